"""REST and websocket handlers: parse, call a service, respond."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from functools import cache

from aiohttp import WSMsgType, web
from pydantic import ValidationError

from control_server.auth import Principal, principal_of
from control_server.errors import ApiError, Forbidden
from control_server.http import (
    Handler,
    api_error_body,
    json_response,
    parse_body,
    parse_json,
    parse_query,
    validation_error_body,
)
from control_server.keys import BROADCASTER, COMMANDS, CONFIG, EVENTS, EXPOSITION, METRICS, RUNS
from protocols.commands import CommandDecision, CommandEnvelope, CommandList, CommandResult
from protocols.constants import PROTOCOL_VERSION
from protocols.errors import ErrorBody
from protocols.events import EventList, StreamReply, StreamSubmit
from protocols.openapi import ROUTE, ROUTES, openapi_document
from protocols.policy import Policy
from protocols.queries import (
    CheckpointQuery,
    CommandListQuery,
    CommandWaitQuery,
    EventQuery,
    MetricsQuery,
    NextCommandsQuery,
)
from protocols.records import (
    AlertReport,
    CheckpointList,
    MetricsBatch,
    ReportAck,
    RunList,
    RunRegistration,
    RunReportBatch,
)
from protocols.schema import protocol_schema

log = logging.getLogger(__name__)

HANDLERS: dict[str, Handler] = {}
"""Each handler by the name of its route in `protocols.openapi.ROUTES`."""


def handler(function: Handler) -> Handler:
    """Serve `function` at the route of the same name in the protocol's route table."""
    HANDLERS[function.__name__] = function
    return function


def check_handlers(handlers: Mapping[str, Handler]) -> None:
    """Refuse to start when a route of the table has no handler, or a handler no route (so no scope)."""
    unserved, unlisted = sorted(set(ROUTE) - set(handlers)), sorted(set(handlers) - set(ROUTE))
    if unserved or unlisted:
        raise RuntimeError(
            f"protocols.openapi.ROUTES and the server's handlers differ: routes with no handler {unserved}, "
            f"handlers with no route (their scope is unknown) {unlisted}"
        )


HOT_ROUTES = ("push_metrics", "next_commands", "report_result")
"""What every trainer calls all the time: registered first, because the router tries the routes under `/runs/` in
the order they were added (a coroutine and a regular expression each) until one matches."""


def add_routes(app: web.Application, handlers: Mapping[str, Handler] = HANDLERS) -> None:
    """Serve every route of the protocol's table (GETs answer HEAD too) with its handler, the paths of HOT_ROUTES
    first (no two paths of the table match the same URL, except `commands/next`, which stays before
    `commands/{command_id}`)."""
    check_handlers(handlers)
    hot = [ROUTE[name].path for name in HOT_ROUTES]
    for route in sorted(ROUTES, key=lambda route: hot.index(route.path) if route.path in hot else len(hot)):
        if route.method == "GET":
            app.router.add_get(route.path, handlers[route.name])
        else:
            app.router.add_route(route.method, route.path, handlers[route.name])


@handler
async def healthz(request: web.Request) -> web.Response:
    """Liveness for load balancers and compose health checks."""
    return web.json_response({"status": "ok", "protocol_version": PROTOCOL_VERSION})


@handler
async def prometheus_metrics(request: web.Request) -> web.Response:
    """Prometheus exposition."""
    body = request.app[EXPOSITION].render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


@cache
def _schema_body() -> bytes:
    return json.dumps(protocol_schema()).encode()


@handler
async def schema(request: web.Request) -> web.Response:
    """The JSON Schema of every wire model."""
    return web.Response(body=_schema_body(), content_type="application/json")


@cache
def _openapi_body() -> bytes:
    return json.dumps(openapi_document()).encode()


@handler
async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI document of the REST API, generated from `protocols`."""
    return web.Response(body=_openapi_body(), content_type="application/json")


@handler
async def register_run(request: web.Request) -> web.Response:
    """Register a run (201) or re-attach a trainer to one (200)."""
    registration = await parse_body(request, RunRegistration)
    run, created = await request.app[RUNS].register(registration, principal_of(request))
    return json_response(run, status=201 if created else 200)


@handler
async def list_runs(request: web.Request) -> web.Response:
    """Every run, newest first."""
    return json_response(RunList(runs=request.app[RUNS].listing()))


@handler
async def get_run(request: web.Request) -> web.Response:
    """One run."""
    return json_response(request.app[RUNS].get(request.match_info["run_id"]))


@handler
async def set_policy(request: web.Request) -> web.Response:
    """Replace a run's policy."""
    policy = await parse_body(request, Policy)
    return json_response(await request.app[RUNS].set_policy(request.match_info["run_id"], policy))


@handler
async def submit_command(request: web.Request) -> web.Response:
    """Queue a command (202), or return the first record of a resubmitted id (200)."""
    envelope = await parse_body(request, CommandEnvelope)
    principal_of(request).check_source(envelope.source)
    record, created = await request.app[COMMANDS].submit(request.match_info["run_id"], envelope)
    return json_response(record, status=202 if created else 200)


@handler
async def list_commands(request: web.Request) -> web.Response:
    """Command history in `seq` order."""
    query = parse_query(request, CommandListQuery)
    records = await request.app[COMMANDS].history(
        request.match_info["run_id"], status=query.status, after_seq=query.after, limit=query.limit
    )
    return json_response(CommandList(commands=records))


def long_poll_wait(request: web.Request, asked_s: float) -> float:
    """How long a request that asked to wait `asked_s` may hold its connection: at most the server's long-poll cap."""
    return min(asked_s, request.app[CONFIG].long_poll_max_s)


@handler
async def next_commands(request: web.Request) -> web.Response:
    """The trainer's long-poll for commands after `after`."""
    query = parse_query(request, NextCommandsQuery)
    records = await request.app[COMMANDS].next_for_trainer(
        request.match_info["run_id"], after_seq=query.after, wait_s=long_poll_wait(request, query.wait)
    )
    return json_response(CommandList(commands=records))


@handler
async def get_command(request: web.Request) -> web.Response:
    """One command; `wait` holds the answer until it finishes."""
    query = parse_query(request, CommandWaitQuery)
    record = await request.app[COMMANDS].get(
        request.match_info["run_id"], request.match_info["command_id"], wait_s=long_poll_wait(request, query.wait)
    )
    return json_response(record)


async def _decide(request: web.Request, *, approve: bool) -> web.Response:
    decision = await parse_body(request, CommandDecision)
    principal_of(request).check_source(decision.source)
    record = await request.app[COMMANDS].decide(
        request.match_info["run_id"], request.match_info["command_id"], decision, approve=approve
    )
    return json_response(record)


@handler
async def approve_command(request: web.Request) -> web.Response:
    """Release a command held for approval."""
    return await _decide(request, approve=True)


@handler
async def reject_command(request: web.Request) -> web.Response:
    """Refuse a command held for approval."""
    return await _decide(request, approve=False)


@handler
async def report_result(request: web.Request) -> web.Response:
    """The trainer's answer to a delivered command."""
    result = await parse_body(request, CommandResult)
    record = await request.app[COMMANDS].report_result(
        request.match_info["run_id"], request.match_info["command_id"], result
    )
    return json_response(record)


@handler
async def push_metrics(request: web.Request) -> web.Response:
    """Store a batch of metric samples (committed before the answer)."""
    batch = await parse_body(request, MetricsBatch)
    return json_response(await request.app[METRICS].ingest(request.match_info["run_id"], batch))


@handler
async def metrics_history(request: web.Request) -> web.Response:
    """Metric history, downsampled on the server when `max_points` is given."""
    query = parse_query(request, MetricsQuery)
    history = await request.app[METRICS].history(
        request.match_info["run_id"],
        keys=query.key_list,
        branch=query.branch,
        since_step=query.since_step,
        max_points=query.max_points,
    )
    return json_response(history)


@handler
async def push_reports(request: web.Request) -> web.Response:
    """Heartbeats, status changes, checkpoints, logs and alerts from the trainer."""
    batch = await parse_body(request, RunReportBatch)
    accepted = await request.app[RUNS].apply_reports(request.match_info["run_id"], list(batch.reports))
    return json_response(ReportAck(accepted=accepted))


@handler
async def raise_alert(request: web.Request) -> web.Response:
    """An alert from an agent or a script, for the run's feed."""
    alert = await parse_body(request, AlertReport)
    principal_of(request).check_source(alert.source)
    await request.app[RUNS].alert(request.match_info["run_id"], alert)
    return json_response(ReportAck(accepted=1))


@handler
async def list_events(request: web.Request) -> web.Response:
    """Stored events: command changes, status changes, checkpoints, alerts and logs."""
    query = parse_query(request, EventQuery)
    run_id = request.match_info["run_id"]
    request.app[RUNS].get(run_id)
    kinds = frozenset(kind for kind in query.kinds.split(",") if kind)
    events = await request.app[EVENTS].history(run_id, after=query.after, kinds=kinds, limit=query.limit)
    return json_response(EventList(events=events))


@handler
async def list_checkpoints(request: web.Request) -> web.Response:
    """The run's checkpoint index."""
    query = parse_query(request, CheckpointQuery)
    checkpoints = await request.app[RUNS].checkpoints(request.match_info["run_id"], query.branch)
    return json_response(CheckpointList(checkpoints=checkpoints))


@handler
async def run_stream(request: web.Request) -> web.StreamResponse:
    """Websocket: one run's events; command envelopes may be submitted over it."""
    run_id = request.match_info["run_id"]
    request.app[RUNS].get(run_id)
    return await _stream(request, run_id)


@handler
async def all_stream(request: web.Request) -> web.StreamResponse:
    """Websocket: every run's events."""
    return await _stream(request, None)


MAX_STREAM_MESSAGE = 256 * 1024
"""Largest message a client may send over the stream (a command envelope is far smaller)."""


async def _stream(request: web.Request, run_id: str | None) -> web.StreamResponse:
    socket = web.WebSocketResponse(heartbeat=30.0, max_msg_size=MAX_STREAM_MESSAGE)
    await socket.prepare(request)
    principal = principal_of(request)
    broadcaster = request.app[BROADCASTER]
    subscriber = broadcaster.subscribe(request, socket, run_id, principal.name)
    try:
        async for message in socket:
            if message.type == WSMsgType.TEXT:
                reply = await _submit_over_stream(request, principal, run_id, message.data)
            elif message.type == WSMsgType.BINARY:
                reply = _stream_error("", "bad_frame", "binary frames are not accepted; send JSON text")
            else:
                continue
            broadcaster.offer(subscriber, reply.model_dump_json())
    finally:
        await broadcaster.unsubscribe(subscriber)
    return socket


def _stream_error(ref: str, code: str, message: str) -> StreamReply:
    return StreamReply(ref=ref, error=ErrorBody(error=code, message=message))


async def _submit_over_stream(request: web.Request, principal: Principal, run_id: str | None, text: str) -> StreamReply:
    """Accept a `StreamSubmit` (answered with its `ref`) or a bare command envelope (answered with ref ""), with
    the answers `POST .../commands` gives for the same input, under the scope the route table gives it."""
    ref, bare = _peek(text)
    scope = ROUTE["submit_command"].scope
    try:
        if bare:
            envelope = parse_json(CommandEnvelope, text)
        else:
            envelope = parse_json(StreamSubmit, text).envelope
        if run_id is None:
            raise ApiError("submit commands on a run's stream, not the all-runs stream")
        if scope is not None and not principal.may(scope):
            raise Forbidden(f"token {principal.name!r} lacks the {scope!r} scope this route needs", scope=scope)
        principal.check_source(envelope.source)
        record, _ = await request.app[COMMANDS].submit(run_id, envelope)
    except ValidationError as exc:
        return StreamReply(ref=ref, error=validation_error_body(exc)[1])
    except ApiError as exc:
        return StreamReply(ref=ref, error=api_error_body(exc))
    return StreamReply(ref=ref, record=record)


def _peek(text: str) -> tuple[str, bool]:
    """(ref, is a bare envelope) of a message, read before validation so that errors carry the client's ref."""
    try:
        data = json.loads(text)
    except ValueError:
        return "", False
    if not isinstance(data, dict):
        return "", False
    ref = data.get("ref")
    return (ref if isinstance(ref, str) and len(ref) <= 64 else ""), ("op" not in data and "command" in data)
