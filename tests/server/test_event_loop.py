"""The server serves the same on asyncio's event loop and on uvloop (`--event-loop`, `runsteer[fast]`)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from control_server.cli import loop_factory
from protocols import CommandResult, MetricsBatch, MetricsSample, SetHparams
from protocols.client.sync import Client
from tests.server.helpers import raw_request, register
from tests.serving import ServerProcess


@pytest.fixture
def processes() -> Iterator[list[ServerProcess]]:
    """Server processes started by the test; any still running at the end are killed."""
    started: list[ServerProcess] = []
    yield started
    for process in started:
        process.stop(kill=True)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_each_event_loop_stores_metrics_delivers_commands_and_counts_requests(
    processes: list[ServerProcess], tmp_path: Path, loop: str
) -> None:
    """A run's metrics are stored, a command reaches its long-poll and comes back applied, and Prometheus counts
    the requests, on the loop the flag names (the server says which in its log)."""
    pytest.importorskip(loop)
    server = ServerProcess(tmp_path / "runsteer.db", "--event-loop", loop).start()
    processes.append(server)
    with Client(server.url) as client:
        run_id = register(client, "looped")
        ack = client.push_metrics(
            run_id, MetricsBatch(samples=[MetricsSample(step=1, time=1.0, values={"loss": 2.5})], batch_id="b1")
        )
        assert ack.stored_values == 1
        submitted = client.submit(run_id, SetHparams(lr=0.01))
        (delivered,) = client.next_commands(run_id, after_seq=0, wait_s=5)
        assert delivered.id == submitted.id
        client.report_result(run_id, delivered.id, CommandResult(status="applied", step=1, effective={"lr": 0.01}))
        assert client.get_command(run_id, submitted.id).status == "applied"
        assert client.metrics_history(run_id).series["loss"].values == [2.5]
    exposition = raw_request(server.url, "GET", "/metrics").body.decode()
    route = "/api/v1/runs/{run_id}/metrics"
    assert f'runsteer_http_requests_total{{method="POST",route="{route}",status="200"}} 1.0' in exposition
    assert server.stop() == 0
    assert f"{loop} event loop" in server.log()


def test_asking_for_uvloop_without_it_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--event-loop uvloop` on a machine without uvloop is refused with the install command; `auto` falls back."""
    monkeypatch.setitem(sys.modules, "uvloop", None)
    with pytest.raises(ValueError, match=r"runsteer\[fast\]"):
        loop_factory("uvloop")
    assert loop_factory("auto") is None
    assert loop_factory("asyncio") is None
