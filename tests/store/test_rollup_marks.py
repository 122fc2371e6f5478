"""Rollups written off the write path: a read across the part not rolled up yet returns exactly what it returns once
everything is rolled up, and the store writer's chore rolls up what closed, also what a stopped server left."""

from __future__ import annotations

import asyncio
import math
import random
import sqlite3
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import pytest

from control_server.series import (
    FINEST,
    Agg,
    Bucket,
    SeriesCache,
    bucketed,
    catch_up,
    due_rollups,
    insert_steps,
    roll_up_series,
    rolled_through,
)
from control_server.store import Db, SqliteStore, Store, make_store

Result = TypeVar("Result")
WIDTHS = (16, 32, 48, 64, 128, 256, 1024, 4096, 16384)
"""Read widths: each rollup level serves some (48: three buckets of 16 regrouped)."""


def history(seed: int) -> list[dict[int, tuple[float, dict[str, float]]]]:
    """Batches of steps as a trainer with odd habits sends them: dense and sparse stretches, a step with no values,
    keys that come and go, and late batches (steps skipped before, or new keys for steps already stored)."""
    rng = random.Random(seed)
    steps = [step for step in range(2400) if rng.random() < 0.9] + list(range(2400, 4800, 97))
    batches: list[dict[int, tuple[float, dict[str, float]]]] = []
    at = 0
    while at < len(steps):
        size = rng.choice((1, 1, 3, 16, 40, 300))
        batch: dict[int, tuple[float, dict[str, float]]] = {}
        for step in steps[at : at + size]:
            keys = rng.choice((("loss", "lr"), ("loss", "lr"), ("loss",), ("lr",), ()))
            batch[step] = (1.0, {key: rng.uniform(-5, 5) for key in keys})
        batches.append(batch)
        at += size
        if rng.random() < 0.15:
            late = {
                step: (1.0, {"loss": rng.uniform(-5, 5), "late": rng.uniform(-5, 5)})
                for step in rng.sample(range(max(1, steps[at - 1] - 600), steps[at - 1] + 1), 5)
            }
            batches.append(late)
    return batches


def in_store(store: Store, op: Callable[[Db], Result]) -> Result:
    async def write() -> Result:
        return await store.write(op)

    return asyncio.run(write())


def reads(db: Db, series_id: int) -> list[dict[int, Bucket]]:
    cache = SeriesCache()
    found = []
    for width in WIDTHS:
        for start in (0, 3 * width):
            found.append(bucketed(db, cache, series_id, start, width))
            found.append(bucketed(db, cache, series_id, start, width, frozenset({"loss"})))
    return found


@pytest.mark.both_stores
def test_a_read_across_a_rollup_gap_equals_the_read_once_everything_is_rolled_up(store_db: Path | str) -> None:
    """Two series get the same batches; one is rolled up after each, the other now and then (its mark lags by up
    to a few thousand steps, late points fall on both sides of it): every downsampled read is the same, bit for bit."""
    store = make_store(store_db)
    store.open()
    try:
        cache = SeriesCache()
        now, later = in_store(store, lambda db: (cache.series_id(db, "r", "now"), cache.series_id(db, "r", "later")))
        rng = random.Random(5)
        gaps = []
        truth: dict[int, dict[str, float]] = {}
        for number, batch in enumerate(history(11)):
            for step, (_, values) in batch.items():
                truth[step] = values | truth.get(step, {})  # the first value of a key wins

            def write(db: Db, batch: dict[int, tuple[float, dict[str, float]]] = batch) -> int:
                insert_steps(db, cache, now, batch)
                catch_up(db, cache, now)
                insert_steps(db, cache, later, batch)
                if rng.random() < 0.1:
                    roll_up_series(db, cache, later)
                return rolled_through(db, now) - rolled_through(db, later)

            gaps.append(in_store(store, write))
            if number % 7 == 0:
                assert store.read_now(partial(reads, series_id=later)) == store.read_now(partial(reads, series_id=now))
        assert store.read_now(partial(reads, series_id=later)) == store.read_now(partial(reads, series_id=now))
        assert max(gaps) > 1024 and gaps.count(0) < len(gaps) / 2
        for width in (16, 256, 4096):
            found = store.read_now(partial(bucketed, cache=cache, series_id=later, start=0, width=width))
            wanted = {bucket: aggs for bucket, aggs in expected(truth, width).items() if aggs}
            assert found.keys() == wanted.keys()
            for bucket, aggs in wanted.items():
                assert found[bucket].keys() == aggs.keys()
                for key, agg in aggs.items():
                    got = found[bucket][key]
                    assert (got.n, got.last, got.lo, got.hi) == (agg.n, agg.last, agg.lo, agg.hi)
                    assert math.isclose(got.total, agg.total, rel_tol=1e-9, abs_tol=1e-9)
    finally:
        store.close()


def expected(truth: dict[int, dict[str, float]], width: int) -> dict[int, Bucket]:
    """Buckets computed from the values themselves (sums added in step order)."""
    found: dict[int, Bucket] = {}
    for step in sorted(truth):
        for key, value in truth[step].items():
            agg = found.setdefault(step // width, {}).setdefault(key, Agg(0, step, 0.0, value, value))
            agg.merge(Agg(1, step, value, value, value))
    return found


def marks(db: Db) -> dict[int, tuple[int, int]]:
    """Per series: its rollup mark and where its closed buckets end."""
    rows = db.execute("SELECT series_id, MAX(step) FROM metric_steps GROUP BY series_id").fetchall()
    return {int(series): (rolled_through(db, series), (newest >> FINEST) << FINEST) for series, newest in rows}


def wait_until_rolled_up(store: Store) -> dict[int, tuple[int, int]]:
    deadline = time.monotonic() + 10
    while True:
        found = store.read_now(marks)
        if all(mark == closed for mark, closed in found.values()):
            return found
        assert time.monotonic() < deadline, found
        time.sleep(0.05)


def test_the_writer_rolls_up_between_writes_and_what_a_stopped_server_left(tmp_path: Path) -> None:
    """With the chore registered, every series' mark reaches its last closed bucket soon after the writes; series
    written by a store without it (a server stopped before rolling up) are found and rolled up on the next open."""

    def write_steps(store: SqliteStore, cache: SeriesCache, steps: range) -> None:
        async def one_step_per_write() -> None:
            for step in steps:
                for run in ("a", "b", "c"):

                    def op(db: Db, run: str = run, step: int = step) -> None:
                        insert_steps(db, cache, cache.series_id(db, run, "main"), {step: (1.0, {"loss": step / 7})})

                    await store.write(op)

        asyncio.run(one_step_per_write())

    for chore, steps in ((True, range(0, 200)), (False, range(200, 300)), (True, range(300, 301))):
        store = SqliteStore(tmp_path / "runsteer.db")
        cache = SeriesCache()
        if chore:
            store.add_chore(partial(due_rollups, cache))
        store.open()
        try:
            write_steps(store, cache, steps)
            if chore:
                assert {closed for _, closed in wait_until_rolled_up(store).values()} == {(steps[-1] >> 4) << 4}
            else:
                assert {mark for mark, _ in store.read_now(marks).values()} == {192}
        finally:
            store.close()
    fine = SqliteStore(tmp_path / "runsteer.db")
    fine.open()
    try:
        cache = SeriesCache()
        for series_id in (1, 2, 3):
            loss = fine.read_now(partial(bucketed, cache=cache, series_id=series_id, start=0, width=16))
            assert sorted(loss) == list(range(19))
            assert all(
                bucket["loss"].n == 16 and bucket["loss"].last == index * 16 + 15
                for index, bucket in loss.items()
                if index < 18
            )
    finally:
        fine.close()


def test_a_store_rolled_up_as_buckets_closed_opens_with_its_marks(tmp_path: Path) -> None:
    """A file of schema 3 (every closed bucket stored, no marks) gets the mark of each series' last closed bucket,
    so its reads come from its rollups."""
    path = tmp_path / "runsteer.db"
    store = SqliteStore(path)
    store.open()
    try:
        cache = SeriesCache()

        def fill(db: Db) -> None:
            for run, last in (("a", 1000), ("b", 15), ("c", 40)):
                series_id = cache.series_id(db, run, "main")
                insert_steps(db, cache, series_id, {step: (1.0, {"loss": step / 3}) for step in range(last + 1)})
                catch_up(db, cache, series_id)

        in_store(store, fill)
        before = store.read_now(marks)
    finally:
        store.close()
    old = sqlite3.connect(path, isolation_level=None)
    old.execute("DROP TABLE metric_rollup_marks")
    old.execute("PRAGMA user_version = 3")
    assert old.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'metric_rollup_marks'").fetchone() == (0,)
    old.close()
    store = SqliteStore(path)
    store.open()
    try:
        assert store.read_now(marks) == before == {1: (992, 992), 2: (0, 0), 3: (32, 32)}
    finally:
        store.close()
