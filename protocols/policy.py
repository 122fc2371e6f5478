"""A run's policy: the bounds, rate limit and approval rules every command must pass."""

from __future__ import annotations

from typing import Annotated, Self

from pydantic import Field, StringConstraints, model_validator

from protocols.base import WholeNumber, WireModel
from protocols.commands import Command
from protocols.errors import ErrorDetail, allowed_range

BoundedField = Annotated[
    str,
    StringConstraints(pattern=r"^(set_hparams|set_schedule|set_optimizer|set_data_mix|rollback|evaluate)\.[a-z_]+$"),
]
"""A numeric command field, written `<type>.<field>`, e.g. `set_hparams.lr`."""

SourcePattern = Annotated[str, StringConstraints(pattern=r"^(user|agent|script|system):([A-Za-z0-9_.@-]{1,64}|\*)$")]
"""A source, or a kind of source with `*` for any name: `agent:*`, `user:bob`."""


class Bounds(WireModel):
    """An inclusive range for one numeric field; `min` must not exceed `max`."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min must not exceed max")
        return self

    def allows(self, value: float) -> bool:
        """True when `value` lies within the range (both ends included)."""
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def describe(self) -> str:
        """The range as refusals state it, e.g. `[1e-06, 0.01] (run policy)`."""
        return f"{allowed_range(self.min, self.max)} (run policy)"


class RateLimit(WireModel):
    """At most `max_commands` accepted per `per_seconds` for one run."""

    max_commands: Annotated[int, Field(ge=1, le=100_000), WholeNumber] = 120
    per_seconds: Annotated[float, Field(gt=0.0, le=86_400.0)] = 60.0


class Policy(WireModel):
    """What a run accepts: numeric bounds per field, a rate limit, and which sources need approval."""

    bounds: dict[BoundedField, Bounds] = Field(default_factory=dict, max_length=64)
    """Allowed ranges, e.g. {"set_hparams.lr": {"min": 1e-6, "max": 0.01}}; each betas entry is checked too."""
    rate_limit: RateLimit = Field(default_factory=RateLimit)
    approval_required: list[SourcePattern] = Field(default_factory=list, max_length=64)
    """Sources whose commands wait in `pending_approval` until a person approves them."""

    def violations(self, command: Command) -> list[ErrorDetail]:
        """Every numeric field of `command` (each element of a pair such as betas) outside this policy's bounds.

        The server refuses a command with these details and agents' guardrails hold it back with the same ones.
        """
        details: list[ErrorDetail] = []
        for key, bounds in self.bounds.items():
            command_type, field = key.split(".", 1)
            if command_type != command.type:
                continue
            value = getattr(command, field, None)
            items = value if isinstance(value, tuple) else (value,)
            for index, item in enumerate(items):
                if isinstance(item, bool) or not isinstance(item, int | float) or bounds.allows(item):
                    continue
                where = f"command.{field}" + (f".{index}" if isinstance(value, tuple) else "")
                message = f"{item:g} is outside the allowed range"
                details.append(ErrorDetail(field=where, message=message, allowed=bounds.describe()))
        return details

    def needs_approval(self, source: str) -> bool:
        """True when `source` matches one of the approval patterns."""
        kind = source.split(":", 1)[0]
        return any(pattern == source or pattern == f"{kind}:*" for pattern in self.approval_required)
