"""The training thread's tail: `poll` + `record` per step on the built-in `cpu-tiny` run, snapshot copies on and
off the training thread.

One steered run trains in interleaved blocks of `--snapshot-every` steps (one in-memory snapshot each): in the
"before" blocks the ring copies every tensor on the training thread (`CheckpointStore.overlap = False`), in the
"after" blocks it copies parameters and optimizer state on its worker thread while the next step's forward and
backward run. Prints the median and p99 of poll + record (wall time, and the training thread's CPU time, which
other processes on a shared machine disturb less) and the snapshot steps alone. Prints figures; asserts nothing.
Run: `python -m benchmarks.trainer_tail` (~2 min on a quiet 2-core machine).
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks._common import Server, load_average, percentiles_ms
from trainer.run import BuiltinRun, RunConfig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=600, help="steered steps in all (default %(default)s)")
    parser.add_argument("--snapshot-every", type=int, default=25, help="steps between snapshots (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kinds = {"before": False, "after": True}
    wall: dict[str, list[float]] = {kind: [] for kind in kinds}
    cpu: dict[str, list[float]] = {kind: [] for kind in kinds}
    snapshot_wall: dict[str, list[float]] = {kind: [] for kind in kinds}
    snapshot_cpu: dict[str, list[float]] = {kind: [] for kind in kinds}
    with Server() as server:
        run = BuiltinRun(RunConfig(server=server.url, steps=10**9, run_name="tail"))
        steer = run.steer
        steer.config.snapshot_every = args.snapshot_every
        for iteration in range(3):  # warm-up: allocator, autograd graph, the first snapshot and its worker thread
            steer.record(iteration, **run.train_step(steer.poll(iteration)))
        iteration = 3
        for block in range(args.steps // args.snapshot_every):
            kind = list(kinds)[block % 2]
            steer.checkpoints.overlap = kinds[kind]
            for _ in range(args.snapshot_every):
                started, cpu_started = time.perf_counter(), time.thread_time()
                step = steer.poll(iteration)
                polled, cpu_polled = time.perf_counter(), time.thread_time()
                values = run.train_step(step)
                recording, cpu_recording = time.perf_counter(), time.thread_time()
                steer.record(step, **values)
                ended, cpu_ended = time.perf_counter(), time.thread_time()
                spent, cpu_spent = (
                    polled - started + ended - recording,
                    cpu_polled - cpu_started + cpu_ended - cpu_recording,
                )
                wall[kind].append(spent)
                cpu[kind].append(cpu_spent)
                if step % args.snapshot_every == 0:
                    snapshot_wall[kind].append(spent)
                    snapshot_cpu[kind].append(cpu_spent)
                iteration += 1
        steer.close()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(wall['after'])} steered steps of each "
        f"kind, a snapshot every {args.snapshot_every} steps, load average {load_average()}"
    )
    for kind in kinds:
        where = "on the training thread" if kind == "before" else "overlapped with the next step"
        spent, cpu_spent = percentiles_ms(wall[kind]), percentiles_ms(cpu[kind])
        print(
            f"  {kind:<6} (snapshot copy {where}): poll + record median {spent['p50'] * 1e3:7.1f} us, "
            f"p99 {spent['p99'] * 1e3:8.1f} us wall; median {cpu_spent['p50'] * 1e3:7.1f} us, "
            f"p99 {cpu_spent['p99'] * 1e3:8.1f} us thread CPU"
        )
        snapshot, cpu_snapshot = percentiles_ms(snapshot_wall[kind]), percentiles_ms(snapshot_cpu[kind])
        print(
            f"  {'':<6} snapshot steps alone ({len(snapshot_wall[kind])}): median {snapshot['p50'] * 1e3:7.1f} us "
            f"wall, {cpu_snapshot['p50'] * 1e3:7.1f} us thread CPU"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
