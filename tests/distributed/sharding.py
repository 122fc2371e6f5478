"""What the framework workers share: planned commands at step boundaries, and under FSDP2 the full state and each
step's global gradient norm, parameter norm and update ratio (collectives every rank makes in the same order)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from protocols.client import Client
from tests.distributed.worker import FAST_IO, deliver, lead
from trainer.steer import Steer, SteerConfig

FSDP_PLAN: dict[int, list[dict[str, Any]]] = {
    2: [{"type": "set_hparams", "lr": 5e-4}, {"type": "save_checkpoint", "tag": "sharded"}],
    3: [{"type": "save_checkpoint"}],
    4: [{"type": "rollback", "step": 3}],
    6: [{"type": "rollback", "step": 4}],
}
"""By boundary (counted from 1), each applied at the next (handed over `lead` boundaries earlier): a learning-rate
change and a sharded save at step 3, a later save at step 4 (so only the file still holds step 3), a rollback to
step 3 at the fifth boundary (from the DCP directory), and at the seventh a rollback to the new branch's step-4
snapshot (from each rank's ring)."""
CAPTURED = (3, 5, 6, 7)
"""The boundaries after which the FSDP2 workers keep the full state: each checkpoint taken and the rollback to it."""
DDP_PLAN: dict[int, list[dict[str, Any]]] = {2: [{"type": "set_hparams", "lr": 5e-4}]}


@dataclass(frozen=True)
class Worker:
    """A framework worker's command line and rank, and what follows from them."""

    server: str
    out: Path
    fsdp: bool
    rank: int

    @property
    def max_steps(self) -> int:
        """One step past the FSDP2 plan's last rollback; the DDP plan needs fewer."""
        return 6 if self.fsdp else 5

    def steer_config(self, framework: str) -> SteerConfig:
        """Checkpoints under `--out`, a one-snapshot ring, a snapshot every 2 steps, fast I/O."""
        return SteerConfig(
            run_name=f"{framework}-{'fsdp' if self.fsdp else 'ddp'}", checkpoint_dir=self.out / "ck", ring_size=1,
            snapshot_every=2, io=FAST_IO,
        )  # fmt: skip


def start_worker(fsdp_means: str) -> Worker:
    """Parse `--server`, `--out` and `--fsdp` (described by `fsdp_means`), then seed and use one thread per rank."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fsdp", action="store_true", help=f"{fsdp_means} instead of DDP")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    return Worker(args.server, args.out, args.fsdp, int(os.environ["RANK"]))


def full(state: Any) -> Any:
    """A nested state with every DTensor gathered into a plain tensor (a collective on every rank)."""
    if isinstance(state, DTensor):
        return state.full_tensor()
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, dict):
        return {key: full(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return [full(value) for value in state]
    return state


class Script:
    """Called by a framework callback placed after `SteerCallback`: rank 0 hands the plan's commands to the server
    in time for their boundary (applied at the next one, on every rank); every rank keeps the full state right
    after a boundary that applied commands, and each step's global gradient norm, parameter norm and update ratio
    computed directly from the full tensors."""

    def __init__(self, client: Client, rank: int, *, sharded: bool) -> None:
        self.client = client
        self.rank = rank
        self.sharded = sharded
        self.plan = FSDP_PLAN if sharded else DDP_PLAN
        self.boundaries = 0
        self.captured: dict[int, dict[str, Any]] = {}
        """Boundary number: full model and optimizer state once the commands given at the one before applied."""
        self.direct: dict[tuple[str, int], dict[str, float]] = {}
        """(branch, step): that step's `grad_norm`, `param_norm` and `update_ratio` over the full tensors."""
        self._before: tuple[tuple[str, int], list[torch.Tensor]] | None = None

    def before_optimizer_step(self, steer: Steer | None, model: nn.Module) -> None:
        """Gradients are final: their global norm, and the parameters before the update, computed without runsteer."""
        if steer is None or not self.sharded:
            return
        total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        key = (steer.branch, steer.step)
        self.direct[key] = {"grad_norm": float(full(total))}
        self._before = (key, [full(param.detach()) for param in model.parameters()])

    def boundary(self, steer: Steer | None, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """After the steering callback's boundary: the update of the step just done (unless a rollback replaced
        the parameters), then the captures and the commands due."""
        assert steer is not None
        self.boundaries += 1
        if self._before is not None and self._before[0][0] == steer.branch:
            (key, before), after = self._before, [full(param.detach()) for param in model.parameters()]
            param_norm = float(torch.cat([p.flatten() for p in after]).norm())
            update = float(torch.cat([(a - b).flatten() for a, b in zip(after, before, strict=True)]).norm())
            self.direct[key].update(param_norm=param_norm, update_ratio=update / (param_norm + 1e-12))
        self._before = None
        if self.sharded and self.boundaries in CAPTURED:
            self.captured[self.boundaries] = {
                "model": full(model.state_dict()),
                "optimizer": full(optimizer.state_dict()),
            }
        if self.rank == 0:
            for command in self.plan.get(self.boundaries + lead(steer), []):
                deliver(self.client, steer, command)

    def save(self, steer: Steer | None, model: nn.Module, out: Path) -> None:
        """Every rank writes what the test compares to `out/rank<r>.pt`."""
        assert steer is not None
        optimizer = steer.live.optimizer
        torch.save(
            {
                "model": full(model.state_dict()),
                "optimizer": full(optimizer.state_dict()),
                "lr": [group["lr"] for group in optimizer.param_groups],
                "results": [(r.command.type, res.status, res.step) for r, res in steer.results],
                "effective": [res.effective for _, res in steer.results],
                "captured": self.captured,
                "direct": self.direct,
                "run_id": steer.run_id,
                "branch": steer.branch,
            },
            out / f"rank{self.rank}.pt",
        )
