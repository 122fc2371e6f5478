"""Limits that hold: the per-run rate limit under concurrent submitters, the size of a run's config, what a heartbeat
sends to watchers, distinct metric names per run, the points one history read may return, and lost runs leaving
/metrics."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

import control_server.metrics
import control_server.runs
from benchmarks.rate_limit import flood
from control_server.config import ServerConfig
from control_server.metrics import MAX_METRIC_NAMES
from protocols import (
    Heartbeat,
    MetricsBatch,
    MetricsSample,
    Policy,
    RateLimit,
    RequestRejected,
    RunEvent,
    RunRegistration,
    RunState,
    RunStateEvent,
)
from protocols.client import Client
from protocols.records import MAX_CONFIG_BYTES
from tests.polling import wait_until
from tests.server.helpers import row_counts
from tests.serving import ServerProcess, ServerThread


@pytest.mark.parametrize(("max_commands", "submitters"), [(5, 100), (120, 300)])
def test_the_rate_limit_holds_exactly_under_concurrent_submitters(
    tmp_path: Path, max_commands: int, submitters: int
) -> None:
    """A server process and `submitters` concurrent clients: exactly `max_commands` are accepted (202) and the rest
    answered 429, and the store holds exactly `max_commands` commands."""
    server = ServerProcess(tmp_path / "runsteer.db").start()
    try:
        with Client(server.url) as client:
            policy = Policy(rate_limit=RateLimit(max_commands=max_commands, per_seconds=600))
            run_id = client.register_run(RunRegistration(name="flooded", policy=policy)).run_id
            statuses = asyncio.run(flood(server.url, run_id, submitters))
            assert statuses == Counter({202: max_commands, 429: submitters - max_commands})
            assert len(client.list_commands(run_id)) == max_commands
    finally:
        server.stop()


def test_a_run_config_over_the_bound_is_refused_naming_config(client: Client) -> None:
    """A config of more than MAX_CONFIG_BYTES as JSON is a 422 on `config`; one just under it registers."""
    with pytest.raises(RequestRejected) as refused:
        client.register_run(RunRegistration.model_construct(name="big", config={"blob": "x" * MAX_CONFIG_BYTES}))
    assert refused.value.status == 422 and [d.field for d in refused.value.details] == ["config"]
    assert f"at most {MAX_CONFIG_BYTES}" in refused.value.details[0].message
    fits = client.register_run(RunRegistration(name="fits", config={"blob": "x" * (MAX_CONFIG_BYTES - 100)}))
    assert len(fits.config["blob"]) == MAX_CONFIG_BYTES - 100  # type: ignore[arg-type]


def test_a_heartbeat_sends_watchers_the_runs_state_not_its_config(client: Client) -> None:
    """With a 60 kB config, each heartbeat reaches a watcher as a `run_state` event of well under 1 kB that
    carries the new step and state; the full run (config included) goes out only when the run is registered."""
    run_id = client.register_run(RunRegistration(name="chatty", config={"blob": "x" * 60_000})).run_id
    with client.stream(run_id) as stream:
        for step in range(1, 6):
            client.push_reports(run_id, [Heartbeat(state=RunState(step=step, lr=0.01))])
        events = [stream.next_event(timeout_s=5) for _ in range(5)]
    assert all(isinstance(event, RunStateEvent) for event in events)
    assert [event.step for event in events] == [1, 2, 3, 4, 5]  # type: ignore[union-attr]
    assert max(len(event.model_dump_json()) for event in events if event is not None) < 1000
    last = events[-1]
    assert isinstance(last, RunStateEvent)
    run = client.get_run(run_id)
    assert last.apply(run.model_copy(update={"step": 0, "state": None})) == run
    assert not any(isinstance(event, RunEvent) for event in events)


def test_distinct_metric_names_per_run_are_bounded_and_a_refused_batch_stores_nothing(
    client: Client, server: ServerThread
) -> None:
    """Names up to MAX_METRIC_NAMES are stored; a batch that would pass it is 422 `too_many_metrics` naming
    `samples.values` and stores nothing; known names still go in, and another run has its own budget."""
    run_id = client.register_run(RunRegistration(name="wide")).run_id
    per_batch = 4096
    for first in range(0, MAX_METRIC_NAMES, per_batch):
        values = {f"m{index}": 1.0 for index in range(first, first + per_batch)}
        client.push_metrics(run_id, MetricsBatch(samples=[MetricsSample(step=0, time=1.0, values=values)]))
    before = row_counts(server.config.db)
    extra = MetricsSample(step=1, time=1.0, values={"loss": 1.0, "m0": 2.0})
    with pytest.raises(RequestRejected) as refused:
        client.push_metrics(run_id, MetricsBatch(samples=[extra], batch_id="over"))
    assert refused.value.status == 422 and refused.value.body is not None
    assert refused.value.body.error == "too_many_metrics"
    assert [d.field for d in refused.value.details] == ["samples.values"]
    assert row_counts(server.config.db) == before
    known = MetricsSample(step=1, time=1.0, values={"m0": 2.0, "m1": 3.0})
    assert client.push_metrics(run_id, MetricsBatch(samples=[known], batch_id="over")).stored_values == 2
    other = client.register_run(RunRegistration(name="narrow")).run_id
    assert client.push_metrics(other, MetricsBatch(samples=[extra])).stored_values == 2


def test_a_history_read_past_the_point_budget_is_refused_and_a_narrower_one_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a budget of 1,000 points per answer, reading 20 series x 100 steps without `keys` is 422
    `too_many_points` naming what to narrow; the same run read with `keys` or `max_points` answers."""
    monkeypatch.setattr(control_server.metrics, "MAX_READ_POINTS", 1000)
    server = ServerThread(ServerConfig(port=0, db=tmp_path / "runsteer.db")).start()
    try:
        with Client(server.url) as client:
            run_id = client.register_run(RunRegistration(name="long")).run_id
            samples = [
                MetricsSample(step=step, time=1.0, values={f"m{index}": float(step) for index in range(20)})
                for step in range(100)
            ]
            client.push_metrics(run_id, MetricsBatch(samples=samples))
            with pytest.raises(RequestRejected) as refused:
                client.metrics_history(run_id)
            assert refused.value.status == 422 and refused.value.body is not None
            assert refused.value.body.error == "too_many_points" and "keys" in str(refused.value)
            assert len(client.metrics_history(run_id, keys=[f"m{index}" for index in range(5)]).series) == 5
            downsampled = client.metrics_history(run_id, max_points=10)
            assert sum(len(series.steps) for series in downsampled.series.values()) <= 1000
    finally:
        server.stop()


def test_a_lost_run_leaves_metrics_after_the_ttl(tmp_path: Path) -> None:
    """A run whose trainer stops heartbeating becomes `lost`, and its series leave /metrics once the TTL passes."""
    config = ServerConfig(port=0, db=tmp_path / "runsteer.db", heartbeat_timeout_s=0.4, finished_run_ttl_s=0.5)
    server = ServerThread(config).start()
    try:
        with Client(server.url) as client:
            run_id = client.register_run(RunRegistration(name="vanishing")).run_id
            client.push_metrics(run_id, MetricsBatch(samples=[MetricsSample(step=3, time=1.0, values={"loss": 2.0})]))

            def exposed() -> bool:
                text = urllib.request.urlopen(f"{server.url}/metrics").read().decode()
                return f'run_id="{run_id}"' in text

            assert exposed()
            wait_until(lambda: client.get_run(run_id).status == "lost", timeout_s=10, what="the run lost")
            time.sleep(0.6)
            assert not exposed()
    finally:
        server.stop()


def test_branches_and_series_per_run_are_bounded_and_a_refused_batch_stores_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With at most 3 branches and 4 series a run: a heartbeat or a metrics batch opening a fourth branch, or a
    fifth series, is 422 naming the field, and nothing of it is stored; known branches and series still go in."""
    monkeypatch.setattr(control_server.runs, "MAX_BRANCHES", 3)
    monkeypatch.setattr(control_server.metrics, "MAX_BRANCHES", 3)
    monkeypatch.setattr(control_server.metrics, "MAX_METRIC_SERIES", 4)
    server = ServerThread(ServerConfig(port=0, db=tmp_path / "runsteer.db")).start()
    try:
        with Client(server.url) as client:
            run_id = client.register_run(RunRegistration(name="branchy")).run_id
            client.push_reports(run_id, [Heartbeat(state=RunState(step=1, branch=name)) for name in ("b1", "b2")])
            before = row_counts(server.config.db)
            with pytest.raises(RequestRejected) as by_heartbeat:
                client.push_reports(run_id, [Heartbeat(state=RunState(step=2, branch="b3"))])
            assert [d.field for d in by_heartbeat.value.details] == ["reports.0.state.branch"]
            assert client.get_run(run_id).branches == ["main", "b1", "b2"]

            def batch(branch: str, *names: str) -> MetricsBatch:
                return MetricsBatch(
                    samples=[MetricsSample(branch=branch, step=1, time=1.0, values=dict.fromkeys(names, 1.0))]
                )

            client.push_metrics(run_id, batch("b1", "loss", "lr"))
            client.push_metrics(run_id, batch("b2", "loss"))
            client.push_metrics(run_id, batch("main", "loss"))
            after_four = row_counts(server.config.db)
            refusals = {}
            for label, refused_batch in (("fourth branch", batch("b4", "loss")), ("fifth series", batch("b2", "lr"))):
                with pytest.raises(RequestRejected) as caught:
                    client.push_metrics(run_id, refused_batch)
                assert caught.value.body is not None and caught.value.body.error == "too_many_metrics"
                refusals[label] = [d.field for d in caught.value.details]
            assert refusals == {"fourth branch": ["samples.branch"], "fifth series": ["samples.values"]}
            assert row_counts(server.config.db) == after_four
            assert after_four["metric_steps"] == 3  # a row per (branch, step)
            assert before["runs"] == after_four["runs"]
            assert (
                client.push_metrics(
                    run_id, MetricsBatch(samples=[MetricsSample(branch="b1", step=2, time=1.0, values={"lr": 2.0})])
                ).stored_values
                == 1
            )
    finally:
        server.stop()
