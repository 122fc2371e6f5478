"""The `Steer` hook: three lines in any PyTorch loop to take commands and report metrics.

```python
with Steer(model, optimizer, scheduler=sched, server="http://127.0.0.1:8765") as steer:
    for step, batch in enumerate(loader):
        step = steer.poll(step)            # applies commands fetched meanwhile; returns the run's step
        loss = train_step(model, optimizer, batch)
        steer.record(step, loss=loss)      # buffered; the I/O threads send it
```

`poll` returns the run's own step, which differs from the loop counter after a rollback (the run goes back to
the checkpoint's step on a new branch); record with the step `poll` returned. `stop` raises `StopTraining`
out of `poll` after the final checkpoint, and the `with` block ends quietly on it.
"""

from __future__ import annotations

import logging
import math
import queue
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import torch
from pydantic import JsonValue
from torch import Tensor, nn

from protocols.client import Client
from protocols.commands import CommandRecord, CommandResult
from protocols.records import (
    CheckpointInfo,
    CheckpointSaved,
    LogReport,
    RunRegistration,
    RunState,
    StatusReport,
)
from trainer.appliers import APPLIERS, CommandRejected
from trainer.checkpoints import CheckpointStore
from trainer.io import FlushItem, IOConfig, IOWorker, ResultItem, SampleItem, Transport
from trainer.optim import group_name, optimizer_name, plan_swap, swap_optimizer
from trainer.schedule import Schedule

log = logging.getLogger("runsteer.trainer")

Evaluator = Callable[[int | None], dict[str, float]]
"""Runs evaluation on at most `max_batches` batches per domain (the run's default for None); returns
`eval_loss` and `eval_loss/<domain>` values."""


class Sampler(Protocol):
    """What `set_data_mix` and rollback need from a data sampler."""

    names: list[str]

    def set_weights(self, weights: dict[str, float]) -> dict[str, float]: ...
    def mix(self) -> dict[str, float]: ...
    def skip(self, batches: int) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class StopTraining(Exception):
    """Raised by `Steer.poll` once a `stop` command was applied; the run is already marked finished."""


@dataclass
class SteerConfig:
    """Everything the hook is configured with; one field per `runsteer train` flag where there is one."""

    server: str = "http://127.0.0.1:8765"
    token: str | None = None
    run_name: str = "run"
    run_id: str | None = None
    """Re-attach to this run (after a trainer restart) instead of registering a new one."""
    branch: str = "main"
    checkpoint_dir: Path | None = None
    """Where checkpoint files go; without it checkpoints live only in the in-memory ring."""
    ring_size: int = 4
    """How many recent snapshots are kept in memory for fast rollback."""
    keep_files: int = 5
    """How many untagged checkpoint files are kept on disk; tagged ones are always kept."""
    snapshot_every: int = 0
    """Take an in-memory snapshot every N steps (0: never), so a rollback has recent targets; with either this or
    `checkpoint_every` on, step 0 is snapshotted in memory too, so the state before any update is a target."""
    checkpoint_every: int = 0
    """Write a checkpoint file every N steps (0: never)."""
    max_commands_per_step: int = 8
    """At most this many commands are applied at one step boundary; the rest wait, in order."""
    grad_clip: float = 0.0
    """Initial gradient clipping threshold the loop reads from `steer.grad_clip` (0: off)."""
    register_timeout_s: float = 5.0
    """How long construction waits for the server to register the run before training on regardless."""
    close_timeout_s: float = 5.0
    """How long closing waits for queued results and metrics to be sent."""
    run_config: dict[str, JsonValue] = field(default_factory=dict)
    """Free-form configuration shown with the run."""
    io: IOConfig = field(default_factory=IOConfig)


class Steer:
    """Applies commands at step boundaries and buffers metrics; all network I/O is on background threads."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        schedule: Schedule | None = None,
        sampler: Sampler | None = None,
        evaluate: Evaluator | None = None,
        server: str | None = None,
        config: SteerConfig | None = None,
        transport_factory: Callable[[], Transport] | None = None,
    ) -> None:
        self.config = config or SteerConfig()
        if server is not None:
            self.config.server = server
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.schedule = schedule
        self.sampler = sampler
        self.evaluator = evaluate
        self.grad_clip = self.config.grad_clip
        self.branch = self.config.branch
        self.branches = {self.branch}
        self.step = 0
        self.paused = False
        self.stopped = False
        self.last_applied_seq = 0
        self.results: deque[tuple[CommandRecord, CommandResult]] = deque(maxlen=1000)
        """The latest commands applied here with their results, newest last."""
        self.checkpoints = CheckpointStore(
            self.config.checkpoint_dir, ring_size=self.config.ring_size, keep_files=self.config.keep_files
        )
        self._offset = 0
        self._pending: deque[CommandRecord] = deque()
        self._healthy_since_checkpoint = True
        self._last_values: dict[str, float] = {}
        self._closed = False
        self._last_periodic: tuple[str, int] | None = None
        factory = transport_factory or (lambda: Client(self.config.server, token=self.config.token))
        domains = list(sampler.names) if sampler is not None else []
        registration = RunRegistration(
            name=self.config.run_name, run_id=self.config.run_id, config=self.config.run_config, domains=domains
        )
        self.io = IOWorker(factory, registration, self.config.io)
        self.io.outbox.put(self.run_state())
        self.io.start()
        if not self.io.registered.wait(self.config.register_timeout_s):
            if self.io.registration_error is not None:
                raise self.io.registration_error
            log.warning("runsteer: server %s not reachable yet; training on and buffering", self.config.server)

    # The three calls of the loop

    def poll(self, step: int) -> int:
        """At the boundary before `step` runs: apply fetched commands in order; returns the run's step."""
        self.step = step + self._offset
        self._take_inbox()
        self._apply_pending()
        while self.paused and not self.stopped:
            try:
                self._pending.append(self.io.inbox.get(timeout=0.05))
            except queue.Empty:
                continue
            self._apply_pending()
        if self.stopped:
            raise StopTraining(f"stopped by command at step {self.step}")
        if self.schedule is not None:
            self._apply_schedule()
        self._periodic_checkpoints()
        return self.step

    def record(self, step: int, loss: float | Tensor | None = None, **values: float | Tensor) -> None:
        """Buffer one step's metrics (a tensor is read with one sync each; pass floats to avoid that)."""
        floats = {name: float(value) for name, value in values.items()}
        if loss is not None:
            floats["loss"] = float(loss)
        if "lr" not in floats:
            floats["lr"] = float(self.optimizer.param_groups[0]["lr"])
        if not all(math.isfinite(value) for value in floats.values()):
            self._healthy_since_checkpoint = False
        self._last_values = floats
        self.io.outbox.put(SampleItem(self.branch, step, time.time(), floats))

    def close(self, status: str = "finished", message: str = "") -> bool:
        """Mark the run finished (or `status`), send what is queued and stop the I/O threads."""
        if self._closed:
            return True
        self._closed = True
        self.checkpoints.close()
        if status != "finished" or not self.stopped:
            self.io.outbox.put(StatusReport(status=status, message=message[:2000]))  # type: ignore[arg-type]
        return self.io.stop(self.config.close_timeout_s)

    def __enter__(self) -> Steer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if kind is None or issubclass(kind, StopTraining):
            self.close("finished")
            return True
        self.close("failed", f"{kind.__name__}: {exc}")
        return False

    # Extras for loops and tests

    @property
    def run_id(self) -> str | None:
        """The server's id for this run, once registered."""
        return self.io.run_info.run_id if self.io.run_info else None

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Block until everything recorded so far was sent; False if that did not happen in time."""
        item = FlushItem()
        self.io.outbox.put(item)
        return item.done.wait(timeout_s)

    def clip_gradients(self) -> float | None:
        """Clip gradients to `grad_clip` when it is on; returns the pre-clip global norm, or None."""
        if self.grad_clip <= 0:
            return None
        return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip))

    def log(self, message: str, level: str = "info") -> None:
        """Send a log line to the server."""
        self.io.outbox.put(LogReport(level=level, message=message[:2000], step=self.step))  # type: ignore[arg-type]

    # State

    def group_names(self) -> list[str]:
        """Names of the optimizer's parameter groups."""
        return [group_name(group, index) for index, group in enumerate(self.optimizer.param_groups)]

    def run_state(self) -> RunState:
        """The settings in force, for heartbeats and the server's view of the run."""
        group = self.optimizer.param_groups[0]
        return RunState(
            step=self.step, branch=self.branch, paused=self.paused, lr=float(group["lr"]),
            weight_decay=float(group.get("weight_decay", 0.0)), grad_clip=self.grad_clip,
            optimizer=optimizer_name(self.optimizer),
            schedule=self.schedule.state() if self.schedule is not None else None,
            data_mix=self.sampler.mix() if self.sampler is not None else {},
            param_groups=self.group_names(),
        )

    def capture(self) -> dict[str, Any]:
        """Everything a checkpoint restores (references; the store copies them)."""
        state: dict[str, Any] = {
            # Parameters as `nn.Parameter`s: the ring copies those off the training thread (see checkpoints.py).
            "model": self.model.state_dict(keep_vars=True),
            "optimizer": self.optimizer.state_dict(),
            "optimizer_name": optimizer_name(self.optimizer) or type(self.optimizer).__name__,
            "schedule": self.schedule.state_dict() if self.schedule is not None else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "sampler": self.sampler.state_dict() if self.sampler is not None else None,
            "rng": {"torch": torch.get_rng_state()},
            "step": self.step,
            "branch": self.branch,
            "hparams": {"grad_clip": self.grad_clip},
            "last_applied_seq": self.last_applied_seq,
        }
        if torch.cuda.is_available():
            state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def restore(self, state: dict[str, Any]) -> None:
        """Load a captured state into the model, optimizer, schedule, sampler and RNG (not the branch)."""
        self.model.load_state_dict(state["model"])
        saved_name = state["optimizer_name"]
        if saved_name != optimizer_name(self.optimizer):
            swap_optimizer(self.optimizer, plan_swap(self.optimizer, saved_name, {}, carry_state=False))
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule = Schedule.from_state_dict(state["schedule"]) if state["schedule"] is not None else None
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.sampler is not None and state["sampler"] is not None:
            self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.grad_clip = float(state["hparams"]["grad_clip"])

    def save_checkpoint(self, tag: str | None = None, *, to_disk: bool = True) -> CheckpointInfo:
        """Snapshot the run now, report it to the server, and report what retention evicted."""
        info, evicted = self.checkpoints.save(
            self.capture(), branch=self.branch, step=self.step, tag=tag, to_disk=to_disk,
            healthy=self._healthy_since_checkpoint,
            metrics={k: v for k, v in self._last_values.items() if math.isfinite(v)},
        )
        self._healthy_since_checkpoint = True
        self.io.outbox.put(CheckpointSaved(checkpoint=info))
        for old in evicted:
            self.io.outbox.put(CheckpointSaved(checkpoint=old, deleted=True))
        return info

    def move_to(self, step: int, branch: str) -> None:
        """Continue as `step` on `branch` (after a rollback); later loop counters map onto it."""
        self._offset += step - self.step
        self.step = step
        self.branch = branch
        self.branches.add(branch)

    def publish_state(self) -> None:
        """Queue the current settings for the next heartbeat."""
        self.io.outbox.put(self.run_state())

    def report_status(self, status: str, message: str = "") -> None:
        """Tell the server the run changed status (paused, running, finished)."""
        self.io.outbox.put(StatusReport(status=status, message=message[:2000]))  # type: ignore[arg-type]

    # Internals

    def _take_inbox(self) -> None:
        while True:
            try:
                self._pending.append(self.io.inbox.get_nowait())
            except queue.Empty:
                return

    def _apply_pending(self) -> None:
        applied = 0
        while self._pending and applied < self.config.max_commands_per_step and not self.stopped:
            record = self._pending.popleft()
            if record.seq <= self.last_applied_seq:
                continue
            self._apply(record)
            applied += 1

    def _apply(self, record: CommandRecord) -> None:
        step = self.step
        try:
            effective = APPLIERS[record.command.type](self, record.command)
            result = CommandResult(status="applied", step=step, effective=effective)
        except CommandRejected as exc:
            result = CommandResult(status="rejected", step=step, message=str(exc)[:2000])
        except Exception as exc:
            log.exception("runsteer: command %s (%s) failed", record.id, record.command.type)
            result = CommandResult(status="failed", step=step, message=f"{type(exc).__name__}: {exc}"[:2000])
        self.last_applied_seq = record.seq
        self.results.append((record, result))
        self.io.outbox.put(ResultItem(record.id, result))
        self.publish_state()

    def _apply_schedule(self) -> None:
        assert self.schedule is not None
        for group, lr in zip(self.optimizer.param_groups, self.schedule.lrs(self.step), strict=True):
            group["lr"] = lr

    def _periodic_checkpoints(self) -> None:
        if (self.branch, self.step) == self._last_periodic:
            return
        if not (self.config.snapshot_every or self.config.checkpoint_every):
            return
        self._last_periodic = (self.branch, self.step)
        if self.step == 0:
            # Step 0 is kept in memory only: the earliest healthy state, for a run that goes wrong before its first
            # periodic snapshot (a learning rate far too high does its damage during warm-up).
            self.save_checkpoint(to_disk=False)
        elif self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0:
            self.save_checkpoint(to_disk=True)
        elif self.config.snapshot_every and self.step % self.config.snapshot_every == 0:
            self.save_checkpoint(to_disk=False)
