"""Older SQLite files open at the current schema: a row per value (schema 1) as packed steps with the same history,
schema 2's commands with their times, and (PostgreSQL too) without the batch ids kept forever."""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
from pathlib import Path

import psycopg
import pytest

from control_server.postgres import SCHEMA_VERSION as POSTGRES_VERSION
from control_server.series import SeriesCache, bucketed, insert_steps, raw_steps
from control_server.store import SCHEMA_VERSION, Db, SqliteStore, is_postgres_url, make_store

VERSION_1 = """
CREATE TABLE metric_series (series_id INTEGER PRIMARY KEY, run_id TEXT NOT NULL, branch TEXT NOT NULL,
    key TEXT NOT NULL, UNIQUE (run_id, branch, key));
CREATE TABLE metric_points (series_id INTEGER NOT NULL, step INTEGER NOT NULL, time REAL NOT NULL,
    value REAL NOT NULL, PRIMARY KEY (series_id, step)) WITHOUT ROWID;
CREATE TABLE metric_rollups (series_id INTEGER NOT NULL, shift INTEGER NOT NULL, bucket INTEGER NOT NULL,
    n INTEGER NOT NULL, total REAL NOT NULL, lo REAL NOT NULL, hi REAL NOT NULL, last_step INTEGER NOT NULL,
    PRIMARY KEY (series_id, shift, bucket)) WITHOUT ROWID;
"""


def series_of(db: sqlite3.Connection, branch: str) -> int:
    row = db.execute("SELECT series_id FROM metric_series WHERE run_id = 'r' AND branch = ?", (branch,)).fetchone()
    return int(row[0])


def test_row_per_value_history_is_repacked_on_open(tmp_path: Path) -> None:
    """Every value of a version-1 file is there after opening, in raw reads and in rollups, and old tables are gone."""
    path = tmp_path / "runsteer.db"
    rng = random.Random(3)
    values = {
        (branch, key, step): rng.uniform(-1, 1)
        for branch in ("main", "b2")
        for key in ("loss", "lr")
        for step in range(0, 700)
        if not (key == "lr" and step % 3)
    }
    old = sqlite3.connect(path)
    old.executescript(VERSION_1)
    ids = {}
    for branch, key, _ in values:
        if (branch, key) not in ids:
            old.execute("INSERT INTO metric_series (run_id, branch, key) VALUES ('r', ?, ?)", (branch, key))
            ids[(branch, key)] = old.execute("SELECT last_insert_rowid()").fetchone()[0]
    old.executemany(
        "INSERT INTO metric_points VALUES (?, ?, 1.0, ?)",
        [(ids[(branch, key)], step, value) for (branch, key, step), value in values.items()],
    )
    old.commit()
    old.close()

    store = SqliteStore(path)
    store.open()
    try:

        def read(db: sqlite3.Connection) -> tuple[int, dict[tuple[str, str, int], float], dict[int, float]]:
            cache = SeriesCache()
            found = {}
            for branch in ("main", "b2"):
                series_id = series_of(db, branch)
                for step, _, row in raw_steps(db, cache, series_id, 0):
                    found.update({(branch, key, step): value for key, value in row.items()})
            main = series_of(db, "main")
            buckets = bucketed(db, cache, main, 0, 128)
            means = {bucket: agg["loss"].total / agg["loss"].n for bucket, agg in buckets.items()}
            return db.execute("PRAGMA user_version").fetchone()[0], found, means

        version, found, means = store.read_now(read)
        tables = store.read_now(lambda db: {name for (name,) in db.execute("SELECT name FROM sqlite_master")})
    finally:
        store.close()
    assert version == SCHEMA_VERSION
    assert found == values
    assert "metric_points" not in tables
    for bucket, mean in means.items():
        members = [values[("main", "loss", step)] for step in range(bucket * 128, min(bucket * 128 + 128, 700))]
        assert mean == pytest.approx(sum(members) / len(members), rel=1e-12)


def test_a_schema_2_file_gives_its_commands_the_time_rate_limits_count(tmp_path: Path) -> None:
    """Commands stored before `created_at` was a column get it from their records, so a rate limit counts them."""
    path = tmp_path / "runsteer.db"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE commands (run_id TEXT NOT NULL, id TEXT NOT NULL, seq INTEGER NOT NULL, status TEXT NOT NULL, "
        "body TEXT NOT NULL, PRIMARY KEY (run_id, id)) WITHOUT ROWID; PRAGMA user_version = 2;"
    )
    old.execute("INSERT INTO commands VALUES ('r', 'c-1', 1, 'applied', ?)", (json.dumps({"created_at": 1234.5}),))
    old.commit()
    old.close()
    store = SqliteStore(path)
    store.open()
    try:
        rows = store.read_now(lambda db: db.execute("SELECT id, created_at FROM commands").fetchall())
        version = store.read_now(lambda db: db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        store.close()
    assert rows == [("c-1", 1234.5)]
    assert version == SCHEMA_VERSION


def downgrade_to_kept_batch_ids(db: Path | str) -> None:
    """Make a store of this schema one of the schema before recent batch ids (SQLite 4, PostgreSQL 3): every batch id
    ever stored, a row each."""
    old = "CREATE TABLE metric_batches (run_id TEXT NOT NULL, batch_id TEXT NOT NULL, PRIMARY KEY (run_id, batch_id))"
    ids = [(f"b-{index}",) for index in range(100)]
    if is_postgres_url(db):
        with psycopg.connect(str(db), autocommit=True) as pg:
            pg.execute("DROP TABLE metric_recent_batches")
            pg.execute(old)
            pg.cursor().executemany("INSERT INTO metric_batches VALUES ('r', %s)", ids)
            pg.execute("UPDATE runsteer_schema SET version = 3")
        return
    lite = sqlite3.connect(db, isolation_level=None)
    lite.execute("DROP TABLE metric_recent_batches")
    lite.execute(old + " WITHOUT ROWID")
    lite.executemany("INSERT INTO metric_batches VALUES ('r', ?)", ids)
    lite.execute("PRAGMA user_version = 4")
    lite.close()


def schema_of(db: Db, postgres: bool) -> tuple[int, set[str]]:
    """The store's schema version and its tables."""
    if postgres:
        version = db.execute("SELECT MAX(version) FROM runsteer_schema").fetchone()[0]
        return int(version), {name for (name,) in db.execute("SELECT tablename FROM pg_tables")}
    version = db.execute("PRAGMA user_version").fetchone()[0]
    return int(version), {name for (name,) in db.execute("SELECT name FROM sqlite_master")}


@pytest.mark.both_stores
def test_a_store_that_kept_every_batch_id_drops_them_and_keeps_its_history_and_rollup_marks(
    store_db: Path | str,
) -> None:
    """Opening a store of the schema before recent batch ids drops the ids kept forever for the table of each run's
    recent ones; its steps stay, and a series not rolled up yet gets no mark (older stores' marks are not made
    again)."""
    store = make_store(store_db)
    store.open()
    try:
        cache = SeriesCache()

        async def fill() -> None:
            def op(db: Db) -> None:
                insert_steps(db, cache, cache.series_id(db, "r", "main"), {s: (1.0, {"loss": s}) for s in range(40)})

            await store.write(op)

        asyncio.run(fill())
    finally:
        store.close()
    downgrade_to_kept_batch_ids(store_db)
    store = make_store(store_db)
    store.open()
    try:
        version, tables = store.read_now(lambda db: schema_of(db, is_postgres_url(store_db)))
        steps = store.read_now(lambda db: [step for step, _, _ in raw_steps(db, SeriesCache(), 1, 0)])
        marks = store.read_now(lambda db: db.execute("SELECT COUNT(*) FROM metric_rollup_marks").fetchone()[0])
    finally:
        store.close()
    assert version == (POSTGRES_VERSION if is_postgres_url(store_db) else SCHEMA_VERSION)
    assert "metric_batches" not in tables and "metric_recent_batches" in tables
    assert steps == list(range(40))
    assert marks == 0
