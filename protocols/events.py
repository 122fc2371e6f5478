"""Events: what the server streams to websocket subscribers, one JSON object per message."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, TypeAdapter

from protocols.base import Count, Name, Step, Text, UnixTime, WireModel, tag_required
from protocols.commands import CommandEnvelope, CommandRecord
from protocols.constants import RunStatus
from protocols.errors import ErrorBody
from protocols.records import CheckpointInfo, MetricsSample, RunInfo, RunState


class EventBase(WireModel):
    """Fields every event has."""

    model_config = ConfigDict(json_schema_extra=tag_required("kind"))

    event_id: Count
    """Increases with every event the server emits, across restarts too (a restarted server starts higher)."""
    time: UnixTime
    run_id: Name


class MetricsEvent(EventBase):
    """New metric samples for a run."""

    kind: Literal["metrics"] = "metrics"
    samples: list[MetricsSample]


class CommandEvent(EventBase):
    """A command was submitted or changed status."""

    kind: Literal["command"] = "command"
    record: CommandRecord


class RunEvent(EventBase):
    """A run was registered or changed (status, step, state)."""

    kind: Literal["run"] = "run"
    run: RunInfo


class RunStateEvent(EventBase):
    """A heartbeat's news about a run: status, step, branches and reported state, not its config or policy.

    Those two change only in a (stored) `run` event, so a heartbeat costs watchers little whatever the config.
    """

    kind: Literal["run_state"] = "run_state"
    status: RunStatus
    step: Step
    branch: Name
    branches: list[Name]
    state: RunState | None = None
    last_heartbeat: UnixTime | None = None
    updated_at: UnixTime

    @classmethod
    def of(cls, run: RunInfo, event_id: int, now: float) -> RunStateEvent:
        """The event telling watchers how `run` stands now."""
        return cls(event_id=event_id, time=now, run_id=run.run_id, **{name: getattr(run, name) for name in _STATE})

    def apply(self, run: RunInfo) -> RunInfo:
        """`run` (as last received) brought up to date by this event."""
        return run.model_copy(update={name: getattr(self, name) for name in _STATE})


_STATE = ("status", "step", "branch", "branches", "state", "last_heartbeat", "updated_at")
"""The fields of a run that a `run_state` event carries."""


class CheckpointEvent(EventBase):
    """A checkpoint was saved or deleted."""

    kind: Literal["checkpoint"] = "checkpoint"
    checkpoint: CheckpointInfo
    deleted: bool = False


class AlertEvent(EventBase):
    """Something a person should look at."""

    kind: Literal["alert"] = "alert"
    severity: Literal["info", "warning", "critical"]
    message: Text
    source: str
    step: Step | None = None


class LogEvent(EventBase):
    """A log line from the trainer."""

    kind: Literal["log"] = "log"
    level: Literal["debug", "info", "warning", "error"]
    message: Text
    step: Step | None = None


Event = Annotated[
    MetricsEvent | CommandEvent | RunEvent | RunStateEvent | CheckpointEvent | AlertEvent | LogEvent,
    Field(discriminator="kind"),
]
"""Any event on the stream, told apart by its `kind`."""

event_adapter: TypeAdapter[Event] = TypeAdapter(Event)


class StreamSubmit(WireModel):
    """A command sent over the websocket; the server answers with a `StreamReply` carrying the same `ref`."""

    op: Literal["submit"] = "submit"
    ref: Annotated[str, Field(max_length=64)] = ""
    """Echoed in the reply so a client can match answers to requests."""
    envelope: CommandEnvelope


class StreamReply(WireModel):
    """The answer to a `StreamSubmit`: the stored record, or the error that refused it."""

    op: Literal["reply"] = "reply"
    ref: str
    record: CommandRecord | None = None
    error: ErrorBody | None = None


class EventList(WireModel):
    """Stored events of a run (commands, status changes, checkpoints, alerts, logs), oldest first."""

    events: list[Event]
