"""A Lightning `Trainer` with `SteerCallback` under torchrun, on gloo: strategy `ddp`, or with `--fsdp`
`ModelParallelStrategy` with the module's `configure_model` calling `fully_shard` (FSDP2). The callback is used
unchanged.

Rank 0 hands the planned commands of tests/distributed/sharding.py to the server; every rank writes its final state,
learning rates, the commands' results and (FSDP2) its captures and gradient norms to `DIR/rank<r>.pt`.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn import functional as F
from torch.utils.data import DataLoader

from protocols.client import Client
from tests.distributed.sharding import Script, start_worker
from tests.trainer.frameworks import byte_domains
from trainer.lightning import SteerCallback


class ByteLM(L.LightningModule):
    """A small next-byte model: embedding, tanh, projection back to the 256 bytes; sharded layer by layer when
    `sharded`."""

    def __init__(self, sharded: bool) -> None:
        super().__init__()
        self.sharded = sharded
        self.embed = nn.Embedding(256, 32)
        self.head = nn.Linear(32, 256)

    def configure_model(self) -> None:
        if self.sharded:
            mesh = self.device_mesh["data_parallel"]
            for layer in (self.embed, self.head, self):
                fully_shard(layer, mesh=mesh)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids = batch["input_ids"]
        logits = self.head(torch.tanh(self.embed(ids[:, :-1])))
        return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class Follow(L.Callback):
    """Runs the script after the steering callback, at every boundary and before every optimizer step."""

    def __init__(self, steering: SteerCallback, script: Script) -> None:
        self.steering = steering
        self.script = script

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.script.before_optimizer_step(self.steering.steer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.script.boundary(self.steering.steer, pl_module, trainer.optimizers[0])


def main() -> None:
    args = start_worker("ModelParallelStrategy with fully_shard")
    module = ByteLM(sharded=args.fsdp)
    # The update ratio every step: the test compares each step's with one computed from the full tensors.
    steering = SteerCallback(server=args.server, config=args.steer_config("lightning"), update_every=1)
    strategy: Strategy | str = (
        ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if args.fsdp else "ddp"
    )
    with Client(args.server) as client:
        script = Script(client, args.rank, sharded=args.fsdp)
        trainer = L.Trainer(
            max_steps=args.max_steps, accelerator="cpu", devices=2, strategy=strategy, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=str(args.out), callbacks=[steering, Follow(steering, script)],
        )  # fmt: skip
        trainer.fit(module, DataLoader(byte_domains()["prose"], batch_size=4))
    script.save(steering.steer, module, args.out)


if __name__ == "__main__":
    main()
