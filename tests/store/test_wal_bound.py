"""The SQLite WAL stays bounded under steady load with concurrent readers, and commits keep flowing."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from control_server.series import SeriesCache, bucketed, insert_steps
from control_server.store import Db, SqliteStore

RESTART_BYTES = 1 * 2**20
LOAD_S = 6.0
RUNS = 50
KEYS = [f"metric_{index:02d}" for index in range(40)]


@pytest.mark.slow
def test_wal_stays_bounded_under_steady_writes_and_reads(tmp_path: Path) -> None:
    """Many times the bound goes through the WAL while readers read, yet the file never grows far past it."""
    store = SqliteStore(tmp_path / "runsteer.db", wal_restart_bytes=RESTART_BYTES)
    store.open()
    cache = SeriesCache()
    largest_wal = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal largest_wal
        while not stop.is_set():
            largest_wal = max(largest_wal, store.disk_bytes()["wal"])
            time.sleep(0.005)

    async def trainer(run: int, commit_times: list[float]) -> int:
        step = 0
        deadline = time.monotonic() + LOAD_S
        while time.monotonic() < deadline:
            values = {key: step * 0.001 + index for index, key in enumerate(KEYS)}

            def op(db: Db, step: int = step, values: dict[str, float] = values) -> int:
                return insert_steps(db, cache, cache.series_id(db, f"run-{run}", "main"), {step: (time.time(), values)})

            started = time.monotonic()
            await store.write(op)
            commit_times.append(time.monotonic() - started)
            step += 1
        return step

    async def reader() -> int:
        reads = 0
        read_cache = SeriesCache()
        deadline = time.monotonic() + LOAD_S
        while time.monotonic() < deadline:
            await store.read(lambda db: bucketed(db, read_cache, 1, 0, 64))
            reads += 1
        return reads

    async def load() -> tuple[list[int], list[float], int]:
        commit_times: list[float] = []
        steps = await asyncio.gather(*(trainer(run, commit_times) for run in range(RUNS)))
        return list(steps), commit_times, 0

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:

        async def everything() -> tuple[list[int], list[float], int]:
            (steps, commit_times, _), reads = await asyncio.gather(load(), reader())
            return steps, commit_times, reads

        steps, commit_times, reads = asyncio.run(everything())
    finally:
        stop.set()
        watcher.join()
        store.close()
    assert store.wal_restarts >= 3, f"the load must pass the bound several times ({store.wal_restarts} restarts)"
    assert reads > 0 and min(steps) > 0
    assert largest_wal < 4 * RESTART_BYTES, f"WAL reached {largest_wal / 2**20:.1f} MiB"
    commit_times.sort()
    assert commit_times[int(len(commit_times) * 0.99)] < 1.0, "commits did not stall behind checkpoints"
