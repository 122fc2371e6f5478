"""JSON Schema of the wire contract, generated from the models (never kept by hand)."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter
from pydantic.json_schema import models_json_schema

from protocols.base import WireJsonSchema
from protocols.commands import Command, CommandDecision, CommandEnvelope, CommandList, CommandRecord, CommandResult
from protocols.constants import PROTOCOL_VERSION
from protocols.errors import ErrorBody
from protocols.events import Event, StreamReply, StreamSubmit
from protocols.policy import Policy
from protocols.records import (
    CheckpointList,
    MetricsAck,
    MetricsBatch,
    MetricsHistory,
    ReportAck,
    RunInfo,
    RunList,
    RunRegistration,
    RunReportBatch,
)

WIRE_MODELS = (
    CommandEnvelope,
    CommandRecord,
    CommandList,
    CommandResult,
    CommandDecision,
    RunRegistration,
    RunInfo,
    RunList,
    MetricsBatch,
    MetricsAck,
    MetricsHistory,
    RunReportBatch,
    ReportAck,
    CheckpointList,
    Policy,
    ErrorBody,
    StreamSubmit,
    StreamReply,
)


def command_schema() -> dict[str, Any]:
    """The JSON Schema of one command (the discriminated union), as an LLM agent is shown it."""
    return TypeAdapter(Command).json_schema(schema_generator=WireJsonSchema)


def protocol_schema() -> dict[str, Any]:
    """One JSON Schema document with every wire model under `$defs`, plus `Command` and `Event`."""
    _, document = models_json_schema(
        [(model, "validation") for model in WIRE_MODELS],
        ref_template="#/$defs/{model}",
        schema_generator=WireJsonSchema,
    )
    definitions: dict[str, Any] = document["$defs"]
    for name, adapter in (("Command", TypeAdapter(Command)), ("Event", TypeAdapter(Event))):
        schema = adapter.json_schema(ref_template="#/$defs/{model}", schema_generator=WireJsonSchema)
        definitions.update(schema.pop("$defs", {}))
        definitions[name] = schema
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "runsteer wire protocol",
        "version": PROTOCOL_VERSION,
        "$defs": dict(sorted(definitions.items())),
    }
