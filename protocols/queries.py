"""Query-string parameters of the REST routes, validated like bodies (strings converted, ranges checked)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from protocols.base import Count, Name, Step
from protocols.constants import CommandStatus

MAX_KEYS_LENGTH = 20_000
"""Longest `keys` list of a metrics query; the server reads request lines long enough for it."""


class QueryModel(BaseModel):
    """Query parameters arrive as strings, so these models convert (not strict) but forbid unknown names."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, use_attribute_docstrings=True)


class CommandListQuery(QueryModel):
    """`GET /runs/{run_id}/commands`"""

    after: Count = 0
    """Only commands with a larger `seq`."""
    status: CommandStatus | None = None
    limit: Annotated[int, Field(ge=1, le=10_000)] = 1000


class CommandWaitQuery(QueryModel):
    """`GET /runs/{run_id}/commands/{id}`"""

    wait: Annotated[float, Field(ge=0.0, le=60.0)] = 0.0
    """Seconds to wait for the command to finish before answering."""


class NextCommandsQuery(QueryModel):
    """`GET /runs/{run_id}/commands/next` (the trainer's long-poll)"""

    after: Count = 0
    """The highest `seq` the trainer already has."""
    wait: Annotated[float, Field(ge=0.0, le=60.0)] = 0.0
    """Seconds to wait for a command when none is ready."""


class MetricsQuery(QueryModel):
    """`GET /runs/{run_id}/metrics`"""

    keys: Annotated[str, StringConstraints(max_length=MAX_KEYS_LENGTH, pattern=r"^[A-Za-z0-9_./:,-]*$")] = ""
    """Comma-separated metric names; every metric when empty. Only the characters of metric names and commas,
    so the longest list fits the server's request line even with every character percent-encoded."""
    branch: Name = "main"
    since_step: Step = 0
    """Only steps at or after this one (rounded down to a bucket boundary when downsampling)."""
    max_points: Annotated[int, Field(ge=1, le=100_000)] | None = None
    """Downsample on the server to at most this many points per metric."""

    @property
    def key_list(self) -> list[str]:
        """The requested metric names."""
        return [key for key in self.keys.split(",") if key]


class CheckpointQuery(QueryModel):
    """`GET /runs/{run_id}/checkpoints`"""

    branch: Name | None = None


class EventQuery(QueryModel):
    """`GET /runs/{run_id}/events`"""

    after: Count = 0
    """Only events with a larger `event_id`."""
    kinds: Annotated[str, StringConstraints(pattern=r"^((command|run|checkpoint|alert|log)(,|$))*$")] = ""
    """Comma-separated event kinds; every stored kind when empty."""
    limit: Annotated[int, Field(ge=1, le=10_000)] = 1000
