"""Metric ingest (packed rows per step, de-duplicated per batch id) and history with server-side downsampling.

History lives in the store, not in memory: the server keeps only each run's latest values
(for Prometheus). `control_server.series` stores a step per row and keeps rollups (count, sum,
min, max per bucket of every power of two from 16 to 8192 steps), written by the store writer's
chore soon after buckets close; downsampling reads those, so a long run answers as fast as a
short one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import partial

from control_server.errors import ApiError
from control_server.events import Emitter, EventLog
from control_server.runs import MAX_BRANCHES, RunRegistry
from control_server.series import (
    SeriesCache,
    bucketed,
    due_rollups,
    insert_steps,
    newest_step,
    raw_steps,
    step_span,
)
from control_server.store import Cursor, Db, Store
from protocols.errors import ErrorDetail
from protocols.events import MetricsEvent
from protocols.records import MetricsAck, MetricsBatch, MetricSeries, MetricsHistory, MetricsSample

MAX_RAW_POINTS = 100_000
"""Most points per series a request without `max_points` may return."""

MAX_READ_POINTS = 250_000
"""Most points one history answer may hold across all its series (about 6 MB of JSON)."""

MAX_METRIC_NAMES = 4096
"""Most distinct metric names one run may have: each is a series on every branch, kept for good."""

MAX_METRIC_SERIES = 65_536
"""Most (branch, name) series one run may have, e.g. 16 branches of 4,096 metrics or 1,024 of 64."""


RECENT_BATCH_IDS = 32
"""Batch ids kept per run, its newest: a batch resent with one of them is acknowledged and not stored again.

A sender resends a batch only until it is acknowledged, and the reference trainer makes its next batch only then,
so a resend (after any outage) is of the run's newest batch; the rest leave room for senders with several batches
in flight. Keeping every id instead grew a table by a row per batch forever, its random keys about a sixth of the
writer's time at 1,000 runs. A resend the window misses stores nothing either (the first value of a step wins);
only its samples reach watchers twice."""


def recent_batches(db: Db, run_id: str) -> Cursor:
    """Ask for the run's recent batch ids (`note_batch` reads the answer)."""
    return db.execute("SELECT batch_ids FROM metric_recent_batches WHERE run_id = ?", (run_id,))


def note_batch(db: Db, run_id: str, batch_id: str, recent: Cursor) -> bool:
    """Add `batch_id` to the run's recent ones (`recent`: what `recent_batches` asked); False when it is one of them
    already. Runs in a write holding the run's lock, so no other server adds one meanwhile."""
    row = recent.fetchone()
    kept = row[0].split("\n") if row is not None else []
    if batch_id in kept:
        return False
    db.execute(
        "INSERT INTO metric_recent_batches VALUES (?, ?) "
        "ON CONFLICT (run_id) DO UPDATE SET batch_ids = excluded.batch_ids",
        (run_id, "\n".join([batch_id, *kept[: RECENT_BATCH_IDS - 1]])),
    )
    return True


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
        self._writer_ids = SeriesCache(lock_names=store.lock_names)  # touched only by the writer thread
        self._reader_ids = SeriesCache()  # ids only grow, so readers may share one
        self._series: dict[str, dict[str, set[str]]] = {}  # each run's names per branch; writer thread only
        store.on_rollback(self._forget_uncommitted)
        store.add_chore(partial(due_rollups, self._writer_ids))

    def _forget_uncommitted(self) -> None:
        """In the writer thread, after writes were undone: what the writer cached may name rows never committed."""
        self._writer_ids.forget_ids()
        self._series.clear()

    async def ingest(self, run_id: str, batch: MetricsBatch) -> MetricsAck:
        """Commit a batch (unless its `batch_id` was already stored), then publish it."""
        self.runs.get(run_id)
        by_branch: dict[str, dict[int, tuple[float, dict[str, float]]]] = {}
        for sample in batch.samples:
            steps = by_branch.setdefault(sample.branch, {})
            known = steps.get(sample.step)
            if known is None:
                steps[sample.step] = (sample.time, sample.values)
            else:  # the first value of a step wins, within a batch as across them
                steps[sample.step] = (known[0], sample.values | known[1])

        def write(db: Db, emit: Emitter) -> int | None:
            cache = self._writer_ids
            newest: dict[str, Cursor] = {}
            if batch.batch_id is not None:
                recent = recent_batches(db, run_id)
                # Asked before `recent` is read, so a pipelined store (PostgreSQL) answers both in one round trip.
                for branch in by_branch:
                    known = cache.series.get((run_id, branch))
                    if known is not None:
                        newest[branch] = newest_step(db, known)
                if not note_batch(db, run_id, batch.batch_id, recent):
                    return None
            self._admit_series(db, run_id, batch)
            stored = sum(
                insert_steps(db, cache, cache.series_id(db, run_id, branch), steps, newest.get(branch))
                for branch, steps in by_branch.items()
            )
            for samples in self.events.sample_chunks(batch.samples):
                # The samples were validated on the way in; building the event does not check them again.
                emit(partial(_metrics_event, run_id, samples))
            return stored

        stored = await self.events.write(run_id, write)
        if stored is None:
            return MetricsAck(stored_values=0, duplicate=True)
        self.values_ingested += stored
        for sample in batch.samples:
            self.latest.setdefault((run_id, sample.branch), {}).update(sample.values)
            self.latest_nonfinite[(run_id, sample.branch)] = list(sample.nonfinite)
        last = max(batch.samples, key=lambda sample: (sample.time, sample.step))
        await self.runs.note_step(run_id, last.branch, last.step)
        return MetricsAck(stored_values=stored)

    def _admit_series(self, db: Db, run_id: str, batch: MetricsBatch) -> None:
        """Refuse a batch that would take the run past MAX_METRIC_NAMES names, MAX_BRANCHES branches or
        MAX_METRIC_SERIES (branch, name) series, in its transaction: each series is kept, indexed and cached."""
        known = self._series.get(run_id)
        if known is None:
            rows = db.execute(
                "SELECT s.branch, k.key FROM metric_series s JOIN metric_series_keys k ON k.series_id = s.series_id "
                "WHERE s.run_id = ?",
                (run_id,),
            )
            known = self._series[run_id] = {}
            for branch, key in rows:
                known.setdefault(branch, set()).add(key)
        new = [
            sample
            for sample in batch.samples
            if sample.branch not in known or not sample.values.keys() <= known[sample.branch]
        ]
        if not new:  # the steady case: keys the run already has, checked as one subset test per sample
            return
        every = {branch: set(keys) for branch, keys in known.items()}
        for sample in new:
            every.setdefault(sample.branch, set()).update(sample.values)
        names = set().union(*every.values())
        for what, count, limit, field in (
            ("metric names", len(names), MAX_METRIC_NAMES, "samples.values"),
            ("branches", len(every), MAX_BRANCHES, "samples.branch"),
            ("series (branch, name)", sum(len(keys) for keys in every.values()), MAX_METRIC_SERIES, "samples.values"),
        ):
            if count > limit:
                raise TooManyMetrics(
                    f"this batch would give run {run_id} {count} {what}; a run may have at most {limit}",
                    details=[ErrorDetail(field=field, message=f"too many {what}", allowed=f"at most {limit} per run")],
                )
        self._series[run_id] = every

    async def history(
        self, run_id: str, *, keys: Iterable[str], branch: str, since_step: int, max_points: int | None
    ) -> MetricsHistory:
        """A branch's metric history; with `max_points`, buckets of equal step width (mean, min, max)."""
        self.runs.get(run_id)
        wanted = set(keys)
        cache = self._reader_ids

        def op(db: Db) -> tuple[int, dict[str, MetricSeries]]:
            row = db.execute(
                "SELECT series_id FROM metric_series WHERE run_id = ? AND branch = ?", (run_id, branch)
            ).fetchone()
            if row is None:
                return 1, {}
            series_id = int(row[0])
            found = [
                key
                for (key,) in db.execute("SELECT key FROM metric_series_keys WHERE series_id = ?", (series_id,))
                if not wanted or key in wanted
            ]
            names = sorted(found)
            span = step_span(db, series_id, since_step)
            width = 1 if max_points is None or span is None else _bucket_width(span, max_points)
            if width == 1:
                return 1, _raw_series(db, cache, series_id, names, since_step)
            series = _bucketed_series(db, cache, series_id, names, since_step, width)
            if sum(len(read.steps) for read in series.values()) > MAX_READ_POINTS:
                raise _too_many_points(len(names))
            return width, series

        width, series = await self.store.read(op)
        return MetricsHistory.model_construct(run_id=run_id, branch=branch, bucket_steps=width, series=series)


def _metrics_event(run_id: str, samples: list[MetricsSample], event_id: int, now: float) -> MetricsEvent:
    return MetricsEvent.model_construct(event_id=event_id, time=now, run_id=run_id, samples=samples)


def _raw_series(
    db: Db, cache: SeriesCache, series_id: int, names: list[str], since_step: int
) -> dict[str, MetricSeries]:
    steps: dict[str, list[int]] = {name: [] for name in names}
    values: dict[str, list[float]] = {name: [] for name in names}
    points = 0
    for step, _, row in raw_steps(db, cache, series_id, since_step):
        for name in names:
            value = row.get(name)
            if value is not None:
                steps[name].append(step)
                values[name].append(value)
                points += 1
                if points > MAX_READ_POINTS:
                    raise _too_many_points(len(names))
                if len(steps[name]) > MAX_RAW_POINTS:
                    raise TooManyPoints(
                        f"more than {MAX_RAW_POINTS} points per series; "
                        "pass max_points to downsample or a later since_step",
                        details=[
                            ErrorDetail(
                                field="max_points", message="required for this range", allowed=f"1..{MAX_RAW_POINTS}"
                            )
                        ],
                    )
    return {
        name: MetricSeries.model_construct(steps=steps[name], values=values[name], min=None, max=None) for name in names
    }


def _too_many_points(series: int) -> TooManyPoints:
    """The refusal of an answer past MAX_READ_POINTS, saying how to narrow it."""
    return TooManyPoints(
        f"more than {MAX_READ_POINTS} points in one answer ({series} series); name fewer "
        "`keys`, pass a smaller `max_points` or a later `since_step`",
        details=[ErrorDetail(field="keys", message="too many points", allowed=f"at most {MAX_READ_POINTS} in all")],
    )


def _bucket_width(span: tuple[int, int], max_points: int) -> int:
    """Steps per bucket so that the series has no more than `max_points` buckets (1: no downsampling).

    Widths are powers of two (at most twice the width needed): from the smallest rollup up, each point is one
    rollup row; below it the raw steps are grouped, at most 8 rows per point.
    """
    low, high = span
    steps = high - low + 1
    if steps <= max_points:
        return 1
    # Buckets are aligned to multiples of the width, so a span can touch one bucket more than span / width.
    needed = steps if max_points == 1 else math.ceil(steps / (max_points - 1))
    return 1 << (needed - 1).bit_length()


def _bucketed_series(
    db: Db, cache: SeriesCache, series_id: int, names: list[str], since_step: int, width: int
) -> dict[str, MetricSeries]:
    buckets = bucketed(db, cache, series_id, (since_step // width) * width, width, frozenset(names))
    series: dict[str, MetricSeries] = {}
    for name in names:
        aggs = [buckets[index][name] for index in sorted(buckets) if name in buckets[index]]
        series[name] = MetricSeries.model_construct(
            steps=[agg.last for agg in aggs],
            values=[agg.total / agg.n for agg in aggs],
            min=[agg.lo for agg in aggs],
            max=[agg.hi for agg in aggs],
        )
    return series
