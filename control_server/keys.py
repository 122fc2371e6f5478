"""Typed application keys: every piece of state the app holds, in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from control_server.config import ServerConfig

if TYPE_CHECKING:
    from control_server.auth import Principal, TokenTable
    from control_server.commands import CommandService
    from control_server.events import EventLog
    from control_server.fanout import Broadcaster
    from control_server.metrics import MetricsService
    from control_server.policy import TokenBudget
    from control_server.prometheus import Exposition
    from control_server.runs import RunRegistry
    from control_server.store import Store

CONFIG: web.AppKey[ServerConfig] = web.AppKey("config")
AUTH: web.AppKey[TokenTable] = web.AppKey("auth")
STORE: web.AppKey[Store] = web.AppKey("store")
BROADCASTER: web.AppKey[Broadcaster] = web.AppKey("broadcaster")
EVENTS: web.AppKey[EventLog] = web.AppKey("events")
RUNS: web.AppKey[RunRegistry] = web.AppKey("runs")
COMMANDS: web.AppKey[CommandService] = web.AppKey("commands")
METRICS: web.AppKey[MetricsService] = web.AppKey("metrics")
EXPOSITION: web.AppKey[Exposition] = web.AppKey("exposition")
TOKEN_BUDGET: web.AppKey[TokenBudget | None] = web.AppKey("token_budget")
"""Per-token request budgets; None when `token_rate_limit` is 0."""

PRINCIPAL: web.RequestKey[Principal] = web.RequestKey("principal")
"""The authenticated caller of a request."""
