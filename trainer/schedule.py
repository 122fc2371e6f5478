"""Learning-rate schedules that can be replaced or rescaled while a run is going.

The rule for a new learning rate under a running schedule (`set_hparams.lr`): the new value becomes the
current learning rate, and the rest of the schedule keeps its shape scaled by `new / current`, i.e. every
peak learning rate is multiplied by that ratio. Warmup, horizon and floor (a fraction of the peak) are kept.
When the schedule currently sits at zero (a finished decay to a zero floor) there is no ratio, so the schedule
is replaced by a constant one at the new value.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from protocols.commands import ScheduleKind
from protocols.records import ScheduleState


@dataclass(frozen=True)
class Schedule:
    """A schedule in force: kind, per-group peak learning rates, and the step it started at."""

    kind: ScheduleKind
    peak_lrs: tuple[float, ...]
    """One peak per optimizer parameter group, so that groups keep their relative learning rates."""
    start_step: int = 0
    warmup_steps: int = 0
    horizon_steps: int | None = None
    floor: float = 0.0
    decay_fraction: float = 0.2

    def factor(self, step: int) -> float:
        """The multiplier of each peak learning rate at `step` (1.0 at the peak, `floor` at the end)."""
        t = max(0, step - self.start_step)
        floor, warmup = self.floor, self.warmup_steps
        if t < warmup:
            return floor + (1.0 - floor) * t / warmup
        if self.kind == "constant":
            return 1.0
        if self.kind == "inverse_sqrt":
            return max(floor, math.sqrt(max(warmup, 1) / max(t, 1)))
        horizon = self.horizon_steps or 1
        if t >= horizon:
            return floor
        if self.kind == "wsd":
            decay_start = max(warmup, horizon - max(1, round(self.decay_fraction * horizon)))
            if t < decay_start:
                return 1.0
            progress = (t - decay_start) / max(1, horizon - decay_start)
            return floor + (1.0 - floor) * (1.0 - progress)
        progress = (t - warmup) / max(1, horizon - warmup)
        if self.kind == "cosine":
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return floor + (1.0 - floor) * (1.0 - progress)

    def lrs(self, step: int) -> list[float]:
        """The learning rate of every parameter group at `step`."""
        factor = self.factor(step)
        return [peak * factor for peak in self.peak_lrs]

    def rescaled(self, step: int, group_index: int, new_lr: float) -> Schedule:
        """This schedule with group `group_index` at `new_lr` now and its remaining curve scaled to match."""
        current = self.lrs(step)[group_index]
        peaks = list(self.peak_lrs)
        if current <= 0.0:
            peaks = self.lrs(step)
            peaks[group_index] = new_lr
            return Schedule("constant", tuple(peaks), start_step=step)
        peaks[group_index] *= new_lr / current
        return replace(self, peak_lrs=tuple(peaks))

    def state(self) -> ScheduleState:
        """The wire description of this schedule (peak of the first group)."""
        return ScheduleState(
            kind=self.kind,
            peak_lr=self.peak_lrs[0],
            warmup_steps=self.warmup_steps,
            horizon_steps=self.horizon_steps,
            floor=self.floor,
            start_step=self.start_step,
        )

    def state_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint."""
        data = asdict(self)
        data["peak_lrs"] = list(self.peak_lrs)
        return data

    @classmethod
    def from_state_dict(cls, data: dict[str, Any]) -> Schedule:
        """The schedule saved by `state_dict`."""
        return cls(**{**data, "peak_lrs": tuple(data["peak_lrs"])})
