"""Ingest: metric values persisted per second through `POST /runs/{run_id}/metrics`.

The server runs in its own process. `--pushers` threads, each a trainer with its own `Client` and
run, post pre-built `MetricsBatch`es back to back (each answer means the batch is committed).
Two cases: batches of `--steps` steps x `--values` values, and one step per POST. After each case
the rows are counted in the SQLite file itself, so the figure is values persisted, not values sent.
"""

from __future__ import annotations

import sqlite3
import threading
import time

from benchmarks._common import Server, base_parser, format_ms, load_average, percentiles_ms, register, write_summary
from protocols.client.sync import Client
from protocols.records import MetricsBatch, MetricsSample


def build_batches(steps_per_post: int, values: int, posts: int, first_step: int = 0) -> list[MetricsBatch]:
    keys = [f"metric_{i:02d}" for i in range(values)]
    batches, step, now = [], first_step, time.time()
    for _ in range(posts):
        samples = [
            MetricsSample(step=step + i, time=now, values={key: (step + i) * 1e-3 + j for j, key in enumerate(keys)})
            for i in range(steps_per_post)
        ]
        batches.append(MetricsBatch(samples=samples))
        step += steps_per_post
    return batches


def run_case(server: Server, label: str, pushers: int, steps_per_post: int, values: int, duration_s: float) -> dict:
    """Push for about `duration_s` from `pushers` threads; returns the figures of the case."""
    clients = [Client(server.url) for _ in range(pushers)]
    runs = [register(client, f"bench-ingest-{steps_per_post}x{values}-{i}").run_id for i, client in enumerate(clients)]
    # Enough batches for the duration at a generous rate; each thread stops at the deadline.
    posts_each = max(20, int(400_000 * duration_s / (pushers * steps_per_post * values)))
    batches = [build_batches(steps_per_post, values, posts_each) for _ in range(pushers)]
    latencies: list[list[float]] = [[] for _ in range(pushers)]
    acked = [0] * pushers
    start = threading.Barrier(pushers + 1)
    deadline = 0.0

    def push(index: int) -> None:
        client, run_id = clients[index], runs[index]
        start.wait()
        for batch in batches[index]:
            if time.perf_counter() >= deadline:
                break
            t0 = time.perf_counter()
            acked[index] += client.push_metrics(run_id, batch).stored_values
            latencies[index].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=push, args=(i,), daemon=True) for i in range(pushers)]
    for thread in threads:
        thread.start()
    cpu_before = server.cpu_s()
    deadline = time.perf_counter() + duration_s
    started = time.perf_counter()
    start.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    server_cpu = server.cpu_s() - cpu_before
    with sqlite3.connect(f"file:{server.db}?mode=ro", uri=True) as db:
        marks = ",".join("?" * len(runs))
        # A step's values are packed as float64s, 8 bytes each.
        persisted = db.execute(
            f"SELECT COALESCE(SUM(LENGTH(packed)), 0) / 8 FROM metric_steps JOIN metric_series USING (series_id) "
            f"WHERE run_id IN ({marks})",
            runs,
        ).fetchone()[0]
    for client in clients:
        client.close()
    posts = sum(len(lat) for lat in latencies)
    return {
        "label": label,
        "pushers": pushers,
        "steps_per_post": steps_per_post,
        "values": values,
        "elapsed_s": elapsed,
        "posts": posts,
        "acked": sum(acked),
        "persisted": persisted,
        "values_per_s": persisted / elapsed,
        "posts_per_s": posts / elapsed,
        "post_latency": percentiles_ms([x for lat in latencies for x in lat]),
        "server_cpu": server_cpu / elapsed,
    }


def report(case: dict) -> None:
    print(
        f"  {case['label']}: {case['pushers']} pushers x {case['steps_per_post']} steps x {case['values']} values "
        "per POST, "
        f"{case['elapsed_s']:.1f} s"
    )
    print(
        f"    {case['values_per_s']:,.0f} values/s persisted ({case['persisted']:,} values counted in SQLite, "
        f"{case['acked']:,} acknowledged), {case['posts_per_s']:.0f} POSTs/s, "
        f"server CPU {case['server_cpu'] * 100:.0f}% of one core"
    )
    print(f"    POST answered: {format_ms(case['post_latency'])}")


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--pushers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50, help="steps per POST in the batched case")
    parser.add_argument("--values", type=int, default=40)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per case")
    args = parser.parse_args()

    print(f"ingest, load avg {load_average()}")
    with Server() as server:
        batched = run_case(server, "batched", args.pushers, args.steps, args.values, args.duration)
        report(batched)
    with Server() as server:
        single = run_case(server, "one step per POST", args.pushers, 1, args.values, args.duration)
        report(single)
    write_summary(
        args.summary_json,
        {
            "benchmark": "ingest",
            "figure": f"{batched['values_per_s']:,.0f} values/s batched; "
            f"{single['values_per_s']:,.0f} values/s one step per POST",
            "target": "> 100,000 values/s",
            "met": batched["values_per_s"] > 100_000,
            "batched": batched,
            "single": single,
        },
    )


if __name__ == "__main__":
    main()
