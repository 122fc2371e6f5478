"""Events: what the server streams to websocket subscribers, one JSON object per message."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, TypeAdapter

from protocols.base import Name, Step, Text, UnixTime, WireModel
from protocols.commands import CommandEnvelope, CommandRecord
from protocols.errors import ErrorBody
from protocols.records import CheckpointInfo, MetricsSample, RunInfo


class EventBase(WireModel):
    """Fields every event has."""

    event_id: Annotated[int, Field(ge=0)]
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
    MetricsEvent | CommandEvent | RunEvent | CheckpointEvent | AlertEvent | LogEvent, Field(discriminator="kind")
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
