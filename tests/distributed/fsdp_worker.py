"""A hand-written loop with the `Steer` hook on an FSDP2 (`fully_shard`) model, as torchrun starts it.

Rank 0 submits the planned commands through the server in time for fixed iterations (`lead`). The hook's health
metrics measure the gradients (and clip them once a `grad_clip` is set). Every rank writes the full parameters and
optimizer state after each planned boundary, and the true global gradient norm of each step before and after the
optimizer's step pre-hook clipped it, to `DIR/rank<r>.pt`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from protocols.client import Client
from tests.distributed.sharding import full
from tests.distributed.worker import FAST_IO, deliver, lead
from trainer.health import Health
from trainer.steer import Steer, SteerConfig


def global_norm(model: nn.Module) -> float:
    """The norm of the gradients of all shards together, as torch computes it for DTensors."""
    return float(full(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--plan", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    config = SteerConfig(
        server=args.server, run_name="fsdp", checkpoint_dir=args.out / "checkpoints", ring_size=1,
        snapshot_every=2, io=FAST_IO,
    )  # fmt: skip
    plan = {int(iteration): commands for iteration, commands in json.loads(args.plan.read_text()).items()}
    saved: dict[int, Any] = {}
    norms: dict[tuple[str, int], tuple[float, float]] = {}
    health = Health(model)
    with Client(args.server) as client, Steer(model, optimizer, health=health, config=config) as steer:
        for iteration in range(args.steps):
            if rank == 0:
                for command in plan.get(iteration + lead(steer), []):
                    deliver(client, steer, command)
            step = steer.poll(iteration)
            if iteration in plan:
                saved[iteration] = {"model": full(model.state_dict()), "optimizer": full(optimizer.state_dict())}
            generator = torch.Generator().manual_seed(step)
            inputs = torch.randn(8 * world, 16, generator=generator).chunk(world)[rank]
            targets = torch.randn(8 * world, 4, generator=generator).chunk(world)[rank]
            loss = nn.functional.mse_loss(model(inputs), targets)
            loss.backward()
            before = global_norm(model)
            optimizer.step()  # the hook's health metrics measure each shard and clip by the global norm first
            norms[(steer.branch, step)] = (before, global_norm(model))
            optimizer.zero_grad()
            steer.record(step, loss=loss.detach())
        results = [(record.command.type, result.status, result.effective) for record, result in steer.results]
        run_id = steer.run_id
    torch.save({"saved": saved, "norms": norms, "results": results, "run_id": run_id}, args.out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
