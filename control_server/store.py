"""The durable store: SQLite in WAL mode with one writer thread doing group commits.

Every write is a function of a connection, queued to the writer thread; the writer runs
all queued writes in one transaction (each inside its own savepoint, so one failure does
not undo the others), commits, and only then resolves each caller's future. Reads run on
a small pool of read-only connections, never on the event loop.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

Result = TypeVar("Result")
WriteOp = Callable[[sqlite3.Connection], Result]

ROLLUP_LEVELS = (3, 4, 5, 6, 7, 8, 9, 10, 11)
"""Rollup bucket sizes as bit shifts (every power of two from 8 to 2048 steps), so a downsampled read takes
one rollup row per point it returns up to buckets of 2048 steps, and a few beyond."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS commands (
    run_id TEXT NOT NULL,
    id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    status TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (run_id, id)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS commands_by_seq ON commands (run_id, seq);
CREATE TABLE IF NOT EXISTS events (
    event_id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    time REAL NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_run ON events (run_id, event_id);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id TEXT NOT NULL,
    checkpoint_id TEXT NOT NULL,
    branch TEXT NOT NULL,
    step INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (run_id, checkpoint_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS metric_series (
    series_id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    branch TEXT NOT NULL,
    key TEXT NOT NULL,
    UNIQUE (run_id, branch, key)
);
CREATE TABLE IF NOT EXISTS metric_points (
    series_id INTEGER NOT NULL,
    step INTEGER NOT NULL,
    time REAL NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (series_id, step)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS metric_rollups (
    series_id INTEGER NOT NULL,
    shift INTEGER NOT NULL,
    bucket INTEGER NOT NULL,
    n INTEGER NOT NULL,
    total REAL NOT NULL,
    lo REAL NOT NULL,
    hi REAL NOT NULL,
    last_step INTEGER NOT NULL,
    PRIMARY KEY (series_id, shift, bucket)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS metric_batches (
    run_id TEXT NOT NULL,
    batch_id TEXT NOT NULL,
    PRIMARY KEY (run_id, batch_id)
) WITHOUT ROWID;
"""

BATCH_TABLE = """
CREATE TEMP TABLE IF NOT EXISTS batch_points (
    series_id INTEGER NOT NULL,
    step INTEGER NOT NULL,
    time REAL NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (series_id, step)
) WITHOUT ROWID;
CREATE TEMP TABLE IF NOT EXISTS batch_rollup (
    series_id INTEGER NOT NULL,
    bucket INTEGER NOT NULL,
    n INTEGER NOT NULL,
    total REAL NOT NULL,
    lo REAL NOT NULL,
    hi REAL NOT NULL,
    last_step INTEGER NOT NULL,
    PRIMARY KEY (series_id, bucket)
) WITHOUT ROWID;
"""


@dataclass
class _PendingWrite:
    op: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


_STOP = object()


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
        # writer's path, so a commit never waits for one.
        connection.execute("PRAGMA wal_autocheckpoint = 0")
    return connection


CHECKPOINT_INTERVAL_S = 0.5
"""How often the checkpointer folds the WAL back into the database file."""


class Store:
    """SQLite access for the server: `await write(op)` commits before returning; `await read(op)`."""

    def __init__(self, path: Path, *, max_batch: int = 512, readers: int = 2) -> None:
        self.path = path
        self.max_batch = max_batch
        self._writes: queue.SimpleQueue[_PendingWrite | object] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._checkpointer: threading.Thread | None = None
        self._stopping = threading.Event()
        self._readers = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="runsteer-store-read")
        self._local = threading.local()
        self._read_connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self.commits = 0
        self.writes = 0

    def open(self) -> None:
        """Create the file and schema if needed and start the writer thread."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = _connect(self.path, readonly=False)
        connection.executescript(SCHEMA)
        connection.executescript(BATCH_TABLE)
        self._stopping.clear()
        self._writer = threading.Thread(target=self._write_loop, args=(connection,), name="runsteer-store-writer")
        self._writer.start()
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="runsteer-store-checkpointer")
        self._checkpointer.start()

    def close(self) -> None:
        """Finish queued writes, stop the writer and close every connection."""
        if self._writer is not None:
            self._writes.put(_STOP)
            self._writer.join()
            self._writer = None
        self._stopping.set()
        if self._checkpointer is not None:
            self._checkpointer.join()
            self._checkpointer = None
        self._readers.shutdown(wait=True)
        with self._connections_lock:
            for connection in self._read_connections:
                connection.close()
            self._read_connections.clear()

    async def write(self, op: Callable[[sqlite3.Connection], Result]) -> Result:
        """Run `op` in the next group transaction and return its result once that transaction is committed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._writes.put(_PendingWrite(op, future, loop))
        return await future

    async def read(self, op: Callable[[sqlite3.Connection], Result]) -> Result:
        """Run `op` on a read-only connection in the reader pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._run_read, op)

    def read_now(self, op: Callable[[sqlite3.Connection], Result]) -> Result:
        """Run `op` on a read connection in the calling thread (start-up only, before serving)."""
        return self._run_read(op)

    def _run_read(self, op: Callable[[sqlite3.Connection], Result]) -> Result:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = _connect(self.path, readonly=True)
            self._local.connection = connection
            with self._connections_lock:
                self._read_connections.append(connection)
        return op(connection)

    def _checkpoint_loop(self) -> None:
        """Fold the WAL into the database every CHECKPOINT_INTERVAL_S without blocking the writer (PASSIVE)."""
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        try:
            while not self._stopping.wait(CHECKPOINT_INTERVAL_S):
                connection.execute("PRAGMA wal_checkpoint(PASSIVE)")
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            connection.close()

    def _write_loop(self, connection: sqlite3.Connection) -> None:
        stopping = False
        while not stopping:
            batch: list[_PendingWrite] = []
            item = self._writes.get()
            while True:
                if item is _STOP:
                    stopping = True
                    break
                assert isinstance(item, _PendingWrite)
                batch.append(item)
                if len(batch) >= self.max_batch:
                    break
                try:
                    item = self._writes.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._commit_group(connection, batch)
        connection.close()

    def _commit_group(self, connection: sqlite3.Connection, batch: list[_PendingWrite]) -> None:
        outcomes: list[tuple[bool, Any]] = []
        try:
            connection.execute("BEGIN IMMEDIATE")
            for pending in batch:
                connection.execute("SAVEPOINT op")
                try:
                    outcomes.append((True, pending.op(connection)))
                    connection.execute("RELEASE op")
                except Exception as exc:  # the op's own error goes back to its caller only
                    connection.execute("ROLLBACK TO op")
                    connection.execute("RELEASE op")
                    outcomes.append((False, exc))
            connection.execute("COMMIT")
        except sqlite3.Error as exc:  # the commit itself failed: every write in the group failed
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            outcomes = [(False, exc)] * len(batch)
        self.commits += 1
        self.writes += len(batch)
        for pending, (ok, value) in zip(batch, outcomes, strict=True):
            pending.loop.call_soon_threadsafe(_settle, pending.future, ok, value)


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)
