"""Per-run ordered command queues and each command's lifecycle.

The table decides: each change is an op holding the run's lock (see `store`) that reads what it
decides from (the next `seq`, an id already used, the rate limit's count, the command's current
status) and writes the result with its event, so servers sharing a database never hand out a
`seq` twice, let a rate limit through twice, or both win a race for one command. Open commands
(queued, pending approval, delivered) are also kept in memory, from the events of every server,
to wake long-polls and waiters; finished ones live only in the store. Every change is committed
before it is published or answered.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

from control_server.errors import ConflictError, Forbidden, NotFoundError
from control_server.events import Emitter, EventLog
from control_server.policy import check_command, check_rate
from control_server.runs import RunRegistry
from control_server.store import Db, Result, Store
from protocols.commands import CommandDecision, CommandEnvelope, CommandRecord, CommandResult
from protocols.constants import FINAL_COMMAND_STATUSES, OPEN_COMMAND_STATUSES, CommandStatus
from protocols.errors import ErrorDetail
from protocols.events import CommandEvent, Event

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
        self.listeners: list[Callable[[CommandRecord, CommandRecord | None], None]] = []
        """Called with (new, previous) after every change this server committed (e.g. Prometheus latency)."""
        self._open: dict[str, dict[str, CommandRecord]] = {}
        self._queue_changed: dict[str, asyncio.Event] = {}
        self._finished: dict[tuple[str, str], asyncio.Event] = {}
        self._polls: dict[str, list[int]] = {}
        """The `after_seq` of each long-poll waiting on this server, per run (read by the writer, see `_handed_now`)."""
        self._load_open(store.read_now(_open_rows))
        events.watchers.append(self._watch)
        events.resyncs.append(self._resync)

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
            if existing is not None:
                return self._same_or_conflict(existing, envelope), False
        if run.status == "finished" or run.status == "failed":
            raise ConflictError(f"run {run_id} is {run.status} and takes no more commands")
        check_command(run, envelope.command)
        command_id = envelope.id or f"c-{uuid.uuid4().hex[:16]}"
        held = envelope.hold or run.policy.needs_approval(envelope.source)
        status: CommandStatus = "pending_approval" if held else "queued"
        limit = run.policy.rate_limit

        def op(db: Db, emit: Emitter) -> tuple[CommandRecord, CommandRecord | None, bool]:
            # Under the run's lock: a submission of the same id on another server, or in this group, came first.
            first = _stored(db, run_id, command_id) if envelope.id is not None else None
            if first is not None:
                return first, None, False
            now = time.time()
            check_rate(db, run_id, limit, now)
            record = CommandRecord(
                id=command_id,
                run_id=run_id,
                seq=_next_seq(db, run_id),
                command=envelope.command,
                source=envelope.source,
                reason=envelope.reason,
                status=status,
                created_at=now,
                updated_at=now,
            )
            handed = self._handed_now(record, now)
            stored = handed or record
            db.execute(
                "INSERT INTO commands (seq, status, body, run_id, id, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (stored.seq, stored.status, stored.model_dump_json(), run_id, command_id, now),
            )
            emit(lambda event_id, at: _command_event(record, event_id, at))
            if handed is not None:
                emit(lambda event_id, at: _command_event(handed, event_id, at))
            return record, handed, True

        record, handed, created = await self._write(run_id, op)
        if not created:
            return self._same_or_conflict(record, envelope), False
        self._tell(record, None)
        if handed is not None:
            self._tell(handed, record)
        return record, True

    def _handed_now(self, record: CommandRecord, now: float) -> CommandRecord | None:
        """`record` delivered, when a long-poll of this server waits for it (None: it stays queued), in the write
        that stores it: the trainer then gets it with no write of its own (see `_deliver`). Should that long-poll
        end before it answers, the command is handed out again by the next, as every delivered one is."""
        if record.status != "queued" or not any(
            after < record.seq for after in list(self._polls.get(record.run_id, ()))
        ):
            return None
        return _delivered(record, now)

    async def get(self, run_id: str, command_id: str, *, wait_s: float = 0.0) -> CommandRecord:
        """A command's record; with `wait_s`, waits up to that long for it to finish."""
        self.runs.get(run_id)
        # Waited on before the read: another server may finish the command while it is read.
        finished = self._finished.setdefault((run_id, command_id), asyncio.Event()) if wait_s > 0 else None
        record = await self._existing(run_id, command_id)
        if record is None or finished is None or record.status in FINAL_COMMAND_STATUSES:
            if finished is not None and not finished.is_set():
                self._finished.pop((run_id, command_id), None)
            if record is None:
                raise _unknown_command(run_id, command_id)
            return record
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
        """Long-poll: queued or delivered commands after `after_seq`, marked delivered; waits for one if none.

        The open commands in memory say when to look; the table says what is there (a server's memory may lag
        another server's change by the time its announcement takes)."""
        self.runs.get(run_id)
        deadline = time.monotonic() + wait_s
        while True:
            changed = self._queue_changed.setdefault(run_id, asyncio.Event())
            if any(
                record.seq > after_seq and record.status in ("queued", "delivered")
                for record in self._open.get(run_id, {}).values()
            ):
                delivered = await self._deliver(run_id, after_seq)
                if delivered:
                    return delivered
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            waiting = self._polls.setdefault(run_id, [])
            waiting.append(after_seq)
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                return []
            finally:
                waiting.remove(after_seq)
                if not waiting and self._polls.get(run_id) is waiting:
                    del self._polls[run_id]

    async def report_result(self, run_id: str, command_id: str, result: CommandResult) -> CommandRecord:
        """Finish a delivered command with the trainer's result; a repeated identical result is harmless."""
        self.runs.get(run_id)

        def finish(record: CommandRecord, now: float, db: Db) -> CommandRecord | None:
            if record.status in FINAL_COMMAND_STATUSES:
                if record.status == result.status:
                    return None
                raise ConflictError(f"command {command_id} is already {record.status}", status=record.status)
            if record.status != "delivered":
                raise ConflictError(
                    f"command {command_id} is {record.status} and was never delivered: a trainer answers only the "
                    "commands it received",
                    status=record.status,
                )
            return record.model_copy(
                update={
                    "status": result.status,
                    "updated_at": now,
                    "finished_at": now,
                    "applied_step": result.step,
                    "effective": result.effective,
                    "message": result.message,
                }
            )

        return await self._change(run_id, command_id, finish)

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
        verb = "approved" if approve else "rejected"
        note = f"{verb} by {decision.source}" + (f": {decision.reason}" if decision.reason else "")

        def settle(record: CommandRecord, now: float, db: Db) -> CommandRecord | None:
            if approve and record.source == decision.source:
                raise Forbidden(
                    f"{decision.source} sent command {command_id}: nobody approves their own command (rejecting is "
                    "fine)",
                    details=[
                        ErrorDetail(
                            field="source", message="the command's own source", allowed=f"anyone but {record.source}"
                        )
                    ],
                )
            if record.status != "pending_approval":
                raise ConflictError(
                    f"command {command_id} is {record.status}, not pending_approval", status=record.status
                )
            if approve:
                update = {"status": "queued", "seq": _next_seq(db, run_id), "updated_at": now, "message": note}
            else:
                update = {"status": "rejected", "updated_at": now, "finished_at": now, "message": note}
            return record.model_copy(update=update)

        return await self._change(run_id, command_id, settle)

    async def _change(
        self,
        run_id: str,
        command_id: str,
        decide: Callable[[CommandRecord, float, Db], CommandRecord | None],
    ) -> CommandRecord:
        """Change one command as `decide` says, deciding on its stored record under the run's lock (None: the
        stored record stands as it is); returns the record as it now is."""

        def op(db: Db, emit: Emitter) -> tuple[CommandRecord, CommandRecord | None]:
            record = _stored(db, run_id, command_id)
            if record is None:
                raise _unknown_command(run_id, command_id)
            now = time.time()
            changed = decide(record, now, db)
            if changed is None:
                return record, None
            _update(db, changed, emit)
            return changed, record

        record, previous = await self._write(run_id, op)
        if previous is not None:
            self._tell(record, previous)
        return record

    async def _deliver(self, run_id: str, after_seq: int) -> list[CommandRecord]:
        """Mark the stored queued commands after `after_seq` delivered; returns them with those delivered before.

        When none is queued (a command submitted while the long-poll waited was delivered as it was stored), they
        are only read: the trainer waits for no write. From memory when no other server changes them (as
        `_existing`), else from the table."""
        handed = [
            record
            for record in self.open_commands(run_id)
            if record.seq > after_seq and record.status in ("queued", "delivered")
        ]
        if not any(record.status == "queued" for record in handed):
            if not self.store.shared:
                return handed[:MAX_DELIVERY]
            found = await self.store.read(lambda db: _handed_out(db, run_id, after_seq))
            if all(record.status == "delivered" for record in found):
                return found  # else another server's queued command, not heard of yet: marked below

        def op(db: Db, emit: Emitter) -> list[tuple[CommandRecord, CommandRecord]]:
            now = time.time()
            pairs = []
            for record in _handed_out(db, run_id, after_seq):
                if record.status == "queued":
                    delivered = _delivered(record, now)
                    _update(db, delivered, emit)
                    pairs.append((delivered, record))
                else:
                    pairs.append((record, record))
            return pairs

        pairs = await self._write(run_id, op)
        for record, previous in pairs:
            if record is not previous:
                self._tell(record, previous)
        return [record for record, _ in pairs]

    async def _write(self, run_id: str, op: Callable[[Db, Emitter], Result]) -> Result:
        """Every command write (submit, approval, hand-out, result) goes ahead of other writes in the store's queue:
        a submitter waiting for the result and a trainer long-polling wait on each of them, in turn, while the
        metrics of a fleet queue thousands of writes a second."""
        return await self.events.write(run_id, op, urgent=True)

    async def _existing(self, run_id: str, command_id: str) -> CommandRecord | None:
        """The command as it stands: from memory when no other server changes it, else from the table."""
        record = None if self.store.shared else self._open.get(run_id, {}).get(command_id)
        if record is not None:
            return record
        return await self.store.read(lambda db: _stored(db, run_id, command_id))

    @staticmethod
    def _same_or_conflict(existing: CommandRecord, envelope: CommandEnvelope) -> CommandRecord:
        if existing.command != envelope.command or existing.source != envelope.source:
            raise ConflictError(f"command id {existing.id!r} was already used for a different command", field="id")
        return existing

    def _tell(self, record: CommandRecord, previous: CommandRecord | None) -> None:
        for listener in self.listeners:
            listener(record, previous)

    def _watch(self, event: Event) -> None:
        """Keep the open commands and wake their waiters, from the command events of every server."""
        if isinstance(event, CommandEvent):
            self._remember(event.record)

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

    def _load_open(self, bodies: list[str]) -> None:
        self._open.clear()
        for body in bodies:
            self._remember(CommandRecord.model_validate_json(body, strict=False))

    async def _resync(self) -> None:
        """Reload the open commands (announcements of other servers' changes may have been missed)."""
        self._load_open(await self.store.read(_open_rows))
        for changed in self._queue_changed.values():
            changed.set()
        self._queue_changed.clear()


def _open_rows(db: Db) -> list[str]:
    statuses = tuple(OPEN_COMMAND_STATUSES)
    rows = db.execute(
        f"SELECT body FROM commands WHERE status IN ({', '.join('?' * len(statuses))}) ORDER BY run_id, seq",
        statuses,
    ).fetchall()
    return [body for (body,) in rows]


def _handed_out(db: Db, run_id: str, after_seq: int) -> list[CommandRecord]:
    """What a long-poll after `after_seq` hands out: the queued and delivered commands, in `seq` order."""
    rows = db.execute(
        "SELECT body FROM commands WHERE run_id = ? AND seq > ? AND status IN ('queued', 'delivered') "
        "ORDER BY seq LIMIT ?",
        (run_id, after_seq, MAX_DELIVERY),
    ).fetchall()
    return [CommandRecord.model_validate_json(body, strict=False) for (body,) in rows]


def _delivered(record: CommandRecord, now: float) -> CommandRecord:
    return record.model_copy(update={"status": "delivered", "delivered_at": now, "updated_at": now})


def _stored(db: Db, run_id: str, command_id: str) -> CommandRecord | None:
    row = db.execute("SELECT body FROM commands WHERE run_id = ? AND id = ?", (run_id, command_id)).fetchone()
    return CommandRecord.model_validate_json(row[0], strict=False) if row else None


def _next_seq(db: Db, run_id: str) -> int:
    """The run's next `seq` (read under the run's lock, so no other writer takes it meanwhile)."""
    return int(db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM commands WHERE run_id = ?", (run_id,)).fetchone()[0])


def _update(db: Db, record: CommandRecord, emit: Emitter) -> None:
    db.execute(
        "UPDATE commands SET seq = ?, status = ?, body = ? WHERE run_id = ? AND id = ?",
        (record.seq, record.status, record.model_dump_json(), record.run_id, record.id),
    )
    emit(lambda event_id, now: _command_event(record, event_id, now))


def _command_event(record: CommandRecord, event_id: int, now: float) -> CommandEvent:
    return CommandEvent(event_id=event_id, time=now, run_id=record.run_id, record=record)
