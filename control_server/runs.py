"""The run registry: runs held in memory (there are few), every change written through to the store.

A change is an op holding the run's lock; on a store shared by several servers it starts from the
stored row (another server may have changed the run since this one heard), so no server puts back
what another wrote. Every server keeps its runs from the run events of all of them, and with them
when each run was last heard from: the servers judge a run lost alike, and the one that marks it
lost first is the only one (the others find it lost under the lock).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable
from functools import partial

from control_server.auth import Principal
from control_server.errors import ConflictError, Forbidden, NotFoundError, PolicyViolation
from control_server.events import Emitter, EventFactory, EventLog
from control_server.store import Db, Store
from protocols.constants import PROTOCOL_VERSION, RunStatus
from protocols.errors import ErrorDetail
from protocols.events import AlertEvent, CheckpointEvent, Event, LogEvent, MetricsEvent, RunEvent, RunStateEvent
from protocols.policy import Policy
from protocols.records import (
    COMPATIBLE_VERSION,
    AlertReport,
    CheckpointInfo,
    CheckpointSaved,
    Heartbeat,
    LogReport,
    RunInfo,
    RunRegistration,
    RunReport,
    StatusReport,
)

log = logging.getLogger(__name__)

LIVE_STATUSES: frozenset[RunStatus] = frozenset({"running", "paused"})

MAX_BRANCHES = 1024
"""Most branches one run may have (a rollback makes one): each is listed in the run sent to every watcher."""


def check_protocol_version(version: str) -> None:
    """Refuse a trainer speaking another major version of the protocol, before it misreads a command."""
    if re.fullmatch(COMPATIBLE_VERSION, version) is None:
        raise PolicyViolation(
            f"this server speaks protocol {PROTOCOL_VERSION}; the trainer speaks {version}",
            details=[
                ErrorDetail(
                    field="protocol_version",
                    message="incompatible major version",
                    allowed=f"{PROTOCOL_VERSION.split('.')[0]}.x",
                )
            ],
        )


def check_reports(run: RunInfo, reports: list[RunReport]) -> None:
    """Refuse a batch of reports before any is applied: a trainer's alerts carry the source `trainer` (reports are
    not a way to speak as someone else), and heartbeats may not open more than MAX_BRANCHES branches."""
    spoofed = [
        ErrorDetail(field=f"reports.{index}.source", message="a trainer's alerts are its own", allowed="trainer")
        for index, report in enumerate(reports)
        if isinstance(report, AlertReport) and report.source != "trainer"
    ]
    if spoofed:
        raise Forbidden("alerts sent as trainer reports carry the source 'trainer'", details=spoofed)
    branches = set(run.branches)
    for index, report in enumerate(reports):
        if isinstance(report, Heartbeat) and report.state.branch not in branches:
            branches.add(report.state.branch)
            if len(branches) > MAX_BRANCHES:
                raise PolicyViolation(
                    f"run {run.run_id} may have at most {MAX_BRANCHES} branches",
                    details=[
                        ErrorDetail(
                            field=f"reports.{index}.state.branch",
                            message="one branch too many",
                            allowed=f"at most {MAX_BRANCHES} per run",
                        )
                    ],
                )


class RunRegistry:
    """Registers runs, applies trainer reports, and marks runs lost when their heartbeat stops."""

    def __init__(self, store: Store, events: EventLog, *, default_policy: Policy, heartbeat_timeout_s: float) -> None:
        self.store = store
        self.events = events
        self.default_policy = default_policy
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.runs: dict[str, RunInfo] = {}
        self._last_seen: dict[str, float] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.status_changed_at: dict[str, float] = {}
        self._load(store.read_now(_run_rows))
        events.watchers.append(self._watch)
        events.resyncs.append(self._resync)

    def _load(self, bodies: list[str]) -> None:
        started = time.time()
        for body in bodies:
            run = RunInfo.model_validate_json(body, strict=False)
            self.runs[run.run_id] = run
            # A (re)started server gives every run a full timeout to heartbeat before calling it lost.
            self._last_seen[run.run_id] = started
            self.status_changed_at[run.run_id] = run.updated_at

    async def _resync(self) -> None:
        """Reload the runs (announcements of other servers' changes may have been missed)."""
        self._load(await self.store.read(_run_rows))

    def _lock(self, run_id: str) -> asyncio.Lock:
        """Serialises each run's read-modify-write across the awaited commit, so no update overwrites another."""
        return self._locks.setdefault(run_id, asyncio.Lock())

    def get(self, run_id: str) -> RunInfo:
        """The run, or a 404 naming it."""
        run = self.runs.get(run_id)
        if run is None:
            raise NotFoundError(
                f"no run with run_id {run_id!r}",
                details=[ErrorDetail(field="run_id", message=f"unknown run {run_id!r}")],
                run_id=run_id,
            )
        return run

    def unheard_of(self, run_id: str) -> bool:
        """True for a run this server does not know but another server sharing the store may have registered."""
        return self.store.shared and run_id not in self.runs

    async def catch_up(self, run_id: str) -> None:
        """Learn a run from the store that this server has not heard of yet (see `unheard_of`)."""
        if self.unheard_of(run_id):
            run = await self.store.read(lambda db: _stored_run(db, run_id))
            if run is not None and run_id not in self.runs:
                self._remember(run)

    def listing(self) -> list[RunInfo]:
        """Every run, newest first."""
        return sorted(self.runs.values(), key=lambda run: run.created_at, reverse=True)

    def check_trainer(self, run_id: str, name: str) -> None:
        """Refuse a non-admin token acting as the trainer of a run another token registered (unknown runs pass,
        to be answered 404 by the route)."""
        run = self.runs.get(run_id)
        if run is not None:
            _check_trainer(run, name)

    async def register(self, registration: RunRegistration, by: Principal) -> tuple[RunInfo, bool]:
        """Create a run, or re-attach its trainer to it; returns (run, created).

        Only the token that registered a run (or an admin) may re-attach to it, and only an admin may change its
        policy that way: re-registering must not be a way around `PUT .../policy`.
        """
        check_protocol_version(registration.protocol_version)
        run_id = registration.run_id or f"{registration.name[:40]}-{uuid.uuid4().hex[:8]}"
        created = False

        def change(existing: RunInfo | None, now: float) -> tuple[RunInfo, bool]:
            nonlocal created
            if existing is not None:
                if not by.may("admin"):
                    _check_trainer(existing, by.name)
                if existing.name != registration.name:
                    raise ConflictError(
                        f"run {existing.run_id!r} is named {existing.name!r}, not {registration.name!r}",
                    )
                if registration.policy not in (None, existing.policy) and not by.may("admin"):
                    raise Forbidden(
                        f"re-registering run {existing.run_id} may not change its policy; an admin token can "
                        "(PUT .../policy)",
                        details=[
                            ErrorDetail(
                                field="policy",
                                message="differs from the run's policy",
                                allowed="the run's current policy, or leave it out",
                            )
                        ],
                    )
                created = False
                return existing.model_copy(
                    update={
                        "status": "running",
                        "updated_at": now,
                        "last_heartbeat": now,
                        "config": registration.config or existing.config,
                        "domains": registration.domains or existing.domains,
                        "policy": registration.policy or existing.policy,
                    }
                ), True
            created = True
            return RunInfo(
                run_id=run_id,
                name=registration.name,
                status="running",
                created_at=now,
                updated_at=now,
                last_heartbeat=now,
                config=registration.config,
                domains=registration.domains,
                policy=registration.policy or self.default_policy,
                registered_by=by.name,
            ), True

        async with self._lock(run_id):
            run = await self._update(run_id, change)
        assert run is not None
        return run, created

    async def set_policy(self, run_id: str, policy: Policy) -> RunInfo:
        """Replace a run's policy."""
        self.get(run_id)
        async with self._lock(run_id):
            run = await self._update(
                run_id,
                lambda stored, now: (
                    _known(stored, run_id).model_copy(update={"policy": policy, "updated_at": now}),
                    True,
                ),
            )
        assert run is not None
        return run

    async def apply_reports(self, run_id: str, reports: list[RunReport]) -> int:
        """Apply a trainer's reports in order, once all of them passed `check_reports`; returns how many."""
        check_reports(self.get(run_id), reports)
        for report in reports:
            if isinstance(report, Heartbeat):
                await self._heartbeat(run_id, report)
            elif isinstance(report, StatusReport):
                await self._set_status(run_id, report.status, report.message)
            elif isinstance(report, CheckpointSaved):
                await self._checkpoint(run_id, report)
            elif isinstance(report, LogReport):
                await self._log(run_id, report)
            elif isinstance(report, AlertReport):
                await self.alert(run_id, report)
        return len(reports)

    async def alert(self, run_id: str, report: AlertReport) -> None:
        """Store and publish an alert for people to see."""
        await self._emit(
            run_id,
            lambda event_id, now: AlertEvent(
                event_id=event_id,
                time=now,
                run_id=run_id,
                severity=report.severity,
                message=report.message,
                source=report.source,
                step=report.step,
            ),
        )

    async def note_step(self, run_id: str, branch: str, step: int) -> None:
        """Remember the newest step seen in metrics (the run row is written at the next heartbeat).

        Under the run's lock when a heartbeat holds it across its commit (it would otherwise put back its older
        step); when nobody holds it, the update runs at once, as one step of the event loop (a waiter reads the run
        afresh once it has the lock).
        """
        lock = self._locks.get(run_id)
        if lock is not None and lock.locked():
            async with lock:
                self._note_step(run_id, branch, step)
        else:
            self._note_step(run_id, branch, step)

    def _note_step(self, run_id: str, branch: str, step: int) -> None:
        run = self.runs.get(run_id)
        if run is not None and (step > run.step or branch != run.branch):
            branches = run.branches if branch in run.branches else [*run.branches, branch]
            self.runs[run_id] = run.model_copy(update={"step": step, "branch": branch, "branches": branches})
        self._last_seen[run_id] = time.time()

    async def check_liveness(self) -> None:
        """Mark runs whose trainer stopped heartbeating (to any server sharing the store) as lost."""
        now = time.time()
        for run_id, run in list(self.runs.items()):
            if run.status in LIVE_STATUSES and now - self._last_seen.get(run_id, now) > self.heartbeat_timeout_s:
                log.warning("run %s lost: no heartbeat for %.0f s", run_id, self.heartbeat_timeout_s)
                await self._set_status(run_id, "lost", f"no heartbeat for {self.heartbeat_timeout_s:g} s")

    async def watch_liveness(self) -> None:
        """Background task: check liveness a few times per timeout."""
        interval = min(1.0, self.heartbeat_timeout_s / 4)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check_liveness()
            except Exception:  # a failed write must not end the liveness watch
                log.exception("liveness check failed")

    async def _heartbeat(self, run_id: str, heartbeat: Heartbeat) -> None:
        self.get(run_id)
        state = heartbeat.state

        def change(stored: RunInfo | None, now: float) -> tuple[RunInfo, bool]:
            run = _known(stored, run_id)
            status: RunStatus = run.status
            if run.status in (*LIVE_STATUSES, "lost"):
                status = "paused" if state.paused else "running"
            branches = run.branches if state.branch in run.branches else [*run.branches, state.branch]
            updated = run.model_copy(
                update={
                    "state": state,
                    "step": max(state.step, run.step) if state.branch == run.branch else state.step,
                    "branch": state.branch,
                    "branches": branches,
                    "last_heartbeat": now,
                    "updated_at": now,
                    "status": status,
                }
            )
            return updated, status != run.status

        async with self._lock(run_id):
            self._last_seen[run_id] = time.time()
            await self._update(run_id, change)

    async def _set_status(self, run_id: str, status: RunStatus, message: str) -> None:
        self.get(run_id)

        def change(stored: RunInfo | None, now: float) -> tuple[RunInfo, bool] | None:
            run = _known(stored, run_id)
            if run.status == status:
                return None
            return run.model_copy(update={"status": status, "updated_at": now}), True

        async with self._lock(run_id):
            if status in LIVE_STATUSES:
                self._last_seen[run_id] = time.time()
            changed = await self._update(run_id, change)
        if changed is not None and message:
            await self._log(
                run_id, LogReport(level="warning" if status in ("lost", "failed") else "info", message=message)
            )

    async def _checkpoint(self, run_id: str, report: CheckpointSaved) -> None:
        checkpoint = report.checkpoint

        def index(db: Db, emit: Emitter) -> None:
            if report.deleted:
                db.execute(
                    "DELETE FROM checkpoints WHERE run_id = ? AND checkpoint_id = ?", (run_id, checkpoint.checkpoint_id)
                )
            else:
                db.execute(
                    "INSERT INTO checkpoints VALUES (?, ?, ?, ?, ?) ON CONFLICT (run_id, checkpoint_id) "
                    "DO UPDATE SET branch = excluded.branch, step = excluded.step, body = excluded.body",
                    (
                        run_id,
                        checkpoint.checkpoint_id,
                        checkpoint.branch,
                        checkpoint.step,
                        checkpoint.model_dump_json(),
                    ),
                )
            emit(
                lambda event_id, now: CheckpointEvent(
                    event_id=event_id, time=now, run_id=run_id, checkpoint=checkpoint, deleted=report.deleted
                )
            )

        await self.events.write(run_id, index)

    async def checkpoints(self, run_id: str, branch: str | None) -> list[CheckpointInfo]:
        """The run's indexed checkpoints, oldest first."""
        self.get(run_id)
        where, args = ("AND branch = ?", (run_id, branch)) if branch else ("", (run_id,))

        def op(db: Db) -> list[str]:
            rows = db.execute(
                f"SELECT body FROM checkpoints WHERE run_id = ? {where} ORDER BY step, checkpoint_id", args
            )
            return [body for (body,) in rows]

        return [CheckpointInfo.model_validate_json(body, strict=False) for body in await self.store.read(op)]

    async def _log(self, run_id: str, report: LogReport) -> None:
        await self._emit(
            run_id,
            lambda event_id, now: LogEvent(
                event_id=event_id, time=now, run_id=run_id, level=report.level, message=report.message, step=report.step
            ),
        )

    async def _emit(self, run_id: str, build: EventFactory) -> None:
        """Store and publish one event of the run."""
        await self.events.write(run_id, lambda db, emit: emit(build))

    async def _update(
        self, run_id: str, change: Callable[[RunInfo | None, float], tuple[RunInfo, bool] | None]
    ) -> RunInfo | None:
        """Write the run as `change` makes it from the run as it stands (None: no change) and publish a run event,
        stored when `change` says the change matters beyond the moment; returns the run written.

        On a shared store the run as it stands is the stored row, read under the run's lock. A change that is not
        stored (a heartbeat) is published as a `run_state` event, without config or policy.
        """

        def op(db: Db, emit: Emitter) -> RunInfo | None:
            current = _stored_run(db, run_id) if self.store.shared else self.runs.get(run_id)
            changed = change(current, time.time())
            if changed is None:
                return None
            run, stored_event = changed
            db.execute(
                "INSERT INTO runs (run_id, created_at, body) VALUES (?, ?, ?) "
                "ON CONFLICT (run_id) DO UPDATE SET body = excluded.body",
                (run.run_id, run.created_at, run.model_dump_json()),
            )
            emit(
                (lambda event_id, now: RunEvent(event_id=event_id, time=now, run_id=run.run_id, run=run))
                if stored_event
                else partial(RunStateEvent.of, run)
            )
            return run

        return await self.events.write(run_id, op)

    def _watch(self, event: Event) -> None:
        """Keep the runs, and when each was last heard from, from the run and metrics events of every server."""
        if isinstance(event, RunEvent):
            self._remember(event.run)
        elif isinstance(event, RunStateEvent):
            run = self.runs.get(event.run_id)
            if run is not None:
                self._remember(event.apply(run))
        elif isinstance(event, MetricsEvent) and event.run_id in self.runs:
            self._last_seen[event.run_id] = time.time()

    def _remember(self, run: RunInfo) -> None:
        previous = self.runs.get(run.run_id)
        self.runs[run.run_id] = run
        heard = previous is None or run.last_heartbeat != previous.last_heartbeat or run.status != previous.status
        if run.status in LIVE_STATUSES and heard:
            self._last_seen[run.run_id] = time.time()
        self._last_seen.setdefault(run.run_id, time.time())
        if previous is None or previous.status != run.status:
            self.status_changed_at[run.run_id] = run.updated_at


def _check_trainer(run: RunInfo, name: str) -> None:
    if run.registered_by != name:
        raise Forbidden(
            f"token {name!r} did not register run {run.run_id}: only the token that did (or an admin) is its trainer",
            details=[ErrorDetail(field="run_id", message="another token's run", allowed="runs this token registered")],
        )


def _run_rows(db: Db) -> list[str]:
    return [body for (body,) in db.execute("SELECT body FROM runs ORDER BY created_at").fetchall()]


def _stored_run(db: Db, run_id: str) -> RunInfo | None:
    row = db.execute("SELECT body FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    return RunInfo.model_validate_json(row[0], strict=False) if row else None


def _known(run: RunInfo | None, run_id: str) -> RunInfo:
    """`run`, which a change of an existing run found (runs are never deleted)."""
    if run is None:
        raise NotFoundError(f"no run with run_id {run_id!r}", run_id=run_id)
    return run
