"""Helpers for trainer tests: hand a command to a run at a known step, and drive the built-in loop by hand."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch.overrides import TorchFunctionMode

from protocols.client import Client
from protocols.commands import CommandRecord
from trainer.run import BuiltinRun
from trainer.steer import Steer

SYNC_CALLS = frozenset({"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "__array__"})
"""The calls that bring a device value to the host (each is a host-device sync on CUDA)."""


class TensorCalls(TorchFunctionMode):
    """Records the names of the torch functions and tensor methods called while active (of `only`, when given)."""

    def __init__(self, only: frozenset[str] | None = None) -> None:
        super().__init__()
        self.only = only
        self.calls: list[str] = []

    def __torch_function__(
        self, func: Callable[..., Any], types: Iterable[type], args: Sequence[Any] = (), kwargs: Any = None
    ) -> Any:
        name = getattr(func, "__name__", str(func))
        if self.only is None or name in self.only:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def deliver(client: Client, steer: Steer, command: dict[str, Any], timeout_s: float = 10.0) -> CommandRecord:
    """Submit a command and wait until the trainer's poller has fetched it, so the next `poll` applies it."""
    assert steer.run_id is not None
    before = steer.io.inbox.qsize()
    record = client.submit(steer.run_id, command)
    deadline = time.monotonic() + timeout_s
    while steer.io.inbox.qsize() <= before:
        if time.monotonic() > deadline:
            raise TimeoutError(f"command {record.id} was not delivered within {timeout_s} s")
        time.sleep(0.005)
    return record


def result_of(client: Client, steer: Steer, record: CommandRecord) -> CommandRecord:
    """The command's final record once the trainer's result reached the server."""
    assert steer.run_id is not None
    steer.flush()
    return client.wait_for(steer.run_id, record.id, timeout_s=10.0)


def train(run: BuiltinRun, iterations: range) -> list[float]:
    """Run the built-in loop by hand for these loop iterations; returns the losses."""
    losses = []
    for iteration in iterations:
        step = run.steer.poll(iteration)
        values = run.train_step(step)
        run.steer.record(step, **values)
        losses.append(values["loss"])
    return losses
