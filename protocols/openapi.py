"""The REST API as data: a route table over the wire models, and the OpenAPI document generated from it.

The table is the one description of the HTTP surface; a test checks it against the server's real routes
so the two cannot drift, and `/api/v1/openapi.json` serves the document built here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from protocols.base import NAME_PATTERN, WireJsonSchema
from protocols.commands import CommandDecision, CommandEnvelope, CommandList, CommandRecord, CommandResult
from protocols.constants import API_PREFIX, PROTOCOL_VERSION, Scope
from protocols.errors import ErrorBody
from protocols.events import EventList
from protocols.policy import Policy
from protocols.queries import (
    CheckpointQuery,
    CommandListQuery,
    CommandWaitQuery,
    EventQuery,
    MetricsQuery,
    NextCommandsQuery,
    QueryModel,
)
from protocols.records import (
    AlertReport,
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

Method = Literal["GET", "POST", "PUT"]
Body = Literal["json", "text", "websocket"]


@dataclass(frozen=True)
class Route:
    """One HTTP route: what it takes, what it answers, and the token scope it needs (None: public).

    `name` is the server handler's name and the reference client's method; the server registers its handlers
    from this table and the client builds its requests from it, so path, scope and call cannot disagree.
    """

    name: str
    method: Method
    path: str
    summary: str
    scope: Scope | None
    request: type[BaseModel] | None = None
    query: type[QueryModel] | None = None
    response: type[BaseModel] | None = None
    status: int = 200
    body: Body = "json"

    @property
    def key(self) -> str:
        """`METHOD /path`, as aiohttp's route table spells it."""
        return f"{self.method} {self.path}"

    @property
    def path_parameters(self) -> list[str]:
        """Names of the `{...}` segments of the path."""
        return [part[1:-1] for part in self.path.split("/") if part.startswith("{")]

    def url_path(self, **values: str) -> str:
        """The path with each `{...}` segment filled in (percent-quoted); every segment must be given, no other."""
        if set(values) != set(self.path_parameters):
            raise TypeError(f"{self.name} takes path parameters {self.path_parameters}, got {sorted(values)}")
        return "/".join(
            quote(values[part[1:-1]], safe="") if part.startswith("{") else part for part in self.path.split("/")
        )


RUN = API_PREFIX + "/runs/{run_id}"
COMMAND = RUN + "/commands/{command_id}"

ROUTES: tuple[Route, ...] = (
    Route("healthz", "GET", "/healthz", "Liveness for load balancers and health checks.", None),
    Route("prometheus_metrics", "GET", "/metrics", "Prometheus exposition.", "read", body="text"),
    Route("schema", "GET", API_PREFIX + "/schema", "The JSON Schema of every wire model.", None),
    Route("openapi", "GET", API_PREFIX + "/openapi.json", "This document.", None),
    Route(
        "register_run",
        "POST",
        API_PREFIX + "/runs",
        "Register a run (201), or re-attach a trainer to one (200).",
        "train",
        request=RunRegistration,
        response=RunInfo,
        status=201,
    ),
    Route("list_runs", "GET", API_PREFIX + "/runs", "Every run, newest first.", "read", response=RunList),
    Route("get_run", "GET", RUN, "One run.", "read", response=RunInfo),
    Route("set_policy", "PUT", RUN + "/policy", "Replace a run's policy.", "admin", request=Policy, response=RunInfo),
    Route(
        "submit_command",
        "POST",
        RUN + "/commands",
        "Submit a command (202), or get the first record of a resubmitted id (200).",
        "command",
        request=CommandEnvelope,
        response=CommandRecord,
        status=202,
    ),
    Route(
        "list_commands",
        "GET",
        RUN + "/commands",
        "Command history in `seq` order.",
        "read",
        query=CommandListQuery,
        response=CommandList,
    ),
    Route(
        "next_commands",
        "GET",
        RUN + "/commands/next",
        "The trainer's long-poll for commands after `after`.",
        "train",
        query=NextCommandsQuery,
        response=CommandList,
    ),
    Route(
        "get_command",
        "GET",
        COMMAND,
        "One command; `wait` holds the answer until it finishes.",
        "read",
        query=CommandWaitQuery,
        response=CommandRecord,
    ),
    Route(
        "approve_command",
        "POST",
        COMMAND + "/approve",
        "Release a command held for approval.",
        "command",
        request=CommandDecision,
        response=CommandRecord,
    ),
    Route(
        "reject_command",
        "POST",
        COMMAND + "/reject",
        "Refuse a command held for approval.",
        "command",
        request=CommandDecision,
        response=CommandRecord,
    ),
    Route(
        "report_result",
        "POST",
        COMMAND + "/result",
        "The trainer's answer to a delivered command.",
        "train",
        request=CommandResult,
        response=CommandRecord,
    ),
    Route(
        "push_metrics",
        "POST",
        RUN + "/metrics",
        "Store a batch of metric samples (committed before the answer).",
        "train",
        request=MetricsBatch,
        response=MetricsAck,
    ),
    Route(
        "metrics_history",
        "GET",
        RUN + "/metrics",
        "Metric history, downsampled on the server when `max_points` is given.",
        "read",
        query=MetricsQuery,
        response=MetricsHistory,
    ),
    Route(
        "push_reports",
        "POST",
        RUN + "/events",
        "Heartbeats, status changes, checkpoints, logs and alerts from the trainer.",
        "train",
        request=RunReportBatch,
        response=ReportAck,
    ),
    Route(
        "raise_alert",
        "POST",
        RUN + "/alerts",
        "An alert from an agent or a script, for the run's feed.",
        "command",
        request=AlertReport,
        response=ReportAck,
    ),
    Route(
        "list_events", "GET", RUN + "/events", "Stored events of a run.", "read", query=EventQuery, response=EventList
    ),
    Route(
        "list_checkpoints",
        "GET",
        RUN + "/checkpoints",
        "The run's checkpoint index.",
        "read",
        query=CheckpointQuery,
        response=CheckpointList,
    ),
    Route(
        "run_stream",
        "GET",
        RUN + "/stream",
        "Websocket: one run's events; command envelopes may be submitted over it.",
        "read",
        body="websocket",
    ),
    Route("all_stream", "GET", API_PREFIX + "/stream", "Websocket: every run's events.", "read", body="websocket"),
)
"""Every route the server serves."""

ROUTE: dict[str, Route] = {route.name: route for route in ROUTES}
"""The routes by name."""

ERROR_STATUSES = {
    "400": "Malformed JSON or a bad request",
    "401": "No token or an unknown one",
    "403": "The token lacks the scope, or acts under another name",
    "404": "No such run or command",
    "409": "Conflicts with the run's state",
    "413": "Body too large",
    "422": "A field is invalid or outside the run's policy",
    "429": "Rate limited; see Retry-After",
}

_REF = "#/components/schemas/{model}"


def _models() -> list[type[BaseModel]]:
    found: dict[str, type[BaseModel]] = {"ErrorBody": ErrorBody}
    for route in ROUTES:
        for model in (route.request, route.response):
            if model is not None:
                found[model.__name__] = model
    return list(found.values())


def _parameters(route: Route) -> list[dict[str, Any]]:
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string", "pattern": NAME_PATTERN}}
        for name in route.path_parameters
    ]
    if route.query is not None:
        query_schema = route.query.model_json_schema(ref_template=_REF, schema_generator=WireJsonSchema)
        required = set(query_schema.get("required", []))
        for name, schema in query_schema["properties"].items():
            description = schema.pop("description", "")
            parameters.append(
                {
                    "name": name,
                    "in": "query",
                    "required": name in required,
                    "schema": schema,
                    "description": description,
                }
            )
    return parameters


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _responses(route: Route) -> dict[str, Any]:
    errors = {status: _json({"$ref": _REF.format(model="ErrorBody")}, text) for status, text in ERROR_STATUSES.items()}
    if route.body == "websocket":
        return {"101": {"description": "Switching Protocols: one JSON event per text message"}, **errors}
    if route.body == "text":
        text = {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
        return {"200": text, **errors}
    schema: dict[str, Any] = {"type": "object"}
    if route.response is not None:
        schema = {"$ref": _REF.format(model=route.response.__name__)}
    answer = {str(route.status): _json(schema, route.summary)}
    if route.status != 200:
        answer["200"] = _json(schema, "An earlier answer to the same request")
    return {**answer, **errors}


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the REST API, built from `ROUTES` and the wire models."""
    _, components = models_json_schema(
        [(model, "validation") for model in _models()], ref_template=_REF, schema_generator=WireJsonSchema
    )
    schemas: dict[str, Any] = components.get("$defs", {})
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        operation: dict[str, Any] = {
            "operationId": route.name,
            "summary": route.summary,
            "parameters": _parameters(route),
            "responses": _responses(route),
            "x-runsteer-scope": route.scope,
        }
        if route.scope is not None:
            operation["security"] = [{"bearer": [route.scope]}]
        if route.request is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": _REF.format(model=route.request.__name__)}}},
            }
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "runsteer control server", "version": PROTOCOL_VERSION},
        "paths": paths,
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
