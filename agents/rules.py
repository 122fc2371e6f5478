"""The rule policy: rules from a TOML file, each a detector and the commands to send when it fires.

Action values may be relative to the run's current ones: `lr = "x0.5"` halves the learning rate in force, and a
rollback's `skip_batches = "x2"` skips twice as many batches as the rollback rewinds.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agents.decision import Change, Decision, Severity, changes_of
from agents.detectors import Detector, Finding
from agents.guardrails import GuardrailConfig
from agents.lr_probe import LrProbe, LrProbeConfig
from agents.window import RunWindow
from protocols.commands import Command, CommandType, Rollback, command_adapter

RELATIVE = re.compile(r"^x(?P<factor>(\d+\.?\d*|\.\d+)(e[-+]?\d+)?)$")
"""A relative value: `x0.5` is half the current value."""

RELATIVE_BASES = {"lr": "lr", "peak_lr": "lr", "weight_decay": "weight_decay", "grad_clip": "grad_clip"}
"""Command fields that may be relative, and the run setting each is relative to."""

RuleName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,40}$")]


def factor_of(value: object) -> float | None:
    """The factor of a relative value (`"x0.5"` -> 0.5), or None for an absolute one."""
    if isinstance(value, str) and (match := RELATIVE.match(value)):
        return float(match["factor"])
    return None


class Action(BaseModel):
    """One command of a rule's response: a command `type` and its fields, where values may be relative.

    For `rollback`: `steps_back` picks the newest healthy checkpoint at least that many steps before the problem
    began, and `skip_batches` is a count or `"x<factor>"` of the steps rewound.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    type: CommandType
    steps_back: Annotated[int, Field(ge=0)] = 1
    skip_batches: int | str = 0

    @field_validator("skip_batches")
    @classmethod
    def _skip(cls, value: int | str) -> int | str:
        if (isinstance(value, int) and value < 0) or (isinstance(value, str) and factor_of(value) is None):
            raise ValueError(f"skip_batches must be a count or 'x<factor>', not {value!r}")
        return value

    @property
    def fields(self) -> dict[str, Any]:
        """The command fields given besides `type` (rollback's own keys excluded)."""
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _valid_command(self) -> Action:
        if self.type != "rollback" and {"steps_back", "skip_batches"} & self.model_fields_set:
            raise ValueError("steps_back and skip_batches belong to rollback actions")
        sample: dict[str, Any] = {"type": self.type}
        for name, value in self.fields.items():
            if factor_of(value) is not None:
                if name not in RELATIVE_BASES:
                    raise ValueError(f"{name} cannot be relative; only {', '.join(RELATIVE_BASES)} can")
                sample[name] = 1e-3
            else:
                sample[name] = value
        if self.type == "rollback":
            if self.fields:
                raise ValueError(f"rollback actions take steps_back and skip_batches, not {', '.join(self.fields)}")
            sample["latest_healthy"] = True
        try:
            command_adapter.validate_python(sample, strict=False)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'command'}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"not a valid {self.type} command: {problems}") from exc
        return self


class Repeat(BaseModel):
    """Escalation: when a rule fires `times` interventions in a row, send these actions instead."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    times: Annotated[int, Field(ge=2)]
    actions: list[Action] = Field(min_length=1)


class Rule(BaseModel):
    """A detector and the response to it; no actions means only an alert."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: RuleName
    detector: Detector
    actions: list[Action] = Field(default_factory=list)
    severity: Severity = "warning"
    repeat: Repeat | None = None
    note: str = ""
    """Words added to the reason, e.g. a suggestion for a person ("consider z-loss 1e-4")."""


class RuleSet(BaseModel):
    """A rule file: guardrails and rules, in priority order (the first rule that acts wins)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    guardrails: GuardrailConfig = Field(default_factory=GuardrailConfig)
    rules: list[Rule] = Field(min_length=1)
    lr_probe: LrProbeConfig | None = None
    """The learning-rate probe, asked when no rule acts; none when the table is left out."""

    @field_validator("rules")
    @classmethod
    def _unique(cls, rules: list[Rule]) -> list[Rule]:
        names = [rule.name for rule in rules]
        if len(names) != len(set(names)):
            raise ValueError(f"rule names must be unique: {names}")
        return rules


DEFAULT_RULES = "default_rules.toml"


def load_rules(path: Path | None = None) -> RuleSet:
    """Read a rule file (the shipped default set when None); errors name the rule and field."""
    if path is None:
        text = resources.files("agents").joinpath(DEFAULT_RULES).read_text()
        where = f"agents/{DEFAULT_RULES}"
    else:
        text, where = path.read_text(), str(path)
    try:
        return RuleSet.model_validate(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{where}: not valid TOML: {exc}") from exc
    except ValidationError as exc:
        raise ValueError(f"{where}: {exc}") from exc


class RulePolicy:
    """Applies rules in order; returns the first rule's decision that sends commands, else the learning-rate
    probe's (when the rule file has one), else the first alert."""

    def __init__(self, rules: RuleSet, name: str = "rules") -> None:
        self.rules = rules
        self.name = name
        self.probe = LrProbe(rules.lr_probe) if rules.lr_probe is not None else None

    def decide(self, window: RunWindow) -> Decision | None:
        """The decision for this window, or None when no detector fires."""
        alert: Decision | None = None
        for rule in self.rules.rules:
            finding = rule.detector.check(window)
            if finding is None:
                continue
            decision = respond(rule, finding, window)
            if decision.intervenes:
                return decision
            alert = alert or decision
        if self.probe is not None:
            spent = sum(kind == "rollback" for i in window.interventions for kind in i.command_types)
            probing = self.probe.decide(window, self.rules.guardrails.max_rollbacks - spent)
            if probing is not None:
                return probing
        return alert


def respond(rule: Rule, finding: Finding, window: RunWindow) -> Decision:
    """Turn a finding into commands with absolute values; what cannot be built is said in the reason."""
    actions: Sequence[Action] = rule.actions
    repeats = _repeats(rule.name, window)
    escalated = rule.repeat is not None and repeats + 1 >= rule.repeat.times
    if rule.repeat is not None and escalated:
        actions = rule.repeat.actions
    commands: list[Command] = []
    changes: list[Change] = []
    words: list[str] = []
    for action in actions:
        command, said = build(action, finding, window, commands)
        words.append(said)
        if command is not None:
            commands.append(command)
            changes += changes_of(command, window, commands[:-1])
    reason = finding.summary
    if escalated:
        reason += f"; fired {repeats + 1} times in a row"
    if words:
        reason += "; " + ", ".join(words)
    if rule.note:
        reason += f"; {rule.note}"
    return Decision(
        rule=rule.name,
        reason=reason,
        commands=tuple(commands),
        severity=rule.severity,
        step=finding.step,
        changes=tuple(changes),
    )


def build(
    action: Action, finding: Finding, window: RunWindow, before: Sequence[Command] = ()
) -> tuple[Command | None, str]:
    """One action as a command, and how it reads in the reason; relative values are taken of the settings in
    force once the commands `before` it are applied (after a rollback: those of the checkpoint's step)."""
    if action.type == "rollback":
        return _rollback(action, finding, window)
    values: dict[str, Any] = {"type": action.type}
    words: list[str] = []
    for name, value in action.fields.items():
        factor = factor_of(value)
        if factor is None:
            values[name] = value
            words.append(f"{name}={value}")
            continue
        base = window.base_after(RELATIVE_BASES[name], before)
        if base is None:
            return None, f"could not set {name} x{factor:g}: its current value is unknown"
        values[name] = base * factor
        words.append(f"{name} x{factor:g}")
    command = command_adapter.validate_python(values, strict=False)
    said = {"pause": "paused", "resume": "resumed", "stop": "stopped", "evaluate": "evaluated"}.get(action.type)
    return command, said or (f"{action.type.replace('_', ' ')} " + " ".join(words)).strip()


def _rollback(action: Action, finding: Finding, window: RunWindow) -> tuple[Command, str]:
    limit = finding.onset - action.steps_back
    candidates = [c for c in window.lineage_checkpoints() if c.healthy and c.step <= limit]
    if not candidates:
        skip = action.skip_batches if isinstance(action.skip_batches, int) else 0
        command = Rollback(latest_healthy=True, skip_batches=skip)
        return command, f"rolled back to the latest healthy checkpoint (none known at or before step {limit})"
    target = candidates[-1]
    rewind = max(0, finding.onset - target.step)
    factor = factor_of(action.skip_batches)
    skip = round(rewind * factor) if factor is not None else int(action.skip_batches)
    command = Rollback(checkpoint_id=target.checkpoint_id, skip_batches=skip)
    skipping = f" skipping {skip} batches" if skip else ""
    return command, f"rolled back to step {target.step}{skipping}"


def _repeats(rule: str, window: RunWindow) -> int:
    """How many of this agent's latest interventions in a row came from `rule`."""
    count = 0
    for intervention in reversed(window.interventions):
        if not intervention.command_types:
            continue
        if intervention.rule != rule:
            break
        count += 1
    return count
