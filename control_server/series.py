"""Metric series on disk: a row per (run, branch, step) with the step's values packed, and rollups.

Layout and why. A trainer sends the same few dozen keys every step, so a step is one row: its
values as little-endian float64s in the order of a *keyset* (the sorted key names, stored once
and referenced by id). That is 8 bytes per value plus ~20 per step, where a row per value cost
an index entry and a key per value. Downsampled reads use rollups (count, sum, min, max and last
step per key) at every power of two from 16 to 8192 steps. A rollup row is written only when its
bucket *closes* (the series' newest step has moved past it), computed from the level below, so
the write path adds about one rollup row per eight steps instead of nine upserts per batch. The
newest, still-open bucket of each level is aggregated at read time from the level below (at most
2 rows each). A late point for an already closed bucket rewrites that bucket (and its parents).

Everything here runs inside a store op, so SQLite and PostgreSQL share it.
"""

from __future__ import annotations

import functools
import json
import operator
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from control_server.store import SCHEMA, SCHEMA_VERSION, Cursor, Db

ROLLUP_SHIFTS = tuple(range(4, 14))
"""Rollup bucket widths as bit shifts: every power of two from 16 to 8192 steps, so a downsampled read takes one
rollup row per point it returns up to buckets of 8192 steps (and a few beyond). Each level is written once per
bucket, from two rows of the level below, so the ten levels cost about one row per eight steps."""

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

    def forget_ids(self) -> None:
        """Drop every id (kept: the packers, which follow from key names alone): after a rollback some may name
        rows that were never committed; the next batches look them up again."""
        self.series.clear()
        self.keysets.clear()
        self.keyset_names.clear()
        self.series_keys.clear()

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
    """Store the values not stored yet (first value wins per step and key), roll up what closed; returns the count.
    `asked`: `newest_step` asked already (a pipelined store answers it with the caller's earlier questions)."""
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
        newest = high if previous_max is None else max(high, previous_max)
        _roll_up(db, cache, series_id, changed, previous_max, newest)
    return stored


def _roll_up(
    db: Db, cache: SeriesCache, series_id: int, changed: Sequence[int], previous_max: int | None, newest: int
) -> None:
    """Rewrite every closed bucket that gained a point or closed with this write, finest level first."""
    below = 0
    for shift in ROLLUP_SHIFTS:
        open_bucket = newest >> shift
        dirty = {step >> shift for step in changed if step >> shift < open_bucket}
        if previous_max is not None and previous_max >> shift < open_bucket:
            dirty.add(previous_max >> shift)
        if not dirty:  # nothing closed at this width, so nothing at any wider one (most writes stop here)
            return
        rows = []
        for bucket in sorted(dirty):
            same_keys = _children_of_one_keyset(db, cache, series_id, below, bucket << shift, (bucket + 1) << shift)
            if same_keys is not None:
                rows.append((series_id, shift, bucket, *same_keys))
                continue
            merged = _children(db, cache, series_id, below, bucket << shift, (bucket + 1) << shift)
            if merged:
                keys = tuple(sorted(merged))
                packed = pack_bucket(merged, keys, bucket << shift)
                rows.append((series_id, shift, bucket, cache.keyset_id(db, keys), packed))
        if rows:
            db.executemany(
                "INSERT INTO metric_rollups VALUES (?, ?, ?, ?, ?) ON CONFLICT (series_id, shift, bucket) "
                "DO UPDATE SET keyset_id = excluded.keyset_id, packed = excluded.packed",
                rows,
            )
        below = shift


def _children_of_one_keyset(
    db: Db, cache: SeriesCache, series_id: int, shift: int, start: int, end: int
) -> tuple[int, bytes] | None:
    """(keyset id, packed aggregate) of steps [start, end) from the level `shift` when all its rows share one
    keyset, the steady case; None otherwise (then `_children` merges key by key).

    Every series of a fleet closes its buckets at the same steps, so this runs for every series at once: it reduces
    the rows column by column in C (sum, min, max over each field) and packs once, about a third of the key-by-key
    merge's cost. The bytes are those `pack_bucket` writes for the same aggregates."""
    if shift == 0:
        found = db.execute(
            "SELECT step, keyset_id, packed FROM metric_steps WHERE series_id = ? AND step >= ? AND step < ? "
            "ORDER BY step",
            (series_id, start, end),
        ).fetchall()
    else:
        found = db.execute(
            "SELECT bucket, keyset_id, packed FROM metric_rollups "
            "WHERE series_id = ? AND shift = ? AND bucket >= ? AND bucket < ? ORDER BY bucket",
            (series_id, shift, start >> shift, end >> shift),
        ).fetchall()
    if not found or any(keyset_id != found[0][1] for _, keyset_id, _ in found):
        return None
    keyset_id = int(found[0][1])
    count = len(cache.keys_of(db, keyset_id))
    if count == 0:
        return None
    flat: list[float] = []
    if shift == 0:
        unpack = struct.Struct(f"<{count}d").unpack
        columns = zip(*(unpack(packed) for _, _, packed in found), strict=True)
        last = found[-1][0] - start
        for column in columns:
            flat += (len(found), last, sum(column), min(column), max(column))
    else:
        firsts = [bucket << shift for bucket, _, _ in found]
        fields = list(zip(*(_bucket_struct(count).unpack(packed) for _, _, packed in found), strict=True))
        for at in range(0, 5 * count, 5):
            flat += (
                sum(fields[at]),
                max(map(operator.add, firsts, fields[at + 1])) - start,
                sum(fields[at + 2]),
                min(fields[at + 3]),
                max(fields[at + 4]),
            )
    return keyset_id, _bucket_struct(count).pack(*flat)


def _children(db: Db, cache: SeriesCache, series_id: int, shift: int, start: int, end: int) -> Bucket:
    """The aggregate of steps [start, end) from the level `shift` (0: the raw steps), all of it closed."""
    if shift == 0:
        return _raw_buckets(db, cache, series_id, start, end, end - start).get(start // (end - start), {})
    merged: Bucket = {}
    for bucket in _read_level(db, cache, series_id, shift, start >> shift, end >> shift).values():
        _merge_into(merged, bucket)
    return merged


def _raw_buckets(
    db: Db, cache: SeriesCache, series_id: int, start: int, end: int, width: int, only: Keys = None
) -> dict[int, Bucket]:
    """Raw steps in [start, end) aggregated into buckets of `width` steps (keyed by step // width).

    Rows of one bucket and keyset are unpacked together and reduced column by column (sum, min, max run in C),
    which is what keeps building a rollup cheap next to the insert that closes it.
    """
    groups: dict[tuple[int, int], list[tuple[int, bytes]]] = {}
    for step, keyset_id, packed in db.execute(
        "SELECT step, keyset_id, packed FROM metric_steps WHERE series_id = ? AND step >= ? AND step < ? ORDER BY step",
        (series_id, start, end),
    ):
        groups.setdefault((step // width, keyset_id), []).append((step, packed))
    found: dict[int, Bucket] = {}
    for (bucket, keyset_id), rows in groups.items():
        keys = cache.keys_of(db, keyset_id)
        unpack = struct.Struct(f"<{len(keys)}d").unpack
        last = rows[-1][0]
        columns = zip(*(unpack(packed) for _, packed in rows), strict=True)
        aggs = {
            key: Agg(len(rows), last, sum(column), min(column), max(column))
            for key, column in zip(keys, columns, strict=True)
            if only is None or key in only
        }
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
        found[bucket] = unpack_bucket(packed, cache.keys_of(db, keyset_id), bucket << shift, only)
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
    level = _level_with_open_tail(db, cache, series_id, ROLLUP_SHIFTS.index(shift), start, only)
    return _regroup(level, shift, width)


def _level_with_open_tail(
    db: Db, cache: SeriesCache, series_id: int, index: int, start: int, only: Keys
) -> dict[int, Bucket]:
    """Every bucket of level ROLLUP_SHIFTS[index] from `start`: closed ones stored, the open one built from below."""
    shift = ROLLUP_SHIFTS[index]
    newest = db.execute("SELECT MAX(step) FROM metric_steps WHERE series_id = ?", (series_id,)).fetchone()[0]
    if newest is None:
        return {}
    open_bucket = newest >> shift
    found = _read_level(db, cache, series_id, shift, start >> shift, open_bucket, only)
    tail_start = max(start, open_bucket << shift)
    if index == 0:
        tail = _raw_buckets(db, cache, series_id, tail_start, 2**62, 1 << shift, only)
    else:
        below = ROLLUP_SHIFTS[index - 1]
        lower = _level_with_open_tail(db, cache, series_id, index - 1, tail_start, only)
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
    """Bring a SQLite file to SCHEMA_VERSION: create the tables, and repack a row-per-value history (version 1)."""
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
    db.execute("DROP TABLE metric_points")
    db.execute("DROP TABLE metric_series_v1")
    db.execute("COMMIT")
