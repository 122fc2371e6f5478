"""Fan-out: one run emitting metrics records to many websocket subscribers; delivery rate, latency and loss.

The server runs in its own process. The publisher (this process) posts a `MetricsBatch` every
`--interval` seconds holding `--rate x interval` records of `--values` values each; every record's
values carry `sent_at`, the wall-clock time just before its POST. Subscribers are aiohttp websocket
clients on the run's stream, split across `--procs` processes so that the client side is not the
bottleneck; each notes, per record received, `receive time - sent_at` (server delivery latency) and
`receive time - record time` (which adds the up-to-one-interval batching wait on the trainer side),
and which steps it saw, so lost records are counted per client.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import re
import time
from multiprocessing.synchronize import Event as MpEvent
from typing import Any

import numpy as np

from benchmarks._common import Server, base_parser, format_ms, load_average, register, write_summary
from protocols.client.sync import Client
from protocols.records import MetricsBatch, MetricsSample

SAMPLE_FIELDS = re.compile(r'"step":(\d+),"time":([-0-9.eE+]+),"values":\{[^}]*"sent_at":([-0-9.eE+]+)')
"""step, time and sent_at of each sample in a metrics event as pydantic writes it (field order of MetricsSample)."""


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def subscriber_process(
    url: str, clients: int, ready: mp.Queue, results: mp.Queue, stop: MpEvent, expected: Any, complete: Any
) -> None:
    """Open `clients` websocket subscribers, read until `stop`, then report per-client figures."""
    asyncio.run(_subscribe_all(url, clients, ready, results, stop, expected, complete))


async def _subscribe_all(
    url: str, clients: int, ready: mp.Queue, results: mp.Queue, stop: MpEvent, expected: Any, complete: Any
) -> None:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        sockets = [await session.ws_connect(url, max_msg_size=0, autoping=True) for _ in range(clients)]
        state = [
            {
                "steps": set(),
                "events": 0,
                "dupes": 0,
                "lat_send": [],
                "lat_record": [],
                "close": None,
                "complete": False,
            }
            for _ in sockets
        ]

        async def reader(socket: aiohttp.ClientWebSocketResponse, mine: dict[str, Any]) -> None:
            steps, lat_send, lat_record = mine["steps"], mine["lat_send"], mine["lat_record"]
            async for message in socket:
                now = time.time()
                if message.type != aiohttp.WSMsgType.TEXT:
                    break
                text = message.data
                if not text.startswith('{"event_id"') or '"kind":"metrics"' not in text:
                    event = json.loads(text)  # not the server's compact metrics event: parse it fully
                    if event.get("kind") != "metrics":
                        continue
                    found = [(s["step"], s["time"], s["values"]["sent_at"]) for s in event["samples"]]
                else:  # cheap path, so that 100 clients per process keep up: pull out only what is measured
                    found = [(int(a), float(b), float(c)) for a, b, c in SAMPLE_FIELDS.findall(text)]
                mine["events"] += 1
                for step, record_time, sent_at in found:
                    if step in steps:
                        mine["dupes"] += 1
                    steps.add(step)
                    lat_send.append(now - sent_at)
                    lat_record.append(now - record_time)
            mine["close"] = socket.close_code

        readers = [asyncio.create_task(reader(s, st)) for s, st in zip(sockets, state, strict=True)]

        async def count_complete() -> None:
            """Tell the publisher how many of this process's clients have every record so far."""
            while True:
                await asyncio.sleep(0.05)
                if expected.value:
                    complete.value = sum(1 for st in state if len(st["steps"]) >= expected.value)

        counter = asyncio.create_task(count_complete())
        ready.put(clients)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, stop.wait)
        counter.cancel()
        total = expected.value
        early_closes = [st["close"] for st in state if st["close"] is not None]
        for socket in sockets:
            await socket.close()
        await asyncio.gather(*readers, return_exceptions=True)
        results.put(
            {
                "received": [len(st["steps"]) for st in state],
                "lost": [total - len(st["steps"]) for st in state],
                "dupes": sum(st["dupes"] for st in state),
                "events": sum(st["events"] for st in state),
                "early_closes": early_closes,
                "lat_send": np.concatenate([np.asarray(st["lat_send"]) for st in state]).astype(np.float64).tobytes(),
                "lat_record": np.concatenate([np.asarray(st["lat_record"]) for st in state])
                .astype(np.float64)
                .tobytes(),
            }
        )


def stats_ms(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"n": 0}
    ms = values * 1000
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {
        "n": int(values.size),
        "mean": float(ms.mean()),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "max": float(ms.max()),
    }


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=200)
    parser.add_argument("--procs", type=int, default=2, help="client processes the subscribers are split across")
    parser.add_argument("--rate", type=int, default=200, help="metrics records per second")
    parser.add_argument("--values", type=int, default=40, help="values per record (one is sent_at)")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between POSTs")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument(
        "--drain", type=float, default=10.0, help="most seconds to wait for clients to catch up at the end"
    )
    args = parser.parse_args()

    context = mp.get_context("spawn")
    with Server() as server:
        client = Client(server.url)
        run = register(client, "bench-fanout")
        stream = f"ws://127.0.0.1:{server.port}/api/v1/runs/{run.run_id}/stream"
        ready, results, stop = context.Queue(), context.Queue(), context.Event()
        expected = context.Value("i", 0)
        completes = [context.Value("i", 0) for _ in range(args.procs)]
        shares = [args.subscribers // args.procs + (i < args.subscribers % args.procs) for i in range(args.procs)]
        procs = [
            context.Process(
                target=subscriber_process, args=(stream, n, ready, results, stop, expected, completes[i]), daemon=True
            )
            for i, n in enumerate(shares)
        ]
        for proc in procs:
            proc.start()
        connected = sum(ready.get(timeout=60) for _ in procs)
        time.sleep(0.5)

        per_post = max(1, round(args.rate * args.interval))
        keys = [f"metric_{i:02d}" for i in range(args.values - 1)]
        step = 0
        posts, late_posts, post_times = 0, 0, []
        cpu_before, started = server.cpu_s(), time.time()
        client_cpu_before = sum(_cpu_s(proc.pid) for proc in procs)
        next_post = started + args.interval
        while next_post <= started + args.duration + 1e-9:
            delay = next_post - time.time()
            if delay > 0:
                time.sleep(delay)
            else:
                late_posts += 1
            sent_at = time.time()
            samples = []
            for i in range(per_post):
                record_time = next_post - args.interval + (i + 1) * args.interval / per_post
                values = {key: float(np.sin(step * 0.01 + j)) for j, key in enumerate(keys)}
                values["sent_at"] = sent_at
                samples.append(MetricsSample(step=step, time=min(record_time, sent_at), values=values))
                step += 1
            t0 = time.perf_counter()
            client.push_metrics(run.run_id, MetricsBatch(samples=samples))
            post_times.append(time.perf_counter() - t0)
            posts += 1
            next_post += args.interval
        publish_s = time.time() - started
        server_cpu = server.cpu_s() - cpu_before
        client_cpu = sum(_cpu_s(proc.pid) for proc in procs) - client_cpu_before
        expected.value = step
        # Wait for every client to have every record (a client behind by seconds is still counted as lost).
        drain_started = time.time()
        while sum(c.value for c in completes) < connected and time.time() - drain_started < args.drain:
            time.sleep(0.1)
        drain_s = time.time() - drain_started
        caught_up = sum(c.value for c in completes)
        rss = server.rss_mib()
        stop.set()
        reports = [results.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(10)

    lat_send = np.concatenate([np.frombuffer(r["lat_send"]) for r in reports])
    lat_record = np.concatenate([np.frombuffer(r["lat_record"]) for r in reports])
    lost = [n for r in reports for n in r["lost"]]
    events = sum(r["events"] for r in reports)
    early = [code for r in reports for code in r["early_closes"]]
    send_stats, record_stats = stats_ms(lat_send), stats_ms(lat_record)
    post_stats = stats_ms(np.asarray(post_times))
    print(
        f"fan-out: {connected} subscribers in {args.procs} processes, {args.rate} records/s x {args.values} values, "
        f"one POST of {per_post} records every {args.interval * 1000:.0f} ms, {publish_s:.1f} s; "
        f"load avg {load_average()}"
    )
    print(
        f"  published {step} records in {posts} POSTs ({step / publish_s:.0f} records/s; "
        f"{late_posts} POSTs started late)"
    )
    print(f"  POST answered: {format_ms(post_stats)}")
    print(
        f"  delivered {events} events ({events / publish_s:.0f} events/s), {int(lat_send.size)} records "
        f"({lat_send.size / publish_s:.0f} records/s) across all subscribers"
    )
    print(f"  latency sent_at → received : {format_ms(send_stats)}")
    print(f"  latency record time → recv : {format_ms(record_stats)}")
    print(
        f"  lost records per client: max {max(lost)}, total {sum(lost)}, "
        f"clients with loss {sum(1 for n in lost if n)}; "
        f"duplicates {sum(r['dupes'] for r in reports)}; closed early: {len(early)} {sorted(set(early))}"
    )
    print(f"  after the last POST, {caught_up} of {connected} clients had every record within {drain_s:.1f} s")
    print(
        f"  server CPU {server_cpu / publish_s * 100:.0f}% of one core while publishing, "
        f"subscriber processes {client_cpu / publish_s * 100:.0f}%; RSS {rss:.0f} MiB"
    )
    write_summary(
        args.summary_json,
        {
            "benchmark": "fan-out",
            "figure": (
                f"{events / publish_s:.0f} events/s, p50 {send_stats['p50']:.1f} / p99 {send_stats['p99']:.1f} ms, "
                f"lost {sum(lost)}"
            ),
            "target": "p99 < 100 ms, 0 lost",
            "met": send_stats["p99"] < 100.0 and sum(lost) == 0,
            "latency_send": send_stats,
            "latency_record": record_stats,
            "events_per_s": events / publish_s,
            "lost": sum(lost),
        },
    )


if __name__ == "__main__":
    main()
