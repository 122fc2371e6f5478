"""A trainer stand-in for tests of the server's clients: a real `Client` loop that obeys set_hparams and pause.

It speaks the same protocol as `trainer.Steer` (register, long-poll, results, metrics, heartbeats)
so that tests of scripts, agents and the dashboard do not pay for a model's training steps.
"""

from __future__ import annotations

import threading
import time

from protocols import (
    CommandRecord,
    CommandResult,
    Heartbeat,
    MetricsBatch,
    MetricsSample,
    RunRegistration,
    RunState,
    SetHparams,
)
from protocols.client import Client


class ScriptedTrainer:
    """Steps every `interval_s`, emitting loss/lr/grad_norm; `spikes` maps step → grad_norm to emit."""

    def __init__(
        self,
        server: str,
        *,
        name: str = "scripted",
        lr: float = 0.01,
        interval_s: float = 0.02,
        spikes: dict[int, float] | None = None,
        registration: RunRegistration | None = None,
        token: str | None = None,
    ) -> None:
        self.server = server
        self.token = token
        self.lr = lr
        self.interval_s = interval_s
        self.spikes = spikes or {}
        self.step = 0
        self.paused = False
        self.applied: list[CommandRecord] = []
        self._control = Client(server, token=token)
        self.run_id = self._control.register_run(registration or RunRegistration(name=name)).run_id
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._train, name="scripted-train", daemon=True),
            threading.Thread(target=self._poll, name="scripted-poll", daemon=True),
        ]

    def __enter__(self) -> ScriptedTrainer:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        self._control.close()

    def _state(self) -> RunState:
        return RunState(step=self.step, lr=self.lr, paused=self.paused, optimizer="adamw")

    def _train(self) -> None:
        with Client(self.server, token=self.token) as client:
            while not self._stop.is_set():
                if not self.paused:
                    grad_norm = self.spikes.get(self.step, 1.0 + 0.01 * (self.step % 7))
                    values = {"loss": 3.0 / (1 + self.step / 100), "lr": self.lr, "grad_norm": grad_norm}
                    sample = MetricsSample(step=self.step, time=time.time(), values=values)
                    client.push_metrics(self.run_id, MetricsBatch(samples=[sample]))
                    self.step += 1
                if self.step % 10 == 0 or self.paused:
                    client.push_reports(self.run_id, [Heartbeat(state=self._state())])
                time.sleep(self.interval_s)

    def _poll(self) -> None:
        after = 0
        with Client(self.server, token=self.token) as client:
            while not self._stop.is_set():
                for record in client.next_commands(self.run_id, after_seq=after, wait_s=0.5):
                    after = max(after, record.seq)
                    client.report_result(self.run_id, record.id, self._apply(record))
                    self.applied.append(record)

    def _apply(self, record: CommandRecord) -> CommandResult:
        command = record.command
        if isinstance(command, SetHparams) and command.lr is not None:
            self.lr = command.lr
            return CommandResult(status="applied", step=self.step, effective={"lr": self.lr})
        if command.type in ("pause", "resume"):
            self.paused = command.type == "pause"
            return CommandResult(status="applied", step=self.step, effective={"paused": self.paused})
        return CommandResult(status="rejected", step=self.step, message=f"{command.type} is not scripted")
