"""The learning-rate probe: finds a better learning rate within one run, on short branches from one checkpoint.

Over the last steps of warm-up it reads the run's update ratio (update norm over parameter norm, which grows with
the learning rate). Inside the configured band it leaves the run alone. Outside it, the run so far is the first
candidate (x1); the probe goes back to the checkpoint before warm-up (or, when there is none, saves one where it
is) and trains each further candidate rate for the same number of steps from there, every branch on the same
batches (a rollback without skipping replays the data order). It scores each by its mean training loss over the
branch's last steps and keeps the largest rate that scores within a tolerance of the best: the branch it is on,
or that branch's end checkpoint by one more rollback. Everything it knows of the probe is read back from the
window (its commands' records and the metrics of the branches it left), so the same window gives the same
decision, as for every policy.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agents.decision import Change, Decision
from agents.window import RunWindow, Series
from protocols.commands import CommandRecord, Rollback, SaveCheckpoint, SetHparams
from protocols.records import CheckpointInfo

PROBE_RULE = "lr-probe"
"""The rule name of the probe's steps (checkpoint, then each candidate branch)."""
KEEP_RULE = "lr-keep"
"""The rule name of the probe's last word: which branch it kept, or why it gave up; after it the probe is done."""
TAG = "lr-probe"
"""Tag prefix of the probe's checkpoints: `lr-probe-up-<step>` or `lr-probe-down-<step>`, then `...-end<k>`."""

Direction = Literal["up", "down"]


class LrProbeConfig(BaseModel):
    """When to probe and how: the `[lr_probe]` table of a rule file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    update_ratio: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]]
    """The band [low, high] of the median update ratio right after warm-up inside which the run is left alone."""
    arm_step: Annotated[int, Field(ge=0)] = 40
    """Where the measurement starts when the run reports no schedule (else `measure_steps` before warm-up ends)."""
    measure_steps: Annotated[int, Field(ge=1)] = 10
    """Steps whose median update ratio is compared with the band: of the ratios reported in them (a trainer measures
    it every `update_every` steps, 10 by default)."""
    branch_steps: Annotated[int, Field(ge=2)] = 50
    """Steps each candidate trains before it is scored."""
    score_steps: Annotated[int, Field(ge=1)] = 25
    """A candidate's score is its mean training loss over the last this-many of its `branch_steps`."""
    factors: tuple[Annotated[float, Field(gt=1)], ...] = Field(default=(math.sqrt(10.0), 10.0), min_length=1)
    """Candidate multipliers of the learning rate besides x1, nearest first: up when the update ratio is below
    the band, their inverses when above."""
    tolerance: Annotated[float, Field(ge=0, lt=1)] = 0.03
    """The largest rate whose score is within this fraction of the best score is kept. A short branch at a higher
    rate scores worse than it will end: the loss it shows carries a noise term that the schedule's decay later
    removes (the "river valley" of Wen et al. 2024, on warmup-stable-decay schedules)."""

    @model_validator(mode="after")
    def _consistent(self) -> LrProbeConfig:
        low, high = self.update_ratio
        if low >= high:
            raise ValueError(f"update_ratio must be [low, high] with low < high, not [{low:g}, {high:g}]")
        if self.score_steps > self.branch_steps:
            raise ValueError(f"score_steps ({self.score_steps}) must not exceed branch_steps ({self.branch_steps})")
        if list(self.factors) != sorted(set(self.factors)):
            raise ValueError(f"factors must be distinct and increasing, not {list(self.factors)}")
        return self


@dataclass(frozen=True)
class Candidate:
    """One branch of the probe: its learning-rate factor, branch name, and end checkpoint once it was left."""

    factor: float
    branch: str
    end_checkpoint: str | None = None


@dataclass(frozen=True)
class Probe:
    """A probe under way, as read back from this agent's applied commands."""

    direction: Direction
    step: int
    """The step of the checkpoint every candidate starts from."""
    checkpoint_id: str
    base_lr: float
    """The learning rate at that step, which the factors multiply."""
    candidates: tuple[Candidate, ...]


class LrProbe:
    """Decides the probe's next move from a window; `rollbacks_left` is what the guardrails still allow."""

    def __init__(self, config: LrProbeConfig) -> None:
        self.config = config

    def decide(self, window: RunWindow, rollbacks_left: int) -> Decision | None:
        """Start a probe, send the next candidate, keep the best, or None (nothing to do, or waiting)."""
        own = [i for i in window.interventions if i.rule in (PROBE_RULE, KEEP_RULE)]
        if any(i.rule == KEEP_RULE for i in own):
            return None
        if not own:
            return self._start(window, rollbacks_left)
        records = _records(window, [command_id for i in own for command_id in i.command_ids])
        if any(r.status in ("rejected", "failed") for r in records):
            return self._give_up(window, records)
        if len(records) < sum(len(i.command_ids) for i in own) or any(r.status != "applied" for r in records):
            return None
        probe = self._read(window, records)
        if probe is None:
            return self._give_up(window, records, "its commands do not read as a probe")
        current = probe.candidates[-1]
        if window.branch != current.branch:
            why = f"the run left the probe's branch {current.branch} for {window.branch}"
            return self._give_up(window, records, why)
        end = probe.step + self.config.branch_steps
        if window.step < end - 1:
            return None
        scores = [self._score(window, probe, c) for c in probe.candidates]
        tried = ", ".join(f"x{c.factor:.3g} {s:.4f}" for c, s in zip(probe.candidates, scores, strict=True))
        plan = self._plan(probe.direction)
        # Rates further on in the plan are tried only while each one improves on all before it: past the best
        # rate the loss only grows (a far-too-high rate diverges, a far-too-low one crawls).
        improving = len(scores) < 2 or scores[-1] < min(scores[:-1])
        if len(probe.candidates) < len(plan) and improving and rollbacks_left >= 2:
            return self._next(window, probe, plan[len(probe.candidates)], tried)
        return self._keep(window, probe, scores, tried, rollbacks_left)

    def _start(self, window: RunWindow, rollbacks_left: int) -> Decision | None:
        measured = self._measure(window)
        if measured is None:
            return None
        ratio, first = measured
        low, high = self.config.update_ratio
        if low <= ratio <= high or rollbacks_left < 2:
            return None
        direction: Direction = "up" if ratio < low else "down"
        plan = self._plan(direction)
        origin = self._origin(window)
        said = (
            f"update ratio {ratio:.3g} (median of steps {first}-{first + self.config.measure_steps - 1}) is "
            f"{'below' if direction == 'up' else 'above'} [{low:g}, {high:g}]: the learning rate looks too "
            f"{'low' if direction == 'up' else 'high'}; probing {', '.join(f'x{f:.3g}' for f in plan)} for "
            f"{self.config.branch_steps} steps each from "
        )
        if origin is None:
            command = SaveCheckpoint(tag=f"{TAG}-{direction}-{window.step + 1}")
            return Decision(
                rule=PROBE_RULE,
                reason=said + "a checkpoint here",
                commands=(command,),
                severity="info",
                step=window.step,
            )
        base = window.value_at("lr", origin.step)
        if base is None:
            return None
        commands = (
            SaveCheckpoint(tag=f"{TAG}-{direction}-{origin.step}-end0"),
            Rollback(checkpoint_id=origin.checkpoint_id),
            SaveCheckpoint(tag=f"{TAG}-{direction}-{origin.step}"),
            SetHparams(lr=base * plan[1]),
        )
        reason = (
            f"{said}step {origin.step}, before warm-up (x1 is the run so far, steps {origin.step}-{window.step}); "
            f"next x{plan[1]:.3g}, back to step {origin.step}"
        )
        changes = (
            Change("position", f"{window.branch} step {window.step}", f"step {origin.step}"),
            Change("lr", base, base * plan[1]),
        )
        return Decision(
            rule=PROBE_RULE, reason=reason, commands=commands, severity="info", step=window.step, changes=changes
        )

    def _origin(self, window: RunWindow) -> CheckpointInfo | None:
        """The newest healthy checkpoint of the lineage at or before the warm-up began, once the run has trained
        `branch_steps` past it: candidates started there run the whole warm-up at their own rate, and the run so
        far is the x1 candidate at no extra cost."""
        schedule = window.state.schedule if window.state is not None else None
        begins = schedule.start_step if schedule is not None else 0
        found = [c for c in window.lineage_checkpoints() if c.healthy and c.step <= begins]
        if not found or window.step < found[-1].step + self.config.branch_steps - 1:
            return None
        return found[-1]

    def _measure(self, window: RunWindow) -> tuple[float, int] | None:
        """The median update ratio over the last steps of warm-up, and the first of them (None: not yet)."""
        schedule = window.state.schedule if window.state is not None else None
        if schedule is not None:
            first = max(0, schedule.start_step + schedule.warmup_steps - self.config.measure_steps)
        else:
            first = self.config.arm_step
        last = first + self.config.measure_steps - 1
        series = window.series("update_ratio")
        if series is None or window.step < last:
            return None
        values = [v for s, v in series.last_points() if first <= s <= last and math.isfinite(v)]
        if not values:
            return None
        return statistics.median(values), first

    def _plan(self, direction: Direction) -> list[float]:
        """The candidate factors in the order tried, x1 first."""
        return [1.0] + [f if direction == "up" else 1.0 / f for f in self.config.factors]

    def _read(self, window: RunWindow, records: Sequence[CommandRecord]) -> Probe | None:
        """The probe that these applied records (the probe's own, in order) describe: its start checkpoint (saved
        where it began, or right after going back to before warm-up), then per candidate after x1 the end
        checkpoint of the one before, the rollback to the start and the new rate."""
        rest = list(records)
        first_end: CommandRecord | None = None
        went_back: CommandRecord | None = None
        if len(rest) >= 4 and isinstance(rest[1].command, Rollback):
            first_end, went_back = rest[0], rest[1]
            rest = [rest[2], *rest[4:]] if isinstance(rest[3].command, SetHparams) else []
            setting = records[3]
        start = (rest[0].effective or {}) if rest else {}
        tag, checkpoint_id, step, branch = (start.get(k) for k in ("tag", "checkpoint_id", "step", "branch"))
        if not (isinstance(tag, str) and isinstance(checkpoint_id, str) and isinstance(step, int)):
            return None
        direction: Direction = "down" if tag.startswith(f"{TAG}-down") else "up"
        candidates: list[Candidate] = []
        if went_back is None or first_end is None:
            candidates.append(Candidate(1.0, str(branch)))
        else:
            moved = went_back.effective or {}
            candidates.append(Candidate(1.0, str(moved.get("from_branch")), _checkpoint_of(first_end)))
        base_lr = _value(window, candidates[0].branch, "lr", step)
        if base_lr is None or base_lr <= 0:
            return None
        if went_back is not None:
            lr = (setting.effective or {}).get("lr")
            if not isinstance(lr, float):
                return None
            candidates.append(Candidate(lr / base_lr, str((went_back.effective or {}).get("branch"))))
        rest = rest[1:]
        while len(rest) >= 3:
            ended, rollback, hparams = rest[:3]
            rest = rest[3:]
            lr, new_branch = (hparams.effective or {}).get("lr"), (rollback.effective or {}).get("branch")
            end_id = _checkpoint_of(ended)
            if not (isinstance(new_branch, str) and isinstance(lr, float) and end_id is not None):
                return None
            candidates[-1] = Candidate(candidates[-1].factor, candidates[-1].branch, end_id)
            candidates.append(Candidate(lr / base_lr, new_branch))
        if rest:
            return None
        return Probe(direction, step, checkpoint_id, base_lr, tuple(candidates))

    def _score(self, window: RunWindow, probe: Probe, candidate: Candidate) -> float:
        """Mean training loss over the candidate's scored steps (inf when they are not all known or finite)."""
        series = _series(window, candidate.branch, "loss")
        end = probe.step + self.config.branch_steps
        wanted = range(end - self.config.score_steps, end)
        points = dict(series.last_points()) if series is not None else {}
        values = [points.get(step, math.inf) for step in wanted]
        return math.fsum(values) / len(values) if all(math.isfinite(v) for v in values) else math.inf

    def _next(self, window: RunWindow, probe: Probe, factor: float, tried: str) -> Decision:
        lr = probe.base_lr * factor
        commands = (
            SaveCheckpoint(tag=f"{TAG}-{probe.direction}-{probe.step}-end{len(probe.candidates)}"),
            Rollback(checkpoint_id=probe.checkpoint_id),
            SetHparams(lr=lr),
        )
        reason = (
            f"learning-rate probe from step {probe.step}: scored {tried} (mean loss of steps "
            f"{probe.step + self.config.branch_steps - self.config.score_steps}-"
            f"{probe.step + self.config.branch_steps - 1}); next x{factor:.3g}, back to step {probe.step}"
        )
        changes = (
            Change("position", f"{window.branch} step {window.step}", f"step {probe.step}"),
            Change("lr", probe.base_lr, lr),
        )
        return Decision(
            rule=PROBE_RULE, reason=reason, commands=commands, severity="info", step=window.step, changes=changes
        )

    def _keep(
        self, window: RunWindow, probe: Probe, scores: Sequence[float], tried: str, rollbacks_left: int
    ) -> Decision:
        near = [i for i, score in enumerate(scores) if score <= min(scores) * (1 + self.config.tolerance)]
        best = max(near, key=lambda index: probe.candidates[index].factor)
        kept = probe.candidates[best]
        said = f"learning-rate probe from step {probe.step}: scored {tried}; keeping x{kept.factor:.3g}"
        if best == len(probe.candidates) - 1:
            return Decision(
                rule=KEEP_RULE, reason=f"{said}, the branch the run is on", severity="info", step=window.step
            )
        if kept.end_checkpoint is None or rollbacks_left < 1:
            return Decision(
                rule=KEEP_RULE,
                reason=f"{said} is out of reach (no rollback left); staying",
                severity="warning",
                step=window.step,
            )
        lr = probe.base_lr * kept.factor
        changes = (
            Change("position", f"{window.branch} step {window.step}", f"{kept.branch} end"),
            Change("lr", window.current("lr"), lr),
        )
        return Decision(
            rule=KEEP_RULE,
            reason=f"{said}: back to the end of branch {kept.branch}",
            commands=(Rollback(checkpoint_id=kept.end_checkpoint),),
            severity="info",
            step=window.step,
            changes=changes,
        )

    def _give_up(self, window: RunWindow, records: Sequence[CommandRecord], why: str = "") -> Decision:
        """End the probe with a warning; when a rollback of it was refused but the new rate that came with it was
        applied, that rate is undone (it was meant for the branch the rollback would have started)."""
        bad = next((r for r in records if r.status in ("rejected", "failed")), None)
        if bad is not None:
            why = f"its {bad.command.type} was {bad.status}: {bad.message or 'no reason'}"
        last = records[-1]
        current = window.current("lr")
        if (
            bad is not None
            and isinstance(bad.command, Rollback)
            and isinstance(last.command, SetHparams)
            and last.status == "applied"
            and last.applied_step is not None
            and isinstance(set_to := (last.effective or {}).get("lr"), float)
            and (before := window.value_at("lr", last.applied_step - 1)) is not None
            and current is not None
        ):
            lr = current * before / set_to
            return Decision(
                rule=KEEP_RULE,
                reason=f"learning-rate probe stopped: {why}; the rate sent with it is undone",
                commands=(SetHparams(lr=lr),),
                severity="warning",
                step=window.step,
                changes=(Change("lr", current, lr),),
            )
        return Decision(
            rule=KEEP_RULE, reason=f"learning-rate probe stopped: {why}", severity="warning", step=window.step
        )


def _records(window: RunWindow, ids: Sequence[str]) -> list[CommandRecord]:
    """The records of these command ids, in the order given (those not seen yet left out)."""
    by_id = {record.id: record for record in window.commands}
    return [by_id[command_id] for command_id in ids if command_id in by_id]


def _series(window: RunWindow, branch: str, name: str) -> Series | None:
    """A metric of the current branch or of one the run left."""
    return window.series(name) if branch == window.branch else window.left.get(branch, {}).get(name)


def _value(window: RunWindow, branch: str, name: str, step: int) -> float | None:
    """A metric's value at `step` as trained on `branch` (None when not held)."""
    series = _series(window, branch, name)
    return dict(series.last_points()).get(step) if series is not None else None


def _checkpoint_of(record: CommandRecord) -> str | None:
    """The id of the checkpoint an applied save_checkpoint made."""
    checkpoint_id = (record.effective or {}).get("checkpoint_id")
    return checkpoint_id if isinstance(checkpoint_id, str) else None
