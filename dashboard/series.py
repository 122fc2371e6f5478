"""Metric history kept per run and branch, grown by fetching only the steps after a cursor."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from protocols.client import Client
from protocols.records import MetricsHistory

MAX_POINTS = 600
"""Points per metric asked of the server on a (re)load; it downsamples longer histories into buckets."""


@dataclass(frozen=True)
class ChartSpec:
    """One chart: a title and the metrics it draws (exact names, or prefixes ending in `/`)."""

    title: str
    keys: tuple[str, ...]
    log_scale: bool = False

    def matches(self, key: str) -> bool:
        """True when `key` belongs on this chart."""
        return any(key == wanted or (wanted.endswith("/") and key.startswith(wanted)) for wanted in self.keys)


CHARTS: tuple[ChartSpec, ...] = (
    ChartSpec("Loss (train and eval)", ("loss", "eval_loss", "eval_loss/")),
    ChartSpec("Learning rate", ("lr",)),
    ChartSpec("Gradient norm", ("grad_norm",)),
    ChartSpec("Gradient norm per block", ("grad_norm/",), log_scale=True),
    ChartSpec("Attention logit max per layer", ("attn_logit_max/",)),
    ChartSpec("Output logits (max and z)", ("logit_max", "logit_z")),
    ChartSpec("Update ratio", ("update_ratio",), log_scale=True),
    ChartSpec("Throughput (tokens/s)", ("tokens_per_s",)),
    ChartSpec("Train loss per domain", ("loss/",)),
)
"""The health charts, in the order the page shows them."""

NONFINITE_FLAG = "nonfinite"
"""The trainer's per-step flag: 1 when any metric of that step was NaN or infinite."""


@dataclass
class BranchSeries:
    """One branch's points per metric, and the last step fetched."""

    points: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    cursor: int | None = None
    """The newest step held; the next fetch asks only for steps after it."""
    bucket_steps: int = 1
    nonfinite_steps: list[int] = field(default_factory=list)
    """Steps at which the trainer flagged a non-finite value, or `loss` is missing while others are present."""

    @property
    def size(self) -> int:
        """Points held over all metrics."""
        return sum(len(steps) for steps, _ in self.points.values())

    def add(self, history: MetricsHistory) -> int:
        """Append a fetched slice; returns how many points it added."""
        added = 0
        self.bucket_steps = max(self.bucket_steps, history.bucket_steps)
        for key, series in history.series.items():
            steps, values = self.points.setdefault(key, ([], []))
            start = len(steps)
            for step, value in zip(series.steps, series.values, strict=True):
                if steps and step <= steps[-1]:
                    continue
                steps.append(step)
                values.append(value)
            added += len(steps) - start
            if series.steps:
                self.cursor = max(self.cursor or 0, series.steps[-1])
            if key == NONFINITE_FLAG:
                self.nonfinite_steps += [s for s, v in zip(series.steps, series.values, strict=True) if v > 0]
        if history.bucket_steps == 1:
            self.nonfinite_steps += _missing_loss_steps(history)
        return added


def _missing_loss_steps(history: MetricsHistory) -> list[int]:
    """Steps where other per-step metrics arrived but `loss` did not: its value was not finite."""
    reference = history.series.get("lr") or history.series.get("grad_norm")
    if reference is None:
        return []
    loss = history.series.get("loss")
    have = set(loss.steps) if loss is not None else set()
    return [step for step in reference.steps if step not in have]


@dataclass
class RunSeries:
    """Every branch of one run."""

    branches: dict[str, BranchSeries] = field(default_factory=dict)

    def refresh(self, client: Client, run_id: str, branches: list[str]) -> int:
        """Fetch what is new on each branch; a branch seen for the first time (or grown too long) is reloaded."""
        added = 0
        for branch in branches:
            held = self.branches.get(branch)
            if held is None or held.size > 4 * MAX_POINTS * max(1, len(held.points)):
                held = self.branches[branch] = BranchSeries()
            since = 0 if held.cursor is None else held.cursor + 1
            history = client.metrics_history(run_id, branch=branch, since_step=since, max_points=MAX_POINTS)
            added += held.add(history)
        return added

    def rows(self, spec: ChartSpec) -> list[tuple[int, float, str, str]]:
        """(step, value, metric, branch) rows for one chart, finite values only."""
        found: list[tuple[int, float, str, str]] = []
        for branch, held in self.branches.items():
            for key, (steps, values) in held.points.items():
                if spec.matches(key):
                    found += [(s, v, key, branch) for s, v in zip(steps, values, strict=True) if math.isfinite(v)]
        return found

    def nonfinite_steps(self, branch: str) -> list[int]:
        """Steps of `branch` with a non-finite metric."""
        held = self.branches.get(branch)
        return list(held.nonfinite_steps) if held else []
