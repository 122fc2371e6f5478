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

import contextlib
import logging
import queue
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import torch
from pydantic import JsonValue
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from protocols.client import Client
from protocols.commands import CommandRecord, CommandResult
from protocols.errors import RunsteerError
from protocols.records import CheckpointInfo, LogReport, RunRegistration, StatusReport
from trainer.appliers import apply_command
from trainer.checkpoints import CheckpointStore
from trainer.distributed import DistributedConfig, FollowerIO, Meeting, RankCheckpoints, Ranks, Sample
from trainer.health import Health
from trainer.io import FlushItem, IOConfig, IOWorker, OutItem, ResultItem, Transport
from trainer.live import Evaluator, LiveRun, Sampler
from trainer.metrics import HostValues, as_floats
from trainer.schedule import Schedule

log = logging.getLogger("runsteer.trainer")


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
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """The side channel between ranks under torchrun (unused in one process)."""


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
        health: Health | None = None,
        server: str | None = None,
        config: SteerConfig | None = None,
        transport_factory: Callable[[], Transport] | None = None,
    ) -> None:
        self.config = config or SteerConfig()
        if server is not None:
            self.config.server = server
        self.results: deque[tuple[CommandRecord, CommandResult]] = deque(maxlen=1000)
        """The latest commands applied here with their results, newest last."""
        self.ranks = Ranks.detect(model, self.config.distributed)
        """The side channel to the other ranks under torchrun; None in one process."""
        checkpoints = (
            CheckpointStore(
                self.config.checkpoint_dir, ring_size=self.config.ring_size, keep_files=self.config.keep_files
            )
            if self.ranks is None
            else RankCheckpoints(
                self.ranks,
                self.config.checkpoint_dir,
                ring_size=self.config.ring_size,
                keep_files=self.config.keep_files,
                live_state=lambda: self.live.capture(),
            )
        )
        self.live = LiveRun(
            model,
            optimizer,
            checkpoints=checkpoints,
            emit=self._emit,
            scheduler=scheduler,
            schedule=schedule,
            sampler=sampler,
            evaluate=evaluate,
            grad_clip=self.config.grad_clip,
            branch=self.config.branch,
        )
        """The run's live parts, which commands change."""
        self._offset = 0
        self._pending: deque[CommandRecord] = deque()
        self._unreduced: list[Sample] = []
        self._meeting: Meeting | None = None
        """Under torchrun, the collective issued at the last boundary, awaited at the next."""
        self._announced: list[CommandRecord] | None = None
        """Under torchrun, once that collective is finished: the commands it announced, applied at this boundary on
        every rank (rank 0's records; an empty list elsewhere, whose ranks learn them from rank 0), or None."""
        self._closed = False
        self._last_periodic: tuple[str, int] | None = None
        self._unread: tuple[int, HostValues] | None = None
        """In one process, the last step's health values still on their way to the host (see `record_values`)."""
        self.health = health
        """With one, every `record` adds the model's health metrics (trainer/health.py) in the same transfer, and the
        optimizer clips to `grad_clip` by itself (in its step pre-hook)."""
        self._health_hooks: list[RemovableHandle] = []
        if health is not None:
            self._health_hooks = self._watch(health, model, optimizer)
        factory = transport_factory or (lambda: Client(self.config.server, token=self.config.token))
        domains = list(sampler.names) if sampler is not None else []
        registration = RunRegistration(
            name=self.config.run_name, run_id=self.config.run_id, config=self.config.run_config, domains=domains
        )
        self.io: IOWorker | FollowerIO
        if self.ranks is None or self.ranks.leader:
            self.io = IOWorker(factory, registration, self.config.io)
            self.io.outbox.put(self.live.run_state())
            self.io.start()
            if not self.io.registered.wait(self.config.register_timeout_s):
                if self.io.registration_error is not None:
                    raise self.io.registration_error
                log.warning("runsteer: server %s not reachable yet; training on and buffering", self.config.server)
        if self.ranks is not None:
            # Rank 0 alone talks to the server; the others learn the run's id from it.
            run_info = self.ranks.share(self.io.run_info if self.ranks.leader else None)
            if not self.ranks.leader:
                self.io = FollowerIO(run_info)
        # Samples need no wake-up: the sender takes them on its own timer.
        self.live.emit_sample = self.io.samples.append

    # The three calls of the loop

    def poll(self, step: int) -> int:
        """At the boundary before loop iteration `step`: apply fetched commands in order; returns the run's step."""
        return self.boundary(step + self._offset)

    def boundary(self, step: int) -> int:
        """At the boundary before the run's own `step` runs (a framework keeps the count and rollback moves it):
        apply fetched commands in order, hold while paused; returns the run's step, raises `StopTraining` on stop."""
        live = self.live
        live.step = step
        # The common case, nothing fetched, not paused and one process, is tested here with one call at most: this
        # runs every step.
        if self.ranks is not None:
            self._meet()
        if self.ranks is not None or self._pending or live.paused or live.stopped or not self.io.inbox.empty():
            step = self._take_commands(step)
        live.apply_schedule()
        to_disk = self._periodic_checkpoint_due(step)
        if to_disk is not None and (live.branch, step) != self._last_periodic:
            self._last_periodic = (live.branch, step)
            self._read_unread()  # a checkpoint is unhealthy if the values before it were not finite
            live.save_checkpoint(to_disk=to_disk)
        if self.health is not None:
            self.health.begin_step(step)
        if self.ranks is not None:
            self._announce()
        return step

    def record(self, step: int, /, **values: float | Tensor) -> None:
        """Buffer one step's metrics, such as `loss=` (a tensor is read with one sync each; with `health`, all in one
        transfer, read a step later). `step` is positional only, so that Python matches no keyword against it: a
        call passing many values costs less."""
        given = values  # a fresh dict (the keyword arguments), which this call may change
        if "lr" not in given:
            given["lr"] = float(self.live.optimizer.param_groups[0]["lr"])
        if self.health is not None:
            self.record_values(step, self.health.finish_step(**given))
            return
        self._read_unread()  # samples go out in the order they were recorded (the first value of a step wins)
        finite = as_floats(given)
        floats = cast("dict[str, float]", given)
        if self.ranks is not None:
            # Reduced across ranks in the collective the next boundary issues anyway (see `_meet`).
            self._unreduced.append((step, floats))
            return
        self.live.record(step, floats, finite)

    def record_values(self, step: int, values: HostValues) -> None:
        """Buffer one step's values gathered by `Health.finish_step`. In one process they are read at the next
        record, or sooner when a command, a checkpoint or the end needs them: on CUDA their copy has landed by then,
        so the loop never waits for the GPU to finish a step. Under torchrun they are read now (reduced in the
        collective the next boundary issues, see `_meet`)."""
        self._read_unread()
        if self.ranks is None:
            self._unread = (step, values)
        else:
            self._unreduced.append((step, values.read()))

    def close(self, status: str = "finished", message: str = "") -> bool:
        """Mark the run finished (or `status`), send what is queued and stop the I/O threads."""
        if self._closed:
            return True
        self._closed = True
        self._read_unread()
        if self.ranks is not None and status == "finished":
            try:
                self._settle()  # every rank ends here alike: the last steps' metrics go out reduced
            except RuntimeError as exc:
                log.warning("runsteer: the last metrics could not be reduced across ranks: %s", exc)
        leftover = [*self._meeting.samples, *self._unreduced] if self._meeting is not None else self._unreduced
        for step, values in leftover:  # a rank failed: no collective; rank 0 reports its own values
            self.live.record(step, values)
        if self.ranks is not None:
            self.ranks.close()
        for handle in self._health_hooks:
            handle.remove()
        self.live.checkpoints.close()
        if status != "finished" or not self.live.stopped:
            self.io.outbox.put(StatusReport(status=status, message=message[:2000]))  # type: ignore[arg-type]
        return self.io.stop(self.config.close_timeout_s)

    def __enter__(self) -> Steer:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
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

    @property
    def registration_error(self) -> RunsteerError | None:
        """The server's refusal of this run (a wrong token, another protocol version) when it refused it after
        start-up: training goes on, nothing reaches the server, and metrics spill within their memory bound."""
        return self.io.registration_error if isinstance(self.io, IOWorker) else None

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Block until everything recorded so far was sent; False if that did not happen in time (under torchrun,
        values recorded since the last boundary are reduced and sent at the boundary after the next, see `_meet`)."""
        self._read_unread()
        item = FlushItem()
        self.io.outbox.put(item)
        return item.done.wait(timeout_s)

    def clip_gradients(self) -> float | None:
        """Clip gradients to `grad_clip` when it is on; returns the pre-clip global norm, or None."""
        if self.live.grad_clip <= 0:
            return None
        return float(torch.nn.utils.clip_grad_norm_(self.live.model.parameters(), self.live.grad_clip))

    def log(self, message: str, level: str = "info") -> None:
        """Send a log line to the server."""
        self.io.outbox.put(LogReport(level=level, message=message[:2000], step=self.live.step))  # type: ignore[arg-type]

    def save_checkpoint(self, tag: str | None = None, *, to_disk: bool = True) -> CheckpointInfo:
        """Snapshot the run now and report it to the server (under torchrun, call it on every rank alike: the values
        recorded before it are reduced first, so the checkpoint knows whether they were finite)."""
        self._read_unread()
        if self.ranks is not None:
            self._settle()
        return self.live.save_checkpoint(tag, to_disk=to_disk)

    # What loops read of the live run

    @property
    def step(self) -> int:
        """The run's step (after a rollback, the checkpoint's step and on from there)."""
        return self.live.step

    @property
    def branch(self) -> str:
        """The branch the run is on."""
        return self.live.branch

    @property
    def grad_clip(self) -> float:
        """The gradient clipping threshold in force (0: off)."""
        return self.live.grad_clip

    @property
    def model(self) -> nn.Module:
        """The model being trained."""
        return self.live.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer (the same object after a swap)."""
        return self.live.optimizer

    @property
    def checkpoints(self) -> CheckpointStore:
        """The checkpoint ring and files."""
        return self.live.checkpoints

    @property
    def branches(self) -> set[str]:
        """Every branch this run has been on."""
        return self.live.branches

    # Internals

    def _take_commands(self, step: int) -> int:
        """Apply the commands due at the boundary before `step`, hold while paused; returns the run's step (moved by a
        rollback), raises `StopTraining` on stop."""
        live = self.live
        if self.ranks is None:  # under torchrun `_meet` applied what was due
            self._read_unread()  # a command (a rollback, a pause) acts after the last step's values are recorded
            self._apply_due(0.0)
        if live.paused:
            wait_s = 0.05 if self.ranks is None else self.ranks.config.pause_slice_s
            while live.paused and not live.stopped:
                self._apply_due(wait_s)
        self._offset += live.step - step
        if live.stopped:
            raise StopTraining(f"stopped by command at step {live.step}")
        return live.step

    def _periodic_checkpoint_due(self, step: int) -> bool | None:
        """Whether `step` is due for a periodic file (True) or in-memory snapshot (False), or neither (None).

        Step 0 is kept in memory only: the earliest healthy state, for a run that goes wrong before its first periodic
        snapshot (a learning rate far too high does its damage during warm-up).
        """
        config = self.config
        if config.checkpoint_every and not step % config.checkpoint_every:
            return step != 0
        if config.snapshot_every and not step % config.snapshot_every:
            return False
        return None

    def _read_unread(self) -> None:
        """Record the values `record_values` left on their way to the host."""
        if self._unread is not None:
            step, values = self._unread
            self._unread = None
            self.live.record(step, values.read())

    def _take_inbox(self) -> None:
        if self.io.inbox.empty():
            return
        while True:
            try:
                self._pending.append(self.io.inbox.get_nowait())
            except queue.Empty:
                return

    def _apply_due(self, wait_s: float) -> None:
        """Apply the commands due now (waiting up to `wait_s` for one); under torchrun rank 0's, on every rank at
        once (while paused), each answered `applied` only when every rank applied it."""
        if wait_s > 0.0:
            with contextlib.suppress(queue.Empty):
                self._pending.append(self.io.inbox.get(timeout=wait_s))
        self._take_inbox()
        if not self._pending and self.ranks is None:
            return
        due = self._due()
        self._apply(self._exchange(due) if self.ranks is not None else due)

    def _apply(self, due: list[CommandRecord]) -> None:
        """Apply `due` in order and queue each result (under torchrun, every rank's outcomes combined)."""
        applied: list[CommandRecord] = []
        results: list[CommandResult] = []
        for record in due:
            if self.live.stopped:
                break
            applied.append(record)
            results.append(apply_command(self.live, record))
        if self.ranks is not None and due:
            results = self.ranks.agree(results)
        for record, result in zip(applied, results, strict=True):
            self.results.append((record, result))
            self.io.outbox.put(ResultItem(record.id, result))
            self.io.outbox.put(self.live.run_state())

    def _meet(self) -> None:
        """Under torchrun, at a boundary: finish the collective issued at the last one and apply on every rank the
        commands it announced, so each command applies one boundary after rank 0 had it, and the collective's
        latency hides behind the step. Such a boundary, and one due for a periodic checkpoint, first reduces the
        values recorded since the last one (a collective waited for at once): a command or a checkpoint then sees
        every value recorded before it, as in one process, and every value is reported on the branch it was
        recorded on (only a command changes the branch)."""
        self._collect()
        announced, self._announced = self._announced, None
        if announced is not None or self._periodic_checkpoint_due(self.live.step) is not None:
            self._apply(self._exchange(announced or []))

    def _announce(self) -> None:
        """Issue this boundary's collective, awaited at the next: rank 0's commands due (applied there) and the
        values recorded since the last boundary."""
        assert self.ranks is not None
        records: list[CommandRecord] = []
        if self.ranks.leader:
            self._take_inbox()
            records = self._due()
        self._meeting = self.ranks.start(records, self._unreduced)
        self._unreduced = []

    def _collect(self) -> None:
        """Wait for the collective issued at the last boundary (done long since, as a rule), report the values it
        reduced and keep the commands it announced for this boundary."""
        if self._meeting is None:
            return
        assert self.ranks is not None
        size, reduced = self.ranks.finish(self._meeting)
        if size:
            self._announced = self._meeting.records
        self._meeting = None
        self._report(reduced)

    def _exchange(self, due: list[CommandRecord]) -> list[CommandRecord]:
        """Hand rank 0's commands to every rank and report the values recorded since the last boundary, reduced (one
        collective, waited for at once)."""
        assert self.ranks is not None
        due, reduced = self.ranks.exchange(due, self._unreduced)
        self._unreduced = []
        self._report(reduced)
        return due

    def _report(self, reduced: list[Sample]) -> None:
        """Record the values reduced across ranks."""
        for step, values in reduced:
            self.live.record(step, values)

    def _settle(self) -> None:
        """Report every value recorded so far, reduced across ranks (collectives: every rank calls this alike)."""
        self._collect()
        self._exchange([])

    def _due(self) -> list[CommandRecord]:
        """The next commands to apply, in order: at most `max_commands_per_step`, none applied before."""
        due: list[CommandRecord] = []
        while self._pending and len(due) < self.config.max_commands_per_step and not self.live.stopped:
            record = self._pending.popleft()
            if record.seq > (due[-1].seq if due else self.live.last_applied_seq):
                due.append(record)
        return due

    def _watch(self, health: Health, model: nn.Module, optimizer: torch.optim.Optimizer) -> list[RemovableHandle]:
        """Measure gradients and updates from the optimizer's own step hooks, and the logits from the model's output.

        Clipping to `grad_clip` moves into the pre-hook, so `grad_norm` is the norm before clipping.
        """

        def before(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            health.before_optimizer_step(self.live.grad_clip)

        def after(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            health.after_optimizer_step()

        return [
            optimizer.register_step_pre_hook(before),
            optimizer.register_step_post_hook(after),
            health.watch_output(model),
        ]

    def _emit(self, item: OutItem) -> None:
        self.io.outbox.put(item)
