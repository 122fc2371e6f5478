"""Metric series on disk: a row per (run, branch, step) with the step's values packed, and rollups.

Layout and why. A trainer sends the same few dozen keys every step, so a step is one row: its
values as little-endian float64s in the order of a *keyset* (the sorted key names, stored once
and referenced by id). That is 8 bytes per value plus ~20 per step, where a row per value cost
an index entry and a key per value. Downsampled reads use rollups (count, sum, min, max and last
step per key) at every power of two from 16 to 8192 steps. A rollup row is written once its
bucket *closes* (the series' newest step has moved past it), computed from the level below, about
one row per eight steps. Not by the write that closes it: runs of a fleet step in lockstep, so
their buckets close together, and rolling them up there held every commit for a fraction of a
second. The writer's chore (`due_rollups`) rolls them up between groups of writes, a few series
at a time, and moves each series' *rollup mark*: buckets ending by the mark are stored, and a read
builds the rest (a few buckets behind, and the open ones) from the level below, down to the raw
steps, so a read never misses a value. A late point for a stored bucket rewrites it (and its
parents) in the write that brings it.

Everything here runs inside a store op, so SQLite and PostgreSQL share it.
"""

from __future__ import annotations

import functools
import json
import operator
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from control_server.store import SCHEMA, SCHEMA_VERSION, Cursor, Db

ROLLUP_SHIFTS = tuple(range(4, 14))
"""Rollup bucket widths as bit shifts: every power of two from 16 to 8192 steps, so a downsampled read takes one
rollup row per point it returns up to buckets of 8192 steps (and a few beyond). Each level is written once per
bucket, from two rows of the level below, so the ten levels cost about one row per eight steps."""

FINEST = ROLLUP_SHIFTS[0]
"""The finest rollup's shift: a series' rollup mark is always a multiple of its width."""

_AGG = struct.Struct("<HHddd")
"""One key's aggregate in a rollup: count, last step (as an offset into the bucket), sum, min, max. 28 bytes, so
a bucket of 40 keys stays within a page (SQLite spills larger rows to overflow pages, mostly empty)."""

RAW_CHUNK = 4096
"""Rows read per query when scanning raw steps."""


@dataclass(slots=True)
class Agg:
    """Count, last step, sum, min and max of one key over a bucket."""

    n: int
    last: int
    total: float
    lo: float
    hi: float

    def merge(self, other: Agg) -> None:
        self.n += other.n
        self.last = max(self.last, other.last)
        self.total += other.total
        self.lo = min(self.lo, other.lo)
        self.hi = max(self.hi, other.hi)


Bucket = dict[str, Agg]
Keys = frozenset[str] | None
"""The metric names a read wants (None: all)."""


@dataclass
class SeriesCache:
    """Ids the writer has already looked up, so a steady stream of batches does no lookups at all."""

    series: dict[tuple[str, str], int] = field(default_factory=dict)
    keysets: dict[tuple[str, ...], int] = field(default_factory=dict)
    keyset_names: dict[int, tuple[str, ...]] = field(default_factory=dict)
    series_keys: dict[int, set[str]] = field(default_factory=dict)
    packers: dict[tuple[str, ...], Callable[[Mapping[str, float]], bytes]] = field(default_factory=dict)
    lock_names: Callable[[Db], None] = lambda db: None
    """Called before creating a keyset, which every run shares (`Store.lock_names`)."""
    runs: dict[int, str] = field(default_factory=dict)
    """The run of each series id in `series`."""
    due: OrderedDict[int, str | None] = field(default_factory=OrderedDict)
    """Series with buckets closed past their rollup mark, oldest first, with their run (the lock a rollup takes). A
    hint only: an op undone after noting a series leaves it here, and rolling it up then finds nothing to do."""
    scanned: bool = False
    """Whether the store was searched for series a stopped server left with closed buckets to roll up."""

    def forget_ids(self) -> None:
        """Drop every id (kept: the packers, which follow from key names alone): after a rollback some may name
        rows that were never committed; the next batches look them up again."""
        self.series.clear()
        self.keysets.clear()
        self.keyset_names.clear()
        self.series_keys.clear()
        self.runs.clear()

    def series_id(self, db: Db, run_id: str, branch: str) -> int:
        """The id of a run's branch, created on first use."""
        name = (run_id, branch)
        found = self.series.get(name)
        if found is None:
            db.execute("INSERT INTO metric_series (run_id, branch) VALUES (?, ?) ON CONFLICT DO NOTHING", name)
            found = int(
                db.execute("SELECT series_id FROM metric_series WHERE run_id = ? AND branch = ?", name).fetchone()[0]
            )
            self.series[name] = found
            self.runs[found] = run_id
        return found

    def keyset_id(self, db: Db, keys: tuple[str, ...]) -> int:
        """The id of a sorted tuple of key names, created on first use."""
        found = self.keysets.get(keys)
        if found is None:
            text = json.dumps(keys)
            self.lock_names(db)
            db.execute("INSERT INTO metric_keysets (keys) VALUES (?) ON CONFLICT DO NOTHING", (text,))
            found = int(db.execute("SELECT keyset_id FROM metric_keysets WHERE keys = ?", (text,)).fetchone()[0])
            self.keysets[keys] = found
            self.keyset_names[found] = keys
        return found

    def keys_of(self, db: Db, keyset_id: int) -> tuple[str, ...]:
        """The key names of a keyset id."""
        found = self.keyset_names.get(keyset_id)
        if found is None:
            text = db.execute("SELECT keys FROM metric_keysets WHERE keyset_id = ?", (keyset_id,)).fetchone()[0]
            found = tuple(json.loads(text))
            self.keyset_names[keyset_id] = found
            self.keysets[found] = keyset_id
        return found

    def note_keys(self, db: Db, series_id: int, keys: Iterable[str]) -> None:
        """Record which keys a series has (what a history query without `keys` returns)."""
        known = self.series_keys.setdefault(series_id, set())
        new = [(series_id, key) for key in keys if key not in known]
        if new:
            db.executemany("INSERT INTO metric_series_keys VALUES (?, ?) ON CONFLICT DO NOTHING", new)
            known.update(key for _, key in new)

    def packer(self, keys: tuple[str, ...]) -> Callable[[Mapping[str, float]], bytes]:
        """Packs a step's values in keyset order as float64s; the struct and key lookup are built once per keyset
        (every step of a run uses one)."""
        found = self.packers.get(keys)
        if found is None:
            found = self.packers[keys] = _packer(keys)
        return found


def _packer(keys: tuple[str, ...]) -> Callable[[Mapping[str, float]], bytes]:
    if not keys:  # a step with no values (allowed: `values` may be empty)
        return lambda values: b""
    pack, pick = struct.Struct(f"<{len(keys)}d").pack, operator.itemgetter(*keys)
    if len(keys) == 1:
        return lambda values: pack(pick(values))
    return lambda values: pack(*pick(values))


def unpack_values(packed: bytes, keys: tuple[str, ...]) -> dict[str, float]:
    return dict(zip(keys, struct.unpack(f"<{len(keys)}d", packed), strict=True))


def pack_bucket(bucket: Bucket, keys: tuple[str, ...], first_step: int) -> bytes:
    """A bucket's aggregates in keyset order; `first_step` is the bucket's first step (counts and offsets fit 16 bits:
    no bucket is wider than 8192 steps)."""
    return b"".join(
        _AGG.pack(agg.n, agg.last - first_step, agg.total, agg.lo, agg.hi) for agg in (bucket[key] for key in keys)
    )


@functools.cache
def _bucket_struct(count: int) -> struct.Struct:
    return struct.Struct("<" + "HHddd" * count)


def unpack_bucket(packed: bytes, keys: tuple[str, ...], first_step: int, only: Keys = None) -> Bucket:
    """A bucket's aggregates (of the keys in `only`, when given: a read of one metric builds one)."""
    flat = _bucket_struct(len(keys)).unpack(packed)
    return {
        key: Agg(flat[at], first_step + flat[at + 1], flat[at + 2], flat[at + 3], flat[at + 4])
        for key, at in zip(keys, range(0, len(flat), 5), strict=True)
        if only is None or key in only
    }


def newest_step(db: Db, series_id: int) -> Cursor:
    """Ask for a series' newest step (None when it has none); the answer is read from the cursor."""
    return db.execute("SELECT MAX(step) FROM metric_steps WHERE series_id = ?", (series_id,))


def insert_steps(
    db: Db,
    cache: SeriesCache,
    series_id: int,
    steps: Mapping[int, tuple[float, dict[str, float]]],
    asked: Cursor | None = None,
) -> int:
    """Store the values not stored yet (first value wins per step and key); returns the count.

    Buckets that close with this write are left to `roll_up_series` (the series is noted in `cache.due`); a late
    point for a bucket already rolled up rewrites that bucket and its parents here. `asked`: `newest_step` asked
    already (a pipelined store answers it with the caller's earlier questions)."""
    if not steps:
        return 0
    low, high = min(steps), max(steps)
    previous_max = (newest_step(db, series_id) if asked is None else asked).fetchone()[0]
    existing: dict[int, tuple[float, dict[str, float]]] = {}
    if previous_max is not None and low <= previous_max:
        for step, time, keyset_id, packed in db.execute(
            "SELECT step, time, keyset_id, packed FROM metric_steps WHERE series_id = ? AND step BETWEEN ? AND ?",
            (series_id, low, high),
        ):
            existing[step] = (time, unpack_values(packed, cache.keys_of(db, keyset_id)))
    inserts: list[tuple[int, int, float, int, bytes]] = []
    updates: list[tuple[int, bytes, int, int]] = []
    changed: list[int] = []
    stored = 0
    for step, (time, values) in steps.items():
        old = existing.get(step)
        if old is None:
            keys = tuple(sorted(values))
            inserts.append((series_id, step, time, cache.keyset_id(db, keys), cache.packer(keys)(values)))
            stored += len(values)
        else:
            fresh = {key: value for key, value in values.items() if key not in old[1]}
            if not fresh:
                continue
            merged = old[1] | fresh
            keys = tuple(sorted(merged))
            updates.append((cache.keyset_id(db, keys), cache.packer(keys)(merged), series_id, step))
            stored += len(fresh)
        changed.append(step)
    if inserts:
        db.executemany("INSERT INTO metric_steps VALUES (?, ?, ?, ?, ?)", inserts)
    if updates:
        db.executemany("UPDATE metric_steps SET keyset_id = ?, packed = ? WHERE series_id = ? AND step = ?", updates)
    if changed:
        cache.note_keys(db, series_id, {key for _, values in steps.values() for key in values})
        if previous_max is not None and low <= previous_max:
            _rewrite_rolled_up(db, cache, series_id, changed, rolled_through(db, series_id))
        if high >> FINEST > (-1 if previous_max is None else previous_max >> FINEST):
            cache.due[series_id] = cache.runs.get(series_id)  # a bucket closed: roll it up later, off this write's path
    return stored


ROLLUP_SLICE_STEPS = 1024
"""Most steps one `roll_up_series` call rolls up (a multiple of the finest bucket): a series far behind (a long
backlog replayed at once, an old file) catches up over several small ops instead of one long one."""


def rolled_through(db: Db, series_id: int) -> int:
    """The series' rollup mark: every bucket (of every level) that ends at or before this step is stored and complete;
    buckets after it are read from the level below (ultimately the raw steps)."""
    row = db.execute("SELECT through_step FROM metric_rollup_marks WHERE series_id = ?", (series_id,)).fetchone()
    return 0 if row is None else int(row[0])


MARKS_OF_EAGER_ROLLUPS = (
    "INSERT INTO metric_rollup_marks SELECT series_id, newest FROM (SELECT series_id, "
    f"((SELECT MAX(step) FROM metric_steps AS t WHERE t.series_id = s.series_id) >> {FINEST}) << {FINEST} AS newest "
    "FROM metric_series AS s) AS found WHERE newest IS NOT NULL ON CONFLICT DO NOTHING"
)
"""The marks of a store whose every closed bucket was rolled up as it closed (schemas before the marks), so it is
read from its rollups at once (one index lookup per series)."""


def roll_up_series(db: Db, cache: SeriesCache, series_id: int) -> bool:
    """Store the buckets closed since the series' mark (at most ROLLUP_SLICE_STEPS steps of them), finest level first,
    and move the mark; returns True while closed buckets are left."""
    newest = db.execute("SELECT MAX(step) FROM metric_steps WHERE series_id = ?", (series_id,)).fetchone()[0]
    if newest is None:
        return False
    closed = (int(newest) >> FINEST) << FINEST
    done = rolled_through(db, series_id)
    target = min(closed, done + ROLLUP_SLICE_STEPS)
    if target <= done:
        return False
    below = 0
    for shift in ROLLUP_SHIFTS:
        first, end = done >> shift, target >> shift
        if first >= end:  # no bucket of this width ends in (done, target], so none of a wider one does
            break
        _rebuild(db, cache, series_id, shift, below, first, end)
        below = shift
    db.execute(
        "INSERT INTO metric_rollup_marks VALUES (?, ?) ON CONFLICT (series_id) DO UPDATE "
        "SET through_step = excluded.through_step WHERE excluded.through_step > metric_rollup_marks.through_step",
        (series_id, target),
    )
    return target < closed


def catch_up(db: Db, cache: SeriesCache, series_id: int) -> None:
    """Roll up every closed bucket of a series now (a migration, or a writer outside the server)."""
    while roll_up_series(db, cache, series_id):
        pass


def due_rollups(cache: SeriesCache, count: int) -> list[tuple[str | None, Callable[[Db], object]]]:
    """The writer's rollup chore (`Store.add_chore`): up to `count` ops, each rolling up one series that has closed
    buckets past its mark, oldest first. The first call hands out a scan for series a stopped server left behind."""
    if not cache.scanned:
        return [(None, partial(_scan_due, cache))]
    ops: list[tuple[str | None, Callable[[Db], object]]] = []
    while cache.due and len(ops) < count:
        series_id, run_id = cache.due.popitem(last=False)
        ops.append((run_id, partial(_roll_up_due, cache, series_id, run_id)))
    return ops


def _roll_up_due(cache: SeriesCache, series_id: int, run_id: str | None, db: Db) -> None:
    if roll_up_series(db, cache, series_id):
        cache.due[series_id] = run_id  # more left: back at the end of the line


def _scan_due(cache: SeriesCache, db: Db) -> None:
    for series_id, run_id in db.execute(
        "SELECT s.series_id, s.run_id FROM metric_series AS s LEFT JOIN metric_rollup_marks AS m "
        "ON m.series_id = s.series_id WHERE COALESCE(m.through_step, 0) < "
        f"((SELECT MAX(step) FROM metric_steps AS t WHERE t.series_id = s.series_id) >> {FINEST}) << {FINEST}"
    ).fetchall():
        cache.due[int(series_id)] = run_id
    cache.scanned = True


def _rewrite_rolled_up(db: Db, cache: SeriesCache, series_id: int, steps: Sequence[int], mark: int) -> None:
    """Rewrite the stored buckets (those ending by `mark`) that hold a late point, finest level first."""
    below = 0
    for shift in ROLLUP_SHIFTS:
        dirty = {step >> shift for step in steps if ((step >> shift) + 1) << shift <= mark}
        if not dirty:  # no stored bucket of this width changed, so none of a wider one did
            return
        _rebuild(db, cache, series_id, shift, below, min(dirty), max(dirty) + 1, dirty)
        below = shift


def _rebuild(
    db: Db,
    cache: SeriesCache,
    series_id: int,
    shift: int,
    below: int,
    first: int,
    end: int,
    only: set[int] | None = None,
) -> None:
    """Write the buckets [first, end) of level `shift` (those in `only`, when given) from the rows of the level
    `below` (0: the raw steps), read in one query; a bucket with no values gets no row."""
    if below == 0:
        rows = db.execute(
            "SELECT step, keyset_id, packed FROM metric_steps WHERE series_id = ? AND step >= ? AND step < ? "
            "ORDER BY step",
            (series_id, first << shift, end << shift),
        )
    else:
        rows = db.execute(
            "SELECT bucket, keyset_id, packed FROM metric_rollups "
            "WHERE series_id = ? AND shift = ? AND bucket >= ? AND bucket < ? ORDER BY bucket",
            (series_id, below, (first << shift) >> below, (end << shift) >> below),
        )
    groups: dict[int, list[tuple[int, int, bytes]]] = {}
    for position, keyset_id, packed in rows:
        bucket = (position << below) >> shift
        if only is None or bucket in only:
            groups.setdefault(bucket, []).append((position, keyset_id, packed))
    written = []
    for bucket, group in groups.items():
        aggregate = _aggregate(db, cache, below, bucket << shift, group)
        if aggregate is not None:
            written.append((series_id, shift, bucket, *aggregate))
    if written:
        db.executemany(
            "INSERT INTO metric_rollups VALUES (?, ?, ?, ?, ?) ON CONFLICT (series_id, shift, bucket) "
            "DO UPDATE SET keyset_id = excluded.keyset_id, packed = excluded.packed",
            written,
        )


def _aggregate(
    db: Db, cache: SeriesCache, below: int, start: int, rows: list[tuple[int, int, bytes]]
) -> tuple[int, bytes] | None:
    """(keyset id, packed aggregate) of a bucket starting at `start` from its rows of the level `below` (position,
    keyset id, packed; in position order), or None when it holds no value.

    When the rows share one keyset (the steady case) they are reduced column by column in C (sum, min, max over each
    field) and packed once, about a third of the cost of merging key by key; the bytes are the same."""
    keyset_id = rows[0][1]
    count = len(cache.keys_of(db, keyset_id))
    if count and all(row[1] == keyset_id for row in rows):
        flat: list[float] = []
        if below == 0:
            unpack = struct.Struct(f"<{count}d").unpack
            last = rows[-1][0] - start
            for column in zip(*(unpack(packed) for _, _, packed in rows), strict=True):
                flat += (len(rows), last, sum(column), min(column), max(column))
        else:
            firsts = [bucket << below for bucket, _, _ in rows]
            fields = list(zip(*(_bucket_struct(count).unpack(packed) for _, _, packed in rows), strict=True))
            for at in range(0, 5 * count, 5):
                flat += (
                    sum(fields[at]),
                    max(map(operator.add, firsts, fields[at + 1])) - start,
                    sum(fields[at + 2]),
                    min(fields[at + 3]),
                    max(fields[at + 4]),
                )
        return keyset_id, _bucket_struct(count).pack(*flat)
    if below == 0:
        merged = _reduce_steps(db, cache, rows, 2**62).get(0, {})
    else:
        merged = {}
        for position, row_keyset, packed in rows:
            _merge_into(merged, unpack_bucket(packed, cache.keys_of(db, row_keyset), position << below))
    if not merged:
        return None
    keys = tuple(sorted(merged))
    return cache.keyset_id(db, keys), pack_bucket(merged, keys, start)


def _raw_buckets(
    db: Db, cache: SeriesCache, series_id: int, start: int, end: int, width: int, only: Keys = None
) -> dict[int, Bucket]:
    """Raw steps in [start, end) aggregated into buckets of `width` steps (keyed by step // width)."""
    rows = db.execute(
        "SELECT step, keyset_id, packed FROM metric_steps WHERE series_id = ? AND step >= ? AND step < ? ORDER BY step",
        (series_id, start, end),
    )
    return _reduce_steps(db, cache, rows, width, only)


def _reduce_steps(
    db: Db, cache: SeriesCache, rows: Iterable[tuple[int, int, bytes]], width: int, only: Keys = None
) -> dict[int, Bucket]:
    """Raw rows (step, keyset id, packed; in step order) aggregated into buckets of `width` steps.

    Rows of one bucket and keyset are unpacked together and reduced column by column (sum, min, max run in C).
    Rollups of mixed keysets are built here too, so a read from the raw steps adds in the order a rollup did.
    """
    groups: dict[tuple[int, int], list[tuple[int, bytes]]] = {}
    for step, keyset_id, packed in rows:
        groups.setdefault((step // width, keyset_id), []).append((step, packed))
    found: dict[int, Bucket] = {}
    for (bucket, keyset_id), group in groups.items():
        keys = cache.keys_of(db, keyset_id)
        unpack = struct.Struct(f"<{len(keys)}d").unpack
        last = group[-1][0]
        columns = zip(*(unpack(packed) for _, packed in group), strict=True)
        aggs = {
            key: Agg(len(group), last, sum(column), min(column), max(column))
            for key, column in zip(keys, columns, strict=True)
            if only is None or key in only
        }
        if aggs:  # a bucket of steps without values (or without the keys in `only`) is none, as in a rollup
            _merge_into(found.setdefault(bucket, {}), aggs)
    return found


def _merge_into(target: Bucket, source: Bucket) -> None:
    for key, agg in source.items():
        mine = target.get(key)
        if mine is None:
            target[key] = Agg(agg.n, agg.last, agg.total, agg.lo, agg.hi)
        else:
            mine.merge(agg)


def _read_level(
    db: Db, cache: SeriesCache, series_id: int, shift: int, first: int, end: int, only: Keys = None
) -> dict[int, Bucket]:
    """Stored buckets of one level in [first, end) (level 0: one bucket per raw step)."""
    if shift == 0:
        return _raw_buckets(db, cache, series_id, first, end, 1, only)
    found: dict[int, Bucket] = {}
    for bucket, keyset_id, packed in db.execute(
        "SELECT bucket, keyset_id, packed FROM metric_rollups "
        "WHERE series_id = ? AND shift = ? AND bucket >= ? AND bucket < ? ORDER BY bucket",
        (series_id, shift, first, end),
    ):
        aggs = unpack_bucket(packed, cache.keys_of(db, keyset_id), bucket << shift, only)
        if aggs:
            found[bucket] = aggs
    return found


def raw_steps(
    db: Db, cache: SeriesCache, series_id: int, start: int, end: int | None = None
) -> Iterable[tuple[int, float, dict[str, float]]]:
    """(step, time, values) of a series from `start` (to `end`, exclusive), in step order, read in chunks."""
    cursor_step = start
    while True:
        rows = db.execute(
            "SELECT step, time, keyset_id, packed FROM metric_steps WHERE series_id = ? AND step >= ? AND step < ? "
            "ORDER BY step LIMIT ?",
            (series_id, cursor_step, end if end is not None else 2**62, RAW_CHUNK),
        ).fetchall()
        for step, time, keyset_id, packed in rows:
            yield step, time, unpack_values(packed, cache.keys_of(db, keyset_id))
        if len(rows) < RAW_CHUNK:
            return
        cursor_step = rows[-1][0] + 1


def step_span(db: Db, series_id: int, since_step: int) -> tuple[int, int] | None:
    """The first and last stored step at or after `since_step`, if any."""
    # Two single-aggregate subqueries, so each is answered from the primary key without a scan.
    first, last = db.execute(
        "SELECT (SELECT MIN(step) FROM metric_steps WHERE series_id = ? AND step >= ?), "
        "(SELECT MAX(step) FROM metric_steps WHERE series_id = ? AND step >= ?)",
        (series_id, since_step, series_id, since_step),
    ).fetchone()
    return None if first is None else (int(first), int(last))


def bucketed(
    db: Db, cache: SeriesCache, series_id: int, start: int, width: int, only: Keys = None
) -> dict[int, Bucket]:
    """Buckets of `width` steps from `start` (a multiple of width), keyed by bucket index, from the best level."""
    usable = [shift for shift in ROLLUP_SHIFTS if width % (1 << shift) == 0]
    if not usable:
        return _raw_buckets(db, cache, series_id, start, 2**62, width, only)
    shift = max(usable)
    mark = rolled_through(db, series_id)
    level = _level_with_tail(db, cache, series_id, ROLLUP_SHIFTS.index(shift), start, mark, only)
    return _regroup(level, shift, width)


def _level_with_tail(
    db: Db, cache: SeriesCache, series_id: int, index: int, start: int, mark: int, only: Keys
) -> dict[int, Bucket]:
    """Every bucket of level ROLLUP_SHIFTS[index] from `start`: those ending by the rollup mark stored, the rest
    (not rolled up yet, or still open) built from the level below, down to the raw steps."""
    shift = ROLLUP_SHIFTS[index]
    stored_end = mark >> shift
    found = _read_level(db, cache, series_id, shift, start >> shift, stored_end, only)
    tail_start = max(start, stored_end << shift)
    if index == 0:
        tail = _raw_buckets(db, cache, series_id, tail_start, 2**62, 1 << shift, only)
    else:
        below = ROLLUP_SHIFTS[index - 1]
        lower = _level_with_tail(db, cache, series_id, index - 1, tail_start, mark, only)
        tail = _regroup(lower, below, 1 << shift)
    for bucket, aggs in tail.items():
        _merge_into(found.setdefault(bucket, {}), aggs)
    return found


def _regroup(buckets: Mapping[int, Bucket], shift: int, width: int) -> dict[int, Bucket]:
    """Merge buckets of 2**shift steps into buckets of `width` steps."""
    if width == 1 << shift:
        return dict(buckets)
    grouped: dict[int, Bucket] = {}
    for bucket, aggs in buckets.items():
        _merge_into(grouped.setdefault((bucket << shift) // width, {}), aggs)
    return grouped


def migrate_sqlite(db: Any) -> None:
    """Bring a SQLite file to SCHEMA_VERSION: create the tables, repack a row-per-value history (version 1), mark
    the rollups stored before the marks (3), drop the batch ids kept forever (4)."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise RuntimeError(
            f"the store was written by a newer runsteer (schema {version}; this one reads {SCHEMA_VERSION})"
        )
    old = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'metric_points'").fetchone() is not None
    if old:
        db.execute("ALTER TABLE metric_series RENAME TO metric_series_v1")
        db.execute("DROP TABLE IF EXISTS metric_rollups")
    db.executescript(SCHEMA)
    if old:
        _repack_v1(db)
    if version < 4:  # the marks came with schema 4
        db.execute(MARKS_OF_EAGER_ROLLUPS)
    if version < 5:  # every batch id ever stored, a row each; a run's recent ones replace them
        db.execute("DROP TABLE IF EXISTS metric_batches")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _repack_v1(db: Any) -> None:
    """Move version 1's row-per-value points into packed steps (one transaction), then drop the old tables."""
    cache = SeriesCache()
    db.execute("BEGIN IMMEDIATE")
    names = db.execute("SELECT DISTINCT run_id, branch FROM metric_series_v1 ORDER BY run_id, branch").fetchall()
    for run_id, branch in names:
        series_id = cache.series_id(db, run_id, branch)
        steps: dict[int, tuple[float, dict[str, float]]] = {}
        for step, time, key, value in db.execute(
            "SELECT p.step, p.time, s.key, p.value FROM metric_points AS p JOIN metric_series_v1 AS s "
            "USING (series_id) WHERE s.run_id = ? AND s.branch = ? ORDER BY p.step",
            (run_id, branch),
        ).fetchall():
            steps.setdefault(step, (time, {}))[1][key] = value
        ordered = sorted(steps)
        for index in range(0, len(ordered), RAW_CHUNK):
            chunk = {step: steps[step] for step in ordered[index : index + RAW_CHUNK]}
            insert_steps(db, cache, series_id, chunk)
        catch_up(db, cache, series_id)
    db.execute("DROP TABLE metric_points")
    db.execute("DROP TABLE metric_series_v1")
    db.execute("COMMIT")
