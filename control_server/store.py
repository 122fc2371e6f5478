"""The durable store: one writer thread doing group commits, readers on a small pool.

Every write is a function of a connection (`Db`), queued to the writer thread; the writer runs
all queued writes in one transaction (each inside its own savepoint, so one failure does not
undo the others), commits, and only then resolves each caller's future. Reads run on a small
pool of connections, never on the event loop. `SqliteStore` (the embedded default, WAL mode)
lives here; `control_server.postgres` has the PostgreSQL one behind the same `Store` seam.

A write names the run it decides for (`write(op, run=...)`): a store shared by several servers
takes that run's lock for the transaction, so an op may read the run's rows and decide (next
`seq`, rate limit, a command's status) with no other server deciding for that run meanwhile.
One SQLite writer decides alone, so there the name costs nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)

Result = TypeVar("Result")


class Cursor(Protocol):
    """What an op reads back from a statement (sqlite3 and psycopg cursors both are one)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Db(Protocol):
    """The connection an op runs on; SQL uses `?` placeholders and the syntax SQLite and PostgreSQL share."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Cursor: ...

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Cursor: ...


class Store(Protocol):
    """The storage seam: `await write(op)` returns once `op`'s transaction is committed; reads run off the loop."""

    commits: int
    writes: int
    shared: bool
    """True when other servers may write the same database: events then reach every server through `listen`."""
    announce_limit: int
    """Most bytes one `announce` may carry (0: the store announces nothing)."""

    def open(self) -> None: ...

    def close(self) -> None: ...

    async def write(self, op: Callable[[Db], Result], *, run: str | None = None, urgent: bool = False) -> Result:
        """Run `op` in a transaction holding `run`'s lock; returns once committed. An `urgent` op goes ahead of
        every other queued write (see `GroupWriter.write`)."""
        ...

    def event_ids(self, db: Db, count: int) -> list[int]:
        """`count` new event ids, in the writer's transaction: increasing in the order the run's writes commit."""
        ...

    def announce(self, db: Db, payload: str) -> None:
        """Tell every listening server `payload` once the writer's transaction commits (never if the op is undone)."""
        ...

    def listen(self, deliver: Callable[[str | None], None]) -> None:
        """Call `deliver` (in another thread) with every announced payload, in commit order; None when some may
        have been missed (the listening connection was lost and is back)."""
        ...

    def add_chore(self, chore: Chore) -> None:
        """Have the writer thread run `chore`'s ops between groups of writes (see `GroupWriter.add_chore`)."""
        ...

    def lock_names(self, db: Db) -> None:
        """Before creating a row every run shares (a keyset of metric names), in the writer's transaction: so two
        servers creating several such rows never wait on each other in a cycle."""
        ...

    def on_rollback(self, forget: Callable[[], None]) -> None:
        """Call `forget` in the writer thread whenever writes are undone (an op's savepoint or a whole group), so
        what an op cached from its own uncommitted rows is dropped with them."""
        ...

    async def read(self, op: Callable[[Db], Result]) -> Result: ...

    def read_now(self, op: Callable[[Db], Result]) -> Result: ...

    def disk_bytes(self) -> dict[str, int]:
        """Bytes the store keeps on disk, by part (for benchmarks and /metrics)."""
        ...


SCHEMA_VERSION = 5
"""Bumped with every change to the tables; an older file is migrated on open (see `migrate_sqlite`)."""

SCHEMA_TEMPLATE = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    created_at {real} NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS commands (
    run_id TEXT NOT NULL,
    id TEXT NOT NULL,
    seq {int} NOT NULL,
    status TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at {real} NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, id)
){clustered};
CREATE UNIQUE INDEX IF NOT EXISTS commands_by_seq ON commands (run_id, seq);
CREATE INDEX IF NOT EXISTS commands_by_time ON commands (run_id, created_at);
CREATE TABLE IF NOT EXISTS events (
    event_id {int} PRIMARY KEY,
    run_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    time {real} NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_run ON events (run_id, event_id);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id TEXT NOT NULL,
    checkpoint_id TEXT NOT NULL,
    branch TEXT NOT NULL,
    step {int} NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (run_id, checkpoint_id)
){clustered};
CREATE TABLE IF NOT EXISTS metric_series (
    series_id {serial},
    run_id TEXT NOT NULL,
    branch TEXT NOT NULL,
    UNIQUE (run_id, branch)
);
CREATE TABLE IF NOT EXISTS metric_keysets (
    keyset_id {serial},
    keys TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS metric_series_keys (
    series_id {int} NOT NULL,
    key TEXT NOT NULL,
    PRIMARY KEY (series_id, key)
){clustered};
CREATE TABLE IF NOT EXISTS metric_steps (
    series_id {int} NOT NULL,
    step {int} NOT NULL,
    time {real} NOT NULL,
    keyset_id {int} NOT NULL,
    packed {blob} NOT NULL,
    PRIMARY KEY (series_id, step)
);
CREATE TABLE IF NOT EXISTS metric_rollups (
    series_id {int} NOT NULL,
    shift INTEGER NOT NULL,
    bucket {int} NOT NULL,
    keyset_id {int} NOT NULL,
    packed {blob} NOT NULL,
    PRIMARY KEY (series_id, shift, bucket)
);
CREATE TABLE IF NOT EXISTS metric_rollup_marks (
    series_id {int} PRIMARY KEY,
    through_step {int} NOT NULL
);
CREATE TABLE IF NOT EXISTS metric_recent_batches (
    run_id TEXT PRIMARY KEY,
    batch_ids TEXT NOT NULL
);
"""
"""The tables of both stores, with each dialect's types filled in (`SQLITE_TYPES`, `postgres.POSTGRES_TYPES`).
Metrics are a row per (run, branch, step) holding every value of that step packed (see `series`), so a
step of 40 values is one row and one index entry instead of forty. Their rows stay in SQLite's rowid order
(appended, so pages fill up) with the key in a small index beside them: clustering them by key filled pages
about half, and spilled the larger rollup rows to overflow pages. A run's recent metrics batch ids are one row,
rewritten in place (see `metrics.RECENT_BATCH_IDS`)."""

SQLITE_TYPES = {
    "real": "REAL",
    "int": "INTEGER",
    "blob": "BLOB",
    "serial": "INTEGER PRIMARY KEY",
    "clustered": " WITHOUT ROWID",
}
SCHEMA = SCHEMA_TEMPLATE.format(**SQLITE_TYPES)


@dataclass
class PendingWrite:
    """One op queued for the writer thread, with what its caller awaits and the run whose lock it takes."""

    op: Callable[[Any], Any]
    future: asyncio.Future[Any] | None
    """None for a chore's op: nobody awaits it."""
    loop: asyncio.AbstractEventLoop | None
    run: str | None


_STOP = object()
_URGENT = object()
"""Put in the writer's queue after an urgent op is put in its own lane: it only wakes the writer."""

Chore = Callable[[int], list[tuple[str | None, Callable[[Any], object]]]]
"""Background work for the writer: called with a count, hands out up to that many ops, each with the run it decides
for (none when nothing is left to do)."""
CHORE_OPS = 4
"""Most ops of a chore in one group of their own (a few milliseconds: a write arriving meanwhile waits that long)."""
CHORE_REST = 3.0
"""After a group of chores, the writer does only writes for this many times as long, so chores take at most a
quarter of its time (and of the interpreter's lock, which the event loop needs too), whatever their backlog."""


class GroupWriter:
    """The writer thread shared by both stores: queued ops run in one transaction, a savepoint each."""

    begin = "BEGIN"
    error: type[Exception] = Exception
    """The driver's error class: a failure of the group itself (commit, lost connection)."""
    shared = False
    announce_limit = 0

    def __init__(self, *, max_batch: int) -> None:
        self.max_batch = max_batch
        self._writes: queue.SimpleQueue[PendingWrite | object] = queue.SimpleQueue()
        self._urgent: deque[PendingWrite] = deque()
        """Urgent ops, run before anything in `_writes` in groups of their own (see `write`)."""
        self._writer: threading.Thread | None = None
        self.commits = 0
        self.writes = 0
        self._forgetters: list[Callable[[], None]] = []
        self._chores: list[Chore] = []

    def add_chore(self, chore: Chore) -> None:
        """Have the writer thread run `chore`'s ops between groups of writes, CHORE_OPS at a time in a group of their
        own, at most a quarter of its time (CHORE_REST). Work that need not delay a commit (rolling up metrics) goes
        here, in small slices spread over time, instead of into the write that made it due."""
        self._chores.append(chore)

    def on_rollback(self, forget: Callable[[], None]) -> None:
        """Call `forget` in the writer thread whenever writes are undone (see `Store.on_rollback`)."""
        self._forgetters.append(forget)

    def start_writer(self) -> None:
        self._writer = threading.Thread(target=self._write_loop, name="runsteer-store-writer")
        self._writer.start()

    def stop_writer(self) -> None:
        if self._writer is not None:
            self._writes.put(_STOP)
            self._writer.join()
            self._writer = None

    async def write(self, op: Callable[[Db], Result], *, run: str | None = None, urgent: bool = False) -> Result:
        """Run `op` in the next group transaction (holding `run`'s lock, see `start_group`) and return its result
        once that transaction is committed.

        An `urgent` op waits only for the group being written: the writer then commits the urgent ops in a group of
        their own before any other queued write or chore (a few small ops: about a millisecond). In line, it would
        also wait for every write queued ahead of it: a fleet of 1,000 runs queues 2,000 a second, hundreds at once
        after any stall of the writer."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        pending = PendingWrite(op, future, loop, run)
        if urgent:
            self._urgent.append(pending)
            self._writes.put(_URGENT)
        else:
            self._writes.put(pending)
        return await future

    def start_group(self, db: Any, runs: list[str], size: int) -> None:
        """Before a group's first op: take the locks of `runs` for its transaction (one writer needs none)."""

    def end_op(self, ok: bool) -> None:
        """After each op of a group: whether it stands (its savepoint released) or was undone."""

    def end_group(self, db: Any) -> None:
        """Before a group's COMMIT."""

    def announce(self, db: Db, payload: str) -> None:
        """Nothing to tell: no other server shares this store."""

    def lock_names(self, db: Db) -> None:
        """Nothing to order: one writer."""

    def listen(self, deliver: Callable[[str | None], None]) -> None:
        """Nothing to hear: no other server shares this store."""

    def writer_db(self) -> Any:
        """The writer's connection, (re)opened when needed."""
        raise NotImplementedError

    def close_writer_db(self) -> None:
        raise NotImplementedError

    def after_commit(self) -> None:
        """Called in the writer thread after each group (SQLite keeps its WAL bounded here)."""

    def _write_loop(self) -> None:
        stopping = False
        chores_due = bool(self._chores)  # the first call of a chore may have work left by an earlier server
        chores_at = 0.0
        while not stopping:
            if self._urgent:
                self._commit_urgent()
                continue
            if chores_due and time.monotonic() >= chores_at:
                ops = [op for chore in self._chores for op in chore(CHORE_OPS)]
                if ops:
                    started = time.monotonic()
                    self._commit_group([PendingWrite(op, None, None, run) for run, op in ops])
                    self.after_commit()
                    chores_at = time.monotonic() + (time.monotonic() - started) * CHORE_REST
                    continue
                chores_due = False
            try:
                item = self._writes.get(timeout=max(0.0, chores_at - time.monotonic()) if chores_due else None)
            except queue.Empty:
                continue
            batch: list[PendingWrite] = []
            while True:
                if item is _STOP:
                    stopping = True
                    break
                if isinstance(item, PendingWrite):
                    batch.append(item)
                if len(batch) >= self.max_batch or self._urgent:
                    break
                try:
                    item = self._writes.get_nowait()
                except queue.Empty:
                    break
            self._commit_urgent()
            if batch:
                self._commit_group(batch)
                self.after_commit()
                chores_due = bool(self._chores)  # a write may have made some due
        self.close_writer_db()

    def _commit_urgent(self) -> None:
        """Commit every urgent op queued so far, in groups of their own."""
        while self._urgent:
            batch = [self._urgent.popleft() for _ in range(min(len(self._urgent), self.max_batch))]
            self._commit_group(batch)
            self.after_commit()

    def _commit_group(self, batch: list[PendingWrite]) -> None:
        try:
            outcomes = self._run_group(batch)
        except self.error as exc:  # the group itself failed: every write in it failed
            log.warning("store group commit failed: %s", exc)
            self._abandon_group()
            self._forget_undone()
            outcomes = [(False, exc)] * len(batch)
        self.commits += 1
        self.writes += len(batch)
        for pending, (ok, value) in zip(batch, outcomes, strict=True):
            if pending.loop is not None and pending.future is not None:
                pending.loop.call_soon_threadsafe(_settle, pending.future, ok, value)
            elif not ok:
                log.warning("store chore failed (it is handed out again when due): %s", value)

    def _run_group(self, batch: list[PendingWrite]) -> list[tuple[bool, Any]]:
        """Run `batch` in one transaction, each op in its own savepoint, and commit; returns each op's (ok, result or
        error). The driver's error escaping it means the group itself failed."""
        outcomes: list[tuple[bool, Any]] = []
        db = self.writer_db()
        db.execute(self.begin)
        self.start_group(db, sorted({pending.run for pending in batch if pending.run is not None}), len(batch))
        for pending in batch:
            db.execute("SAVEPOINT op")
            try:
                outcomes.append((True, pending.op(db)))
                db.execute("RELEASE SAVEPOINT op")
                self.end_op(True)
            except Exception as exc:  # the op's own error goes back to its caller only
                db.execute("ROLLBACK TO SAVEPOINT op")
                db.execute("RELEASE SAVEPOINT op")
                self.end_op(False)
                self._forget_undone()
                outcomes.append((False, exc))
        self.end_group(db)
        db.execute("COMMIT")
        return outcomes

    def _abandon_group(self) -> None:
        """Roll back what is left of a failed group (or drop a broken connection)."""
        raise NotImplementedError

    def _forget_undone(self) -> None:
        for forget in self._forgetters:
            forget()


def _connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    connection.execute("PRAGMA busy_timeout = 30000")
    if readonly:
        connection.execute("PRAGMA query_only = ON")
    else:
        connection.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode: a commit survives a process crash; only an OS crash may lose the last ones.
        connection.execute("PRAGMA synchronous = NORMAL")
        connection.execute("PRAGMA temp_store = MEMORY")
        # Checkpoints copy the WAL into the database and fsync; the checkpointer thread does them, off the
        # writer's path; automatic ones would run inside a commit.
        connection.execute("PRAGMA wal_autocheckpoint = 0")
        # When a checkpoint resets the WAL, SQLite also cuts the file back to this size.
        connection.execute(f"PRAGMA journal_size_limit = {WAL_KEEP_BYTES}")
    return connection


CHECKPOINT_INTERVAL_S = 0.25
"""How often the checkpointer copies the WAL back into the database file (PASSIVE: never blocks anyone)."""
WAL_RESTART_BYTES = 16 * 2**20
"""WAL size past which the writer, between two groups, finishes a checkpoint and restarts the WAL.

A passive checkpoint alone never restarts the WAL while commits keep coming (each new commit lands
after the frames it copied), so under steady load the file grew without bound. The restart waits
only for the frames not copied yet and for readers still on old frames. The writer restarts only
between two groups in which the checkpointer is idle: a restart that met a pass in progress waited
for it in SQLite's busy handler (sleeps of 1 to 100 ms), 20-70 ms a restart, about every second
at 1,000 runs."""
WAL_KEEP_BYTES = 4 * 2**20
"""What the WAL file is truncated to after a restart (a WAL that size is reused, not regrown)."""
RESTART_BUSY_MS = 0
"""How long a restart waits for readers still on old frames: not at all. Every commit waits while it does, and
readers are short: a restart that finds one is tried again after the next group."""
WAL_FORCE_FACTOR = 2
"""Past this many times `wal_restart_bytes`, a restart waits for the checkpointer and for the readers (SQLite's busy
handler) instead of trying again later: readers that never all pause at once must not grow the WAL without bound."""


class SqliteStore(GroupWriter):
    """SQLite access for the server: the embedded default, one process, nothing to install."""

    begin = "BEGIN IMMEDIATE"
    error = sqlite3.Error

    def __init__(self, path: Path, *, max_batch: int = 512, readers: int = 2, wal_restart_bytes: int = 0) -> None:
        super().__init__(max_batch=max_batch)
        self.path = path
        self.wal_restart_bytes = wal_restart_bytes or WAL_RESTART_BYTES
        self.wal_restarts = 0
        self._db: sqlite3.Connection | None = None
        self._checkpointer: threading.Thread | None = None
        self._stopping = threading.Event()
        self._checkpointing = threading.Lock()
        """Held by the checkpointer during a pass; the writer restarts the WAL only when it can take it at once."""
        self._readers = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="runsteer-store-read")
        self._local = threading.local()
        self._read_connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._event_ids = itertools.count(1)

    @property
    def wal_path(self) -> Path:
        return self.path.with_name(self.path.name + "-wal")

    def open(self) -> None:
        """Create the file and schema if needed (migrating an older one) and start the writer thread."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = _connect(self.path, readonly=False)
        from control_server.series import migrate_sqlite

        _add_command_times(connection)
        migrate_sqlite(connection)
        last_id = connection.execute("SELECT COALESCE(MAX(event_id), 0) FROM events").fetchone()[0]
        # Events that are only streamed (metrics, heartbeats) are not stored, so the stored maximum alone could
        # hand out an id again after a restart; starting at the clock in microseconds keeps ids increasing.
        self._event_ids = itertools.count(max(int(last_id) + 1, time.time_ns() // 1000))
        self._db = connection
        self._stopping.clear()
        self.start_writer()
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="runsteer-store-checkpointer")
        self._checkpointer.start()

    def close(self) -> None:
        """Finish queued writes, stop the writer and close every connection."""
        self.stop_writer()
        self._stopping.set()
        if self._checkpointer is not None:
            self._checkpointer.join()
            self._checkpointer = None
        self._readers.shutdown(wait=True)
        with self._connections_lock:
            for connection in self._read_connections:
                connection.close()
            self._read_connections.clear()

    def event_ids(self, db: Db, count: int) -> list[int]:
        """The next `count` ids of this server's counter (one writer: the order of ids is the order of commits)."""
        return [next(self._event_ids) for _ in range(count)]

    def disk_bytes(self) -> dict[str, int]:
        """Sizes of the database file and its WAL."""
        return {"db": _size(self.path), "wal": _size(self.wal_path)}

    async def read(self, op: Callable[[Db], Result]) -> Result:
        """Run `op` on a read-only connection in the reader pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._run_read, op)

    def read_now(self, op: Callable[[Db], Result]) -> Result:
        """Run `op` on a read connection in the calling thread (start-up only, before serving)."""
        return self._run_read(op)

    def _run_read(self, op: Callable[[Db], Result]) -> Result:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = _connect(self.path, readonly=True)
            self._local.connection = connection
            with self._connections_lock:
                self._read_connections.append(connection)
        return op(connection)

    def writer_db(self) -> sqlite3.Connection:
        assert self._db is not None
        return self._db

    def close_writer_db(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _abandon_group(self) -> None:
        if self._db is not None and self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def after_commit(self) -> None:
        """Restart the WAL once it passes `wal_restart_bytes`, so it stays bounded under any steady load."""
        size = _size(self.wal_path)
        if self._db is None or size < self.wal_restart_bytes:
            return
        wait = size >= WAL_FORCE_FACTOR * self.wal_restart_bytes
        if not self._checkpointing.acquire(blocking=wait):
            return  # the checkpointer is copying: the next group looks again, and finds less left to copy
        try:
            if not wait:
                self._db.execute(f"PRAGMA busy_timeout = {RESTART_BUSY_MS}")
            busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        finally:
            if not wait:
                self._db.execute("PRAGMA busy_timeout = 30000")
            self._checkpointing.release()
        if not busy:
            self.wal_restarts += 1

    def _checkpoint_loop(self) -> None:
        """Copy the WAL into the database every CHECKPOINT_INTERVAL_S without blocking anyone (PASSIVE)."""
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        try:
            while not self._stopping.wait(CHECKPOINT_INTERVAL_S):
                with self._checkpointing:
                    connection.execute("PRAGMA wal_checkpoint(PASSIVE)")
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            connection.close()


def _add_command_times(db: sqlite3.Connection) -> None:
    """Give the commands table of a schema-2 file its `created_at` column (rate limits count it), read from the
    records, before the schema's index on it is created."""
    columns = [row[0] for row in db.execute("SELECT name FROM pragma_table_info('commands')").fetchall()]
    if columns and "created_at" not in columns:
        db.execute("ALTER TABLE commands ADD COLUMN created_at REAL NOT NULL DEFAULT 0")
        db.execute("UPDATE commands SET created_at = json_extract(body, '$.created_at')")


def is_postgres_url(db: object) -> bool:
    """True for a `postgresql://` (or `postgres://`) URL."""
    return isinstance(db, str) and db.startswith(("postgresql://", "postgres://"))


def describe_store(db: Path | str) -> str:
    """`--db` as it may be logged: a PostgreSQL URL loses its password."""
    if not is_postgres_url(db):
        return str(db)
    parts = urlsplit(str(db))
    if parts.password is None:
        return str(db)
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))


def make_store(db: Path | str) -> Store:
    """The store `--db` names: a PostgreSQL URL, or else a SQLite file."""
    if is_postgres_url(db):
        from control_server.postgres import PostgresStore  # psycopg is loaded only by those who use it

        return PostgresStore(str(db))
    return SqliteStore(Path(db))


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)
