"""A Lightning `Trainer` (strategy `ddp`) with `SteerCallback` under torchrun: the callback used unchanged.

Rank 0 hands a learning-rate change to the server at the second step boundary; every rank writes its final
parameters, learning rate and the command's result to `DIR/rank<r>.pt`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from protocols.client import Client
from tests.distributed.worker import FAST_IO, deliver
from tests.trainer.frameworks import byte_domains
from trainer.lightning import SteerCallback
from trainer.steer import SteerConfig


class ByteLM(L.LightningModule):
    """A small next-byte model: embedding, tanh, projection back to the 256 bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, 32)
        self.head = nn.Linear(32, 256)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids = batch["input_ids"]
        logits = self.head(torch.tanh(self.embed(ids[:, :-1])))
        return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class HandOver(L.Callback):
    """On rank 0, submits the learning-rate change at the second boundary (applied at the third, on every rank)."""

    def __init__(self, steering: SteerCallback, client: Client, rank: int) -> None:
        self.steering = steering
        self.client = client
        self.rank = rank

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        steer = self.steering.steer
        if self.rank == 0 and trainer.global_step == 2 and steer is not None:
            deliver(self.client, steer, {"type": "set_hparams", "lr": 5e-4})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    torch.manual_seed(0)
    module = ByteLM()
    steering = SteerCallback(
        server=args.server, config=SteerConfig(run_name="lightning-ddp", checkpoint_dir=args.out / "ck", io=FAST_IO)
    )
    with Client(args.server) as client:
        trainer = L.Trainer(
            max_steps=5, accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(args.out),
            callbacks=[steering, HandOver(steering, client, rank)],
        )  # fmt: skip
        trainer.fit(module, DataLoader(byte_domains()["prose"], batch_size=4))
    steer = steering.steer
    assert steer is not None
    torch.save(
        {
            "model": {key: value.clone() for key, value in module.state_dict().items()},
            "lr": [group["lr"] for group in steer.live.optimizer.param_groups],
            "results": [(r.command.type, res.status, res.step) for r, res in steer.results],
            "run_id": steer.run_id,
        },
        args.out / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main()
