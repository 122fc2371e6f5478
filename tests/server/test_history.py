"""Metric history: downsampled buckets equal what the raw points say, whichever rollup serves them."""

from __future__ import annotations

import math
import random
import time

import pytest

from protocols import MetricsBatch, MetricsSample, RunRegistration
from protocols.client import Client

pytestmark = pytest.mark.both_stores

STEPS = 6000


@pytest.fixture
def run_with_history(client: Client) -> tuple[str, dict[int, float]]:
    """A run with STEPS steps of `loss`, sent in batches, some sent twice (the second copy must not count)."""
    run_id = client.register_run(RunRegistration(name="history")).run_id
    rng = random.Random(7)
    loss = {step: rng.uniform(0.0, 10.0) for step in range(STEPS)}
    for start in range(0, STEPS, 250):
        samples = [MetricsSample(step=s, time=time.time(), values={"loss": loss[s]}) for s in range(start, start + 250)]
        client.push_metrics(run_id, MetricsBatch(samples=samples))
        if start % 1000 == 0:
            resent = [MetricsSample(step=s.step, time=s.time, values={"loss": -1.0}) for s in samples]
            ack = client.push_metrics(run_id, MetricsBatch(samples=resent))
            assert ack.stored_values == 0
    return run_id, loss


@pytest.mark.parametrize("max_points", [1, 7, 100, 999, 2500, 5999, 6000])
def test_downsampled_buckets_match_the_raw_points(client: Client, run_with_history, max_points: int) -> None:
    """Each bucket's step, mean, min and max are those of the raw points in it, and there are at most max_points."""
    run_id, loss = run_with_history
    history = client.metrics_history(run_id, keys=["loss"], max_points=max_points)
    series = history.series["loss"]
    assert 0 < len(series.steps) <= max_points
    width = history.bucket_steps
    if width == 1:
        assert series.steps == list(range(STEPS))
        assert series.values == [loss[s] for s in range(STEPS)]
        return
    assert series.min is not None and series.max is not None
    for index, last_step in enumerate(series.steps):
        start = (last_step // width) * width
        members = [loss[s] for s in range(start, min(start + width, STEPS))]
        assert last_step == min(start + width, STEPS) - 1
        assert math.isclose(series.values[index], sum(members) / len(members), rel_tol=1e-9)
        assert series.min[index] == min(members)
        assert series.max[index] == max(members)


def test_since_step_returns_only_later_points(client: Client, run_with_history) -> None:
    """Without downsampling, since_step is exact: the dashboard's incremental fetch sees only new points."""
    run_id, _ = run_with_history
    history = client.metrics_history(run_id, keys=["loss"], since_step=5990)
    assert history.series["loss"].steps == list(range(5990, STEPS))


def test_steps_without_values_or_with_one_and_repeated_steps_keep_the_first_value(client: Client) -> None:
    """A sample may carry no values, one, or many; a step sent twice in one batch keeps each key's first value."""
    run_id = client.register_run(RunRegistration(name="shapes")).run_id
    samples = [
        MetricsSample(step=0, time=1.0, values={}),
        MetricsSample(step=1, time=1.0, values={"loss": 1.5}),
        MetricsSample(step=2, time=1.0, values={"loss": 2.5, "lr": 0.1}),
        MetricsSample(step=2, time=1.0, values={"loss": 9.0, "grad_norm": 3.0}),
    ]
    assert client.push_metrics(run_id, MetricsBatch(samples=samples)).stored_values == 4
    series = client.metrics_history(run_id).series
    assert series["loss"].steps == [1, 2] and series["loss"].values == [1.5, 2.5]
    assert series["lr"].values == [0.1] and series["grad_norm"].values == [3.0]
