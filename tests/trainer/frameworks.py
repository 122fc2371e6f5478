"""Byte-level data made here (nothing downloaded) and a step-by-step driver for the framework callback tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from protocols.client import Client
from protocols.commands import CommandRecord
from tests.trainer.helpers import deliver
from trainer.mixture import DomainMixture
from trainer.steer import Steer

BLOCK = 32
"""Tokens per example: bytes, so the vocabulary is 256."""


def _blocks(text: bytes) -> list[dict[str, torch.Tensor]]:
    data = torch.tensor(list(text), dtype=torch.long)
    starts = range(0, len(data) - BLOCK, BLOCK // 2)
    return [{"input_ids": data[s : s + BLOCK], "labels": data[s : s + BLOCK]} for s in starts]


def byte_domains() -> dict[str, list[dict[str, torch.Tensor]]]:
    """Two small domains with different statistics: English prose and sums of numbers."""
    prose = (torch.nn.Module.__doc__ or "") + (torch.optim.Optimizer.__doc__ or "") + (time.__doc__ or "")
    sums = "".join(f"{a}+{b}={a + b};" for a in range(40) for b in range(0, 40, 3))
    return {"prose": _blocks(prose.encode()), "sums": _blocks(sums.encode())}


def mixture(batch_size: int) -> DomainMixture[dict[str, torch.Tensor]]:
    """The two byte domains, equally weighted."""
    return DomainMixture(byte_domains(), batch_size=batch_size, seed=0)


class Script:
    """Runs `actions[n]` at the n-th step boundary (counted from 1), after the steering callback applied commands.

    A command handed over at boundary n is applied at boundary n + 1: `send` waits until the trainer's poller has it.
    """

    def __init__(self, client: Client, steer_of: Callable[[], Steer | None]) -> None:
        self.client = client
        self.steer_of = steer_of
        self.calls = 0
        self.actions: dict[int, Callable[[], None]] = {}
        self.records: dict[str, CommandRecord] = {}

    def at(self, boundary: int, action: Callable[[], None]) -> None:
        """Run `action` at that boundary."""
        self.actions[boundary] = action

    def send(self, name: str, command: dict[str, Any]) -> None:
        """Submit a command now; it is applied at the next boundary."""
        steer = self.steer_of()
        assert steer is not None
        self.records[name] = deliver(self.client, steer, command)

    def boundary(self) -> None:
        """Called by the framework's hook once per step, after the steering callback's."""
        self.calls += 1
        action = self.actions.get(self.calls)
        if action is not None:
            action()

    def result(self, name: str) -> CommandRecord:
        """The final record of a command sent earlier (once the run has ended and sent everything)."""
        steer = self.steer_of()
        assert steer is not None and steer.run_id is not None
        return self.client.wait_for(steer.run_id, self.records[name].id, timeout_s=10.0)
