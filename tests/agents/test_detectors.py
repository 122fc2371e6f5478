"""Detectors are pure functions of a metric's recent values."""

from __future__ import annotations

import dataclasses

import pytest

from agents.detectors import (
    NonFinite,
    Plateau,
    Ratio,
    Spike,
    Stall,
    Threshold,
    Trend,
    evaluations_without_improvement,
    ratio_to_ema,
    ratio_to_max,
    ratio_to_mean,
    robust_z,
    slope,
)
from agents.window import WindowTracker
from protocols import MetricsSample, RunState
from tests.agents.helpers import window_of

NOISY = [2.0 + 0.01 * ((i * 7) % 5 - 2) for i in range(200)]


def test_robust_z_measures_distance_from_the_median_in_mad_units():
    """A value 6 scaled MADs above the median scores 6; the median itself scores 0."""
    history = [1.0, 2.0, 3.0, 4.0, 5.0]
    mad_sigma = 1.0 * 1.4826
    assert robust_z(history, 3.0) == 0.0
    assert robust_z(history, 3.0 + 6 * mad_sigma) == pytest.approx(6.0)
    assert robust_z([1.0], 5.0) is None


def test_robust_z_ignores_earlier_outliers_that_would_inflate_a_standard_deviation():
    """One huge earlier value barely moves the median/MAD baseline."""
    history = [1.0] * 50 + [1.1] * 50 + [1000.0]
    assert robust_z(history, 2.0) > 6


def test_ratios_compare_against_mean_ema_and_max():
    """Ratio helpers divide by the mean, the EMA and the largest earlier value."""
    assert ratio_to_mean([1.0, 3.0], 4.0) == 2.0
    assert ratio_to_ema([2.0] * 10, 6.0, span=5) == pytest.approx(3.0)
    assert ratio_to_max([1.0, 5.0, 2.0], 50.0) == 10.0
    assert ratio_to_mean([], 1.0) is None


def test_slope_fits_a_line_and_reports_its_r2():
    """A straight line has its slope and R^2 1; fewer than three points give None."""
    fit = slope([0, 1, 2, 3], [1.0, 3.0, 5.0, 7.0])
    assert fit is not None and fit[0] == pytest.approx(2.0) and fit[1] == pytest.approx(1.0)
    assert slope([0, 1], [0.0, 1.0]) is None


def test_plateau_counts_reports_since_the_last_real_improvement():
    """Improvements smaller than min_delta (relative) do not reset the count."""
    assert evaluations_without_improvement([3.0, 2.5, 2.49, 2.495, 2.6], min_delta=0.01) == 3
    assert evaluations_without_improvement([3.0, 2.5, 2.0], min_delta=0.01) == 0


def test_spike_fires_on_a_jump_but_not_on_noise_or_before_it_is_armed():
    """z > 6 against 128 steps fires; the same jump with too little history does not."""
    spike = Spike(metric="loss", window=128, min_points=64, z=6.0)
    assert spike.check(window_of({"loss": NOISY})) is None
    finding = spike.check(window_of({"loss": [*NOISY, 3.0]}))
    assert finding is not None and finding.step == 200 and "loss z=" in finding.summary
    assert spike.check(window_of({"loss": [*NOISY[:30], 3.0]})) is None


def test_spike_with_for_steps_needs_consecutive_outliers():
    """A lone outlier does not fire a 3-step spike rule; three in a row do, with the onset at the first."""
    spike = Spike(metric="grad_norm", for_steps=3)
    assert spike.check(window_of({"grad_norm": [*NOISY, 9.0, 2.0, 2.0]})) is None
    finding = spike.check(window_of({"grad_norm": [*NOISY, 9.0, 9.0, 9.0]}))
    assert finding is not None and finding.onset == 200


def test_ratio_to_mean_fires_after_the_run_of_high_values_and_names_its_onset():
    """Loss at 2x its 50-step mean for 5 steps fires with onset at the first high step; 4 steps do not."""
    rule = Ratio(metric="loss", baseline="mean", window=50, factor=2.0, for_steps=5)
    assert rule.check(window_of({"loss": [*NOISY[:100], 9.0, 9.0, 9.0, 9.0]})) is None
    finding = rule.check(window_of({"loss": [*NOISY[:100], 9.0, 9.0, 9.0, 9.0, 9.0]}))
    assert finding is not None and finding.onset == 100 and finding.step == 104


def test_a_decaying_spike_is_measured_against_the_mean_before_it_not_a_mean_it_raised():
    """A spike from ~2.0 decaying 4.4, 3.9, 3.5, 3.3, 3.1 stays above 1.5x the pre-spike mean for 5 steps and
    fires, though its last step is below 1.5x a 50-step mean that counted the spike's first four steps."""
    rule = Ratio(metric="loss", baseline="mean", window=50, factor=1.5, for_steps=5)
    finding = rule.check(window_of({"loss": [*NOISY[:100], 4.4, 3.9, 3.5, 3.3, 3.1]}))
    assert finding is not None and finding.onset == 100
    assert 3.1 / ((46 * 2.0 + 4.4 + 3.9 + 3.5 + 3.3) / 50) < 1.5


def test_ratio_to_max_is_megatrons_catastrophic_loss():
    """A loss 10x the largest seen fires; 9x does not."""
    rule = Ratio(metric="loss", baseline="max", factor=10.0)
    assert rule.check(window_of({"loss": [5.0, *NOISY[:50], 45.0]})) is None
    assert rule.check(window_of({"loss": [5.0, *NOISY[:50], 55.0]})) is not None


def test_threshold_matches_globs_and_needs_every_recent_step_over_the_line():
    """`attn_logit_max/*` fires when any layer is above the line for `for_steps` steps."""
    rule = Threshold(metric="attn_logit_max/*", above=100.0, for_steps=2)
    calm = window_of({"attn_logit_max/0": [10.0, 20.0], "attn_logit_max/1": [30.0, 150.0]})
    hot = window_of({"attn_logit_max/0": [10.0, 20.0], "attn_logit_max/1": [120.0, 150.0]})
    assert rule.check(calm) is None
    finding = rule.check(hot)
    assert finding is not None and "attn_logit_max/1 150 above 100" in finding.summary
    with pytest.raises(ValueError, match="exactly one"):
        Threshold(metric="loss")


def test_trend_fires_on_a_steady_rise_above_its_level_and_not_on_noise():
    """A clean rise fires; noise (low R^2) and a rise below `min_value` do not."""
    rule = Trend(metric="x", window=50, min_rise_ratio=0.25, min_value=100.0)
    assert rule.check(window_of({"x": [100.0 + 5 * i for i in range(60)]})) is not None
    assert rule.check(window_of({"x": [10.0 + i for i in range(60)]})) is None
    assert rule.check(window_of({"x": [200.0 + 40 * ((i * 7) % 3 - 1) for i in range(60)]})) is None


def test_plateau_fires_after_patience_evaluations_without_improvement():
    """Three eval_loss reports without a 1% improvement fire; two do not."""
    rule = Plateau(metric="eval_loss", patience=3, min_delta=0.01)
    assert rule.check(window_of({"eval_loss": [3.0, 2.5, 2.5, 2.49]})) is None
    assert rule.check(window_of({"eval_loss": [3.0, 2.5, 2.5, 2.49, 2.5]})) is not None


def test_nonfinite_fires_on_the_newest_sample_naming_a_watched_metric():
    """A NaN loss in the newest sample fires; one at an older step does not."""
    tracker = WindowTracker("run-1")
    tracker.add_sample(MetricsSample(step=0, time=1.0, values={"lr": 0.1}, nonfinite=["loss"]))
    assert NonFinite().check(tracker.window()) is not None
    tracker.add_sample(MetricsSample(step=1, time=1.0, values={"loss": 2.0}))
    assert NonFinite().check(tracker.window()) is None
    tracker.add_sample(MetricsSample(step=2, time=1.0, values={"loss": 2.0}, nonfinite=["tokens_per_s"]))
    assert NonFinite().check(tracker.window()) is None


def test_stall_fires_only_for_a_running_run_that_went_quiet():
    """No step for longer than `seconds` fires while running, not while paused."""
    window = window_of({"loss": [1.0]})
    finding = Stall(seconds=0.5).check(window)
    assert finding is not None and finding.value == pytest.approx(1.0)
    assert Stall(seconds=5.0).check(window) is None
    assert Stall(seconds=0.5).check(dataclasses.replace(window, status="paused")) is None


def test_the_lr_in_force_is_the_newer_of_the_run_state_and_the_lr_metric():
    """A schedule moves lr every step while the state comes with heartbeats: the metric wins when it is newer."""
    window = window_of({"lr": [0.001, 0.002, 0.003]})
    assert dataclasses.replace(window, state=RunState(step=1, lr=0.01)).current("lr") == 0.003
    assert dataclasses.replace(window, state=RunState(step=3, lr=0.01)).current("lr") == 0.01


def test_an_evaluation_at_the_newest_step_is_merged_into_it_and_keeps_its_training_metrics():
    """The trainer records eval_loss as a second sample of a step; the step's loss stays and no new step counts."""
    tracker = WindowTracker("run-1")
    assert tracker.add_sample(MetricsSample(step=0, time=1.0, values={"loss": 3.0}))
    assert tracker.add_sample(MetricsSample(step=1, time=1.0, values={"loss": 2.0}))
    assert not tracker.add_sample(MetricsSample(step=1, time=1.0, values={"eval_loss": 2.5}))
    window = tracker.window()
    assert window.metrics["loss"].last_points() == [(0, 3.0), (1, 2.0)]
    assert window.metrics["eval_loss"].last_points() == [(1, 2.5)]
    assert (window.step, window.tick) == (1, 2)
