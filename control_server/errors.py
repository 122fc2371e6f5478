"""Domain errors a service raises and the middleware turns into JSON with the right status."""

from __future__ import annotations

from protocols.errors import ErrorDetail


class ApiError(Exception):
    """An error a client can act on: a status, a stable code, a message and per-field details."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, details: list[ErrorDetail] | None = None, **extra: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []
        self.extra = extra


class NotFoundError(ApiError):
    status = 404
    code = "not_found"


class ConflictError(ApiError):
    status = 409
    code = "conflict"


class PolicyViolation(ApiError):
    status = 422
    code = "policy_violation"


class RateLimited(ApiError):
    status = 429
    code = "rate_limited"


class Unauthenticated(ApiError):
    status = 401
    code = "unauthorized"


class Forbidden(ApiError):
    status = 403
    code = "forbidden"
