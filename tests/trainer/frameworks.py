"""Byte-level data made here (nothing downloaded) and a step-by-step driver for the framework callback tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

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


def tiny_gpt2() -> Any:
    """A 2-layer GPT-2 of width 32 over bytes, built from its config (transformers imported only by the HF tests)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(
        GPT2Config(vocab_size=256, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    )


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


class Closable(Protocol):
    def close(self) -> None: ...


S = TypeVar("S", bound=Closable)


def built_and_closed(build: Callable[[int], S]) -> Iterator[Callable[[int], S]]:
    """A fixture body: hands out `build(max_steps)` and closes everything it built when the test ends."""
    made: list[S] = []

    def make(max_steps: int) -> S:
        made.append(build(max_steps))
        return made[-1]

    yield make
    for each in made:
        each.close()


def resume_after_a_heartbeat(
    client: Client, steer_of: Callable[[], Steer | None], step_of: Callable[[], int], seen: dict[str, Any]
) -> threading.Thread:
    """From another thread: wait for the pause, see a heartbeat arrive and the step held while paused, then resume."""

    def watch() -> None:
        deadline = time.monotonic() + 20
        steer = steer_of()
        assert steer is not None and steer.run_id is not None
        while not steer.live.paused and time.monotonic() < deadline:
            time.sleep(0.02)
        step, run_id = step_of(), steer.run_id
        first = client.get_run(run_id).last_heartbeat
        while client.get_run(run_id).last_heartbeat == first and time.monotonic() < deadline:
            time.sleep(0.1)
        seen["heartbeat_while_paused"] = client.get_run(run_id).last_heartbeat != first
        seen["held"] = step_of() == step and client.get_run(run_id).status == "paused"
        client.submit(run_id, {"type": "resume"})

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def metrics_of(client: Client, steer: Steer | None, branch: str = "main") -> dict[str, dict[int, float]]:
    """Every metric the server stored for the run on `branch`, as {name: {step: value}}."""
    assert steer is not None and steer.run_id is not None
    history = client.metrics_history(steer.run_id, branch=branch)
    return {name: dict(zip(s.steps, s.values, strict=True)) for name, s in history.series.items()}
