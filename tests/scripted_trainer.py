"""The one scripted trainer of the tests: threads that speak the trainer's side of the protocol, with no torch.

It does what the real trainer does on the wire: registers, sends metric batches and heartbeats, long-polls commands
on its own connection, applies each in `seq` order and answers it, and names a rollback's branch with the same
function the real trainer uses (`protocols.commands.rollback_branch`). Its metrics follow a plausible curve.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

from protocols.client import Client
from protocols.client.core import Backoff
from protocols.commands import CommandRecord, CommandResult, Rollback, SetSchedule, rollback_branch
from protocols.errors import RunsteerError
from protocols.policy import Policy
from protocols.records import (
    AlertReport,
    CheckpointInfo,
    CheckpointSaved,
    Heartbeat,
    MetricsBatch,
    MetricsSample,
    RunRegistration,
    RunState,
    StatusReport,
)

DOMAINS = ["prose", "code", "arithmetic"]
LAYERS = 2
HEARTBEAT_EVERY_S = 0.5
BATCH = 5
"""Samples per metrics batch, as the real trainer's sender groups them."""

Loss = Callable[[str, int], float]
"""The loss reported at (branch, step)."""


def falling_loss(branch: str, step: int) -> float:
    """A loss that falls quickly and then slowly, with a little wiggle."""
    return 4.0 * math.exp(-step / 300) + 1.2 + 0.05 * math.sin(step)


class ScriptedTrainer:
    """Registers a run on construction; `start()` begins stepping every `step_s` and answering commands."""

    def __init__(
        self,
        server: str,
        *,
        name: str = "scripted",
        policy: Policy | None = None,
        token: str | None = None,
        domains: list[str] | None = None,
        lr: float = 1e-3,
        step_s: float = 0.05,
        steps: int | None = None,
        loss: Loss = falling_loss,
        health: bool = True,
        snapshot_every: int | None = None,
        hold_at: int | None = None,
        nonfinite_at: int | None = None,
        grad_norm_spikes: dict[int, float] | None = None,
    ) -> None:
        self.client = Client(server, token=token)
        self.poller = Client(server, token=token)
        """The long-poll has its own connection, as the real trainer's I/O thread does."""
        self.step_s, self.steps, self.loss, self.health = step_s, steps, loss, health
        self.snapshot_every, self.hold_at, self.nonfinite_at = snapshot_every, hold_at, nonfinite_at
        self.grad_norm_spikes = grad_norm_spikes or {}
        """Steps at which `grad_norm` takes the given value instead of its smooth decay."""
        self.domains = domains or DOMAINS
        self.lr, self.weight_decay, self.grad_clip, self.optimizer = lr, 0.1, 1.0, "adamw"
        self.schedule: SetSchedule | None = None
        self.mix = {domain: 1 / len(self.domains) for domain in self.domains}
        self.step, self.branch, self.branches, self.paused = 0, "main", {"main"}, False
        self.applied: list[CommandRecord] = []
        self.checkpoints: dict[str, CheckpointInfo] = {}
        self._lock = threading.Lock()
        self._halt, self._released = threading.Event(), threading.Event()
        registration = RunRegistration(name=name, domains=self.domains, policy=policy, config={"preset": "scripted"})
        self.run_id = self.client.register_run(registration).run_id
        self._threads = [
            threading.Thread(target=self._train, name=f"scripted-train-{name}", daemon=True),
            threading.Thread(target=self._poll, name=f"scripted-poll-{name}", daemon=True),
        ]

    def start(self) -> ScriptedTrainer:
        """Start stepping and answering commands."""
        self._heartbeat()
        for thread in self._threads:
            thread.start()
        return self

    def release(self) -> None:
        """Let a trainer held at `hold_at` go on."""
        self._released.set()

    def close(self) -> None:
        """Stop both threads and close the clients."""
        self._halt.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(10)
        self.client.close()
        self.poller.close()

    def __enter__(self) -> ScriptedTrainer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def latest_checkpoint(self) -> CheckpointInfo:
        """The checkpoint saved last."""
        return list(self.checkpoints.values())[-1]

    def state(self) -> RunState:
        """What a heartbeat reports."""
        return RunState(
            step=self.step,
            branch=self.branch,
            paused=self.paused,
            lr=self.lr,
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
            optimizer=self.optimizer,
            data_mix=self.mix,
            param_groups=["decay", "no_decay"],
        )

    def alert(self, message: str, severity: str = "warning") -> None:
        """Raise an alert as a trainer would."""
        self._send(lambda: self.client.push_reports(self.run_id, [AlertReport(severity=severity, message=message)]))

    def _send(self, call: Callable[[], Any]) -> None:
        """Retry a call while the server is away, as the real trainer's sender does, until closed."""
        backoff = Backoff(0.05, 0.5)
        while not self._halt.is_set():
            try:
                call()
                return
            except (RunsteerError, OSError):
                self._halt.wait(backoff.next_delay())

    def _heartbeat(self) -> None:
        self._send(lambda: self.client.push_reports(self.run_id, [Heartbeat(state=self.state())]))

    def _train(self) -> None:
        samples: list[MetricsSample] = []
        last_heartbeat = time.monotonic()
        while not self._halt.is_set() and (self.steps is None or self.step < self.steps):
            held = self.hold_at is not None and self.step >= self.hold_at and not self._released.is_set()
            with self._lock:
                stepping = not (held or self.paused)
                if stepping:
                    self.step += 1
                    samples.append(self._sample())
                    snapshot = self.snapshot_every is not None and self.step % self.snapshot_every == 0
            if stepping and snapshot:
                self._checkpoint(tag=None)
            if samples and (len(samples) >= BATCH or not stepping):
                batch = MetricsBatch(samples=samples)
                self._send(lambda: self.client.push_metrics(self.run_id, batch))  # noqa: B023
                samples = []
            if time.monotonic() - last_heartbeat > HEARTBEAT_EVERY_S:
                self._heartbeat()
                last_heartbeat = time.monotonic()
            time.sleep(self.step_s)
        if samples:
            batch = MetricsBatch(samples=samples)
            self._send(lambda: self.client.push_metrics(self.run_id, batch))

    def _poll(self) -> None:
        after = 0
        backoff = Backoff(0.05, 0.5)
        while not self._halt.is_set():
            try:
                records = self.poller.next_commands(self.run_id, after_seq=after, wait_s=0.5)
                backoff.reset()
            except (RunsteerError, OSError):
                self._halt.wait(backoff.next_delay())
                continue
            for record in records:
                after = max(after, record.seq)
                with self._lock:
                    result = self._apply(record)
                self._send(lambda: self.poller.report_result(self.run_id, record.id, result))  # noqa: B023
                if result.status == "applied":
                    self.applied.append(record)
                if record.command.type == "stop" and result.status == "applied":
                    self._send(lambda: self.poller.push_reports(self.run_id, [StatusReport(status="finished")]))
                    self._halt.set()
                    return
                self._send(lambda: self.poller.push_reports(self.run_id, [Heartbeat(state=self.state())]))

    def _sample(self) -> MetricsSample:
        step, branch = self.step, self.branch
        loss = self.loss(branch, step)
        values: dict[str, float] = {
            "loss": loss,
            "lr": self.lr,
            "grad_norm": self.grad_norm_spikes.get(step, 1.5 / (1 + step / 200)),
        }
        if self.health:
            values |= {
                "weight_decay": self.weight_decay,
                "param_norm": 40 + step / 100,
                "update_ratio": self.lr * 0.8,
                "logit_max": 8 + step / 50,
                "logit_z": 4 + step / 400,
                "tokens_per_s": 12_000 + 100 * math.sin(step / 7),
                "step_time_ms": 42.0,
                "nonfinite": 0.0,
            }
            values |= {f"grad_norm/block.{block}": 0.5 / (1 + block + step / 300) for block in range(LAYERS)}
            values |= {f"attn_logit_max/{layer}": 5 + layer + step / 80 for layer in range(LAYERS)}
            values |= {f"loss/{domain}": loss + 0.1 * index for index, domain in enumerate(self.domains)}
        nonfinite: list[str] = []
        if self.nonfinite_at is not None and step >= self.nonfinite_at:
            del values["loss"]
            values["nonfinite"] = 1.0
            nonfinite = ["loss"]
        return MetricsSample(branch=branch, step=step, time=time.time(), values=values, nonfinite=nonfinite)

    def _checkpoint(self, tag: str | None) -> CheckpointInfo:
        checkpoint = CheckpointInfo(
            checkpoint_id=f"{self.branch}-{self.step}", branch=self.branch, step=self.step, time=time.time(), tag=tag
        )
        self.checkpoints[checkpoint.checkpoint_id] = checkpoint
        self._send(lambda: self.client.push_reports(self.run_id, [CheckpointSaved(checkpoint=checkpoint)]))
        return checkpoint

    def _rollback_target(self, command: Rollback) -> CheckpointInfo | str:
        """The checkpoint a rollback asks for, or why there is none (the real trainer's rules)."""
        if command.step is not None and command.step > self.step:
            return f"step {command.step} is beyond the run's current step {self.step}"
        infos = list(self.checkpoints.values())
        if command.checkpoint_id is not None:
            found = self.checkpoints.get(command.checkpoint_id)
        elif command.step is not None:
            before = [info for info in infos if info.branch == self.branch and info.step <= command.step]
            found = max(before, key=lambda info: info.step, default=None)
        else:
            found = max((info for info in infos if info.healthy), key=lambda info: info.time, default=None)
        return found if found is not None else "no such checkpoint"

    def _apply(self, record: CommandRecord) -> CommandResult:
        command = record.command
        effective: dict[str, Any] = {}
        if command.type == "set_hparams":
            if command.lr is not None and command.lr > 0.5:
                return CommandResult(status="rejected", step=self.step, message="lr above 0.5 diverges this model")
            self.lr = command.lr if command.lr is not None else self.lr
            self.weight_decay = command.weight_decay if command.weight_decay is not None else self.weight_decay
            self.grad_clip = command.grad_clip if command.grad_clip is not None else self.grad_clip
            effective = {"lr": self.lr, "weight_decay": self.weight_decay, "grad_clip": self.grad_clip}
        elif command.type == "set_schedule":
            self.schedule = command
            effective = {"schedule": command.kind, "horizon_steps": command.horizon_steps}
        elif command.type == "set_optimizer":
            self.optimizer = command.name
            effective = {"optimizer": self.optimizer, "carried": ["exp_avg"] if command.carry_state else []}
        elif command.type == "set_data_mix":
            merged = {**self.mix, **command.weights}
            total = sum(merged.values())
            self.mix = {domain: weight / total for domain, weight in merged.items()}
            effective = {"data_mix": dict(self.mix)}
        elif command.type == "save_checkpoint":
            effective = {"checkpoint_id": self._checkpoint(command.tag).checkpoint_id}
        elif command.type == "rollback":
            target = self._rollback_target(command)
            if isinstance(target, str):
                return CommandResult(status="rejected", step=self.step, message=target)
            if command.branch is not None and command.branch in self.branches:
                message = f"branch {command.branch!r} already exists; name a new one"
                return CommandResult(status="rejected", step=self.step, message=message)
            old_branch, old_step = self.branch, self.step
            self.branch = command.branch or rollback_branch(old_branch, target.step, self.branches)
            self.branches.add(self.branch)
            self.step = target.step
            effective = {
                "checkpoint_id": target.checkpoint_id,
                "step": target.step,
                "branch": self.branch,
                "from_branch": old_branch,
                "from_step": old_step,
                "skipped_batches": command.skip_batches,
                "source": "memory",
                "restore_ms": 0.0,
            }
            return CommandResult(status="applied", step=old_step, effective=effective)
        elif command.type in ("pause", "resume"):
            if self.paused == (command.type == "pause"):
                message = "the run is already paused" if self.paused else "the run is not paused"
                return CommandResult(status="rejected", step=self.step, message=message)
            self.paused = command.type == "pause"
            status = StatusReport(status="paused" if self.paused else "running")
            self._send(lambda: self.client.push_reports(self.run_id, [status]))
            effective = {"paused": self.paused}
        elif command.type == "evaluate":
            values = {f"eval_loss/{domain}": 1.5 + 0.1 * index for index, domain in enumerate(self.domains)}
            values["eval_loss"] = sum(values.values()) / len(values)
            sample = MetricsSample(branch=self.branch, step=self.step, time=time.time(), values=values)
            self._send(lambda: self.client.push_metrics(self.run_id, MetricsBatch(samples=[sample])))
            effective = {"eval_loss": values["eval_loss"]}
        elif command.type == "stop":
            effective = {"stopped": True}
        return CommandResult(status="applied", step=self.step, effective=effective)
