"""The SQLite store's writer alone under a fleet's metrics: N series stepping in lockstep, one step of 40 values
each every 0.5 s, each series at its own phase in the half second (as `benchmarks.fleet` posts them), written
through the server's own ops (`insert_steps` with the batch-id row) and rollup chore.

It prints the write latency (queued until committed) of steps where rollup buckets close (a multiple of 64, of
16) and of the others, of command-sized writes sent urgent (as the server sends a command's) and the same sent as
ordinary writes, and the writer thread's CPU per group: write groups, chore groups and WAL restarts. The
CPU figures do not depend on what else the machine runs, so they show a stall even where the latencies are
drowned by a busy machine.

    python -m benchmarks.fleet_writer --runs 1000 --duration 40 --first-step 200
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks._common import load_average
from control_server.cli import tune_gc
from control_server.metrics import note_batch, recent_batches
from control_server.series import FINEST, SeriesCache, catch_up, due_rollups, insert_steps
from control_server.store import Db, SqliteStore

VALUES = 40
STEP_INTERVAL_S = 0.5
COMMANDS_PER_S = 10


class TimedStore(SqliteStore):
    """The SQLite store, noting the writer thread's CPU and wall time of each group and each WAL restart."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.groups: list[tuple[bool, int, float, float]] = []
        """(chore group, ops, wall s, CPU s) of each group."""
        self.restarts: list[tuple[float, float]] = []

    def _commit_group(self, batch: list[Any]) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        super()._commit_group(batch)
        self.groups.append((batch[0].future is None, len(batch), time.perf_counter() - wall, time.thread_time() - cpu))

    def after_commit(self) -> None:
        before, wall, cpu = self.wal_restarts, time.perf_counter(), time.thread_time()
        super().after_commit()
        if self.wal_restarts > before:
            self.restarts.append((time.perf_counter() - wall, time.thread_time() - cpu))


def ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1e3 if ordered else 0.0


async def drive(store: TimedStore, cache: SeriesCache, runs: int, duration_s: float, first_step: int) -> None:
    keys = [f"metric_{k:02d}" for k in range(VALUES)]

    def prefill(db: Db) -> list[int]:
        ids = []
        for run in range(runs):
            series_id = cache.series_id(db, f"run-{run}", "main")
            steps = {step: (1.0, {key: step + k for k, key in enumerate(keys)}) for step in range(first_step)}
            insert_steps(db, cache, series_id, steps)
            catch_up(db, cache, series_id)
            for step in range(first_step):  # a batch per step, as the fleet posts them
                note_batch(db, f"run-{run}", f"batch-{step}", recent_batches(db, f"run-{run}"))
            ids.append(series_id)
        return ids

    ids = await store.write(prefill)
    await asyncio.sleep(1.0)  # the prefill's WAL is restarted before the clock starts
    store.groups.clear()
    store.restarts.clear()
    tune_gc()
    latencies: dict[int, list[float]] = {}
    start = time.monotonic() + 0.1

    async def post(run: int, step: int) -> None:
        values = {key: step * 1e-3 + k for k, key in enumerate(keys)}

        def op(db: Db) -> int:
            note_batch(db, f"run-{run}", f"batch-{step}", recent_batches(db, f"run-{run}"))
            return insert_steps(db, cache, ids[run], {step: (time.time(), values)})

        queued = time.perf_counter()
        await store.write(op)
        latencies.setdefault(step, []).append(time.perf_counter() - queued)

    commands: dict[bool, list[float]] = {True: [], False: []}
    seqs = itertools.count(1)

    async def command(urgent: bool) -> None:
        """A write the size of a command's (its row and its event), as the server writes a submit."""
        seq = next(seqs)
        body = json.dumps({"id": f"c-{seq}", "command": {"type": "set_hparams", "lr": 1e-4}, "padding": "x" * 300})

        def op(db: Db) -> None:
            db.execute(
                "INSERT INTO commands (run_id, id, seq, status, body, created_at) VALUES (?, ?, ?, 'queued', ?, ?)",
                (f"run-{seq % runs}", f"c-{seq}", seq, body, time.time()),
            )
            event = (seq, f"run-{seq % runs}", time.time(), body)
            db.execute("INSERT INTO events VALUES (?, ?, 'command', ?, ?)", event)

        queued = time.perf_counter()
        await store.write(op, urgent=urgent)
        commands[urgent].append(time.perf_counter() - queued)

    async def commander() -> None:
        """COMMANDS_PER_S command writes, every other one urgent (as the server sends them) and the others not."""
        writes = []
        for index in range(int(duration_s * COMMANDS_PER_S)):
            await asyncio.sleep(max(0.0, start + index / COMMANDS_PER_S - time.monotonic()))
            writes.append(asyncio.ensure_future(command(urgent=index % 2 == 0)))
        await asyncio.gather(*writes)

    async def trainer(run: int) -> None:
        phase = random.uniform(0, STEP_INTERVAL_S)
        posts = []
        for index in range(int(duration_s / STEP_INTERVAL_S)):
            await asyncio.sleep(max(0.0, start + index * STEP_INTERVAL_S + phase - time.monotonic()))
            posts.append(asyncio.ensure_future(post(run, first_step + index)))
        await asyncio.gather(*posts)

    await asyncio.gather(commander(), *(trainer(run) for run in range(runs)))
    for name, test in (
        ("steps at a multiple of 64", lambda step: step % 64 == 0),
        (f"at another multiple of {1 << FINEST}", lambda step: step % 64 and step % (1 << FINEST) == 0),
        ("the other steps", lambda step: step % (1 << FINEST)),
    ):
        chosen = [latency for step, found in latencies.items() if test(step) for latency in found]
        print(
            f"{name:>30}: write p50 {ms(chosen, 0.5):6.1f} p99 {ms(chosen, 0.99):6.1f} max {ms(chosen, 1.0):6.1f} ms "
            f"(n={len(chosen)})"
        )
    for name, urgent in (("command writes, urgent", True), ("the same, in line", False)):
        chosen = commands[urgent]
        print(
            f"{name:>30}: write p50 {ms(chosen, 0.5):6.1f} p99 {ms(chosen, 0.99):6.1f} max {ms(chosen, 1.0):6.1f} ms "
            f"(n={len(chosen)})"
        )
    for name, chore in (("write groups", False), ("chore groups", True)):
        cpu = [group[3] for group in store.groups if group[0] == chore]
        ops = [group[1] for group in store.groups if group[0] == chore]
        print(
            f"{name:>30}: {len(cpu)}, {sum(ops)} ops, writer CPU {sum(cpu):.2f} s; per group p50 {ms(cpu, 0.5):.2f} "
            f"p99 {ms(cpu, 0.99):.2f} max {ms(cpu, 1.0):.1f} ms"
        )
    cpu = [restart[1] for restart in store.restarts]
    wall = [restart[0] for restart in store.restarts]
    print(
        f"{'WAL restarts':>30}: {len(cpu)}, CPU max {ms(cpu, 1.0):.1f} ms, wall p50 {ms(wall, 0.5):.1f} "
        f"max {ms(wall, 1.0):.1f} ms; mean group size {statistics.fmean(g[1] for g in store.groups):.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1000, help="series stepping in lockstep")
    parser.add_argument("--duration", type=float, default=40.0, help="seconds of load")
    parser.add_argument("--first-step", type=int, default=200, help="steps each series holds before the clock starts")
    args = parser.parse_args()
    print(f"fleet writer: {args.runs} series, {args.duration:g} s from step {args.first_step}; load {load_average()}")
    with tempfile.TemporaryDirectory(prefix="runsteer-fleet-writer-") as tmp:
        store = TimedStore(Path(tmp) / "fleet.db")
        cache = SeriesCache()
        store.add_chore(partial(due_rollups, cache))
        store.open()
        try:
            asyncio.run(drive(store, cache, args.runs, args.duration, args.first_step))
        finally:
            store.close()
    print(f"load {load_average()}")


if __name__ == "__main__":
    main()
