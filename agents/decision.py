"""What a policy returns, what an agent remembers of its own interventions, and the policy seams."""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal, Protocol

from protocols.commands import Command, Rollback, SetDataMix, SetHparams, SetOptimizer, SetSchedule

if TYPE_CHECKING:
    from agents.window import RunWindow

Severity = Literal["info", "warning", "critical"]


@dataclass(frozen=True)
class Change:
    """One setting an action changes, for the log: `lr 0.003 -> 0.0015`."""

    name: str
    old: float | str | None
    new: float | str | None

    def __str__(self) -> str:
        return f"{self.name} {_show(self.old)} -> {_show(self.new)}"


@dataclass(frozen=True)
class Decision:
    """Commands to send (none: only raise an alert) and the sentence that says why."""

    rule: str
    """The rule (or `llm`) that decided; guardrails count repeats per rule."""
    reason: str
    commands: tuple[Command, ...] = ()
    severity: Severity = "warning"
    step: int = 0
    """The step the decision was made at."""
    changes: tuple[Change, ...] = ()

    @property
    def intervenes(self) -> bool:
        """True when the decision sends commands (an alert alone is not an intervention)."""
        return bool(self.commands)

    def describe(self) -> str:
        """The reason plus each change, as logged."""
        changes = "; ".join(str(change) for change in self.changes)
        return f"[{self.rule}] {self.reason}" + (f" ({changes})" if changes else "")


@dataclass(frozen=True)
class Intervention:
    """One decision this agent acted on (or, in dry-run, would have), for cooldowns, budgets and repeats."""

    rule: str
    decided_tick: int
    time: float
    command_types: tuple[str, ...] = ()
    command_ids: tuple[str, ...] = ()
    answered_tick: int | None = None
    """Tick at which every command of it was applied, rejected or failed (at once for alerts and dry runs)."""

    def answered(self, tick: int) -> Intervention:
        """This intervention, marked answered at `tick`."""
        return replace(self, answered_tick=tick)

    @property
    def since_tick(self) -> int:
        """The tick cooldowns count from: the answer, or the decision while unanswered."""
        return self.answered_tick if self.answered_tick is not None else self.decided_tick


class Policy(Protocol):
    """A pure policy: the same window gives the same decision, and it does no I/O."""

    name: str

    def decide(self, window: RunWindow) -> Decision | None: ...


class AsyncPolicy(Protocol):
    """A policy that must wait on something outside the process (an LLM) before it decides."""

    name: str

    def decide(self, window: RunWindow) -> Awaitable[Decision | None]: ...


def changes_of(command: Command, window: RunWindow, before: Sequence[Command] = ()) -> tuple[Change, ...]:
    """The settings `command` changes, each with the value in force once the commands `before` it are applied."""
    if isinstance(command, SetHparams | SetOptimizer):
        changes = [
            Change(name, window.base_after(name, before), value)
            for name in ("lr", "weight_decay", "grad_clip")
            if isinstance(value := getattr(command, name, None), float)
        ]
        if isinstance(command, SetOptimizer):
            old = window.state.optimizer if window.state is not None else None
            changes.insert(0, Change("optimizer", old, command.name))
        return tuple(changes)
    if isinstance(command, SetSchedule):
        old_kind = window.state.schedule.kind if window.state is not None and window.state.schedule else None
        changes = [Change("schedule", old_kind, command.kind)]
        if command.peak_lr is not None:
            changes.append(Change("lr", window.current("lr"), command.peak_lr))
        return tuple(changes)
    if isinstance(command, SetDataMix):
        mix = window.state.data_mix if window.state is not None else {}
        return tuple(Change(f"data_mix.{name}", mix.get(name), weight) for name, weight in command.weights.items())
    if isinstance(command, Rollback):
        target = command.checkpoint_id or (f"step {command.step}" if command.step is not None else "latest healthy")
        skip = f", skip {command.skip_batches} batches" if command.skip_batches else ""
        return (Change("position", f"{window.branch} step {window.step}", f"{target}{skip}"),)
    return (Change(command.type, None, "sent"),)


def _show(value: float | str | None) -> str:
    if value is None:
        return "?"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
