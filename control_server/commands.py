"""Per-run ordered command queues and each command's lifecycle.

Open commands (queued, pending approval, delivered) are few and live in memory as well as in
the store; finished ones live only in the store. Every change is committed before it is
published or answered.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from functools import partial

from control_server.errors import ConflictError, Forbidden, NotFoundError
from control_server.events import EventLog, insert_event
from control_server.policy import RateLimiter, check_command
from control_server.runs import RunRegistry
from control_server.store import Db, Store
from protocols.commands import CommandDecision, CommandEnvelope, CommandRecord, CommandResult
from protocols.constants import FINAL_COMMAND_STATUSES, OPEN_COMMAND_STATUSES, CommandStatus
from protocols.errors import ErrorDetail
from protocols.events import CommandEvent

MAX_DELIVERY = 256
"""Most commands handed to a trainer by one long-poll."""


def _unknown_command(run_id: str, command_id: str) -> NotFoundError:
    return NotFoundError(
        f"run {run_id} has no command {command_id!r}",
        details=[ErrorDetail(field="command_id", message=f"unknown command {command_id!r}")],
        command_id=command_id,
    )


class CommandService:
    """Accepts, queues, delivers and finishes commands, and wakes whoever waits on them."""

    def __init__(self, store: Store, events: EventLog, runs: RunRegistry) -> None:
        self.store = store
        self.events = events
        self.runs = runs
        self.rate_limiter = RateLimiter()
        self.listeners: list[Callable[[CommandRecord, CommandRecord | None], None]] = []
        """Called with (new, previous) after every committed change (e.g. Prometheus latency)."""
        self._open: dict[str, dict[str, CommandRecord]] = {}
        self._in_flight: dict[tuple[str, str], asyncio.Future[CommandRecord | None]] = {}
        """Client-chosen ids being stored right now; a concurrent resubmission waits for the first."""
        self._next_seq: dict[str, int] = {}
        self._queue_changed: dict[str, asyncio.Event] = {}
        self._finished: dict[tuple[str, str], asyncio.Event] = {}
        for run_id, seq in store.read_now(
            lambda db: db.execute("SELECT run_id, MAX(seq) FROM commands GROUP BY run_id").fetchall()
        ):
            self._next_seq[run_id] = int(seq) + 1
        statuses = tuple(OPEN_COMMAND_STATUSES)
        rows = store.read_now(
            lambda db: db.execute(
                f"SELECT body FROM commands WHERE status IN ({', '.join('?' * len(statuses))}) ORDER BY run_id, seq",
                statuses,
            ).fetchall()
        )
        for (body,) in rows:
            record = CommandRecord.model_validate_json(body, strict=False)
            self._open.setdefault(record.run_id, {})[record.id] = record

    def open_commands(self, run_id: str) -> list[CommandRecord]:
        """The run's queued, held and delivered commands in `seq` order."""
        return sorted(self._open.get(run_id, {}).values(), key=lambda record: record.seq)

    async def submit(self, run_id: str, envelope: CommandEnvelope) -> tuple[CommandRecord, bool]:
        """Validate against the run and store a new command; returns (record, created).

        Resubmitting an `id` the run already has returns the first record (created False) when the
        command is the same, and is a conflict when it is not.
        """
        run = self.runs.get(run_id)
        if envelope.id is not None:
            existing = await self._existing(run_id, envelope.id)
            # Looked up again after the read: a submission of the same id may have started or finished meanwhile.
            existing = existing or self._open.get(run_id, {}).get(envelope.id)
            first = self._in_flight.get((run_id, envelope.id))
            if existing is None and first is not None:
                existing = await asyncio.shield(first)
            if existing is not None:
                return self._same_or_conflict(existing, envelope), False
        if run.status == "finished" or run.status == "failed":
            raise ConflictError(f"run {run_id} is {run.status} and takes no more commands")
        check_command(run, envelope.command)
        command_id = envelope.id or f"c-{uuid.uuid4().hex[:16]}"
        held = envelope.hold or run.policy.needs_approval(envelope.source)
        status: CommandStatus = "pending_approval" if held else "queued"
        now = time.time()
        record = CommandRecord(
            id=command_id,
            run_id=run_id,
            seq=self._take_seq(run_id),
            command=envelope.command,
            source=envelope.source,
            reason=envelope.reason,
            status=status,
            created_at=now,
            updated_at=now,
        )
        limit = run.policy.rate_limit
        counted: list[float] = []

        def admit(db: Db) -> None:
            # In the inserting transaction: concurrent submitters are counted one by one, never all let through.
            counted.append(self.rate_limiter.take(run_id, limit))

        stored: asyncio.Future[CommandRecord | None] = asyncio.get_running_loop().create_future()
        self._in_flight[(run_id, command_id)] = stored
        try:
            await self._commit_many([(record, None)], insert=True, admit=admit)
            stored.set_result(record)
        except BaseException:
            for stamp in counted:
                self.rate_limiter.give_back(run_id, stamp)
            raise
        finally:
            if not stored.done():
                stored.set_result(None)
            del self._in_flight[(run_id, command_id)]
        return record, True

    async def get(self, run_id: str, command_id: str, *, wait_s: float = 0.0) -> CommandRecord:
        """A command's record; with `wait_s`, waits up to that long for it to finish."""
        self.runs.get(run_id)
        record = await self._existing(run_id, command_id)
        if record is None:
            raise _unknown_command(run_id, command_id)
        if wait_s <= 0 or record.status in FINAL_COMMAND_STATUSES:
            return record
        finished = self._finished.setdefault((run_id, command_id), asyncio.Event())
        try:
            await asyncio.wait_for(finished.wait(), wait_s)
        except TimeoutError:
            pass
        return await self._existing(run_id, command_id) or record

    async def history(
        self, run_id: str, *, status: CommandStatus | None, after_seq: int, limit: int
    ) -> list[CommandRecord]:
        """Records in `seq` order, optionally of one status."""
        self.runs.get(run_id)
        where, args = ("AND status = ?", (status,)) if status else ("", ())

        def op(db: Db) -> list[str]:
            rows = db.execute(
                f"SELECT body FROM commands WHERE run_id = ? AND seq > ? {where} ORDER BY seq LIMIT ?",
                (run_id, after_seq, *args, limit),
            )
            return [body for (body,) in rows]

        return [CommandRecord.model_validate_json(body, strict=False) for body in await self.store.read(op)]

    async def next_for_trainer(self, run_id: str, *, after_seq: int, wait_s: float) -> list[CommandRecord]:
        """Long-poll: queued or delivered commands after `after_seq`, marked delivered; waits for one if none."""
        self.runs.get(run_id)
        deadline = time.monotonic() + wait_s
        while True:
            changed = self._queue_changed.setdefault(run_id, asyncio.Event())
            ready = [
                record
                for record in self.open_commands(run_id)
                if record.seq > after_seq and record.status in ("queued", "delivered")
            ][:MAX_DELIVERY]
            if ready:
                return await self._mark_delivered(ready)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                return []

    async def report_result(self, run_id: str, command_id: str, result: CommandResult) -> CommandRecord:
        """Finish a delivered command with the trainer's result; a repeated identical result is harmless."""
        self.runs.get(run_id)
        record = await self._existing(run_id, command_id)
        if record is None:
            raise _unknown_command(run_id, command_id)
        if record.status in FINAL_COMMAND_STATUSES:
            if record.status == result.status:
                return record
            raise ConflictError(f"command {command_id} is already {record.status}", status=record.status)
        if record.status != "delivered":
            raise ConflictError(
                f"command {command_id} is {record.status} and was never delivered: a trainer answers only the "
                "commands it received",
                status=record.status,
            )
        now = time.time()
        finished = record.model_copy(
            update={
                "status": result.status,
                "updated_at": now,
                "finished_at": now,
                "applied_step": result.step,
                "effective": result.effective,
                "message": result.message,
            }
        )
        await self._commit(finished, record)
        return finished

    async def decide(self, run_id: str, command_id: str, decision: CommandDecision, *, approve: bool) -> CommandRecord:
        """Approve (the command joins the end of the queue with a new `seq`) or reject a held command.

        A source the run's policy holds for approval may do neither, and no source approves its own command, or an
        agent could approve its own proposals.
        """
        run = self.runs.get(run_id)
        if run.policy.needs_approval(decision.source):
            raise Forbidden(
                f"{decision.source} may not decide held commands: the run's policy holds its own commands for approval",
                details=[
                    ErrorDetail(
                        field="source",
                        message="this source needs approval itself",
                        allowed="a source the run's policy does not hold",
                    )
                ],
            )
        record = await self._existing(run_id, command_id)
        if record is None:
            raise _unknown_command(run_id, command_id)
        if approve and record.source == decision.source:
            raise Forbidden(
                f"{decision.source} sent command {command_id}: nobody approves their own command (rejecting is fine)",
                details=[
                    ErrorDetail(
                        field="source", message="the command's own source", allowed=f"anyone but {record.source}"
                    )
                ],
            )
        if record.status != "pending_approval":
            raise ConflictError(f"command {command_id} is {record.status}, not pending_approval", status=record.status)
        now = time.time()
        verb = "approved" if approve else "rejected"
        note = f"{verb} by {decision.source}" + (f": {decision.reason}" if decision.reason else "")
        if approve:
            update = {"status": "queued", "seq": self._take_seq(run_id), "updated_at": now, "message": note}
        else:
            update = {"status": "rejected", "updated_at": now, "finished_at": now, "message": note}
        changed = record.model_copy(update=update)
        await self._commit(changed, record)
        return changed

    def _take_seq(self, run_id: str) -> int:
        seq = self._next_seq.get(run_id, 1)
        self._next_seq[run_id] = seq + 1
        return seq

    async def _existing(self, run_id: str, command_id: str) -> CommandRecord | None:
        record = self._open.get(run_id, {}).get(command_id)
        if record is not None:
            return record

        def op(db: Db) -> str | None:
            row = db.execute("SELECT body FROM commands WHERE run_id = ? AND id = ?", (run_id, command_id)).fetchone()
            return row[0] if row else None

        body = await self.store.read(op)
        return CommandRecord.model_validate_json(body, strict=False) if body else None

    @staticmethod
    def _same_or_conflict(existing: CommandRecord, envelope: CommandEnvelope) -> CommandRecord:
        if existing.command != envelope.command or existing.source != envelope.source:
            raise ConflictError(f"command id {existing.id!r} was already used for a different command", field="id")
        return existing

    async def _mark_delivered(self, ready: list[CommandRecord]) -> list[CommandRecord]:
        now = time.time()
        delivered = [
            record
            if record.status == "delivered"
            else record.model_copy(update={"status": "delivered", "delivered_at": now, "updated_at": now})
            for record in ready
        ]
        changes = [(new, old) for new, old in zip(delivered, ready, strict=True) if new is not old]
        if changes:
            await self._commit_many(changes)
        return delivered

    async def _commit(self, record: CommandRecord, previous: CommandRecord | None, *, insert: bool = False) -> None:
        await self._commit_many([(record, previous)], insert=insert)

    async def _commit_many(
        self,
        changes: Sequence[tuple[CommandRecord, CommandRecord | None]],
        *,
        insert: bool = False,
        admit: Callable[[Db], None] | None = None,
    ) -> None:
        """Write the changes and their events in one transaction (after `admit`, which may refuse them all)."""
        events = [self.events.make(partial(_command_event, record)) for record, _ in changes]

        def write(db: Db) -> None:
            if admit is not None:
                admit(db)
            for record, _ in changes:
                row = (record.seq, record.status, record.model_dump_json(), record.run_id, record.id)
                if insert:
                    db.execute("INSERT INTO commands (seq, status, body, run_id, id) VALUES (?, ?, ?, ?, ?)", row)
                else:
                    db.execute("UPDATE commands SET seq = ?, status = ?, body = ? WHERE run_id = ? AND id = ?", row)
            for event in events:
                insert_event(db, event)

        await self.store.write(write)
        for (record, previous), event in zip(changes, events, strict=True):
            self._remember(record)
            for listener in self.listeners:
                listener(record, previous)
            self.events.publish(event)

    def _remember(self, record: CommandRecord) -> None:
        run_open = self._open.setdefault(record.run_id, {})
        if record.status in FINAL_COMMAND_STATUSES:
            run_open.pop(record.id, None)
            waiter = self._finished.pop((record.run_id, record.id), None)
            if waiter is not None:
                waiter.set()
        else:
            run_open[record.id] = record
        if record.status == "queued":
            changed = self._queue_changed.pop(record.run_id, None)
            if changed is not None:
                changed.set()


def _command_event(record: CommandRecord, event_id: int, now: float) -> CommandEvent:
    return CommandEvent(event_id=event_id, time=now, run_id=record.run_id, record=record)
