"""Finished runs leave the Prometheus exposition after `finished_run_ttl_s`, so series do not grow for ever."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from control_server.config import ServerConfig
from control_server.keys import EXPOSITION
from protocols import MetricsBatch, MetricsSample, RunRegistration, StatusReport
from protocols.client import Client
from tests.serving import ServerThread

TTL_S = 1.0


@pytest.fixture
def short_ttl_server(tmp_path: Path) -> Iterator[ServerThread]:
    """A server that keeps finished runs in /metrics for one second."""
    running = ServerThread(ServerConfig(port=0, db=tmp_path / "runsteer.db", finished_run_ttl_s=TTL_S)).start()
    yield running
    running.stop()


def loss_lines(url: str, run_id: str) -> list[str]:
    text = urllib.request.urlopen(f"{url}/metrics").read().decode()
    return [line for line in text.splitlines() if line.startswith("runsteer_train_loss{") and run_id in line]


def test_a_finished_run_stays_for_its_ttl_then_leaves_while_a_running_one_stays(short_ttl_server: ServerThread) -> None:
    """Right after finishing, the run's loss is still exposed; past the TTL it is gone; a live run is unaffected."""
    with Client(short_ttl_server.url) as client:
        finished = client.register_run(RunRegistration(name="done")).run_id
        live = client.register_run(RunRegistration(name="live")).run_id
        for run_id in (finished, live):
            sample = MetricsSample(step=1, time=time.time(), values={"loss": 2.5})
            client.push_metrics(run_id, MetricsBatch(samples=[sample]))
        client.push_reports(finished, [StatusReport(status="finished")])
        assert client.get_run(finished).status == "finished"
        assert len(loss_lines(short_ttl_server.url, finished)) == 1
        time.sleep(TTL_S + 0.3)
        assert loss_lines(short_ttl_server.url, finished) == []
        assert len(loss_lines(short_ttl_server.url, live)) == 1


def test_a_run_past_its_ttl_leaves_no_latest_values_or_step_times_in_server_memory(
    short_ttl_server: ServerThread,
) -> None:
    """After a scrape past the TTL the server keeps none of the ended run's latest values or step-time histogram,
    so a server that has seen many runs holds memory for the shown ones only; the live run keeps both."""
    with Client(short_ttl_server.url) as client:
        ended = client.register_run(RunRegistration(name="done")).run_id
        live = client.register_run(RunRegistration(name="live")).run_id
        for run_id in (ended, live):
            sample = MetricsSample(step=1, time=time.time(), values={"loss": 2.5, "step_time_ms": 40.0})
            client.push_metrics(run_id, MetricsBatch(samples=[sample]))
        client.push_reports(ended, [StatusReport(status="failed")])
        time.sleep(TTL_S + 0.3)
        loss_lines(short_ttl_server.url, live)
    exposition = short_ttl_server.app[EXPOSITION]
    kept = {run_id for run_id, _ in exposition.metrics.latest}
    assert kept == {live} and set(exposition.metrics.latest_nonfinite) == {(live, "main")}
    assert set(exposition.step_times) == {live}
