"""History: downsampled `metrics_history(max_points=1000)` on a long run, and server memory as history grows.

The server runs in its own process. One run is filled to 10k, 25k and then 50k steps x 40 values
through the server's own ingest path (`POST /metrics`, big batches from a few threads). At each mark
the server's VmRSS is read from /proc and `metrics_history(max_points=1000)` is timed over HTTP for
one key and for all keys: end to end through the reference `Client` (request + server + pydantic
decode) and as the raw HTTP exchange alone (the server's share).
"""

from __future__ import annotations

import http.client
import sqlite3
import threading
import time
from urllib.parse import urlencode

from benchmarks._common import Server, base_parser, format_ms, load_average, percentiles_ms, register, write_summary
from benchmarks.ingest import build_batches
from control_server.series import SeriesCache, catch_up, insert_steps
from protocols.client.sync import Client

MARKS = (10_000, 25_000, 50_000)


def fill(
    url: str, run_id: str, first_step: int, last_step: int, values: int, pushers: int = 3, steps_per_post: int = 250
) -> float:
    """Ingest steps [first_step, last_step) through the server; returns seconds taken."""
    chunks = list(range(first_step, last_step, steps_per_post))
    started = time.perf_counter()

    def push(mine: list[int]) -> None:
        client = Client(url)
        for step in mine:
            count = min(steps_per_post, last_step - step)
            client.push_metrics(run_id, build_batches(count, values, 1, first_step=step)[0])
        client.close()

    threads = [threading.Thread(target=push, args=(chunks[i::pushers],)) for i in range(pushers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def fill_direct(
    server: Server, run_id: str, first_step: int, last_step: int, values: int, steps_per_commit: int = 500
) -> float:
    """Write steps [first_step, last_step) into the live server's SQLite file with the code of its ingest path.

    Steps go through the server's own `insert_steps` and `catch_up` (packed rows and rollups in one transaction); the
    running server sees them at its next read, as it would after its own writes.
    """
    started = time.perf_counter()
    db = sqlite3.connect(server.db, isolation_level=None, timeout=30.0)
    cache = SeriesCache()
    keys = [f"metric_{i:02d}" for i in range(values)]
    now = time.time()
    for chunk in range(first_step, last_step, steps_per_commit):
        db.execute("BEGIN IMMEDIATE")
        series_id = cache.series_id(db, run_id, "main")
        steps = {
            step: (now, {key: step * 1e-3 + j for j, key in enumerate(keys)})
            for step in range(chunk, min(chunk + steps_per_commit, last_step))
        }
        insert_steps(db, cache, series_id, steps)
        catch_up(db, cache, series_id)  # the server's writer is not told of these steps: roll them up here
        db.execute("COMMIT")
    db.close()
    return time.perf_counter() - started


def time_queries(
    server: Server, run_id: str, keys: list[str], repeats: int, budget_s: float
) -> dict[str, dict[str, float]]:
    """Time each query `repeats` times (at least 5, fewer than `repeats` when one case exceeds `budget_s`)."""
    client = Client(server.url)
    raw = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    results: dict[str, dict[str, float]] = {}
    for label, wanted in (("1 key", keys[:1]), (f"{len(keys)} keys", keys)):
        history = client.metrics_history(run_id, keys=wanted, max_points=1000)  # warm-up, and a sanity check
        points = len(next(iter(history.series.values())).steps)
        assert len(history.series) == len(wanted) and 0 < points <= 1000, (len(history.series), points)
        e2e, server_side, size = [], [], 0
        target = f"/api/v1/runs/{run_id}/metrics?" + urlencode({"keys": ",".join(wanted), "max_points": "1000"})
        case_started = time.perf_counter()
        for index in range(repeats):
            if index >= 5 and time.perf_counter() - case_started > budget_s:
                break
            t0 = time.perf_counter()
            client.metrics_history(run_id, keys=wanted, max_points=1000)
            e2e.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            raw.request("GET", target)
            response = raw.getresponse()
            body = response.read()
            server_side.append(time.perf_counter() - t0)
            size = len(body)
        results[label] = {
            "client": percentiles_ms(e2e),
            "http": percentiles_ms(server_side),
            "points": points,
            "bucket_steps": history.bucket_steps,
            "bytes": size,
        }
    client.close()
    raw.close()
    return results


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--values", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=20, help="requests per query and mark")
    parser.add_argument(
        "--budget", type=float, default=6.0, help="stop repeating a slow query after this many seconds (min 5)"
    )
    parser.add_argument(
        "--fill",
        choices=("direct", "http"),
        default="direct",
        help="direct: write the server's tables from this process (fast); http: POST every batch through the server",
    )
    args = parser.parse_args()

    keys = [f"metric_{i:02d}" for i in range(args.values)]
    rows = []
    with Server() as server:
        client = Client(server.url)
        run_id = register(client, "bench-history").run_id
        baseline = server.rss_mib()
        done = 0
        for mark in MARKS:
            if args.fill == "http":
                fill_s = fill(server.url, run_id, done, mark, args.values)
            else:
                fill_s = fill_direct(server, run_id, done, mark, args.values)
            rss_filled = server.rss_mib()
            queries = time_queries(server, run_id, keys, args.repeats, args.budget)
            rows.append(
                {
                    "steps": mark,
                    "fill_s": fill_s,
                    "fill_rate": (mark - done) * args.values / fill_s,
                    "rss_filled": rss_filled,
                    "rss_after_queries": server.rss_mib(),
                    "queries": queries,
                }
            )
            done = mark
        db_mib = sum(p.stat().st_size for p in server.dir.glob("bench.db*")) / 2**20

    print(
        f"history ({args.fill} fill), load avg {load_average()}; server RSS at start {baseline:.0f} MiB; "
        f"SQLite files at the end {db_mib:.0f} MiB"
    )
    for row in rows:
        print(
            f"  {row['steps']:>6,} steps x {args.values} values: filled in {row['fill_s']:.1f} s "
            f"({row['fill_rate']:,.0f} values/s); "
            f"server RSS {row['rss_filled']:.0f} MiB after ingest, {row['rss_after_queries']:.0f} MiB after queries"
        )
        for label, q in row["queries"].items():
            print(
                f"    max_points=1000, {label:>7} ({q['points']} points x bucket {q['bucket_steps']}, "
                f"{q['bytes']:,} B): "
                f"client {format_ms(q['client'])}"
            )
            print(f"    {'':>36}raw HTTP {format_ms(q['http'])}")
    last = rows[-1]["queries"]
    worst = max(q["client"]["p99"] for q in last.values())
    write_summary(
        args.summary_json,
        {
            "benchmark": "history (50k steps)",
            "figure": "; ".join(
                f"{label} p50 {q['client']['p50']:.1f} / p99 {q['client']['p99']:.1f} ms" for label, q in last.items()
            )
            + "; RSS "
            + " → ".join(f"{row['rss_filled']:.0f}" for row in rows)
            + " MiB",
            "target": "< 100 ms, flat RSS",
            "met": worst < 100.0,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
