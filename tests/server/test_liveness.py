"""Liveness: a run whose heartbeats stop is marked lost, and running again when one arrives."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from control_server.config import ServerConfig
from protocols import Heartbeat, LogEvent, RunEvent, RunState
from protocols.client import Client
from tests.polling import wait_until
from tests.server.helpers import register
from tests.serving import ServerThread

TIMEOUT_S = 0.5


@pytest.fixture
def quick(tmp_path: Path) -> Iterator[Client]:
    """A client of a server that calls a run lost after TIMEOUT_S without a heartbeat."""
    server = ServerThread(ServerConfig(port=0, db=tmp_path / "runsteer.db", heartbeat_timeout_s=TIMEOUT_S)).start()
    with Client(server.url) as client:
        yield client
    server.stop()


def test_a_run_whose_heartbeats_stop_is_lost_and_runs_again_on_the_next_heartbeat(quick: Client) -> None:
    """running → lost after the timeout (with a stored run event and a log line) → running on a heartbeat."""
    run_id = register(quick, "flaky")
    started = time.monotonic()
    lost = wait_until(lambda: (run := quick.get_run(run_id)).status == "lost" and run, timeout_s=10, what="lost")
    assert time.monotonic() - started >= TIMEOUT_S * 0.9
    assert lost.status == "lost"

    quick.push_reports(run_id, [Heartbeat(state=RunState(step=42))])
    back = quick.get_run(run_id)
    assert back.status == "running" and back.step == 42
    assert back.last_heartbeat is not None and lost.last_heartbeat is not None
    assert back.last_heartbeat > lost.last_heartbeat

    events = quick.list_events(run_id)
    statuses = [event.run.status for event in events if isinstance(event, RunEvent)]
    assert statuses == ["running", "lost", "running"]
    assert any(isinstance(e, LogEvent) and e.level == "warning" and "no heartbeat" in e.message for e in events)


def test_a_paused_run_comes_back_paused(quick: Client) -> None:
    """A heartbeat saying the trainer is paused revives a lost run as paused, not running."""
    run_id = register(quick, "sleepy")
    wait_until(lambda: quick.get_run(run_id).status == "lost", timeout_s=10, what="lost")
    quick.push_reports(run_id, [Heartbeat(state=RunState(step=3, paused=True))])
    assert quick.get_run(run_id).status == "paused"


def test_a_run_that_keeps_heartbeating_is_never_lost(quick: Client) -> None:
    """Heartbeats more often than the timeout keep the run running for several timeouts."""
    run_id = register(quick, "steady")
    deadline = time.monotonic() + 4 * TIMEOUT_S
    step = 0
    while time.monotonic() < deadline:
        step += 1
        quick.push_reports(run_id, [Heartbeat(state=RunState(step=step))])
        assert quick.get_run(run_id).status == "running"
        time.sleep(TIMEOUT_S / 5)
    assert [e.run.status for e in quick.list_events(run_id) if isinstance(e, RunEvent)] == ["running"]
