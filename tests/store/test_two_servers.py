"""Two server processes serving the same runs from one PostgreSQL database: commands, approvals, rate limits,
event streams and liveness hold across them as on one server."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from protocols import (
    CommandResult,
    Heartbeat,
    LogReport,
    MetricsBatch,
    MetricsSample,
    Policy,
    RateLimit,
    RunRegistration,
    RunState,
    SetHparams,
)
from protocols.client import Client
from protocols.errors import RequestRejected
from protocols.events import Event, LogEvent, MetricsEvent, RunEvent, RunStateEvent
from tests.postgres import LocalPostgres
from tests.serving import ServerProcess

HEARTBEAT_TIMEOUT_S = 3.0
"""Both servers' `--heartbeat-timeout`: short, so the liveness test sees a run lost quickly."""


@pytest.fixture(scope="module")
def servers(postgres_cluster: LocalPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """Two real server processes on one fresh database; their URLs."""
    url = postgres_cluster.create_database("two_servers")
    root: Path = tmp_path_factory.mktemp("two_servers")
    flags = ("--db", url, "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT_S))
    started = [ServerProcess(root / f"{name}.db", *flags) for name in ("a", "b")]
    try:
        for server in started:
            server.start()
        yield started[0].url, started[1].url
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def clients(servers: tuple[str, str]) -> Iterator[tuple[Client, Client]]:
    """A client of each server."""
    with Client(servers[0]) as a, Client(servers[1]) as b:
        yield a, b


def register(client: Client, name: str, policy: Policy | None = None) -> str:
    return client.register_run(RunRegistration(name=name, policy=policy)).run_id


@pytest.mark.slow
def test_a_command_submitted_on_one_server_reaches_a_trainer_long_polling_the_other(
    clients: tuple[Client, Client],
) -> None:
    """The trainer's long-poll on B returns a command submitted on A about as fast as one submitted on B itself."""
    a, b = clients
    run_id = register(b, "across")
    latencies: dict[str, list[float]] = {"other": [], "same": []}
    after_seq = 0
    with Client(b.server) as trainer:
        for round_ in range(10):
            for where, submitter in (("other", a), ("same", b)):
                with ThreadPoolExecutor(1) as poller:
                    polled = poller.submit(trainer.next_commands, run_id, after_seq=after_seq, wait_s=10)
                    time.sleep(0.05)  # the long-poll is waiting
                    submitted = time.perf_counter()
                    record = submitter.submit(run_id, SetHparams(lr=0.001 * (round_ + 1)), source="script:test")
                    delivered = polled.result(10)
                    latencies[where].append(time.perf_counter() - submitted)
                assert [(c.id, c.seq, c.status) for c in delivered] == [(record.id, record.seq, "delivered")]
                after_seq = record.seq
    assert after_seq == 20, "seqs follow one another whichever server took the command"
    other, same = statistics.median(latencies["other"]), statistics.median(latencies["same"])
    assert other < 0.25, f"median {other * 1000:.0f} ms from A's submit to B's long-poll answer"
    assert other < same + 0.1, f"across servers {other * 1000:.1f} ms, on one server {same * 1000:.1f} ms"


@pytest.mark.slow
def test_watchers_on_either_server_see_every_event_of_a_run_driven_on_one_in_order_once(
    clients: tuple[Client, Client],
) -> None:
    """A run driven on A (metrics, heartbeats, commands, logs): B's watcher gets exactly A's watcher's events, every
    stored one that the history holds and every metrics step, in id order without gaps or repeats."""
    a, b = clients
    run_id = register(a, "watched")
    seen: dict[str, list[Event]] = {"a": [], "b": []}
    streams = {"a": a.stream(run_id), "b": b.stream(run_id)}
    started = {name: threading.Event() for name in streams}

    def read(name: str) -> None:
        for event in streams[name]:
            if isinstance(event, LogEvent) and event.message == "start":
                started[name].set()
            elif started[name].is_set():
                seen[name].append(event)
                if isinstance(event, LogEvent) and event.message == "done":
                    return

    readers = [threading.Thread(target=read, args=(name,)) for name in streams]
    for reader in readers:
        reader.start()
    try:
        while not all(flag.is_set() for flag in started.values()):  # until both are subscribed
            a.push_reports(run_id, [LogReport(message="start")])
            time.sleep(0.1)
        first = a.list_events(run_id)[-1].event_id
        after_seq = 0
        for step in range(40):
            values = {f"v{index}": step + index / 100 for index in range(40)}
            a.push_metrics(run_id, MetricsBatch(samples=[MetricsSample(step=step, time=time.time(), values=values)]))
            if step % 5 == 0:
                a.push_reports(run_id, [Heartbeat(state=RunState(step=step)), LogReport(message=f"step {step}")])
            if step % 10 == 0:
                a.submit(run_id, SetHparams(lr=0.01 / (step + 1)), source="script:test")
                for command in a.next_commands(run_id, after_seq=after_seq, wait_s=1):
                    a.report_result(run_id, command.id, CommandResult(status="applied", step=step))
                    after_seq = command.seq
        big = [MetricsSample(step=40 + i, time=time.time(), values={"loss": float(i)}) for i in range(400)]
        a.push_metrics(run_id, MetricsBatch(samples=big))  # more than one notification can carry
        a.push_reports(run_id, [LogReport(message="done")])
        for reader in readers:
            reader.join(30)
    finally:
        for stream in streams.values():
            stream.close()
    assert not any(reader.is_alive() for reader in readers)
    ids = [event.event_id for event in seen["b"]]
    assert ids == sorted(set(ids)), "in order, once each"
    assert [e.model_dump() for e in seen["b"]] == [e.model_dump() for e in seen["a"]], "both servers stream alike"
    stored = [e for e in seen["b"] if not isinstance(e, MetricsEvent | RunStateEvent)]
    assert [e.event_id for e in stored] == [e.event_id for e in a.list_events(run_id, after=first)], "no gaps"
    steps = [sample.step for e in seen["b"] if isinstance(e, MetricsEvent) for sample in e.samples]
    assert steps == list(range(440))
    assert sum(isinstance(e, RunStateEvent) for e in seen["b"]) == 8, "every heartbeat"


@pytest.mark.slow
def test_concurrent_submissions_on_both_servers_get_distinct_gapless_seqs_under_one_rate_limit(
    clients: tuple[Client, Client],
) -> None:
    """40 submissions to one run, 20 per server at once, against a limit of 25: 25 accepted, seqs 1..25."""
    a, b = clients
    run_id = register(a, "crowded", Policy(rate_limit=RateLimit(max_commands=25, per_seconds=600)))

    def submit(client_and_index: tuple[Client, int]) -> int | str:
        client, index = client_and_index
        with Client(client.server) as own:
            try:
                return own.submit(run_id, SetHparams(lr=0.001 * (index + 1)), source="script:test").seq
            except RequestRejected as exc:
                assert exc.body is not None
                return exc.body.error

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(submit, [(client, index) for index in range(20) for client in (a, b)]))
    seqs = sorted(outcome for outcome in outcomes if isinstance(outcome, int))
    assert seqs == list(range(1, 26))
    assert sorted(str(outcome) for outcome in outcomes if not isinstance(outcome, int)) == ["rate_limited"] * 15
    assert [record.seq for record in b.list_commands(run_id)] == seqs


@pytest.mark.slow
def test_an_approval_on_one_server_racing_a_rejection_on_the_other_has_one_winner(
    clients: tuple[Client, Client],
) -> None:
    """Held commands approved on A while rejected on B: exactly one decision stands each time, and a trainer gets
    each approved command once."""
    a, b = clients
    run_id = register(a, "racing")
    held = [a.submit(run_id, SetHparams(lr=0.001 * (i + 1)), source="agent:tuner", hold=True) for i in range(10)]
    approved: list[str] = []
    for record in held:
        barrier = threading.Barrier(2)

        def decide(
            client: Client, approve: bool, command_id: str = record.id, barrier: threading.Barrier = barrier
        ) -> str:
            with Client(client.server) as own:
                barrier.wait()
                try:
                    decision = own.approve if approve else own.reject
                    return decision(run_id, command_id, source="user:reviewer").status
                except RequestRejected as exc:
                    assert exc.status == 409, exc
                    return "conflict"

        with ThreadPoolExecutor(2) as pool:
            outcomes = list(pool.map(decide, (a, b), (True, False)))
        assert sorted(outcomes) in (["conflict", "queued"], ["conflict", "rejected"]), outcomes
        final = b.get_command(run_id, record.id)
        assert final.status == ("queued" if "queued" in outcomes else "rejected")
        if final.status == "queued":
            approved.append(record.id)
    delivered = b.next_commands(run_id, after_seq=0, wait_s=2)
    assert [c.id for c in delivered] == approved
    assert [c.seq for c in delivered] == sorted({c.seq for c in delivered})


@pytest.mark.slow
def test_a_run_heartbeating_to_one_server_is_alive_on_both_and_marked_lost_once(
    clients: tuple[Client, Client],
) -> None:
    """While its trainer heartbeats to A only, neither server calls the run lost; once it stops, it is lost, with
    one status change and one warning although both servers watch it."""
    a, b = clients
    run_id = register(a, "alive")
    for step in range(20):  # 6 s, twice the timeout, a heartbeat every 0.3 s
        a.push_reports(run_id, [Heartbeat(state=RunState(step=step))])
        time.sleep(0.3)
    assert [a.get_run(run_id).status, b.get_run(run_id).status] == ["running", "running"]
    deadline = time.monotonic() + HEARTBEAT_TIMEOUT_S * 4
    while b.get_run(run_id).status != "lost" and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2.0)  # each server checks liveness at least once a second: the other one has checked too
    assert [a.get_run(run_id).status, b.get_run(run_id).status] == ["lost", "lost"]
    events = a.list_events(run_id)
    assert sum(isinstance(e, RunEvent) and e.run.status == "lost" for e in events) == 1
    assert sum(isinstance(e, LogEvent) and e.level == "warning" for e in events) == 1


@pytest.mark.slow
def test_a_server_that_lost_its_listening_connection_listens_again_and_catches_up(
    clients: tuple[Client, Client], postgres_cluster: LocalPostgres
) -> None:
    """With both servers' LISTEN sessions ended by PostgreSQL, a command submitted on A meanwhile still reaches the
    trainer long-polling B (B listens again and reloads the open commands), and B's watcher gets every stored event
    of the run once, in order, the missed ones read back."""
    a, b = clients
    run_id = register(b, "relisten")
    with b.stream(run_id) as stream:
        b.push_reports(run_id, [LogReport(message="watching")])
        first = stream.next_event(timeout_s=10)
        while isinstance(first, RunEvent):  # the registration's, when B heard it back after the stream opened
            first = stream.next_event(timeout_s=10)
        assert isinstance(first, LogEvent), first
        with psycopg.connect(postgres_cluster.url_of("two_servers"), autocommit=True) as admin:
            ended = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = 'two_servers' AND query LIKE 'LISTEN%'"
            ).fetchall()
            assert len(ended) == 2
            record = a.submit(run_id, SetHparams(lr=0.002), source="script:test")
        delivered = b.next_commands(run_id, after_seq=0, wait_s=10)
        assert [(c.id, c.status) for c in delivered] == [(record.id, "delivered")]
        again = a.submit(run_id, SetHparams(lr=0.003), source="script:test")
        started = time.perf_counter()
        assert [c.id for c in b.next_commands(run_id, after_seq=record.seq, wait_s=10)] == [again.id]
        assert time.perf_counter() - started < 1.0, "announcements are heard again"
        a.push_reports(run_id, [LogReport(message="done")])
        seen = []
        while not (isinstance(event := stream.next_event(timeout_s=10), LogEvent) and event.message == "done"):
            assert event is not None
            seen.append(event.event_id)
    stored = [e.event_id for e in a.list_events(run_id, after=first.event_id) if e.event_id < event.event_id]
    assert seen == stored, "every stored event once, in order"
