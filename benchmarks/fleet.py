"""Fleet: N simulated runs against one server on SQLite, one on PostgreSQL, or two sharing PostgreSQL.

Each simulated run registers, posts one step of 40 values every 0.5 s and long-polls for commands
(answering each with an `applied` result); a commander sends `set_hparams` to random runs at 5 per
second. With two servers, each run talks to one of them and the commander to the other half of the
time, so a command usually crosses servers. Every 10-second window prints: command round trip
(submit until the trainer's result is committed) p50/p99, metrics POST p50/p99, refused or failed
requests, server CPU (mean and busiest second, in % of one core), RSS and the store's size on disk.

With two servers on PostgreSQL, both serve: run i talks to server i mod 2 and its commands are sent
to the other one. Halfway through, the first is SIGKILLed and its runs and commands fail over to the
other (as the reference client does when a connection is refused), so the windows around the kill
show what a failover costs.

    python -m benchmarks.fleet --runs 300 --duration 300 --store sqlite
    python -m benchmarks.fleet --runs 300 --duration 300 --store postgres --servers 2

PostgreSQL runs in a throwaway cluster the benchmark starts itself (as tests do).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from benchmarks._common import UNLIMITED, Server, load_average, percentiles_ms
from control_server.cli import tune_gc
from protocols.constants import API_PREFIX, PROTOCOL_VERSION
from tests.postgres import LocalPostgres

STEP_INTERVAL_S = 0.5
VALUES = 40
COMMANDS_PER_S = 5.0
WINDOW_S = 10.0
LONG_POLL_S = 20.0


@dataclass
class Window:
    """What happened in one 10-second window."""

    round_trips: list[float] = field(default_factory=list)
    posts: list[float] = field(default_factory=list)
    refused: int = 0
    failed: int = 0
    late: int = 0
    answered: int = 0
    """Requests the servers answered (any status): the CPU per request divides by this."""


@dataclass
class Fleet:
    urls: list[str]
    runs: int
    window: Window = field(default_factory=Window)
    submitted: dict[str, float] = field(default_factory=dict)
    stopping: bool = False
    run_ids: list[str] = field(default_factory=list)
    down: set[str] = field(default_factory=set)
    values_stored: int = 0

    def url_for(self, index: int) -> str:
        """The server run `index` talks to (index mod servers), or the next one still up."""
        for offset in range(len(self.urls)):
            url = self.urls[(index + offset) % len(self.urls)]
            if url not in self.down:
                return url
        return self.urls[index % len(self.urls)]

    def refused(self, url: str) -> None:
        """A connection to `url` was refused: move on to the next server, as the reference client does."""
        self.down.add(url)


async def register(session: aiohttp.ClientSession, url: str, name: str) -> str:
    body = {"name": name, "protocol_version": PROTOCOL_VERSION, "policy": UNLIMITED.model_dump(mode="json")}
    async with session.post(f"{url}{API_PREFIX}/runs", json=body) as response:
        response.raise_for_status()
        return str((await response.json())["run_id"])


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection sending pre-encoded requests, one at a time, and reading each answer's
    status and body. A general client (aiohttp's) costs about as much CPU per request as the server; this costs a
    fraction of it, which matters with 1,000 runs' load generator on the server's two cores."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionResetError("the server closed the connection"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None or self.waiter.done():
            return
        lines = bytes(self.buffer[:end]).split(b"\r\n")
        length = next((int(line[15:]) for line in lines if line[:15].lower() == b"content-length:"), None)
        if length is None:
            self.waiter.set_exception(ConnectionError(f"an answer without Content-Length: {lines[0]!r}"))
            return
        if len(self.buffer) < end + 4 + length:
            return
        body = bytes(self.buffer[end + 4 : end + 4 + length])
        del self.buffer[: end + 4 + length]
        self.waiter.set_result((int(lines[0].split(b" ", 2)[1]), body))

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        """Send one request and wait for its answer (status, body)."""
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.closed = True


@dataclass
class Link:
    """A simulated run's connection to its server (a trainer's I/O thread holds one), reopened after a failure."""

    server: str = ""
    connection: Connection | None = None

    async def send(self, server: str, request: bytes, timeout_s: float) -> tuple[int, bytes]:
        """Send `request` (its bytes, Host header included) to `server`; connection errors and timeouts propagate."""
        if self.connection is None or self.connection.closed or self.server != server:
            if self.connection is not None:
                self.connection.close()
            self.connection = None
            address = urlsplit(server)
            _, self.connection = await asyncio.get_running_loop().create_connection(
                Connection, address.hostname, address.port
            )
            self.server = server
        try:
            async with asyncio.timeout(timeout_s):
                return await self.connection.exchange(request)
        except BaseException:
            self.connection.close()
            self.connection = None
            raise


def http_request(method: str, server: str, path: str, body: bytes = b"") -> bytes:
    """A request's bytes: the head, then the body."""
    head = f"{method} {path} HTTP/1.1\r\nHost: {urlsplit(server).netloc}\r\n"
    if method == "POST":
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


async def post_steps(fleet: Fleet, index: int, run_id: str) -> None:
    """Post one step of VALUES values every STEP_INTERVAL_S, on a fixed schedule (late posts are counted).

    The body is built from bytes made once per run: each step has its own step, time and batch id, and the same
    values (the server's work does not depend on them)."""
    values = json.dumps({f"metric_{k:02d}": k + random.random() for k in range(VALUES)}).encode()
    link = Link()
    start = time.monotonic() + random.uniform(0, STEP_INTERVAL_S)
    for step in itertools.count():
        due = start + step * STEP_INTERVAL_S
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -STEP_INTERVAL_S:
            fleet.window.late += 1
        if fleet.stopping:
            return
        body = b'{"samples":[{"step":%d,"time":%.6f,"values":%s}],"batch_id":"%s-%d"}' % (
            step,
            time.time(),
            values,
            run_id.encode(),
            step,
        )
        server = fleet.url_for(index)
        request = http_request("POST", server, f"{API_PREFIX}/runs/{run_id}/metrics", body)
        started = time.perf_counter()
        try:
            status, _ = await link.send(server, request, LONG_POLL_S + 30)
            ok = status == 200
            fleet.window.answered += 1
        except ConnectionRefusedError:
            fleet.refused(server)
            ok = False
        except (OSError, TimeoutError):
            ok = False
        if ok:
            fleet.window.posts.append(time.perf_counter() - started)
            fleet.values_stored += VALUES
        else:
            fleet.window.failed += 1


async def follow_commands(fleet: Fleet, index: int, run_id: str) -> None:
    """Long-poll for commands and answer each as applied; the round trip ends when the result is committed."""
    after = 0
    link = Link()
    result = json.dumps({"status": "applied", "step": 0, "effective": {}}).encode()
    while not fleet.stopping:
        server = fleet.url_for(index)
        base = f"{API_PREFIX}/runs/{run_id}/commands"
        try:
            request = http_request("GET", server, f"{base}/next?after={after}&wait={LONG_POLL_S:g}")
            status, body = await link.send(server, request, LONG_POLL_S + 30)
            records = json.loads(body)["commands"] if status == 200 else []
            if status != 200:
                fleet.window.failed += 1
            fleet.window.answered += 1
        except (OSError, TimeoutError) as exc:
            if isinstance(exc, ConnectionRefusedError):
                fleet.refused(server)
            fleet.window.failed += 1
            await asyncio.sleep(0.5)
            continue
        for record in records:
            after = max(after, record["seq"])
            with contextlib.suppress(OSError, TimeoutError):
                await link.send(server, http_request("POST", server, f"{base}/{record['id']}/result", result), 30)
                fleet.window.answered += 1
            sent = fleet.submitted.pop(record["id"], None)
            if sent is not None:
                fleet.window.round_trips.append(time.perf_counter() - sent)


async def command_sender(fleet: Fleet, session: aiohttp.ClientSession) -> None:
    """Send set_hparams to random runs at COMMANDS_PER_S."""
    start = time.monotonic()
    for count in itertools.count():
        delay = start + count / COMMANDS_PER_S - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if fleet.stopping:
            return
        index = random.randrange(fleet.runs)
        run_id = fleet.run_ids[index]
        command_id = f"bench-{count}"
        body = {
            "id": command_id,
            "command": {"type": "set_hparams", "lr": 10 ** random.uniform(-5, -2)},
            "source": "user:bench",
            "reason": "fleet benchmark",
        }
        fleet.submitted[command_id] = time.perf_counter()
        url = fleet.url_for(index + 1)  # with two servers, not the one the run's trainer long-polls
        try:
            async with session.post(f"{url}{API_PREFIX}/runs/{run_id}/commands", json=body) as response:
                await response.read()
                fleet.window.answered += 1
                if response.status == 429:
                    fleet.window.refused += 1
                elif response.status >= 300:
                    fleet.window.failed += 1
        except aiohttp.ClientConnectorError:
            fleet.refused(url)
            fleet.window.failed += 1
        except aiohttp.ClientError:
            fleet.window.failed += 1


@contextlib.contextmanager
def servers(
    store: str, count: int, workdir: Path, flags: tuple[str, ...] = ()
) -> Iterator[tuple[list[Server], LocalPostgres | None]]:
    """Start `count` servers on a fresh store (and a throwaway PostgreSQL cluster for `postgres`)."""
    postgres = LocalPostgres().start() if store == "postgres" else None
    started: list[Server] = []
    try:
        for index in range(count):
            server = Server(workdir / f"server-{index}", db=postgres.url if postgres else None, flags=flags)
            server.dir.mkdir(parents=True, exist_ok=True)
            started.append(server)
            server.start()
        yield started, postgres
    finally:
        for server in started:
            server.stop()
        if postgres is not None:
            postgres.stop()


def disk_bytes(running: list[Server], postgres: LocalPostgres | None) -> int:
    """The store's bytes on disk: the SQLite file and its WAL, or the PostgreSQL database (its WAL is the cluster's)."""
    if postgres is not None:
        return postgres.disk_bytes()["db"]
    db = running[0].db
    return sum(path.stat().st_size for path in (db, db.with_name(db.name + "-wal")) if path.exists())


def disk_mib(running: list[Server], postgres: LocalPostgres | None) -> str:
    if postgres is not None:
        sizes = postgres.disk_bytes()
        return f"db {sizes['db'] / 2**20:7.1f} MiB  pg_wal {sizes['wal'] / 2**20:6.1f} MiB"
    db = running[0].db
    wal = db.with_name(db.name + "-wal")
    size = db.stat().st_size if db.exists() else 0
    wal_size = wal.stat().st_size if wal.exists() else 0
    return f"db {size / 2**20:7.1f} MiB  wal {wal_size / 2**20:6.1f} MiB"


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_cpu_s(postgres: LocalPostgres | None) -> float:
    """CPU seconds of the PostgreSQL postmaster and every backend it forked."""
    if postgres is None or postgres.process is None:
        return 0.0
    root = postgres.process.pid
    total = process_cpu_s(root)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == root:
                total += process_cpu_s(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return total


async def sample_cpu(
    running: list[Server], postgres: LocalPostgres | None, per_second: list[tuple[float, float]]
) -> None:
    """Append the servers' and PostgreSQL's CPU use over each second, in % of one core."""
    last = sum(process_cpu_s(server.pid) for server in running), postgres_cpu_s(postgres)
    while True:
        await asyncio.sleep(1.0)
        now = sum(process_cpu_s(server.pid) for server in running), postgres_cpu_s(postgres)
        # A backend that exits takes its CPU time with it; count no second below zero.
        per_second.append((max(0.0, now[0] - last[0]) * 100, max(0.0, now[1] - last[1]) * 100))
        last = now


async def sample_own_cpu(per_second: list[float]) -> None:
    """Append the load generator's own CPU use over each second (it shares the machine with the servers)."""
    last = time.process_time()
    while True:
        await asyncio.sleep(1.0)
        now = time.process_time()
        per_second.append((now - last) * 100)
        last = now


@contextlib.asynccontextmanager
async def background(*coroutines: object) -> AsyncIterator[None]:
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]  # type: ignore[arg-type]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def kill_serving_at(running: list[Server], after_s: float) -> None:
    """SIGKILL the first server after `after_s` (its runs fail over to the other)."""
    await asyncio.sleep(after_s)
    assert running[0].process is not None
    running[0].process.kill()
    print(f"-- SIGKILLed the first server at {after_s:.0f} s; its runs fail over to the other", flush=True)


async def drive(running: list[Server], postgres: LocalPostgres | None, runs: int, duration_s: float) -> list[dict]:
    fleet = Fleet([server.url for server in running], runs)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=LONG_POLL_S + 30)
    rows: list[dict] = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        fleet.run_ids = list(
            await asyncio.gather(*(register(session, fleet.url_for(i), f"fleet-{i}") for i in range(runs)))
        )
        tune_gc()  # as the server does: full collections of this process would pause every simulated run at once
        cpu: list[tuple[float, float]] = []
        own: list[float] = []
        workers = [post_steps(fleet, i, run_id) for i, run_id in enumerate(fleet.run_ids)]
        workers += [follow_commands(fleet, i, run_id) for i, run_id in enumerate(fleet.run_ids)]
        if len(running) > 1:
            workers.append(kill_serving_at(running, duration_s / 2))
        samplers = (sample_cpu(running, postgres, cpu), sample_own_cpu(own))
        async with background(*workers, command_sender(fleet, session), *samplers):
            started = time.monotonic()
            while time.monotonic() - started < duration_s:
                await asyncio.sleep(WINDOW_S)
                window, fleet.window = fleet.window, Window()
                seconds = [server for server, _ in cpu[-int(WINDOW_S) :]] or [0.0]
                database = [pg for _, pg in cpu[-int(WINDOW_S) :]] or [0.0]
                rt, post = percentiles_ms(window.round_trips), percentiles_ms(window.posts)
                row = {
                    "t_s": round(time.monotonic() - started),
                    "round_trip_ms": rt,
                    "post_ms": post,
                    "refused": window.refused,
                    "failed": window.failed,
                    "late": window.late,
                    "cpu_pct_mean": statistics.fmean(seconds),
                    "cpu_pct_max": max(seconds),
                    "postgres_cpu_pct_mean": statistics.fmean(database),
                    "answered": window.answered,
                    "generator_cpu_pct_mean": statistics.fmean(own[-int(WINDOW_S) :] or [0.0]),
                    "server_cpu_ms_per_request": sum(seconds) * 10 / max(1, window.answered),
                    "rss_mib": [round(rss) if (rss := server.rss_mib()) == rss else 0 for server in running],
                    "disk": disk_mib(running, postgres),
                }
                rows.append(row)
                print(
                    f"{row['t_s']:>4} s  rt p50 {rt.get('p50', 0):6.1f} p99 {rt.get('p99', 0):7.1f} ms (n={rt['n']})  "
                    f"POST p50 {post.get('p50', 0):6.1f} p99 {post.get('p99', 0):7.1f} ms (n={post['n']})  "
                    f"refused {window.refused} failed {window.failed} late {window.late}  "
                    f"cpu {row['cpu_pct_mean']:5.1f}% (max {row['cpu_pct_max']:5.1f}%)"
                    + (f" + postgres {row['postgres_cpu_pct_mean']:5.1f}%" if postgres else "")
                    + f"  {row['server_cpu_ms_per_request']:.2f} ms CPU/request"
                    + f"  generator {row['generator_cpu_pct_mean']:.0f}%"
                    + f"  rss {row['rss_mib']} MiB  "
                    f"{row['disk']}  load {load_average()}",
                    flush=True,
                )
            fleet.stopping = True
    on_disk = disk_bytes(running, postgres)
    print(
        f"stored {fleet.values_stored:,} values (acknowledged); on disk {on_disk / 2**20:.1f} MiB: "
        f"{on_disk / max(1, fleet.values_stored):.1f} bytes per value, runs, commands and events included",
        flush=True,
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=100, help="simulated runs")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--servers", type=int, default=1, help="servers sharing the store (postgres only for >1)")
    parser.add_argument(
        "--event-loop", choices=("auto", "uvloop", "asyncio"), default="auto", help="the servers' event loop"
    )
    parser.add_argument("--json", type=Path, help="also write every window here")
    args = parser.parse_args()
    if args.servers > 1 and args.store != "postgres":
        parser.error("--servers > 1 needs --store postgres: SQLite serves one process")
    print(
        f"fleet: {args.runs} runs x {VALUES} values every {STEP_INTERVAL_S} s, {COMMANDS_PER_S:g} commands/s, "
        f"{args.servers} server(s) on {args.store} ({args.event_loop} event loop), {args.duration:g} s; "
        f"load {load_average()}",
        flush=True,
    )
    with (
        tempfile.TemporaryDirectory(prefix="runsteer-fleet-") as tmp,
        servers(args.store, args.servers, Path(tmp), ("--event-loop", args.event_loop)) as (running, postgres),
    ):
        rows = asyncio.run(drive(running, postgres, args.runs, args.duration))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
