"""Bearer tokens with scopes: loaded from a file or the environment, compared in constant time."""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from control_server.errors import Forbidden, Unauthenticated
from control_server.http import Handler
from control_server.keys import AUTH, PRINCIPAL, TOKEN_BUDGET
from protocols.constants import Scope
from protocols.openapi import ROUTES

TOKENS_ENV = "RUNSTEER_TOKENS"
"""Environment variable holding the same JSON list as a tokens file."""

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class TokenEntry(BaseModel):
    """One token: who holds it and what it may do (`admin` implies every scope)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    token: str = Field(min_length=16, max_length=512)
    scopes: frozenset[Scope] = Field(min_length=1)


_entries = TypeAdapter(list[TokenEntry])


@dataclass(frozen=True)
class Principal:
    """The caller of a request."""

    name: str
    scopes: frozenset[Scope]

    def may(self, scope: Scope) -> bool:
        """True if this caller holds `scope` (or `admin`)."""
        return scope in self.scopes or "admin" in self.scopes


LOCAL_ADMIN = Principal("local", frozenset({"admin"}))
"""The caller when no tokens are configured (loopback-only servers)."""


class TokenTable:
    """Every configured token; empty means auth is off."""

    def __init__(self, entries: Iterable[TokenEntry]) -> None:
        self.entries = [(entry.token.encode(), Principal(entry.name, entry.scopes)) for entry in entries]

    @property
    def enabled(self) -> bool:
        """True when at least one token is configured."""
        return bool(self.entries)

    def authenticate(self, token: str) -> Principal | None:
        """The token's holder; compares against every entry in constant time so timing reveals nothing."""
        offered = token.encode()
        found: Principal | None = None
        for secret, principal in self.entries:
            if hmac.compare_digest(secret, offered):
                found = principal
        return found

    @classmethod
    def load(cls, tokens_file: Path | None) -> TokenTable:
        """Tokens from `tokens_file` and the RUNSTEER_TOKENS variable; raises ValueError saying what is wrong."""
        entries: list[TokenEntry] = []
        sources: list[tuple[str, str]] = []
        if tokens_file is not None:
            sources.append((str(tokens_file), tokens_file.read_text()))
        if os.environ.get(TOKENS_ENV):
            sources.append((TOKENS_ENV, os.environ[TOKENS_ENV]))
        for where, text in sources:
            try:
                entries.extend(_entries.validate_python(json.loads(text)))
            except (json.JSONDecodeError, ValidationError) as exc:
                raise ValueError(
                    f"bad tokens in {where}: expected a JSON list of {{name, token, scopes}}: {exc}"
                ) from exc
        return cls(entries)


ROUTE_SCOPES: dict[tuple[str, str], Scope | None] = {(route.method, route.path): route.scope for route in ROUTES}
"""The scope each route needs, read from the protocol's route table (the one the OpenAPI document is built from)."""


def required_scope(request: web.Request) -> Scope | None:
    """The scope the matched route needs; None for public routes and for requests that matched no route (404/405).

    A served route missing from the table needs `admin`: failing closed, though `create_app` refuses to start then.
    """
    resource = request.match_info.route.resource
    if resource is None:
        return None
    method = "GET" if request.method == "HEAD" else request.method
    return ROUTE_SCOPES.get((method, resource.canonical), "admin")


def principal_of(request: web.Request) -> Principal:
    """The authenticated caller (set by the auth middleware)."""
    return request[PRINCIPAL]


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse requests without a token holding the route's scope (public routes need none) or past its budget."""
    scope = required_scope(request)
    tokens = request.app[AUTH]
    if not tokens.enabled:
        request[PRINCIPAL] = LOCAL_ADMIN
        return await handler(request)
    if scope is None:
        request[PRINCIPAL] = Principal("public", frozenset())
        return await handler(request)
    header = request.headers.get("Authorization", "")
    kind, _, token = header.partition(" ")
    if kind.lower() != "bearer" or not token:
        raise Unauthenticated("this route needs `Authorization: Bearer <token>`", scope=scope)
    principal = tokens.authenticate(token.strip())
    if principal is None:
        raise Unauthenticated("unknown token", scope=scope)
    if not principal.may(scope):
        raise Forbidden(f"token {principal.name!r} lacks the {scope!r} scope this route needs", scope=scope)
    budget = request.app[TOKEN_BUDGET]
    if budget is not None:
        budget.spend(principal.name)
    request[PRINCIPAL] = principal
    return await handler(request)
