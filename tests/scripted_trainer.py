"""A scripted trainer: a thread that speaks the trainer's side of the protocol with plausible metrics, no torch."""

from __future__ import annotations

import math
import threading
import time
from typing import Any

from protocols.client import Client
from protocols.commands import CommandRecord, CommandResult, SetSchedule
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


class ScriptedTrainer(threading.Thread):
    """Registers a run, steps every `step_s`, applies each command it polls and reports the effective values."""

    def __init__(
        self,
        server: str,
        *,
        name: str = "scripted",
        policy: Policy | None = None,
        step_s: float = 0.05,
        nonfinite_at: int | None = None,
        lr: float = 1e-3,
        grad_norm_spikes: dict[int, float] | None = None,
        token: str | None = None,
    ) -> None:
        super().__init__(name=f"scripted-trainer-{name}", daemon=True)
        self.client = Client(server, token=token)
        self.step_s = step_s
        self.nonfinite_at = nonfinite_at
        self.grad_norm_spikes = grad_norm_spikes or {}
        """Steps at which `grad_norm` takes the given value instead of its smooth decay."""
        self.lr = lr
        self.weight_decay = 0.1
        self.grad_clip = 1.0
        self.optimizer = "adamw"
        self.schedule: SetSchedule | None = None
        self.mix = {domain: 1 / len(DOMAINS) for domain in DOMAINS}
        self.step = 0
        self.branch = "main"
        self.paused = False
        self.applied: list[CommandRecord] = []
        self.checkpoints: list[CheckpointInfo] = []
        self._after_seq = 0
        self._halt = threading.Event()
        self.run_id = self.client.register_run(
            RunRegistration(
                name=name,
                domains=DOMAINS,
                policy=policy,
                config={"preset": "scripted"},
            )
        ).run_id

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

    def __enter__(self) -> ScriptedTrainer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the thread and close its client."""
        self._halt.set()
        if self.is_alive():
            self.join(10)
        self.client.close()

    def run(self) -> None:
        """Step, poll, apply, report until closed or stopped."""
        last_heartbeat = 0.0
        samples: list[MetricsSample] = []
        while not self._halt.is_set():
            for record in self.client.next_commands(self.run_id, after_seq=self._after_seq, wait_s=0):
                self._after_seq = max(self._after_seq, record.seq)
                result = self._apply(record)
                self.client.report_result(self.run_id, record.id, result)
                if result.status == "applied":
                    self.applied.append(record)
                if record.command.type == "stop":
                    self.client.push_reports(self.run_id, [StatusReport(status="finished")])
                    return
            if not self.paused:
                self.step += 1
                samples.append(self._sample())
            if samples and (len(samples) >= 5 or self.paused):
                self.client.push_metrics(self.run_id, MetricsBatch(samples=samples))
                samples = []
            now = time.monotonic()
            if now - last_heartbeat > 0.5:
                self.client.push_reports(self.run_id, [Heartbeat(state=self.state())])
                last_heartbeat = now
            time.sleep(self.step_s)

    def _sample(self) -> MetricsSample:
        step = self.step
        loss = 4.0 * math.exp(-step / 300) + 1.2 + 0.05 * math.sin(step)
        values: dict[str, float] = {
            "loss": loss,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "grad_norm": self.grad_norm_spikes.get(step, 1.5 / (1 + step / 200)),
            "param_norm": 40 + step / 100,
            "update_ratio": self.lr * 0.8,
            "logit_max": 8 + step / 50,
            "logit_z": 4 + step / 400,
            "tokens_per_s": 12_000 + 100 * math.sin(step / 7),
            "step_time_ms": 42.0,
            "nonfinite": 0.0,
        }
        values.update({f"grad_norm/block.{block}": 0.5 / (1 + block + step / 300) for block in range(LAYERS)})
        values.update({f"attn_logit_max/{layer}": 5 + layer + step / 80 for layer in range(LAYERS)})
        values.update({f"loss/{domain}": loss + 0.1 * index for index, domain in enumerate(DOMAINS)})
        nonfinite: list[str] = []
        if self.nonfinite_at is not None and step >= self.nonfinite_at:
            del values["loss"]
            values["nonfinite"] = 1.0
            nonfinite = ["loss"]
        return MetricsSample(branch=self.branch, step=step, time=time.time(), values=values, nonfinite=nonfinite)

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
            checkpoint = CheckpointInfo(
                checkpoint_id=f"ck-{self.branch}-{self.step}",
                branch=self.branch,
                step=self.step,
                time=time.time(),
                tag=command.tag,
            )
            self.checkpoints.append(checkpoint)
            self.client.push_reports(self.run_id, [CheckpointSaved(checkpoint=checkpoint)])
            effective = {"checkpoint_id": checkpoint.checkpoint_id}
        elif command.type == "rollback":
            found = [c for c in self.checkpoints if c.checkpoint_id == command.checkpoint_id]
            if not found:
                return CommandResult(status="rejected", step=self.step, message="no such checkpoint")
            self.step = found[0].step
            self.branch = command.branch or f"{found[0].branch}-r{self.step}"
            effective = {"branch": self.branch, "step": self.step}
        elif command.type in ("pause", "resume"):
            self.paused = command.type == "pause"
            self.client.push_reports(self.run_id, [StatusReport(status="paused" if self.paused else "running")])
            effective = {"paused": self.paused}
        elif command.type == "evaluate":
            values = {f"eval_loss/{domain}": 1.5 + 0.1 * index for index, domain in enumerate(DOMAINS)}
            values["eval_loss"] = sum(values.values()) / len(values)
            sample = MetricsSample(branch=self.branch, step=self.step, time=time.time(), values=values)
            self.client.push_metrics(self.run_id, MetricsBatch(samples=[sample]))
            effective = {"eval_loss": values["eval_loss"]}
        elif command.type == "stop":
            effective = {"stopped": True}
        return CommandResult(status="applied", step=self.step, effective=effective)

    def alert(self, message: str, severity: str = "warning") -> None:
        """Raise an alert as a trainer would."""
        self.client.push_reports(self.run_id, [AlertReport(severity=severity, message=message, step=self.step)])
