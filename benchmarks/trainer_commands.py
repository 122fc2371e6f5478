"""Command latency into a training `cpu-tiny` run (or `--preset`), and the step time while 300 commands drain.

A submitter thread sends `set_hparams` commands at random moments inside running steps; the training loop notes
when each one was fetched (in the inbox) and applied (at a boundary). Then 300 commands are queued at once and
the boundaries that drain them are timed. Prints figures; asserts nothing.
Run: `python -m benchmarks.trainer_commands` (~1 min).
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time

import torch

from benchmarks._common import (
    UNLIMITED,
    Server,
    add_run_arguments,
    device_name,
    format_ms,
    load_average,
    percentiles_ms,
)
from protocols.client import Client
from trainer.run import BuiltinRun, RunConfig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--commands", type=int, default=200, help="commands for the latency figures")
    parser.add_argument("--burst", type=int, default=300, help="commands in the burst")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default %(default)s)")
    add_run_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with Server() as server, Client(server.url) as client:
        run = BuiltinRun(
            RunConfig(server=server.url, steps=10**9, run_name="commands", preset=args.preset, device=args.device)
        )
        steer = run.steer
        client.set_policy(steer.run_id, UNLIMITED)
        submitted: dict[str, tuple[float, float, int]] = {}
        """command id -> (submit called, submit returned, the run's step when it returned)"""
        applied: dict[str, float] = {}
        step_times: list[float] = []
        done = threading.Event()

        def submitter() -> None:
            rng = random.Random(0)
            try:
                with Client(server.url) as own:
                    seen = -1
                    for trial in range(args.commands):
                        while steer.step == seen or len(step_times) < 3:
                            time.sleep(0.0005)
                        seen = steer.step
                        time.sleep(rng.uniform(0.0, 0.9) * statistics.median(step_times[-10:]))
                        called = time.perf_counter()
                        record = own.submit(steer.run_id, {"type": "set_hparams", "weight_decay": trial / 10_000})
                        submitted[record.id] = (called, time.perf_counter(), steer.step)
            finally:
                done.set()  # the training loop below ends on it, also when a submission failed

        thread = threading.Thread(target=submitter)
        thread.start()
        iteration = 0
        while not done.is_set() or len(applied) < len(submitted):
            before = len(steer.results)
            step = steer.poll(iteration)
            now = time.perf_counter()
            applied.update({record.id: now for record, _ in list(steer.results)[before:]})
            started = time.perf_counter()
            steer.record(step, **run.train_step(step))
            step_times.append(time.perf_counter() - started)
            iteration += 1
        thread.join()
        steps = {record.id: result.step for record, result in steer.results}
        typical = statistics.median(step_times)

        records = [
            client.submit(steer.run_id, {"type": "set_hparams", "weight_decay": i / 10_000}) for i in range(args.burst)
        ]
        while steer.io.inbox.qsize() < len(records):
            time.sleep(0.01)
        boundaries: list[float] = []
        burst_steps: list[float] = []
        counts: list[int] = []
        while len(steer.results) < args.commands + args.burst or len(boundaries) < 5:
            before = len(steer.results)
            started = time.perf_counter()
            step = steer.poll(iteration)
            boundaries.append(time.perf_counter() - started)
            counts.append(len(steer.results) - before)
            values = run.train_step(step)
            steer.record(step, **values)
            burst_steps.append(time.perf_counter() - started)
            iteration += 1
        ordered = [record.seq for record, _ in steer.results][args.commands :] == [r.seq for r in records]
        steer.close()

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.preset} on {device_name(run.device)}, "
        f"load average {load_average()}; "
        f"median step {typical * 1e3:.1f} ms"
    )
    delivered = [applied[c] - submitted[c][1] for c in submitted]
    print(f"submit returned -> applied at a boundary: {format_ms(percentiles_ms(delivered))}")
    print(
        f"submit called   -> applied at a boundary: "
        f"{format_ms(percentiles_ms([applied[c] - submitted[c][0] for c in submitted]))}"
    )
    next_boundary = sum(steps[c] <= submitted[c][2] + 1 for c in submitted)
    print(
        f"applied at the boundary right after the step it was accepted in: {next_boundary}/{len(submitted)} "
        f"({100 * next_boundary / len(submitted):.1f}%)"
    )
    bound = steer.config.max_commands_per_step
    print(
        f"burst of {args.burst} commands, at most {bound} per boundary: drained in "
        f"{sum(1 for count in counts if count)} boundaries (most in one: {max(counts)}), in seq order: {ordered}"
    )
    draining = [b for b, count in zip(boundaries, counts, strict=True) if count]
    print(
        f"  boundary (poll) while draining: median {statistics.median(draining) * 1e3:.2f} ms, "
        f"max {max(draining) * 1e3:.2f} ms; step incl. poll: median {statistics.median(burst_steps) * 1e3:.1f} ms, "
        f"max {max(burst_steps) * 1e3:.1f} ms = {max(burst_steps) / typical:.2f}x the usual step"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
