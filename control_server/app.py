"""The application factory: wires the store, services, fan-out, auth and routes together."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

from control_server.auth import LOOPBACK_HOSTS, TokenTable, auth_middleware
from control_server.commands import CommandService
from control_server.config import ServerConfig
from control_server.events import EventLog
from control_server.fanout import Broadcaster
from control_server.http import MAX_REQUEST_LINE, Handler, error_middleware
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


@web.middleware
async def request_metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count requests and time them by route (the route template, so labels stay bounded)."""
    started = time.perf_counter()
    response = await handler(request)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    exposition = request.app[EXPOSITION]
    exposition.requests.labels(request.method, route, str(response.status)).inc()
    exposition.request_seconds.labels(route).observe(time.perf_counter() - started)
    return response


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Allow browser calls only from the configured origins (none by default)."""
    origin = request.headers.get("Origin")
    allowed = origin is not None and origin in request.app[CONFIG].cors_origins
    if allowed and request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        response: web.StreamResponse = web.Response(status=204)
    else:
        response = await handler(request)
    if allowed and origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, PUT, OPTIONS"
        response.headers["Vary"] = "Origin"
    return response


@web.middleware
async def known_run_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Look a run this server has not heard of yet up in the store (another server sharing it may have just
    registered it), before auth and the handler ask the registry for it."""
    run_id = request.match_info.get("run_id")
    if run_id is not None:
        await request.app[RUNS].catch_up(run_id)
    return await handler(request)


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
        middlewares=[
            cors_middleware,
            request_metrics_middleware,
            error_middleware,
            known_run_middleware,
            auth_middleware,
        ],
        handler_args={"max_line_size": MAX_REQUEST_LINE},
    )
    app[CONFIG] = config
    app[AUTH] = tokens
    app[TOKEN_BUDGET] = TokenBudget(config.token_rate_limit) if config.token_rate_limit else None
    app.cleanup_ctx.append(_services)
    add_routes(app)
    return app
