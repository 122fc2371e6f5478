"""Request building and response decoding with no I/O, shared by the sync and async clients."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import urlencode, urlsplit

from pydantic import BaseModel, ValidationError

from protocols.commands import (
    Command,
    CommandDecision,
    CommandEnvelope,
    CommandList,
    CommandRecord,
    CommandResult,
)
from protocols.constants import CommandStatus
from protocols.errors import ErrorBody, RunsteerError, ServerUnavailable, error_for_status
from protocols.events import Event, EventList, StreamReply, event_adapter
from protocols.openapi import ROUTE
from protocols.policy import Policy
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
    RunReport,
    RunReportBatch,
)

Model = TypeVar("Model", bound=BaseModel)

DEFAULT_TIMEOUT_S = 10.0
"""How long a plain request may take before the client gives up on it."""

LONGEST_WAIT_S = 25.0
"""The longest a client asks the server to hold one answer while it waits for a command to finish."""


@dataclass(frozen=True)
class HttpRequest(Generic[Model]):
    """One REST call: what to send and which model the answer decodes to."""

    method: str
    path: str
    response: type[Model]
    params: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def target(self) -> str:
        """The path with its query string."""
        return f"{self.path}?{urlencode(self.params)}" if self.params else self.path


class Backoff:
    """The waits between tries of one call or one connection, for every caller that retries (the trainer's I/O
    threads, the agent runtime, the LLM client): `first_s`, doubling up to `max_s`, back to `first_s` after a
    success. A server that says how long to wait (`Retry-After`) is believed, within `max_s`. It only computes
    delays; each caller waits in its own way (a stop event, asyncio)."""

    def __init__(self, first_s: float = 0.2, max_s: float = 5.0) -> None:
        if not 0 < first_s <= max_s:
            raise ValueError(f"backoff needs 0 < first_s <= max_s, got first_s={first_s:g}, max_s={max_s:g}")
        self.first_s, self.max_s = first_s, max_s
        self.failures = 0
        """Failures since the last success."""

    def next_delay(self, retry_after_s: float | None = None) -> float:
        """Count one more failure and return how long to wait before the next try."""
        if retry_after_s is not None:
            delay = min(self.max_s, max(0.0, retry_after_s))
        else:
            delay = min(self.max_s, self.first_s * 2.0 ** min(self.failures, 64))
        self.failures += 1
        return delay

    def reset(self) -> None:
        """A try succeeded: the next failure waits `first_s` again."""
        self.failures = 0


def retry_after_s(header: str | None) -> float | None:
    """The seconds of a `Retry-After` header given in seconds; None when it is absent or not a number."""
    try:
        return float(header) if header else None
    except ValueError:
        return None


def decode(request: HttpRequest[Model], status: int, body: bytes) -> Model:
    """The response's model, or the client error that the status and error body describe."""
    if 200 <= status < 300:
        try:
            return request.response.model_validate_json(body, strict=False)
        except ValidationError as exc:
            raise ServerUnavailable(f"unexpected answer from {request.path}: {exc}", status=status) from exc
    error_body: ErrorBody | None
    try:
        error_body = ErrorBody.model_validate_json(body, strict=False)
    except ValidationError:
        error_body = None
    fallback = body[:200].decode("utf-8", "replace") or f"HTTP {status}"
    raise error_for_status(status, error_body, f"{request.method} {request.path}: {fallback}")


def normalise_base_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a server URL such as `http://127.0.0.1:8765`."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"server URL must start with http:// or https://, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"server URL has no host: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, parts.hostname, port


class ServerList:
    """The base URLs of servers that share one store, given as one string separated by commas.

    Requests go to `current`; a client moves on with `fail_over()` when it cannot connect there (a
    server stopped or died), so every caller gets failover for free.
    """

    def __init__(self, server: str) -> None:
        self.urls = [part.strip().rstrip("/") for part in server.split(",") if part.strip()]
        if not self.urls:
            raise ValueError("no server URL given")
        for url in self.urls:
            normalise_base_url(url)
        self.index = 0

    @property
    def current(self) -> str:
        """The URL requests go to now."""
        return self.urls[self.index]

    def fail_over(self) -> None:
        """Move on to the next URL (round robin)."""
        self.index = (self.index + 1) % len(self.urls)


def stream_url(base_url: str, run_id: str | None) -> str:
    """The websocket URL of one run's stream, or of every run's when `run_id` is None."""
    scheme, host, port = normalise_base_url(base_url)
    ws_scheme = "wss" if scheme == "https" else "ws"
    path = ROUTE["run_stream"].url_path(run_id=run_id) if run_id else ROUTE["all_stream"].url_path()
    return f"{ws_scheme}://{host}:{port}{path}"


def auth_headers(token: str | None) -> dict[str, str]:
    """The Authorization header for a bearer token, if there is one."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def parse_stream_message(raw: str | bytes) -> Event | StreamReply:
    """Decode one websocket message: an event, or the reply to a command submitted over the socket."""
    data = json.loads(raw)
    if isinstance(data, dict) and data.get("op") == "reply":
        return StreamReply.model_validate(data, strict=False)
    return event_adapter.validate_python(data, strict=False)


def _json(model: BaseModel) -> bytes:
    return model.model_dump_json(exclude_none=False).encode()


def build(
    name: str,
    response: type[Model],
    *,
    body: BaseModel | None = None,
    params: dict[str, str] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    **path: str,
) -> HttpRequest[Model]:
    """The request of route `name` in `protocols.openapi.ROUTES`; raises TypeError where the call and the table
    disagree (answer model, body model, path or query parameters), so a client call cannot drift from its route."""
    route = ROUTE[name]
    if route.response is not response:
        raise TypeError(f"{name} answers {route.response}, not {response.__name__}")
    if (body is None) != (route.request is None) or (body is not None and not isinstance(body, route.request or ())):
        raise TypeError(f"{name} takes a body of {route.request}, got {type(body).__name__}")
    params = params or {}
    unknown = set(params) - set(route.query.model_fields if route.query else ())
    if unknown:
        raise TypeError(f"{name} has no query parameters {sorted(unknown)}")
    encoded = _json(body) if body is not None else None
    return HttpRequest(route.method, route.url_path(**path), response, params=params, body=encoded, timeout_s=timeout_s)


class Requests:
    """Builds the `HttpRequest` of every REST call from the route table; the clients only send them."""

    @staticmethod
    def register_run(registration: RunRegistration) -> HttpRequest[RunInfo]:
        return build("register_run", RunInfo, body=registration)

    @staticmethod
    def list_runs() -> HttpRequest[RunList]:
        return build("list_runs", RunList)

    @staticmethod
    def get_run(run_id: str) -> HttpRequest[RunInfo]:
        return build("get_run", RunInfo, run_id=run_id)

    @staticmethod
    def set_policy(run_id: str, policy: Policy) -> HttpRequest[RunInfo]:
        return build("set_policy", RunInfo, body=policy, run_id=run_id)

    @staticmethod
    def submit(run_id: str, envelope: CommandEnvelope) -> HttpRequest[CommandRecord]:
        return build("submit_command", CommandRecord, body=envelope, run_id=run_id)

    @staticmethod
    def list_commands(
        run_id: str, *, status: CommandStatus | None = None, after_seq: int = 0, limit: int = 1000
    ) -> HttpRequest[CommandList]:
        params = {"after": str(after_seq), "limit": str(limit)}
        if status:
            params["status"] = status
        return build("list_commands", CommandList, params=params, run_id=run_id)

    @staticmethod
    def get_command(run_id: str, command_id: str, *, wait_s: float = 0.0) -> HttpRequest[CommandRecord]:
        params = {"wait": f"{wait_s:g}"} if wait_s > 0 else {}
        return build(
            "get_command",
            CommandRecord,
            params=params,
            timeout_s=DEFAULT_TIMEOUT_S + wait_s,
            run_id=run_id,
            command_id=command_id,
        )

    @staticmethod
    def wait_for(run_id: str, command_id: str, deadline: float) -> tuple[HttpRequest[CommandRecord], bool]:
        """The next request of a wait for a command to finish by `deadline` (monotonic), and whether it is the last:
        each asks the server to hold the answer for what is left, at most `LONGEST_WAIT_S`."""
        remaining = deadline - time.monotonic()
        return Requests.get_command(run_id, command_id, wait_s=max(0.0, min(remaining, LONGEST_WAIT_S))), remaining <= 0

    @staticmethod
    def decide(run_id: str, command_id: str, decision: CommandDecision, *, approve: bool) -> HttpRequest[CommandRecord]:
        name = "approve_command" if approve else "reject_command"
        return build(name, CommandRecord, body=decision, run_id=run_id, command_id=command_id)

    @staticmethod
    def next_commands(run_id: str, *, after_seq: int, wait_s: float) -> HttpRequest[CommandList]:
        return build(
            "next_commands",
            CommandList,
            params={"after": str(after_seq), "wait": f"{wait_s:g}"},
            timeout_s=DEFAULT_TIMEOUT_S + wait_s,
            run_id=run_id,
        )

    @staticmethod
    def report_result(run_id: str, command_id: str, result: CommandResult) -> HttpRequest[CommandRecord]:
        return build("report_result", CommandRecord, body=result, run_id=run_id, command_id=command_id)

    @staticmethod
    def push_metrics(run_id: str, batch: MetricsBatch) -> HttpRequest[MetricsAck]:
        return build("push_metrics", MetricsAck, body=batch, run_id=run_id)

    @staticmethod
    def push_reports(run_id: str, reports: Iterable[RunReport]) -> HttpRequest[ReportAck]:
        return build("push_reports", ReportAck, body=RunReportBatch(reports=list(reports)), run_id=run_id)

    @staticmethod
    def metrics_history(
        run_id: str,
        *,
        keys: Iterable[str] = (),
        branch: str = "main",
        since_step: int = 0,
        max_points: int | None = None,
    ) -> HttpRequest[MetricsHistory]:
        params = {"branch": branch, "since_step": str(since_step)}
        key_list = ",".join(keys)
        if key_list:
            params["keys"] = key_list
        if max_points is not None:
            params["max_points"] = str(max_points)
        return build("metrics_history", MetricsHistory, params=params, run_id=run_id)

    @staticmethod
    def raise_alert(run_id: str, alert: AlertReport) -> HttpRequest[ReportAck]:
        return build("raise_alert", ReportAck, body=alert, run_id=run_id)

    @staticmethod
    def list_events(
        run_id: str, *, after: int = 0, kinds: Iterable[str] = (), limit: int = 1000
    ) -> HttpRequest[EventList]:
        params = {"after": str(after), "limit": str(limit)}
        kind_list = ",".join(kinds)
        if kind_list:
            params["kinds"] = kind_list
        return build("list_events", EventList, params=params, run_id=run_id)

    @staticmethod
    def list_checkpoints(run_id: str, *, branch: str | None = None) -> HttpRequest[CheckpointList]:
        params = {"branch": branch} if branch else {}
        return build("list_checkpoints", CheckpointList, params=params, run_id=run_id)


def envelope_of(
    command: Command | CommandEnvelope | dict[str, Any],
    *,
    source: str | None = None,
    reason: str | None = None,
    command_id: str | None = None,
    hold: bool = False,
) -> CommandEnvelope:
    """Wrap a command (a model, or a dict with a `type`) in an envelope; validation errors name the field."""
    if isinstance(command, CommandEnvelope):
        envelope = command
    elif isinstance(command, dict) and "command" in command:
        envelope = CommandEnvelope.model_validate(command, strict=False)
    else:
        envelope = CommandEnvelope.model_validate({"command": command}, strict=False)
    changes: dict[str, Any] = {}
    if source is not None:
        changes["source"] = source
    if reason is not None:
        changes["reason"] = reason
    if command_id is not None:
        changes["id"] = command_id
    if hold:
        changes["hold"] = True
    if not changes:
        return envelope
    return CommandEnvelope.model_validate({**envelope.model_dump(), **changes}, strict=False)


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "Backoff",
    "HttpRequest",
    "Requests",
    "RunsteerError",
    "ServerList",
    "auth_headers",
    "build",
    "decode",
    "envelope_of",
    "normalise_base_url",
    "parse_stream_message",
    "retry_after_s",
    "stream_url",
]
