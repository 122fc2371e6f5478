"""Metric ingest (a row per value, de-duplicated per batch id) and history with server-side downsampling.

History lives in the store, not in memory: the server keeps only each run's latest values
(for Prometheus) and a map of series ids. Each batch also updates rollups (count, sum, min,
max per bucket of 8 to 2048 steps) in the same transaction, aggregated in SQL; downsampling
reads those, so a long run answers as fast as a short one.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterable

from control_server.errors import ApiError
from control_server.events import EventLog
from control_server.runs import MAX_BRANCHES, RunRegistry
from control_server.store import ROLLUP_LEVELS, Store
from protocols.errors import ErrorDetail
from protocols.events import MetricsEvent
from protocols.records import MetricsAck, MetricsBatch, MetricSeries, MetricsHistory

MAX_RAW_POINTS = 100_000
"""Most points per series a request without `max_points` may return."""

MAX_READ_POINTS = 250_000
"""Most points one history answer may hold across all its series (about 6 MB of JSON)."""

MAX_METRIC_NAMES = 4096
"""Most distinct metric names one run may have: each is a series on every branch, kept for good."""

MAX_METRIC_SERIES = 65_536
"""Most (branch, name) series one run may have, e.g. 16 branches of 4,096 metrics or 1,024 of 64."""


class TooManyPoints(ApiError):
    status = 422
    code = "too_many_points"


class TooManyMetrics(ApiError):
    status = 422
    code = "too_many_metrics"


class MetricsService:
    """Stores metric batches and answers history queries."""

    def __init__(self, store: Store, events: EventLog, runs: RunRegistry) -> None:
        self.store = store
        self.events = events
        self.runs = runs
        self.latest: dict[tuple[str, str], dict[str, float]] = {}
        """The newest value of every metric per (run_id, branch)."""
        self.latest_nonfinite: dict[tuple[str, str], list[str]] = {}
        self.values_ingested = 0
        self._series_ids: dict[tuple[str, str, str], int] = {}  # touched only by the writer thread
        self._series: dict[str, set[tuple[str, str]]] = {}  # each run's (branch, name) series; writer thread only

    async def ingest(self, run_id: str, batch: MetricsBatch) -> MetricsAck:
        """Commit a batch (unless its `batch_id` was already stored), then publish it."""
        self.runs.get(run_id)

        def write(db: sqlite3.Connection) -> int | None:
            if batch.batch_id is not None:
                inserted = db.execute(
                    "INSERT OR IGNORE INTO metric_batches VALUES (?, ?)", (run_id, batch.batch_id)
                ).rowcount
                if inserted == 0:
                    return None
            self._admit_series(db, run_id, batch)
            rows = []
            for sample in batch.samples:
                for key, value in sample.values.items():
                    series_id = self._series_id(db, run_id, sample.branch, key)
                    rows.append((series_id, sample.step, sample.time, value))
            return insert_points(db, rows)

        stored = await self.store.write(write)
        if stored is None:
            return MetricsAck(stored_values=0, duplicate=True)
        self.values_ingested += stored
        for sample in batch.samples:
            self.latest.setdefault((run_id, sample.branch), {}).update(sample.values)
            self.latest_nonfinite[(run_id, sample.branch)] = list(sample.nonfinite)
        last = max(batch.samples, key=lambda sample: (sample.time, sample.step))
        await self.runs.note_step(run_id, last.branch, last.step)
        event = self.events.make(
            lambda event_id, now: MetricsEvent(event_id=event_id, time=now, run_id=run_id, samples=batch.samples)
        )
        self.events.publish(event)
        return MetricsAck(stored_values=stored)

    def _admit_series(self, db: sqlite3.Connection, run_id: str, batch: MetricsBatch) -> None:
        """Refuse a batch that would take the run past MAX_METRIC_NAMES names, MAX_BRANCHES branches or
        MAX_METRIC_SERIES (branch, name) series, in its transaction: each series is kept, indexed and cached."""
        known = self._series.get(run_id)
        if known is None:
            rows = db.execute("SELECT branch, key FROM metric_series WHERE run_id = ?", (run_id,))
            known = self._series[run_id] = {(branch, key) for branch, key in rows}
        new = {(sample.branch, key) for sample in batch.samples for key in sample.values} - known
        if not new:
            return
        every = known | new
        for what, count, limit, field in (
            ("metric names", len({key for _, key in every}), MAX_METRIC_NAMES, "samples.values"),
            ("branches", len({branch for branch, _ in every}), MAX_BRANCHES, "samples.branch"),
            ("series (branch, name)", len(every), MAX_METRIC_SERIES, "samples.values"),
        ):
            if count > limit:
                raise TooManyMetrics(
                    f"this batch would give run {run_id} {count} {what}; a run may have at most {limit}",
                    details=[ErrorDetail(field=field, message=f"too many {what}", allowed=f"at most {limit} per run")],
                )
        known |= new

    def _series_id(self, db: sqlite3.Connection, run_id: str, branch: str, key: str) -> int:
        name = (run_id, branch, key)
        series_id = self._series_ids.get(name)
        if series_id is None:
            db.execute("INSERT OR IGNORE INTO metric_series (run_id, branch, key) VALUES (?, ?, ?)", name)
            series_id = int(
                db.execute(
                    "SELECT series_id FROM metric_series WHERE run_id = ? AND branch = ? AND key = ?", name
                ).fetchone()[0]
            )
            self._series_ids[name] = series_id
        return series_id

    async def history(
        self, run_id: str, *, keys: Iterable[str], branch: str, since_step: int, max_points: int | None
    ) -> MetricsHistory:
        """A branch's metric history; with `max_points`, buckets of equal step width (mean, min, max)."""
        self.runs.get(run_id)
        wanted = sorted(set(keys))

        def op(db: sqlite3.Connection) -> tuple[int, dict[str, MetricSeries]]:
            found = db.execute(
                "SELECT key, series_id FROM metric_series WHERE run_id = ? AND branch = ?", (run_id, branch)
            ).fetchall()
            series_ids = {key: series_id for key, series_id in found if not wanted or key in wanted}
            width = 1 if max_points is None else _bucket_width(db, series_ids.values(), since_step, max_points)
            series: dict[str, MetricSeries] = {}
            points = 0
            for key, series_id in series_ids.items():
                read = (
                    _raw_series(db, series_id, since_step)
                    if width == 1
                    else _bucketed_series(db, series_id, since_step, width)
                )
                points += len(read.steps)
                if points > MAX_READ_POINTS:
                    raise TooManyPoints(
                        f"more than {MAX_READ_POINTS} points in one answer ({len(series_ids)} series); name fewer "
                        "`keys`, pass a smaller `max_points` or a later `since_step`",
                        details=[
                            ErrorDetail(
                                field="keys", message="too many points", allowed=f"at most {MAX_READ_POINTS} in all"
                            )
                        ],
                    )
                series[key] = read
            return width, series

        width, series = await self.store.read(op)
        return MetricsHistory.model_construct(run_id=run_id, branch=branch, bucket_steps=width, series=series)


BATCH_ROLLUP = f"""
INSERT INTO temp.batch_rollup
SELECT series_id, step >> {ROLLUP_LEVELS[0]}, COUNT(*), SUM(value), MIN(value), MAX(value), MAX(step)
FROM temp.batch_points GROUP BY series_id, step >> {ROLLUP_LEVELS[0]}
"""
"""The batch's own buckets at the finest level; every level is folded from these, not from the points."""

ROLLUP_UPSERT = """
INSERT INTO metric_rollups
SELECT series_id, ?1, bucket >> ?2, SUM(n), SUM(total), MIN(lo), MAX(hi), MAX(last_step)
FROM temp.batch_rollup WHERE true GROUP BY series_id, bucket >> ?2
ON CONFLICT DO UPDATE SET
    n = n + excluded.n, total = total + excluded.total, lo = min(lo, excluded.lo), hi = max(hi, excluded.hi),
    last_step = max(last_step, excluded.last_step)
"""


def insert_points(db: sqlite3.Connection, rows: list[tuple[int, int, float, float]]) -> int:
    """Store the points not stored yet (first value wins) and fold exactly those into every rollup level."""
    db.executemany("INSERT OR IGNORE INTO temp.batch_points VALUES (?, ?, ?, ?)", rows)
    db.execute(
        "DELETE FROM temp.batch_points WHERE EXISTS (SELECT 1 FROM main.metric_points AS stored "
        "WHERE stored.series_id = batch_points.series_id AND stored.step = batch_points.step)"
    )
    stored = db.execute("INSERT INTO main.metric_points SELECT * FROM temp.batch_points").rowcount
    db.execute(BATCH_ROLLUP)
    for shift in ROLLUP_LEVELS:
        db.execute(ROLLUP_UPSERT, (shift, shift - ROLLUP_LEVELS[0]))
    db.execute("DELETE FROM temp.batch_points")
    db.execute("DELETE FROM temp.batch_rollup")
    return stored


def _raw_series(db: sqlite3.Connection, series_id: int, since_step: int) -> MetricSeries:
    rows = db.execute(
        "SELECT step, value FROM metric_points WHERE series_id = ? AND step >= ? ORDER BY step LIMIT ?",
        (series_id, since_step, MAX_RAW_POINTS + 1),
    ).fetchall()
    if len(rows) > MAX_RAW_POINTS:
        raise TooManyPoints(
            f"more than {MAX_RAW_POINTS} points per series; pass max_points to downsample or a later since_step",
            details=[
                ErrorDetail(field="max_points", message="required for this range", allowed=f"1..{MAX_RAW_POINTS}")
            ],
        )
    return MetricSeries.model_construct(
        steps=[row[0] for row in rows], values=[row[1] for row in rows], min=None, max=None
    )


def _bucket_width(db: sqlite3.Connection, series_ids: Iterable[int], since_step: int, max_points: int) -> int:
    """Steps per bucket so that no series has more than `max_points` buckets (1: no downsampling).

    Widths the rollups can serve are powers of two of at least the smallest rollup; below that the
    raw points are grouped, which reads at most that many points per bucket.
    """
    low, high = math.inf, -math.inf
    for series_id in series_ids:
        # Two single-aggregate subqueries, so SQLite answers each from the primary key without a scan.
        first, last = db.execute(
            "SELECT (SELECT MIN(step) FROM metric_points WHERE series_id = ?1 AND step >= ?2), "
            "(SELECT MAX(step) FROM metric_points WHERE series_id = ?1 AND step >= ?2)",
            (series_id, since_step),
        ).fetchone()
        if first is not None:
            low, high = min(low, first), max(high, last)
    if low > high:
        return 1
    span = int(high - low) + 1
    if span <= max_points:
        return 1
    # Buckets are aligned to multiples of the width, so a span can touch one bucket more than span / width.
    needed = span if max_points == 1 else math.ceil(span / (max_points - 1))
    smallest_rollup = 1 << ROLLUP_LEVELS[0]
    return needed if needed < smallest_rollup else 1 << (needed - 1).bit_length()


def _bucketed_series(db: sqlite3.Connection, series_id: int, since_step: int, width: int) -> MetricSeries:
    shifts = [shift for shift in ROLLUP_LEVELS if width % (1 << shift) == 0]
    if shifts and width == 1 << max(shifts):
        shift = max(shifts)
        rows = db.execute(
            "SELECT last_step, total / n, lo, hi FROM metric_rollups "
            "WHERE series_id = ? AND shift = ? AND bucket >= ? ORDER BY bucket",
            (series_id, shift, since_step >> shift),
        ).fetchall()
    elif shifts:
        shift = max(shifts)
        per_bucket = width >> shift
        rows = db.execute(
            "SELECT MAX(last_step), SUM(total) / SUM(n), MIN(lo), MAX(hi) FROM metric_rollups "
            "WHERE series_id = ? AND shift = ? AND bucket >= ? GROUP BY bucket / ? ORDER BY 1",
            (series_id, shift, (since_step // width) * per_bucket, per_bucket),
        ).fetchall()
    else:
        rows = db.execute(
            "SELECT MAX(step), AVG(value), MIN(value), MAX(value) FROM metric_points "
            "WHERE series_id = ? AND step >= ? GROUP BY step / ? ORDER BY 1",
            (series_id, (since_step // width) * width, width),
        ).fetchall()
    return MetricSeries.model_construct(
        steps=[row[0] for row in rows],
        values=[row[1] for row in rows],
        min=[row[2] for row in rows],
        max=[row[3] for row in rows],
    )
