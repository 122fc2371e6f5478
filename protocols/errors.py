"""The error body every 4xx/5xx carries, and the client's exception tree."""

from __future__ import annotations

from pydantic import Field, JsonValue

from protocols.base import WireModel


def allowed_range(low: float | None, high: float | None, *, low_open: bool = False, high_open: bool = False) -> str:
    """A range as every refusal states it, e.g. `[1e-06, 0.01]` or `(0, inf)`; None is an open end."""
    low_text = "-inf" if low is None else f"{low:g}"
    high_text = "inf" if high is None else f"{high:g}"
    return f"{'(' if low_open else '['}{low_text}, {high_text}{')' if high_open else ']'}"


class ErrorDetail(WireModel):
    """One problem with a request: where, what, and what would have been allowed."""

    field: str
    """Dotted path to the offending field, e.g. `command.lr`; empty for the whole body."""
    message: str
    allowed: str = ""
    """The allowed range or values, when there is one."""


class ErrorBody(WireModel):
    """The JSON body of every error response."""

    error: str
    """A stable machine-readable code such as `validation_error` or `rate_limited`."""
    message: str
    details: list[ErrorDetail] = Field(default_factory=list)
    extra: dict[str, JsonValue] = Field(default_factory=dict)


class RunsteerError(Exception):
    """Base of every error the client raises."""

    def __init__(self, message: str, *, status: int = 0, body: ErrorBody | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body

    @property
    def details(self) -> list[ErrorDetail]:
        """The per-field problems the server named, if any."""
        return list(self.body.details) if self.body else []


class RequestRejected(RunsteerError):
    """The server refused the request (4xx other than 401/403/404): bad input, policy, rate limit."""


class NotFound(RunsteerError):
    """The run, command or route does not exist."""


class Unauthorized(RunsteerError):
    """The token is missing, unknown, or lacks the scope the route needs."""


class ServerUnavailable(RunsteerError):
    """The server could not be reached, timed out, or answered 5xx."""


def error_for_status(status: int, body: ErrorBody | None, fallback: str) -> RunsteerError:
    """Map an HTTP status to the client's exception type."""
    message = body.message if body else fallback
    if body and body.details:
        message += ": " + "; ".join(_describe(detail) for detail in body.details)
    kind: type[RunsteerError]
    if status in (401, 403):
        kind = Unauthorized
    elif status == 404:
        kind = NotFound
    elif status >= 500:
        kind = ServerUnavailable
    else:
        kind = RequestRejected
    return kind(message, status=status, body=body)


def _describe(detail: ErrorDetail) -> str:
    where = detail.field or "body"
    allowed = f" (allowed: {detail.allowed})" if detail.allowed else ""
    return f"{where}: {detail.message}{allowed}"


class StreamClosed(ServerUnavailable):
    """The server closed the websocket stream; `code` says why (e.g. `CLOSE_SLOW_CONSUMER`)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"stream closed by the server ({code}): {reason or 'no reason given'}")
        self.code = code
        self.reason = reason
