"""Detectors: pure functions over a metric's recent values, and the rule-file specs that apply them to a window.

Every function takes plain sequences and returns a number or None ("not enough data"); every spec's `check`
takes a `RunWindow` and returns a `Finding` (what fired, at which step, in words) or None.
"""

from __future__ import annotations

import fnmatch
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agents.window import RunWindow

MAD_TO_SIGMA = 1.4826
"""Scales the median absolute deviation to a standard deviation for normally distributed data."""


def robust_z(history: Sequence[float], value: float) -> float | None:
    """How many robust standard deviations (median/MAD) `value` lies above the median of `history`."""
    if len(history) < 2:
        return None
    median = statistics.median(history)
    mad = statistics.median(abs(x - median) for x in history) * MAD_TO_SIGMA
    scale = max(mad, 1e-12 * max(1.0, abs(median)))
    return (value - median) / scale


def ratio_to_mean(history: Sequence[float], value: float) -> float | None:
    """`value` over the mean of `history` (None when the mean is not positive)."""
    if not history:
        return None
    mean = math.fsum(history) / len(history)
    return value / mean if mean > 0 else None


def ema(values: Sequence[float], span: int) -> float | None:
    """Exponential moving average with the usual `alpha = 2 / (span + 1)`."""
    if not values:
        return None
    alpha = 2.0 / (span + 1.0)
    average = values[0]
    for value in values[1:]:
        average += alpha * (value - average)
    return average


def ratio_to_ema(history: Sequence[float], value: float, span: int) -> float | None:
    """`value` over the EMA of `history` (None when the EMA is not positive)."""
    average = ema(history, span)
    return value / average if average is not None and average > 0 else None


def ratio_to_max(history: Sequence[float], value: float) -> float | None:
    """`value` over the largest value in `history`."""
    if not history:
        return None
    peak = max(history)
    return value / peak if peak > 0 else None


def slope(steps: Sequence[float], values: Sequence[float]) -> tuple[float, float] | None:
    """Least-squares slope per step and the fit's R^2 (None with fewer than 3 points or one step)."""
    if len(values) < 3:
        return None
    mean_x = math.fsum(steps) / len(steps)
    mean_y = math.fsum(values) / len(values)
    sxx = math.fsum((x - mean_x) ** 2 for x in steps)
    syy = math.fsum((y - mean_y) ** 2 for y in values)
    if sxx == 0:
        return None
    sxy = math.fsum((x - mean_x) * (y - mean_y) for x, y in zip(steps, values, strict=True))
    r2 = (sxy * sxy) / (sxx * syy) if syy > 0 else 0.0
    return sxy / sxx, r2


def evaluations_without_improvement(values: Sequence[float], min_delta: float) -> int:
    """How many of the latest values came after the best (lowest) one, improving on it by less than `min_delta`."""
    if not values:
        return 0
    best, since = values[0], 0
    for value in values[1:]:
        if value < best - min_delta * abs(best):
            best, since = value, 0
        else:
            since += 1
    return since


@dataclass(frozen=True)
class Finding:
    """A detector fired: the step it concerns, the step the problem began, and a sentence."""

    step: int
    onset: int
    summary: str
    value: float = math.nan


class Spec(BaseModel):
    """Base of the detector specs in a rule file."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NonFinite(Spec):
    """Fires when the newest sample reports any watched metric as NaN or infinite."""

    kind: Literal["nonfinite"] = "nonfinite"
    metrics: list[str] = Field(default_factory=lambda: ["loss", "grad_norm"], min_length=1)
    """Metric names (globs allowed); the trainer's catch-all `nonfinite` flag always counts."""

    def check(self, window: RunWindow) -> Finding | None:
        names = window.nonfinite.get(window.step, ())
        hit = [name for name in names if name == "nonfinite" or any(fnmatch.fnmatchcase(name, m) for m in self.metrics)]
        if not hit:
            return None
        return Finding(window.step, window.step, f"{', '.join(hit)} non-finite at step {window.step}")


class Spike(Spec):
    """Fires when the robust z-score (median/MAD of the `window` points before) of each of the last `for_steps`
    values exceeds `z`."""

    kind: Literal["spike"] = "spike"
    metric: str
    window: Annotated[int, Field(ge=4)] = 128
    min_points: Annotated[int, Field(ge=3)] = 64
    """Stay quiet until this many earlier points exist (the detector is 'armed')."""
    z: Annotated[float, Field(gt=0)] = 6.0
    for_steps: Annotated[int, Field(ge=1)] = 1

    def check(self, window: RunWindow) -> Finding | None:
        best: Finding | None = None
        for name in window.matching(self.metric):
            points = window.metrics[name].last_points(self.window + self.for_steps)
            if len(points) < self.min_points + self.for_steps or points[-1][0] != window.step:
                continue
            values = [v for _, v in points]
            scores = [
                robust_z(values[max(0, i - self.window) : i], values[i])
                for i in range(len(values) - self.for_steps, len(values))
            ]
            if not all(score is not None and score > self.z for score in scores):
                continue
            score = scores[-1]
            assert score is not None
            if best is None or score > best.value:
                median = statistics.median(values[-self.window - 1 : -1])
                run = f" for {self.for_steps} steps" if self.for_steps > 1 else ""
                summary = (
                    f"{name} z={score:.1f} over its {self.window}-step median {median:.4g}{run} (now {values[-1]:.4g})"
                )
                best = Finding(window.step, points[len(points) - self.for_steps][0], summary, score)
        return best


class Ratio(Spec):
    """Fires when the value is at least `factor` times a baseline for `for_steps` steps in a row.

    Baselines, all taken before the first of those steps: `mean` of the `window` steps before it, `ema` of them
    with span `window`, or `max` of every point before it in the window.
    """

    kind: Literal["ratio"] = "ratio"
    metric: str
    baseline: Literal["mean", "ema", "max"] = "mean"
    window: Annotated[int, Field(ge=2)] = 100
    factor: Annotated[float, Field(gt=0)] = 2.0
    for_steps: Annotated[int, Field(ge=1)] = 1
    min_points: Annotated[int, Field(ge=1)] = 10

    def check(self, window: RunWindow) -> Finding | None:
        for name in window.matching(self.metric):
            series = window.metrics[name]
            wanted = None if self.baseline == "max" else self.window + self.for_steps
            points = series.last_points(wanted)
            if len(points) < self.min_points + self.for_steps or points[-1][0] != window.step:
                continue
            values = [v for _, v in points]
            first = len(points) - self.for_steps
            # Every point of the run is measured against the window before the run began: a spike must not raise
            # its own baseline (a 5-step spike would otherwise fall below the factor by its last step).
            before = values[max(0, first - self.window) : first] if self.baseline != "max" else values[:first]
            ratios = [self._ratio(before, value) for value in values[first:]]
            if all(r is not None and r >= self.factor for r in ratios):
                onset = points[first][0]
                run = f" for {self.for_steps} steps since step {onset}" if self.for_steps > 1 else ""
                ratio = ratios[-1]
                assert ratio is not None
                summary = f"{name} {ratio:.1f}x its {self._baseline_words()}{run} (now {values[-1]:.4g})"
                return Finding(window.step, onset, summary, ratio)
        return None

    def _ratio(self, before: Sequence[float], value: float) -> float | None:
        if self.baseline == "mean":
            return ratio_to_mean(before, value)
        if self.baseline == "ema":
            return ratio_to_ema(before, value, self.window)
        return ratio_to_max(before, value)

    def _baseline_words(self) -> str:
        return {"mean": f"{self.window}-step mean", "ema": f"EMA (span {self.window})", "max": "largest value so far"}[
            self.baseline
        ]


class Threshold(Spec):
    """Fires when the value (the largest over matching metrics) is above `above` or below `below`."""

    kind: Literal["threshold"] = "threshold"
    metric: str
    above: float | None = None
    below: float | None = None
    for_steps: Annotated[int, Field(ge=1)] = 1

    @model_validator(mode="after")
    def _one_side(self) -> Threshold:
        if (self.above is None) == (self.below is None):
            raise ValueError("a threshold needs exactly one of `above` or `below`")
        return self

    def check(self, window: RunWindow) -> Finding | None:
        for name in window.matching(self.metric):
            points = window.metrics[name].last_points(self.for_steps)
            if len(points) < self.for_steps or points[-1][0] != window.step:
                continue
            values = [v for _, v in points]
            if self.above is not None and all(v > self.above for v in values):
                return Finding(window.step, points[0][0], f"{name} {values[-1]:.4g} above {self.above:g}", values[-1])
            if self.below is not None and all(v < self.below for v in values):
                return Finding(window.step, points[0][0], f"{name} {values[-1]:.4g} below {self.below:g}", values[-1])
        return None


class Plateau(Spec):
    """Fires when a metric (lower is better) has not improved by `min_delta` (relative) for `patience` reports."""

    kind: Literal["plateau"] = "plateau"
    metric: str = "eval_loss"
    patience: Annotated[int, Field(ge=1)] = 3
    min_delta: Annotated[float, Field(ge=0)] = 0.01

    def check(self, window: RunWindow) -> Finding | None:
        series = window.series(self.metric)
        if series is None or series.latest is None or series.latest[0] != window.step:
            return None
        values = series.last()
        stale = evaluations_without_improvement(values, self.min_delta)
        if stale < self.patience:
            return None
        best = min(values[: len(values) - stale])
        summary = f"{self.metric} has not improved on {best:.4g} for {stale} reports (now {values[-1]:.4g})"
        return Finding(window.step, window.step, summary, float(stale))


class Trend(Spec):
    """Fires when a least-squares fit over the last `window` steps rises by `min_rise` (or by `min_rise_ratio`
    of the window's mean), with R^2 at least `min_r2` so that noise alone does not fire it."""

    kind: Literal["trend"] = "trend"
    metric: str
    window: Annotated[int, Field(ge=3)] = 200
    min_points: Annotated[int, Field(ge=3)] = 10
    min_rise: float | None = None
    min_rise_ratio: float | None = None
    min_r2: Annotated[float, Field(ge=0, le=1)] = 0.5
    min_value: float | None = None
    """Only fire once the latest value reaches this (a rise that matters only above a level)."""

    @model_validator(mode="after")
    def _some_rise(self) -> Trend:
        if self.min_rise is None and self.min_rise_ratio is None:
            raise ValueError("a trend needs `min_rise` or `min_rise_ratio`")
        return self

    def check(self, window: RunWindow) -> Finding | None:
        for name in window.matching(self.metric):
            points = [(s, v) for s, v in window.metrics[name].last_points() if s > window.step - self.window]
            if len(points) < self.min_points or points[-1][0] != window.step:
                continue
            if self.min_value is not None and points[-1][1] < self.min_value:
                continue
            fit = slope([s for s, _ in points], [v for _, v in points])
            if fit is None or fit[1] < self.min_r2:
                continue
            per_step, r2 = fit
            span = points[-1][0] - points[0][0]
            rise = per_step * span
            mean = statistics.fmean(v for _, v in points)
            by_rise = self.min_rise is not None and rise >= self.min_rise
            by_ratio = self.min_rise_ratio is not None and mean > 0 and rise / mean >= self.min_rise_ratio
            if by_rise or by_ratio:
                summary = f"{name} rising {rise:+.3g} over {span} steps to {points[-1][1]:.4g} (R^2 {r2:.2f})"
                return Finding(window.step, points[0][0], summary, rise)
        return None


class Stall(Spec):
    """Fires when a running (not paused) run reported no new step for `seconds`."""

    kind: Literal["stall"] = "stall"
    seconds: Annotated[float, Field(gt=0)] = 600.0

    def check(self, window: RunWindow) -> Finding | None:
        if window.status != "running" or window.last_step_at is None:
            return None
        quiet = window.now - window.last_step_at
        if quiet < self.seconds:
            return None
        summary = f"no step reported for {quiet:.0f} s (last: step {window.step})"
        return Finding(window.step, window.step, summary, quiet)


Detector = Annotated[NonFinite | Spike | Ratio | Threshold | Plateau | Trend | Stall, Field(discriminator="kind")]
"""Any detector spec, told apart by its `kind`."""
