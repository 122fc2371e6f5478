"""Guardrails every agent obeys whatever its policy decides: change factor, run policy bounds, cooldown, budget,
one unanswered command at a time, and a cap on rollbacks after which the run is paused for a person."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from agents.decision import Change, Decision
from agents.window import RunWindow
from protocols.commands import Command, Pause, Rollback, SetDataMix, SetHparams, SetOptimizer, SetSchedule

HOUR_S = 3600.0


class GuardrailConfig(BaseModel):
    """Limits on what an agent may send; the `[guardrails]` table of a rule file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_change_factor: Annotated[float, Field(gt=1.0, le=1000.0)] = 10.0
    """A command may move a learning rate, weight decay, clipping threshold or domain weight by at most this factor."""
    cooldown_steps: Annotated[int, Field(ge=0)] = 50
    """Steps (samples taken in, across rollbacks) after an intervention is answered before the next one."""
    max_interventions_per_hour: Annotated[int, Field(ge=1)] = 6
    max_rollbacks: Annotated[int, Field(ge=0)] = 3
    """Rollbacks this agent may send to one run; past it, it pauses the run and asks a person instead."""


@dataclass(frozen=True)
class Review:
    """A guardrail's verdict: the decision to carry out (possibly replaced), or why nothing is sent."""

    decision: Decision | None
    blocked: str = ""


class Guardrails:
    """Reviews each decision against the config, the run's policy and this agent's past interventions."""

    def __init__(self, config: GuardrailConfig, source: str) -> None:
        self.config = config
        self.source = source

    def review(self, decision: Decision, window: RunWindow) -> Review:
        """Pass, replace (rollback cap) or block a decision; pure, like the policies it wraps."""
        own = window.interventions
        same_rule = [i for i in own if i.rule == decision.rule]
        if not decision.intervenes:
            if same_rule and window.tick - same_rule[-1].since_tick < self.config.cooldown_steps:
                return Review(None, f"alert {decision.rule} repeats within {self.config.cooldown_steps} steps")
            return Review(decision)
        waiting = window.open_commands(self.source)
        pending = [i for i in own if i.command_types and i.answered_tick is None]
        if waiting or pending:
            ids = ", ".join(r.id for r in waiting) or ", ".join(pending[-1].command_ids) or "a dry-run decision"
            return Review(None, f"waiting for an answer to {ids}")
        acted = [i for i in own if i.command_types]
        if acted and window.tick - acted[-1].since_tick < self.config.cooldown_steps:
            left = self.config.cooldown_steps - (window.tick - acted[-1].since_tick)
            return Review(None, f"cooling down for {left} more steps after [{acted[-1].rule}]")
        recent = [i for i in acted if window.now - i.time < HOUR_S]
        if len(recent) >= self.config.max_interventions_per_hour:
            return Review(None, f"hourly budget of {self.config.max_interventions_per_hour} interventions spent")
        for index, command in enumerate(decision.commands):
            problem = self._too_far(command, window, decision.commands[:index]) or _out_of_bounds(command, window)
            if problem:
                return Review(None, problem)
        rollbacks = sum(t == "rollback" for i in acted for t in i.command_types)
        if any(isinstance(c, Rollback) for c in decision.commands) and rollbacks >= self.config.max_rollbacks:
            return self._pause_instead(decision, window, rollbacks)
        return Review(decision)

    def _pause_instead(self, decision: Decision, window: RunWindow, rollbacks: int) -> Review:
        reason = (
            f"{decision.reason}; not rolling back: {rollbacks} rollbacks already (limit {self.config.max_rollbacks}),"
            " paused for a person to look"
        )
        if window.state is not None and window.state.paused:
            return Review(None, f"{rollbacks} rollbacks spent and the run is already paused")
        replaced = Decision(
            rule=decision.rule,
            reason=reason,
            commands=(Pause(),),
            severity="critical",
            step=decision.step,
            changes=(Change("paused", False, True),),
        )
        return Review(replaced)

    def _too_far(self, command: Command, window: RunWindow, before: Sequence[Command] = ()) -> str:
        """Why a command moves a setting by more than the change factor (from its value once the commands `before`
        it are applied: after a rollback, the checkpoint's), or ''."""
        limit = self.config.max_change_factor
        moves: list[tuple[str, float | None, float | None]] = []
        if isinstance(command, SetHparams | SetOptimizer):
            moves += [
                (name, window.base_after(name, before), getattr(command, name)) for name in ("lr", "weight_decay")
            ]
        if isinstance(command, SetHparams):
            moves.append(("grad_clip", window.base_after("grad_clip", before), command.grad_clip))
        if isinstance(command, SetSchedule):
            moves.append(("lr", window.base_after("lr", before), command.peak_lr))
        if isinstance(command, SetDataMix) and window.state is not None and window.state.data_mix:
            moves += _mix_moves(window.state.data_mix, command.weights)
        for name, old, new in moves:
            if old is None or new is None or old <= 0 or new <= 0:
                continue
            factor = max(new / old, old / new)
            if factor > limit * (1 + 1e-9):
                return f"{command.type} moves {name} {old:.4g} -> {new:.4g}, x{factor:.3g} (limit x{limit:g})"
        return ""


def _mix_moves(old: dict[str, float], new: dict[str, float]) -> list[tuple[str, float | None, float | None]]:
    """Each domain's normalised weight before and after a data-mix change."""
    merged = {**old, **new}
    old_total, new_total = sum(old.values()), sum(merged.values())
    if old_total <= 0 or new_total <= 0:
        return []
    return [(f"data_mix.{name}", old.get(name, 0.0) / old_total, merged[name] / new_total) for name in sorted(merged)]


def _out_of_bounds(command: Command, window: RunWindow) -> str:
    """Why the run's policy would refuse `command` (the check the server makes), or ''."""
    return "; ".join(
        f"{command.type}.{detail.field.removeprefix('command.')}: {detail.message}; allowed {detail.allowed}"
        for detail in window.policy.violations(command)
    )
