"""Soak: many runs pushing metrics and many websocket watchers for minutes, on loopback; errors, loss, memory, latency.

`--runs` runs each push one sample every `--interval` seconds (its values carry `sent_at`, the wall-clock time
just before the POST) for `--minutes`; `--watchers` websocket clients are spread over the runs' streams and note,
per sample, `receive time - sent_at` (the server's delivery latency) and which steps they saw. At the end every
watcher that was not closed as too slow must have seen every step of its run. The server runs in its own process;
its RSS is sampled every few seconds (the start figure is taken after a short warm-up).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks._common import UNLIMITED, Server, base_parser, format_ms, load_average, percentiles_ms, write_summary
from protocols.client.aio import AsyncClient
from protocols.events import MetricsEvent
from protocols.records import MetricsBatch, MetricsSample, RunRegistration


@dataclass
class SoakResult:
    """What a soak saw: errors, lost samples, server memory over time and delivery latencies."""

    seconds: float
    pushed: int
    delivered: int
    errors: list[str] = field(default_factory=list)
    lost: int = 0
    """Samples a watcher that kept up never received."""
    closed_watchers: int = 0
    """Watchers the server closed (e.g. as too slow); their losses are not counted in `lost`."""
    rss_mib: list[tuple[float, float]] = field(default_factory=list)
    """(seconds since start, server RSS in MiB), sampled every few seconds."""
    latency_s: list[float] = field(default_factory=list)

    @property
    def rss_start_mib(self) -> float:
        """RSS once warmed up: the first sample at or after 10% of the run (at most 10 s in)."""
        warm = min(10.0, self.seconds * 0.1)
        return next((rss for at, rss in self.rss_mib if at >= warm), self.rss_mib[-1][1])

    @property
    def rss_end_mib(self) -> float:
        """RSS at the end."""
        return self.rss_mib[-1][1]

    def summary(self) -> dict[str, Any]:
        """The headline figures."""
        return {
            "seconds": round(self.seconds, 1),
            "pushed": self.pushed,
            "delivered": self.delivered,
            "errors": len(self.errors),
            "lost": self.lost,
            "closed_watchers": self.closed_watchers,
            "rss_first_mib": round(self.rss_mib[0][1], 1),
            "rss_start_mib": round(self.rss_start_mib, 1),
            "rss_end_mib": round(self.rss_end_mib, 1),
            "rss_max_mib": round(max(rss for _, rss in self.rss_mib), 1),
            "latency_ms": percentiles_ms(self.latency_s),
        }


async def _push(
    url: str, run_id: str, until: float, interval_s: float, result: SoakResult, pushed: dict[str, int]
) -> None:
    loop = asyncio.get_running_loop()
    async with AsyncClient(url) as client:
        step, due = 0, loop.time()
        while loop.time() < until:
            now = time.time()
            sample = MetricsSample(step=step, time=now, values={"loss": 1.0 / (step + 1), "sent_at": now})
            try:
                await client.push_metrics(run_id, MetricsBatch(samples=[sample], batch_id=f"s{step}"))
                pushed[run_id] = step + 1
            except Exception as exc:
                result.errors.append(f"push {run_id} step {step}: {exc!r}")
            step += 1
            due += interval_s
            await asyncio.sleep(max(0.0, due - loop.time()))


async def _watch(url: str, run_id: str, seen: set[int], result: SoakResult, opened: asyncio.Event) -> None:
    try:
        async with AsyncClient(url) as client, client.stream(run_id) as stream:
            opened.set()
            async for event in stream:
                if isinstance(event, MetricsEvent):
                    now = time.time()
                    for sample in event.samples:
                        seen.add(sample.step)
                        result.latency_s.append(now - sample.values["sent_at"])
            result.closed_watchers += 1
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        result.closed_watchers += 1
        result.errors.append(f"watch {run_id}: {exc!r}")
        opened.set()


def rss_mib(pid: int) -> float:
    """The resident set size (VmRSS) of process `pid` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for process {pid}")


async def _sample_rss(pid: int, started: float, result: SoakResult, every_s: float) -> None:
    while True:
        result.rss_mib.append((time.monotonic() - started, rss_mib(pid)))
        await asyncio.sleep(every_s)


async def soak(
    url: str, pid: int, *, minutes: float, runs: int = 20, watchers: int = 100, interval_s: float = 0.05
) -> SoakResult:
    """Drive the server at `url` (process `pid`) for `minutes`; watchers are connected before pushing starts."""
    async with AsyncClient(url) as admin:
        run_ids = [
            (await admin.register_run(RunRegistration(name=f"soak-{index}", policy=UNLIMITED))).run_id
            for index in range(runs)
        ]
    result = SoakResult(seconds=minutes * 60, pushed=0, delivered=0)
    seen: list[set[int]] = [set() for _ in range(watchers)]
    opened = [asyncio.Event() for _ in range(watchers)]
    watching = [
        asyncio.create_task(_watch(url, run_ids[index % runs], seen[index], result, opened[index]))
        for index in range(watchers)
    ]
    await asyncio.wait_for(asyncio.gather(*(event.wait() for event in opened)), 60)
    started = time.monotonic()
    sampler = asyncio.create_task(_sample_rss(pid, started, result, every_s=min(5.0, minutes * 60 / 20)))
    pushed: dict[str, int] = dict.fromkeys(run_ids, 0)
    until = asyncio.get_running_loop().time() + minutes * 60
    await asyncio.gather(*(_push(url, run_id, until, interval_s, result, pushed) for run_id in run_ids))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(
        not task.done() and len(seen[index]) < pushed[run_ids[index % runs]] for index, task in enumerate(watching)
    ):
        await asyncio.sleep(0.1)
    result.seconds = time.monotonic() - started
    result.rss_mib.append((result.seconds, rss_mib(pid)))
    kept_up = [not task.done() for task in watching]
    sampler.cancel()
    for task in watching:
        task.cancel()
    await asyncio.gather(sampler, *watching, return_exceptions=True)
    result.pushed = sum(pushed.values())
    result.delivered = sum(len(steps) for steps in seen)
    result.lost = sum(pushed[run_ids[index % runs]] - len(seen[index]) for index in range(watchers) if kept_up[index])
    return result


def main() -> None:
    """Run the soak against a fresh server process and print its figures."""
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to push (default %(default)s)")
    parser.add_argument("--runs", type=int, default=20, help="runs pushing metrics (default %(default)s)")
    parser.add_argument("--watchers", type=int, default=100, help="websocket watchers (default %(default)s)")
    parser.add_argument(
        "--interval", type=float, default=0.05, help="seconds between a run's pushes (default %(default)s)"
    )
    args = parser.parse_args()
    print(f"load average before: {load_average()}")
    with Server() as server:
        result = asyncio.run(
            soak(
                server.url,
                server.pid,
                minutes=args.minutes,
                runs=args.runs,
                watchers=args.watchers,
                interval_s=args.interval,
            )
        )
    summary = result.summary()
    print(f"load average after:  {load_average()}")
    print(
        f"{args.runs} runs x 1 sample / {args.interval * 1000:.0f} ms, {args.watchers} watchers, {summary['seconds']} s"
    )
    print(f"pushed {summary['pushed']} samples, delivered {summary['delivered']} to watchers")
    print(f"errors {summary['errors']}, lost {summary['lost']}, watchers closed {summary['closed_watchers']}")
    for line in result.errors[:10]:
        print(f"  {line}")
    print(
        f"server RSS: first {summary['rss_first_mib']} MiB, after warm-up {summary['rss_start_mib']} MiB, "
        f"end {summary['rss_end_mib']} MiB, max {summary['rss_max_mib']} MiB"
    )
    print(f"delivery latency (receive - sent_at): {format_ms(summary['latency_ms'])}")
    write_summary(args.summary_json, summary)


if __name__ == "__main__":
    main()
