"""The trainer's network side: a command poller thread and a sender thread, fed and drained through queues.

Two threads because a long poll holds its connection (and its `Client`) for up to `poll_wait_s`: the poller
owns one `Client` and only long-polls; the sender owns another and registers the run, reports results,
pushes metric batches, heartbeats and other reports. The training thread only puts items in `outbox` and
takes commands from `inbox`; it never waits on the network.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import math
import os
import queue
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple, Protocol
from uuid import uuid4

from protocols.client.core import Backoff
from protocols.commands import CommandRecord, CommandResult
from protocols.errors import RunsteerError, ServerUnavailable
from protocols.records import (
    AlertReport,
    CheckpointInfo,
    CheckpointSaved,
    Heartbeat,
    MetricsAck,
    MetricsBatch,
    MetricsSample,
    RunInfo,
    RunRegistration,
    RunReport,
    RunState,
)

log = logging.getLogger("runsteer.trainer")

UNAVAILABLE = (ServerUnavailable, OSError)
"""Both mean "try again later": the reference client lets a refused connect escape as a bare OSError."""


class Transport(Protocol):
    """The part of `protocols.client.Client` the trainer uses; a seam for tests and other transports."""

    def register_run(self, registration: RunRegistration) -> RunInfo: ...
    def next_commands(self, run_id: str, *, after_seq: int, wait_s: float = 20.0) -> list[CommandRecord]: ...
    def report_result(self, run_id: str, command_id: str, result: CommandResult) -> CommandRecord: ...
    def push_metrics(self, run_id: str, batch: MetricsBatch) -> MetricsAck: ...
    def push_reports(self, run_id: str, reports: Iterable[RunReport]) -> int: ...
    def close(self) -> None: ...


@dataclass
class IOConfig:
    """Timing and bounds of the I/O threads."""

    poll_wait_s: float = 10.0
    """How long one long poll for commands may wait on the server."""
    flush_interval_s: float = 0.5
    """Metrics wait at most this long before they are sent."""
    batch_max_samples: int = 500
    """At most this many samples per metrics batch."""
    heartbeat_interval_s: float = 5.0
    memory_max_samples: int = 10_000
    """Samples kept in memory while the server is away; later ones spill to `spill_path`."""
    spill_path: Path | None = None
    """The local JSONL file for spilled samples; a temporary file when left out."""
    retry_min_s: float = 0.2
    """First wait before retrying while the server is unreachable; it doubles with each failure..."""
    retry_max_s: float = 5.0
    """...up to this."""


class SampleItem(NamedTuple):
    """One step's values as the training thread hands them over; the sender builds the wire model (a named tuple:
    the leanest object to build, once a step, on the training thread)."""

    branch: str
    step: int
    time: float
    values: dict[str, float]


@dataclass
class SavedItem:
    """A checkpoint saved and those its retention evicted; the sender builds their `CheckpointSaved` reports."""

    info: CheckpointInfo
    evicted: list[CheckpointInfo]


@dataclass
class ResultItem:
    command_id: str
    result: CommandResult


@dataclass
class FlushItem:
    """Set `done` once everything queued before it was sent."""

    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class StopItem:
    """Send what is left (until `deadline`), then end the sender."""

    deadline: float
    done: threading.Event = field(default_factory=threading.Event)


OutItem = SampleItem | SavedItem | ResultItem | RunReport | RunState | FlushItem | StopItem


def to_sample(item: SampleItem) -> MetricsSample:
    """The wire sample (every value a float: the training thread may hand over ints and bools as they were given);
    NaN and infinite values are named in `nonfinite` instead of sent."""
    values = {name: float(value) for name, value in item.values.items() if math.isfinite(value)}
    nonfinite = [name for name in item.values if name not in values]
    return MetricsSample(branch=item.branch, step=item.step, time=item.time, values=values, nonfinite=nonfinite)


class SpillBuffer:
    """Samples in send order: the oldest in memory, and once memory is full, the rest in a JSONL file.

    While the file holds samples every new one goes to the file too, so memory always holds the oldest
    ones and the file the newest: draining memory first and then the file keeps the original order.
    A sample the file cannot take (disk full, file too large) is dropped and counted in `lost`, never silently.
    """

    def __init__(self, path: Path, memory_max: int) -> None:
        self.path = path
        self.memory_max = memory_max
        self.memory: deque[MetricsSample] = deque()
        self.spilled = 0
        self.lost = 0
        """Samples dropped because the spill file could not take them."""
        self.spill_error = ""
        """Why the latest sample was dropped."""
        self._writer: IO[bytes] | None = None
        self._read_offset = 0
        self._write_offset = 0
        self._dropping = False

    def __len__(self) -> int:
        return len(self.memory) + self.spilled

    def append(self, sample: MetricsSample) -> None:
        """Add the newest sample."""
        if self.spilled == 0 and len(self.memory) < self.memory_max:
            self.memory.append(sample)
            return
        line = (sample.model_dump_json() + "\n").encode()
        try:
            if self._writer is None:
                self._writer = open(self.path, "ab", buffering=0)
                if self.spilled == 0:
                    log.warning("server unreachable: spilling metrics to %s", self.path)
            written = self._writer.write(line)
            if written != len(line):
                raise OSError(errno.ENOSPC, "short write: no space left for the spill file")
        except OSError as exc:
            self._drop(exc)
            return
        self._write_offset += len(line)
        self.spilled += 1
        self._dropping = False

    def _drop(self, error: OSError) -> None:
        """Count a sample the file could not take, and cut off any part of it that was written."""
        if self._writer is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._writer.fileno(), self._write_offset)
        if not self._dropping:
            log.error("runsteer: cannot spill metrics to %s (%s): dropping samples and counting them", self.path, error)
        self._dropping = True
        self.lost += 1
        self.spill_error = str(error)

    def close(self) -> None:
        """Close the spill file (it stays on disk while it holds samples no server took)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def head(self, count: int) -> list[MetricsSample]:
        """The oldest `count` samples (fewer if there are fewer), without removing them."""
        if not self.memory and self.spilled:
            self._refill()
        return list(itertools.islice(self.memory, count))

    def pop(self, count: int) -> None:
        """Remove the oldest `count` samples once the server has stored them."""
        for _ in range(count):
            self.memory.popleft()

    def _refill(self) -> None:
        """Move the oldest spilled samples back into memory; remove the file once it is read through."""
        loaded = 0
        with open(self.path, "rb") as reader:
            reader.seek(self._read_offset)
            while loaded < max(1, self.memory_max // 2):
                line = reader.readline()
                if not line:
                    break
                self.memory.append(MetricsSample.model_validate_json(line))
                loaded += 1
            self._read_offset = reader.tell()
        self.spilled -= loaded
        if self.spilled == 0:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            self.path.unlink(missing_ok=True)
            self._read_offset = 0
            self._write_offset = 0


class IOWorker:
    """Owns the two I/O threads and the queues the training thread meets them through."""

    def __init__(
        self,
        transport_factory: Callable[[], Transport],
        registration: RunRegistration,
        config: IOConfig,
        *,
        after_seq: int | None = None,
    ) -> None:
        self.config = config
        self.registration = registration
        self.inbox: queue.SimpleQueue[CommandRecord] = queue.SimpleQueue()
        self.outbox: queue.SimpleQueue[OutItem] = queue.SimpleQueue()
        self.samples: deque[SampleItem] = deque()
        """Each step's values, appended without waking the sender: it takes them on its next wake, at the latest
        `flush_interval_s / 2` later (samples need no quicker answer; everything else goes through `outbox`)."""
        self.registered = threading.Event()
        self.run_info: RunInfo | None = None
        self._after_seq = after_seq
        self._stopping = threading.Event()
        self._poll_transport = transport_factory()
        self._send_transport = transport_factory()
        spill = config.spill_path or Path(tempfile.gettempdir()) / f"runsteer-spill-{uuid4().hex[:8]}.jsonl"
        self.buffer = SpillBuffer(spill, config.memory_max_samples)
        self._batch_prefix = uuid4().hex[:12]
        self._batch_counter = itertools.count(1)
        self._inflight: MetricsBatch | None = None
        self._results: deque[ResultItem] = deque()
        self._reports: deque[RunReport] = deque()
        self._state: RunState | None = None
        self._last_step = 0
        self._flushes: list[FlushItem] = []
        self._stop: StopItem | None = None
        self._next_attempt = 0.0
        self._backoff = Backoff(config.retry_min_s, config.retry_max_s)
        self._last_heartbeat = 0.0
        self._oldest_unsent: float | None = None
        self.connected = False
        self.sent_samples = 0
        self._lost_reported = 0
        self.registration_error: RunsteerError | None = None
        """Set when the server refused the registration (not merely unreachable): logged as an error; the sender
        then only drains the outbox into the spill buffer, so `record()` never grows memory past its bound."""
        self._sender = threading.Thread(target=self._send_loop, name="runsteer-sender", daemon=True)
        self._poller = threading.Thread(target=self._poll_loop, name="runsteer-poller", daemon=True)

    def start(self) -> None:
        """Start both threads; registration happens on the sender thread, retried until the server answers."""
        self._sender.start()
        self._poller.start()

    def stop(self, timeout_s: float) -> bool:
        """Send what is queued (for at most `timeout_s`) and end the threads; True when everything was sent."""
        item = StopItem(deadline=time.monotonic() + timeout_s)
        self.outbox.put(item)
        self._stopping.set()
        # Closing from here aborts a long poll in flight, so the poller ends now instead of after `poll_wait_s`.
        self._poll_transport.close()
        if self._sender.is_alive():
            item.done.wait(timeout_s + 1.0)
        self._send_transport.close()
        self.buffer.close()
        empty = not (self._results or self._reports or len(self.buffer) or self._inflight)
        if not empty:
            log.warning(
                "runsteer: could not send everything before stopping: %d results, %d reports, %d samples (%s)",
                len(self._results),
                len(self._reports),
                len(self.buffer),
                self.buffer.path,
            )
        return empty

    # The poller thread

    def _poll_loop(self) -> None:
        while not self.registered.wait(0.1):
            if self._stopping.is_set():
                return
        assert self.run_info is not None
        run_id = self.run_info.run_id
        after = self._after_seq if self._after_seq is not None else 0
        backoff = Backoff(self.config.retry_min_s, self.config.retry_max_s)
        while not self._stopping.is_set():
            try:
                records = self._poll_transport.next_commands(run_id, after_seq=after, wait_s=self.config.poll_wait_s)
                backoff.reset()
            except UNAVAILABLE:
                self._stopping.wait(backoff.next_delay())
                continue
            except RunsteerError as exc:
                log.error("runsteer: polling for commands failed: %s", exc)
                self._stopping.wait(self.config.retry_max_s)
                continue
            for record in sorted(records, key=lambda r: r.seq):
                if record.seq > after:
                    self.inbox.put(record)
                    after = record.seq
        self._poll_transport.close()

    # The sender thread

    def _send_loop(self) -> None:
        while True:
            self._take(self._wait_time())
            if self.registration_error is not None:
                if self._drain_refused():
                    return
                continue
            now = time.monotonic()
            if now >= self._next_attempt:
                try:
                    self._send_due(now)
                    self._backoff.reset()
                    self.connected = True
                except UNAVAILABLE as exc:
                    if self.connected:
                        log.warning("runsteer: server unavailable, buffering: %s", exc)
                    self.connected = False
                    self._next_attempt = now + self._backoff.next_delay()
                except RunsteerError as exc:
                    self._refuse(exc)
                    continue
            if self._idle():
                for flush in self._flushes:
                    flush.done.set()
                self._flushes.clear()
            if self._stop is not None and (self._idle() or time.monotonic() >= self._stop.deadline):
                self._stop.done.set()
                return

    def _refuse(self, error: RunsteerError) -> None:
        """The server refused the registration (a wrong token, another protocol version): say so loudly, stop
        polling, and from now on only drain the outbox so that memory stays within the spill's bound."""
        self.registration_error = error
        self._stopping.set()
        log.error(
            "runsteer: the server refused to register this run, so nothing will reach it: %s. Training goes on; "
            "its metrics are kept in %s (at most %d samples in memory) and no commands will be received.",
            error,
            self.buffer.path,
            self.config.memory_max_samples,
        )

    def _drain_refused(self) -> bool:
        """After a refusal: samples go to the spill buffer (memory bounded, the rest on disk), results and reports
        are dropped as they can never be sent, and flushes and the stop are answered; True once stopped."""
        self._results.clear()
        self._reports.clear()
        for flush in self._flushes:
            flush.done.set()
        self._flushes.clear()
        if self._stop is not None:
            self._stop.done.set()
            return True
        return False

    def _wait_time(self) -> float:
        if self._stop is not None or self._flushes:
            return max(0.0, min(0.05, self._next_attempt - time.monotonic()))
        if self._results or self._reports:
            return max(0.0, self._next_attempt - time.monotonic())
        return self.config.flush_interval_s / 2

    def _take(self, timeout_s: float) -> None:
        """Move queued items into the sender's own buffers: block for the first, then take what is there, then
        the samples (after the outbox, so a flush or stop sees every sample appended before it was queued)."""
        try:
            item: OutItem | None = self.outbox.get(timeout=timeout_s) if timeout_s > 0 else self.outbox.get_nowait()
        except queue.Empty:
            item = None
        while item is not None:
            self._route(item)
            try:
                item = self.outbox.get_nowait()
            except queue.Empty:
                item = None
        samples = self.samples
        while samples:
            self._route(samples.popleft())

    def _route(self, item: OutItem) -> None:
        if isinstance(item, SampleItem):
            self.buffer.append(to_sample(item))
            self._last_step = item.step
            if self._oldest_unsent is None:
                # The sample's own age counts: it may have waited in `samples` for up to half a flush interval.
                self._oldest_unsent = time.monotonic() - max(0.0, time.time() - item.time)
        elif isinstance(item, SavedItem):
            self._reports.append(CheckpointSaved(checkpoint=item.info))
            self._reports.extend(CheckpointSaved(checkpoint=old, deleted=True) for old in item.evicted)
        elif isinstance(item, ResultItem):
            self._results.append(item)
        elif isinstance(item, RunState):
            self._state = item
            self._last_step = item.step
        elif isinstance(item, FlushItem):
            self._flushes.append(item)
        elif isinstance(item, StopItem):
            self._stop = item
        else:
            self._reports.append(item)

    def _idle(self) -> bool:
        return self.registered.is_set() and not (self._results or self._reports or len(self.buffer) or self._inflight)

    def _send_due(self, now: float) -> None:
        """Register if needed, then send results, reports, a heartbeat and metric batches that are due."""
        if not self.registered.is_set():
            # Only this call may raise a refusal out of here: a run the server will not take cannot go on.
            # A re-attached run polls from seq 0: the server hands back only commands still unanswered.
            self.run_info = self._send_transport.register_run(self.registration)
            self.registered.set()
        assert self.run_info is not None
        run_id = self.run_info.run_id
        while self._results:
            item = self._results[0]
            self._call(self._send_transport.report_result, run_id, item.command_id, item.result)
            self._results.popleft()
        if self._state is not None and now - self._last_heartbeat >= self.config.heartbeat_interval_s:
            state = self._state.model_copy(update={"step": self._last_step})
            self._reports.append(Heartbeat(state=state))
            self._last_heartbeat = now
        if self.buffer.lost > self._lost_reported:
            self._reports.append(self._loss_alert())
        while self._reports:
            reports = list(itertools.islice(self._reports, 1000))
            self._call(self._send_transport.push_reports, run_id, reports)
            for _ in reports:
                self._reports.popleft()
        urgent = self._stop is not None or bool(self._flushes)
        while (
            self._inflight is not None
            or len(self.buffer) >= self.config.batch_max_samples
            or (len(self.buffer) and (urgent or now - (self._oldest_unsent or now) >= self.config.flush_interval_s))
        ):
            if self._inflight is None:
                samples = self.buffer.head(self.config.batch_max_samples)
                batch_id = f"{self._batch_prefix}-{next(self._batch_counter)}"
                self._inflight = MetricsBatch(samples=samples, batch_id=batch_id)
            batch = self._inflight
            # A resend after a lost answer reuses the same batch and id, so the server stores it once.
            self._call(self._send_transport.push_metrics, run_id, batch)
            self.buffer.pop(len(batch.samples))
            self.sent_samples += len(batch.samples)
            self._inflight = None
            self._oldest_unsent = time.monotonic() if len(self.buffer) else None

    def _loss_alert(self) -> AlertReport:
        """A critical alert counting the samples lost since the last one, so no loss goes unreported."""
        lost, total = self.buffer.lost - self._lost_reported, self.buffer.lost
        self._lost_reported = total
        message = (
            f"{lost} metric samples lost ({total} in all): the spill file {self.buffer.path} could not take them "
            f"while the server was unreachable: {self.buffer.spill_error}"
        )
        return AlertReport(severity="critical", message=message[:2000], step=self._last_step)

    def _call(self, send: Callable[..., object], *args: Any) -> None:
        """Send one request; a refusal other than unavailability is logged and the item dropped."""
        try:
            send(*args)
        except ServerUnavailable:
            raise
        except RunsteerError as exc:
            log.error("runsteer: the server refused a trainer report and it was dropped: %s", exc)
