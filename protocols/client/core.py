"""Request building and response decoding with no I/O, shared by the sync and async clients."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote, urlencode, urlsplit

from pydantic import BaseModel, ValidationError

from protocols.commands import (
    Command,
    CommandDecision,
    CommandEnvelope,
    CommandList,
    CommandRecord,
    CommandResult,
)
from protocols.constants import API_PREFIX, CommandStatus
from protocols.errors import ErrorBody, RunsteerError, ServerUnavailable, error_for_status
from protocols.events import Event, EventList, StreamReply, event_adapter
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
    standby server does not listen until it takes over), so every caller gets failover for free.
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
    path = f"{API_PREFIX}/runs/{_segment(run_id)}/stream" if run_id else f"{API_PREFIX}/stream"
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


def _segment(value: str) -> str:
    return quote(value, safe="")


def _run(run_id: str) -> str:
    return f"{API_PREFIX}/runs/{_segment(run_id)}"


def _json(model: BaseModel) -> bytes:
    return model.model_dump_json(exclude_none=False).encode()


class Requests:
    """Builds the `HttpRequest` of every REST call; the clients only send them."""

    @staticmethod
    def register_run(registration: RunRegistration) -> HttpRequest[RunInfo]:
        return HttpRequest("POST", f"{API_PREFIX}/runs", RunInfo, body=_json(registration))

    @staticmethod
    def list_runs() -> HttpRequest[RunList]:
        return HttpRequest("GET", f"{API_PREFIX}/runs", RunList)

    @staticmethod
    def get_run(run_id: str) -> HttpRequest[RunInfo]:
        return HttpRequest("GET", _run(run_id), RunInfo)

    @staticmethod
    def set_policy(run_id: str, policy: Policy) -> HttpRequest[RunInfo]:
        return HttpRequest("PUT", f"{_run(run_id)}/policy", RunInfo, body=_json(policy))

    @staticmethod
    def submit(run_id: str, envelope: CommandEnvelope) -> HttpRequest[CommandRecord]:
        return HttpRequest("POST", f"{_run(run_id)}/commands", CommandRecord, body=_json(envelope))

    @staticmethod
    def list_commands(
        run_id: str, *, status: CommandStatus | None = None, after_seq: int = 0, limit: int = 1000
    ) -> HttpRequest[CommandList]:
        params = {"after": str(after_seq), "limit": str(limit)}
        if status:
            params["status"] = status
        return HttpRequest("GET", f"{_run(run_id)}/commands", CommandList, params=params)

    @staticmethod
    def get_command(run_id: str, command_id: str, *, wait_s: float = 0.0) -> HttpRequest[CommandRecord]:
        params = {"wait": f"{wait_s:g}"} if wait_s > 0 else {}
        return HttpRequest(
            "GET",
            f"{_run(run_id)}/commands/{_segment(command_id)}",
            CommandRecord,
            params=params,
            timeout_s=DEFAULT_TIMEOUT_S + wait_s,
        )

    @staticmethod
    def decide(run_id: str, command_id: str, decision: CommandDecision, *, approve: bool) -> HttpRequest[CommandRecord]:
        verb = "approve" if approve else "reject"
        return HttpRequest(
            "POST", f"{_run(run_id)}/commands/{_segment(command_id)}/{verb}", CommandRecord, body=_json(decision)
        )

    @staticmethod
    def next_commands(run_id: str, *, after_seq: int, wait_s: float) -> HttpRequest[CommandList]:
        return HttpRequest(
            "GET",
            f"{_run(run_id)}/commands/next",
            CommandList,
            params={"after": str(after_seq), "wait": f"{wait_s:g}"},
            timeout_s=DEFAULT_TIMEOUT_S + wait_s,
        )

    @staticmethod
    def report_result(run_id: str, command_id: str, result: CommandResult) -> HttpRequest[CommandRecord]:
        return HttpRequest(
            "POST", f"{_run(run_id)}/commands/{_segment(command_id)}/result", CommandRecord, body=_json(result)
        )

    @staticmethod
    def push_metrics(run_id: str, batch: MetricsBatch) -> HttpRequest[MetricsAck]:
        return HttpRequest("POST", f"{_run(run_id)}/metrics", MetricsAck, body=_json(batch))

    @staticmethod
    def push_reports(run_id: str, reports: Iterable[RunReport]) -> HttpRequest[ReportAck]:
        batch = RunReportBatch(reports=list(reports))
        return HttpRequest("POST", f"{_run(run_id)}/events", ReportAck, body=_json(batch))

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
        return HttpRequest("GET", f"{_run(run_id)}/metrics", MetricsHistory, params=params)

    @staticmethod
    def raise_alert(run_id: str, alert: AlertReport) -> HttpRequest[ReportAck]:
        return HttpRequest("POST", f"{_run(run_id)}/alerts", ReportAck, body=_json(alert))

    @staticmethod
    def list_events(
        run_id: str, *, after: int = 0, kinds: Iterable[str] = (), limit: int = 1000
    ) -> HttpRequest[EventList]:
        params = {"after": str(after), "limit": str(limit)}
        kind_list = ",".join(kinds)
        if kind_list:
            params["kinds"] = kind_list
        return HttpRequest("GET", f"{_run(run_id)}/events", EventList, params=params)

    @staticmethod
    def list_checkpoints(run_id: str, *, branch: str | None = None) -> HttpRequest[CheckpointList]:
        params = {"branch": branch} if branch else {}
        return HttpRequest("GET", f"{_run(run_id)}/checkpoints", CheckpointList, params=params)


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
    "HttpRequest",
    "Requests",
    "RunsteerError",
    "ServerList",
    "auth_headers",
    "decode",
    "envelope_of",
    "normalise_base_url",
    "parse_stream_message",
    "stream_url",
]
