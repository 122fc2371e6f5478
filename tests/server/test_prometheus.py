"""`GET /metrics`: Prometheus text that parses, with each run's latest training values and moving command counters."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from protocols import CommandResult, MetricsBatch, MetricsSample, Pause, SetHparams
from protocols.client import Client
from tests.server.helpers import raw_request, register
from tests.serving import ServerThread

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(server: ServerThread) -> Samples:
    """Every sample of the exposition, keyed by (name, sorted labels); fails if the text does not parse."""
    answer = raw_request(server.url, "GET", "/metrics")
    assert answer.status == 200
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.body.decode())
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_the_latest_loss_of_each_run_and_branch_is_exposed_with_bounded_labels(
    client: Client, server: ServerThread
) -> None:
    """runsteer_train_loss{run_id,run_name,branch} follows the newest sample; other keys stay out."""
    run_id = register(client, "gauged")
    client.push_metrics(
        run_id,
        MetricsBatch(samples=[MetricsSample(step=s, time=1.0, values={"loss": 3.0 - s, "lr": 0.01}) for s in (1, 2)]),
    )
    first = scrape(server)
    labels = {"run_id": run_id, "run_name": "gauged", "branch": "main"}
    assert value(first, "runsteer_train_loss", **labels) == 1.0
    assert value(first, "runsteer_learning_rate", **labels) == 0.01
    assert value(first, "runsteer_step", **labels) == 2

    client.push_metrics(
        run_id,
        MetricsBatch(
            samples=[
                MetricsSample(step=3, time=2.0, values={"loss": 0.75, "my_custom_thing": 5.0}),
                MetricsSample(branch="retry", step=2, time=3.0, values={"loss": 2.5}),
            ]
        ),
    )
    second = scrape(server)
    assert value(second, "runsteer_train_loss", **labels) == 0.75
    assert value(second, "runsteer_train_loss", run_id=run_id, run_name="gauged", branch="retry") == 2.5
    assert not any("my_custom_thing" in name for name, _ in second)
    assert value(second, "runsteer_metric_values_ingested_total") == 7
    assert value(second, "runsteer_runs", status="running") == 1


def test_command_counters_and_latency_move_with_each_status(client: Client, server: ServerThread) -> None:
    """runsteer_commands_total{type,status} counts each status reached; the latency histogram counts finished ones."""
    run_id = register(client, "counted")
    before = scrape(server)
    first = client.submit(run_id, SetHparams(lr=0.001))
    client.submit(run_id, Pause())
    client.next_commands(run_id, after_seq=0, wait_s=1)
    client.report_result(run_id, first.id, CommandResult(status="applied", step=1))
    after = scrape(server)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("runsteer_commands_total", type="set_hparams", status="queued") == 1
    assert moved("runsteer_commands_total", type="set_hparams", status="delivered") == 1
    assert moved("runsteer_commands_total", type="set_hparams", status="applied") == 1
    assert moved("runsteer_commands_total", type="pause", status="queued") == 1
    assert moved("runsteer_commands_total", type="pause", status="delivered") == 1
    assert moved("runsteer_commands_total", type="pause", status="applied") == 0
    assert moved("runsteer_command_latency_seconds_count", type="set_hparams", status="applied") == 1
    route = "/api/v1/runs/{run_id}/commands"
    assert moved("runsteer_http_requests_total", method="POST", route=route, status="202") == 2


def test_a_refused_command_counts_no_command_but_counts_the_request(client: Client, server: ServerThread) -> None:
    """A 422 moves the request counter for its status and leaves the command counters alone."""
    run_id = register(client, "refusing")
    before = scrape(server)
    answer = raw_request(
        server.url, "POST", f"/api/v1/runs/{run_id}/commands", b'{"command": {"type": "pause", "x": 1}}'
    )
    assert answer.status == 422
    after = scrape(server)
    commands = {key: v for key, v in after.items() if key[0] == "runsteer_commands_total"}
    assert commands == {key: v for key, v in before.items() if key[0] == "runsteer_commands_total"}
    route = "/api/v1/runs/{run_id}/commands"
    key = ("runsteer_http_requests_total", (("method", "POST"), ("route", route), ("status", "422")))
    assert after[key] - before.get(key, 0.0) == 1
