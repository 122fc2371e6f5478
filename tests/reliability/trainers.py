"""Drive `tests/reliability/loop.py` as a real trainer process and check its record against the server's."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocols import SetHparams
from protocols.client import Client

REPO = Path(__file__).resolve().parents[2]


@dataclass
class StepLine:
    """One step as the trainer itself recorded it."""

    step: int
    loss: float
    t: float


@dataclass
class TrainerProcess:
    """A `loop.py` process; its stdout lines are collected on a thread as it runs."""

    server: str
    spill: Path
    args: Sequence[str] = ()
    preexec: Callable[[], None] | None = None
    steps: list[StepLine] = field(default_factory=list)
    run_id: str | None = None
    done: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        command = [sys.executable, "-m", "tests.reliability.loop", "--server", self.server, "--spill", str(self.spill)]
        self.log = self.spill.with_suffix(".log")
        with open(self.log, "ab") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [*command, *self.args],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                preexec_fn=self.preexec,
            )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        with self.process.stdout:
            for line in self.process.stdout:
                self._take(json.loads(line))

    def _take(self, fields: dict[str, Any]) -> None:
        if "step" in fields:
            self.steps.append(StepLine(fields["step"], fields["loss"], fields["t"]))
        elif "run_id" in fields:
            self.run_id = fields["run_id"]
        elif "done" in fields:
            self.done = fields

    def wait_step(self, step: int, timeout_s: float = 60.0) -> None:
        """Block until the trainer has finished `step`."""
        deadline = time.monotonic() + timeout_s
        while not self.steps or self.steps[-1].step < step:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"trainer never reached step {step}: {self.stderr()}")
            time.sleep(0.01)

    @property
    def last_step(self) -> int:
        """The latest step the trainer finished (-1 before the first)."""
        return self.steps[-1].step if self.steps else -1

    def finish(self, timeout_s: float = 90.0) -> dict[str, Any]:
        """Wait for the loop to end and return its final report."""
        code = self.process.wait(timeout_s)
        self._reader.join(10)
        assert code == 0 and self.done is not None, f"trainer exited with {code}: {self.stderr()}"
        return self.done

    def stderr(self) -> str:
        """The end of what the trainer logged on stderr."""
        return self.log.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        """SIGKILL the trainer if it still runs, and close its pipe."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)
        self._reader.join(10)

    def longest_pause_s(self) -> float:
        """The longest wall-clock gap between two consecutive steps."""
        return max(later.t - earlier.t for earlier, later in zip(self.steps, self.steps[1:], strict=False))


def submit_lrs(server: str, run_id: str, count: int, start: float) -> list[str]:
    """Submit `count` distinct learning-rate changes; returns their command ids."""
    with Client(server) as client:
        return [client.submit(run_id, SetHparams(lr=start * (index + 1))).id for index in range(count)]


def assert_each_metric_and_command_exactly_once(trainer: TrainerProcess, server: str, commands: list[str]) -> None:
    """The server holds every step the trainer recorded, with its loss, and each command was applied exactly once."""
    done = trainer.finish()
    assert done["sent_all"] and done["lost"] == 0
    assert trainer.run_id is not None
    with Client(server) as client:
        series = client.metrics_history(trainer.run_id, keys=["loss"]).series["loss"]
        records = {record.id: record for record in client.list_commands(trainer.run_id)}
    assert series.steps == [line.step for line in trainer.steps]
    assert series.values == [line.loss for line in trainer.steps]
    applied = [entry["id"] for entry in done["applied"]]
    assert sorted(applied) == sorted(commands), "each command accepted by the server is applied exactly once"
    for entry in done["applied"]:
        record = records[entry["id"]]
        assert (record.status, record.applied_step) == ("applied", entry["step"])
