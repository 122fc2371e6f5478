"""Rolling windows of a run's metrics and the view of the run that a policy decides on."""

from __future__ import annotations

import fnmatch
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice

from pydantic import JsonValue

from agents.decision import Intervention
from protocols.commands import Command, CommandRecord, Rollback
from protocols.constants import OPEN_COMMAND_STATUSES, RunStatus
from protocols.policy import Policy
from protocols.records import CheckpointInfo, MetricsHistory, MetricsSample, RunInfo, RunState

DEFAULT_CAPACITY = 512
"""Points kept per metric: enough for the longest default detector window (128 steps) several times over."""
LEFT_BRANCHES_KEPT = 16
"""Branches whose metrics a window keeps after the run left them (a learning-rate probe compares a few)."""


class Series:
    """One metric's recent points on the run's current lineage, oldest first."""

    def __init__(self, capacity: int) -> None:
        self._points: deque[tuple[int, float]] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self._points)

    def add(self, step: int, value: float) -> None:
        """Append a point; a step at or before the last one replaces the points from there on."""
        while self._points and self._points[-1][0] >= step:
            self._points.pop()
        self._points.append((step, value))

    def truncate(self, before_step: int) -> None:
        """Forget points at or after `before_step` (a rollback restarted the run there)."""
        while self._points and self._points[-1][0] >= before_step:
            self._points.pop()

    def copy(self) -> Series:
        """An independent copy with the same points and capacity."""
        copied = Series(self._points.maxlen or DEFAULT_CAPACITY)
        copied._points.extend(self._points)
        return copied

    def last(self, n: int | None = None) -> list[float]:
        """The last `n` values (all when None)."""
        count = len(self._points) if n is None else min(n, len(self._points))
        return [value for _, value in islice(self._points, len(self._points) - count, None)]

    def last_points(self, n: int | None = None) -> list[tuple[int, float]]:
        """The last `n` (step, value) points."""
        count = len(self._points) if n is None else min(n, len(self._points))
        return list(islice(self._points, len(self._points) - count, None))

    @property
    def latest(self) -> tuple[int, float] | None:
        """The newest (step, value), if any."""
        return self._points[-1] if self._points else None


@dataclass(frozen=True)
class RunWindow:
    """What a policy sees: recent metrics, the run's settings, checkpoints, commands and this agent's interventions.

    Built by `WindowTracker.window()`; a policy only reads it, so the same window always gives the same decision.
    """

    run_id: str
    branch: str
    step: int
    """Newest step with metrics on the current branch (-1 before the first)."""
    tick: int
    """Samples this agent has taken in so far (grows across rollbacks; cooldowns count in it)."""
    now: float
    last_step_at: float | None
    """Wall time at which the newest step arrived."""
    status: RunStatus
    metrics: Mapping[str, Series]
    nonfinite: Mapping[int, tuple[str, ...]]
    """Recent steps whose sample named non-finite metrics, with those names."""
    state: RunState | None
    policy: Policy
    config: Mapping[str, JsonValue]
    domains: tuple[str, ...]
    checkpoints: tuple[CheckpointInfo, ...]
    commands: tuple[CommandRecord, ...]
    """The run's recent commands (anyone's) in `seq` order."""
    interventions: tuple[Intervention, ...]
    """This agent's own interventions, oldest first."""
    lineage: Mapping[str, tuple[str, int]]
    """branch -> (parent branch, step it forked at), learned from applied rollbacks."""
    left: Mapping[str, Mapping[str, Series]] = field(default_factory=dict)
    """Metrics of the branches the run moved away from, as they stood when it left each (newest 16)."""

    def series(self, name: str) -> Series | None:
        """The named metric's series, if it was reported."""
        return self.metrics.get(name)

    def matching(self, pattern: str) -> list[str]:
        """Metric names matching a glob such as `attn_logit_max/*`, sorted."""
        if not any(char in pattern for char in "*?["):
            return [pattern] if pattern in self.metrics else []
        return sorted(name for name in self.metrics if fnmatch.fnmatchcase(name, pattern))

    def current(self, name: str) -> float | None:
        """The value in force of a setting (`lr`, `weight_decay`, `grad_clip`): the newer of the run state and the
        metric of that name (a schedule moves `lr` every step, while the state comes with heartbeats and commands)."""
        series = self.metrics.get(name)
        latest = series.latest if series is not None else None
        if self.state is not None:
            value = getattr(self.state, name, None)
            if isinstance(value, int | float) and (latest is None or self.state.step > latest[0]):
                return float(value)
        return latest[1] if latest is not None else None

    def value_at(self, name: str, step: int) -> float | None:
        """A metric's value at `step` (its newest point at or before it) on the current lineage."""
        series = self.metrics.get(name)
        points = [value for at, value in series.last_points() if at <= step] if series is not None else []
        return points[-1] if points else None

    def base_after(self, name: str, commands: Sequence[Command]) -> float | None:
        """The setting `name` in force once `commands` are applied: as it was at the checkpoint's step when one of
        them rolls back to a known checkpoint (a schedule moves `lr` with the step), else as it is now."""
        rollback = next((c for c in reversed(commands) if isinstance(c, Rollback)), None)
        if rollback is None or rollback.checkpoint_id is None:
            return self.current(name)
        target = next((c for c in self.checkpoints if c.checkpoint_id == rollback.checkpoint_id), None)
        if target is None:
            return self.current(name)
        value = self.value_at(name, target.step)
        if value is None:
            value = target.metrics.get(name)
        return value if value is not None else self.current(name)

    def open_commands(self, source: str) -> list[CommandRecord]:
        """Commands from `source` not yet applied, rejected or failed."""
        return [r for r in self.commands if r.source == source and r.status in OPEN_COMMAND_STATUSES]

    def lineage_checkpoints(self) -> list[CheckpointInfo]:
        """Checkpoints on the current branch or on its ancestors before each fork, oldest step first."""
        reachable: list[CheckpointInfo] = []
        branch, limit = self.branch, None
        seen: set[str] = set()
        while branch not in seen:
            seen.add(branch)
            reachable += [c for c in self.checkpoints if c.branch == branch and (limit is None or c.step <= limit)]
            if branch not in self.lineage:
                break
            branch, limit = self.lineage[branch]
        return sorted(reachable, key=lambda c: (c.step, c.time))


@dataclass
class WindowTracker:
    """Takes in samples, run updates, checkpoints and command records, and hands out `RunWindow`s."""

    run_id: str
    capacity: int = DEFAULT_CAPACITY
    branch: str = "main"
    step: int = -1
    tick: int = 0
    last_step_at: float | None = None
    run: RunInfo | None = None
    metrics: dict[str, Series] = field(default_factory=dict)
    nonfinite: dict[int, tuple[str, ...]] = field(default_factory=dict)
    checkpoints: dict[str, CheckpointInfo] = field(default_factory=dict)
    commands: dict[int, CommandRecord] = field(default_factory=dict)
    interventions: list[Intervention] = field(default_factory=list)
    lineage: dict[str, tuple[str, int]] = field(default_factory=dict)
    left_branches: set[str] = field(default_factory=set)
    """Branches the run moved away from; late samples of theirs are ignored."""
    left_metrics: dict[str, dict[str, Series]] = field(default_factory=dict)
    """The metrics of the newest `LEFT_BRANCHES_KEPT` left branches, kept for comparing branches."""

    def add_sample(self, sample: MetricsSample, *, received_at: float | None = None) -> bool:
        """Take in one sample; True when it is a new step of the current branch.

        A second sample of the newest step (an evaluation recorded beside the step's training metrics) is merged
        into it; an older step means the run went back there, and what came after it is forgotten."""
        if sample.branch != self.branch:
            if sample.branch in self.left_branches:
                return False
            self._switch_branch(sample.branch, sample.step)
        elif sample.step < self.step:
            self._truncate(sample.step)
        for name, value in sample.values.items():
            self.metrics.setdefault(name, Series(self.capacity)).add(sample.step, value)
        flagged = tuple(sample.nonfinite) or (("nonfinite",) if sample.values.get("nonfinite", 0.0) >= 1.0 else ())
        if flagged:
            self.nonfinite[sample.step] = (*self.nonfinite.get(sample.step, ()), *flagged)
            while len(self.nonfinite) > self.capacity:
                del self.nonfinite[min(self.nonfinite)]
        if sample.step == self.step:
            return False
        self.step = sample.step
        self.tick += 1
        self.last_step_at = time.time() if received_at is None else received_at
        return True

    def history_samples(self, history: MetricsHistory) -> list[MetricsSample]:
        """Stored history (a catch-up after a drop) as samples, oldest first, without steps already taken in."""
        by_step: dict[int, dict[str, float]] = {}
        for name, series in history.series.items():
            for step, value in zip(series.steps, series.values, strict=True):
                by_step.setdefault(step, {})[name] = value
        fresh = [step for step in sorted(by_step) if history.branch != self.branch or step > self.step]
        now = time.time()
        return [MetricsSample(branch=history.branch, step=step, time=now, values=by_step[step]) for step in fresh]

    def set_left(self, history: MetricsHistory) -> None:
        """Take in the stored metrics of a branch the run has left (fetched when the agent starts)."""
        held: dict[str, Series] = {}
        for name, stored in history.series.items():
            series = held.setdefault(name, Series(self.capacity))
            for step, value in zip(stored.steps, stored.values, strict=True):
                series.add(step, value)
        self._keep_left(history.branch, held)

    def set_run(self, run: RunInfo) -> None:
        """The run's latest record: status, policy, state (and branch, when it moved)."""
        self.run = run
        branch = run.state.branch if run.state is not None else run.branch
        if branch != self.branch and branch not in self.left_branches:
            self._switch_branch(branch, run.state.step if run.state is not None else run.step)

    def set_checkpoint(self, checkpoint: CheckpointInfo, *, deleted: bool = False) -> None:
        """A checkpoint was indexed, or evicted when `deleted`."""
        if deleted:
            self.checkpoints.pop(checkpoint.checkpoint_id, None)
        else:
            self.checkpoints[checkpoint.checkpoint_id] = checkpoint

    def set_command(self, record: CommandRecord) -> None:
        """A command was submitted or changed status; an applied rollback teaches the lineage of its branch."""
        self.commands[record.seq] = record
        while len(self.commands) > self.capacity:
            del self.commands[min(self.commands)]
        effective = record.effective or {}
        if record.status == "applied" and record.command.type == "rollback":
            branch, step, parent = effective.get("branch"), effective.get("step"), effective.get("from_branch")
            # The new branch forks from the branch the checkpoint was saved on, which is not the branch the run
            # left when the rollback went to another branch's checkpoint (a probe keeping its best branch).
            target = self.checkpoints.get(str(effective.get("checkpoint_id")))
            parent = target.branch if target is not None else parent
            if isinstance(branch, str) and isinstance(step, int) and isinstance(parent, str):
                self.lineage[branch] = (parent, step)
                if branch != self.branch:
                    self._switch_branch(branch, step)
        for index, intervention in enumerate(self.interventions):
            if record.id in intervention.command_ids and intervention.answered_tick is None:
                statuses = {r.id: r.status for r in self.commands.values() if r.id in intervention.command_ids}
                if len(statuses) == len(intervention.command_ids) and all(
                    status not in OPEN_COMMAND_STATUSES for status in statuses.values()
                ):
                    self.interventions[index] = intervention.answered(self.tick)

    def set_commands(self, records: Iterable[CommandRecord]) -> None:
        """Take in several command records in `seq` order."""
        for record in sorted(records, key=lambda r: r.seq):
            self.set_command(record)

    def last_seq(self) -> int:
        """The highest command `seq` seen."""
        return max(self.commands, default=0)

    def window(self, now: float | None = None) -> RunWindow:
        """A view of everything taken in so far."""
        run = self.run
        return RunWindow(
            run_id=self.run_id,
            branch=self.branch,
            step=self.step,
            tick=self.tick,
            now=time.time() if now is None else now,
            last_step_at=self.last_step_at,
            status=run.status if run is not None else "running",
            metrics=self.metrics,
            nonfinite=self.nonfinite,
            state=run.state if run is not None else None,
            policy=run.policy if run is not None else Policy(),
            config=run.config if run is not None else {},
            domains=tuple(run.domains) if run is not None else (),
            checkpoints=tuple(self.checkpoints.values()),
            commands=tuple(self.commands[seq] for seq in sorted(self.commands)),
            interventions=tuple(self.interventions),
            lineage=self.lineage,
            left=self.left_metrics,
        )

    def _switch_branch(self, branch: str, step: int) -> None:
        self.lineage.setdefault(branch, (self.branch, step))
        self._keep_left(self.branch, {name: series.copy() for name, series in self.metrics.items()})
        self.branch = branch
        self._truncate(step)

    def _keep_left(self, branch: str, metrics: dict[str, Series]) -> None:
        """Remember a left branch's metrics, forgetting the oldest past `LEFT_BRANCHES_KEPT`."""
        self.left_branches.add(branch)
        self.left_metrics[branch] = metrics
        while len(self.left_metrics) > LEFT_BRANCHES_KEPT:
            del self.left_metrics[next(iter(self.left_metrics))]

    def _truncate(self, step: int) -> None:
        for series in self.metrics.values():
            series.truncate(step)
        for flagged in [s for s in self.nonfinite if s >= step]:
            del self.nonfinite[flagged]
        self.step = step - 1
