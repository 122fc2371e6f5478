"""History reads without `keys` at once: server memory and time when many clients read a wide run in full.

The server runs in its own process. One run gets `--names` metrics over `--steps` steps (names x steps points, kept
under the server's per-answer budget), then `--readers` clients each read its whole history at the same moment; the
script prints the server's peak RSS (sampled from /proc every 50 ms) and the wall time until the last answer.
"""

from __future__ import annotations

import threading
import time

from benchmarks._common import Server, base_parser, load_average, write_summary
from protocols import MetricsBatch, MetricsSample, RunRegistration
from protocols.client import Client


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--names", type=int, default=500, help="metrics in the run (default: 500)")
    parser.add_argument("--steps", type=int, default=490, help="steps of each metric (default: 490)")
    parser.add_argument("--readers", type=int, default=12, help="clients reading at once (default: 12)")
    args = parser.parse_args()
    with Server() as server, Client(server.url) as client:
        run_id = client.register_run(RunRegistration(name="wide")).run_id
        names = [f"layer{index}/grad_norm" for index in range(args.names)]
        for first in range(0, args.steps, 10):
            samples = [
                MetricsSample(step=step, time=1.0, values=dict.fromkeys(names, step * 0.1))
                for step in range(first, min(first + 10, args.steps))
            ]
            client.push_metrics(run_id, MetricsBatch(samples=samples))
        points = args.names * args.steps
        before = server.rss_mib()
        print(f"filled {points:,} points; server RSS {before:.0f} MiB; load average {load_average()}")
        peak = [before]
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                peak.append(server.rss_mib())
                time.sleep(0.05)

        def read(into: list[int]) -> None:
            with Client(server.url) as reader:
                into.append(sum(len(series.steps) for series in reader.metrics_history(run_id).series.values()))

        watcher = threading.Thread(target=watch)
        watcher.start()
        read_points: list[int] = []
        started = time.monotonic()
        readers = [threading.Thread(target=read, args=(read_points,)) for _ in range(args.readers)]
        for thread in readers:
            thread.start()
        for thread in readers:
            thread.join()
        elapsed = time.monotonic() - started
        stop.set()
        watcher.join()
    answered = sum(1 for count in read_points if count == points)
    print(
        f"{args.readers} reads of {points:,} points: {answered} answered in full, last after {elapsed:.1f} s; "
        f"peak server RSS {max(peak):.0f} MiB; load average {load_average()}"
    )
    summary = {"points": points, "answered": answered, "seconds": elapsed, "peak_mib": max(peak)}
    write_summary(args.summary_json, summary)


if __name__ == "__main__":
    main()
