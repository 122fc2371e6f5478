"""The application factory: wires the store, services, fan-out, auth and routes together."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

from control_server.auth import LOOPBACK_HOSTS, TokenTable, authorize
from control_server.commands import CommandService
from control_server.config import ServerConfig
from control_server.events import EventLog
from control_server.fanout import Broadcaster
from control_server.http import MAX_REQUEST_LINE, Handler, failure_response
from control_server.keys import (
    AUTH,
    BROADCASTER,
    COMMANDS,
    CONFIG,
    EVENTS,
    EXPOSITION,
    METRICS,
    RUNS,
    STORE,
    TOKEN_BUDGET,
)
from control_server.metrics import MetricsService
from control_server.policy import TokenBudget
from control_server.prometheus import Exposition
from control_server.routes import add_routes
from control_server.runs import RunRegistry
from control_server.store import make_store
from protocols.constants import CLOSE_SERVER_SHUTDOWN
from protocols.policy import Policy

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(config: ServerConfig, tokens: TokenTable) -> None:
    """Refuse to serve beyond loopback without tokens: anyone could steer the run."""
    if not is_loopback(config.host) and not tokens.enabled:
        raise ValueError(
            f"refusing to bind {config.host}: without tokens anyone who can reach it could steer your runs; "
            "pass --tokens-file or set RUNSTEER_TOKENS, or bind 127.0.0.1"
        )


CORS_HEADERS = {
    "Access-Control-Allow-Headers": "Authorization, Content-Type",
    "Access-Control-Allow-Methods": "GET, POST, PUT, OPTIONS",
    "Vary": "Origin",
}
"""Sent, with the origin itself, to a browser calling from an allowed origin."""


@web.middleware
async def serve_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one layer around every handler, so a request pays one coroutine, not five: answers allowed browsers'
    preflights (CORS, no origins by default), learns runs another server registered, authorizes, turns every
    failure into JSON, and counts and times the request by route (the route template, so labels stay bounded)."""
    started = time.perf_counter()
    origin = request.headers.get("Origin")
    allowed = origin is not None and origin in request.app[CONFIG].cors_origins
    if allowed and request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        response: web.StreamResponse = web.Response(status=204)
    else:
        try:
            run_id = request.match_info.get("run_id")
            if run_id is not None and request.app[RUNS].unheard_of(run_id):
                await request.app[RUNS].catch_up(run_id)  # learnt before auth asks the registry for it
            authorize(request)
            response = await handler(request)
        except Exception as failure:
            response = failure_response(request, failure)
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        request.app[EXPOSITION].observe_request(request.method, route, response.status, time.perf_counter() - started)
    if allowed and origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers.update(CORS_HEADERS)
    return response


async def _services(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    store = make_store(config.db)
    await asyncio.get_running_loop().run_in_executor(None, store.open)
    broadcaster = Broadcaster(config.subscriber_queue)
    events = EventLog(store, broadcaster)
    runs = RunRegistry(store, events, default_policy=Policy(), heartbeat_timeout_s=config.heartbeat_timeout_s)
    commands = CommandService(store, events, runs)
    metrics = MetricsService(store, events, runs)
    exposition = Exposition(
        store=store,
        events=events,
        runs=runs,
        commands=commands,
        metrics=metrics,
        broadcaster=broadcaster,
        finished_run_ttl_s=config.finished_run_ttl_s,
    )
    broadcaster.on_drop = lambda subscriber: exposition.websocket_dropped.inc()
    app[STORE], app[BROADCASTER], app[EVENTS], app[RUNS] = store, broadcaster, events, runs
    app[COMMANDS], app[METRICS], app[EXPOSITION] = commands, metrics, exposition
    tasks = [asyncio.create_task(runs.watch_liveness(), name="runsteer-liveness")]
    if store.shared:
        tasks.append(asyncio.create_task(events.relay(), name="runsteer-relay"))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await broadcaster.close_all(CLOSE_SERVER_SHUTDOWN, "server shutting down")
        await asyncio.get_running_loop().run_in_executor(None, store.close)


def create_app(config: ServerConfig, tokens: TokenTable | None = None) -> web.Application:
    """A ready-to-run application; raises ValueError when the configuration is unsafe."""
    tokens = tokens if tokens is not None else TokenTable.load(config.tokens_file)
    check_exposure(config, tokens)
    app = web.Application(
        client_max_size=config.max_body_bytes,
        middlewares=[serve_middleware],
        handler_args={"max_line_size": MAX_REQUEST_LINE},
    )
    app[CONFIG] = config
    app[AUTH] = tokens
    app[TOKEN_BUDGET] = TokenBudget(config.token_rate_limit) if config.token_rate_limit else None
    app.cleanup_ctx.append(_services)
    add_routes(app)
    return app
