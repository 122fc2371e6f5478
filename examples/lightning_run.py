"""Train a small byte-level model with PyTorch Lightning, steered live by runsteer through one callback.

python examples/lightning_run.py [--server http://127.0.0.1:8765] [--steps 300]

Start the demo (`python3 dev.py demo`) first, then watch and steer this run from the dashboard like any other.
`training_step` returns the loss, which the callback records at every step; `validation_step` logs `val_loss`,
which an `evaluate` command runs and reports.
"""

import argparse

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from trainer.data import arithmetic_domain, code_domain, prose_domain
from trainer.lightning import SteerCallback
from trainer.mixture import DomainMixture
from trainer.steer import SteerConfig

BLOCK = 64


class ByteLM(L.LightningModule):
    """Next-byte prediction with a one-layer GRU."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = steps
        self.embed = nn.Embedding(256, 128)
        self.rnn = nn.GRU(128, 128, batch_first=True)
        self.head = nn.Linear(128, 256)

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.rnn(self.embed(ids[:, :-1]))
        return F.cross_entropy(self.head(hidden).flatten(0, 1), ids[:, 1:].flatten())

    def training_step(self, ids: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.loss(ids)

    def validation_step(self, ids: torch.Tensor, batch_idx: int) -> None:
        self.log("val_loss", self.loss(ids))

    def configure_optimizers(self):  # noqa: ANN201
        optimizer = torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.1)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="http://127.0.0.1:8765")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.manual_seed(0)
    domains = [prose_domain(200_000), code_domain(200_000), arithmetic_domain(200_000)]
    mixture = DomainMixture({d.name: d.blocks(BLOCK) for d in domains}, batch_size=16, seed=0)
    held_out = [b for d in domains for b in d.blocks(BLOCK, "eval")[:16]]
    callback = SteerCallback(
        server=args.server, sampler=mixture, config=SteerConfig(run_name="lightning-run", snapshot_every=25)
    )
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=4,
        val_check_interval=100,
        check_val_every_n_epoch=None,
        gradient_clip_val=1.0,
        callbacks=[callback],  # the one line that makes the run steerable
    )
    trainer.fit(ByteLM(args.steps), DataLoader(mixture, batch_size=16), DataLoader(held_out, batch_size=16))
    print(f"run {callback.steer.run_id if callback.steer else '-'}: {trainer.global_step} steps")


if __name__ == "__main__":
    main()
