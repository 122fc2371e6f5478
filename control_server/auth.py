"""Bearer tokens with scopes: loaded from a file or the environment, compared in constant time."""

from __future__ import annotations

import hmac
import json
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from control_server.errors import Forbidden, Unauthenticated
from control_server.keys import AUTH, PRINCIPAL, RUNS, TOKEN_BUDGET
from protocols.base import PRINCIPAL_PATTERN
from protocols.constants import Scope
from protocols.errors import ErrorDetail
from protocols.openapi import ROUTES

TOKENS_ENV = "RUNSTEER_TOKENS"
"""Environment variable holding the same JSON list as a tokens file."""

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


TokenKind = Literal["user", "agent", "script"]
"""The kinds of source a token may act as; `system:` sources belong to the server (and admin tokens)."""


class TokenEntry(BaseModel):
    """One token: who holds it, what it may do (`admin` implies every scope) and the source it acts as."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=PRINCIPAL_PATTERN)
    token: str = Field(min_length=16, max_length=512, pattern=r"^[!-~]+$")
    """Printable ASCII without spaces: a trailing newline or space would load but never match a request."""
    scopes: frozenset[Scope] = Field(min_length=1)
    kind: TokenKind = "user"
    """A non-admin token's commands, approvals and alerts carry exactly the source `<kind>:<name>`."""


_entries = TypeAdapter(list[TokenEntry])


@dataclass(frozen=True)
class Principal:
    """The caller of a request."""

    name: str
    scopes: frozenset[Scope]
    kind: TokenKind = "user"

    def may(self, scope: Scope) -> bool:
        """True if this caller holds `scope` (or `admin`)."""
        return scope in self.scopes or "admin" in self.scopes

    @property
    def source(self) -> str:
        """The one source a non-admin caller acts as (an admin may act as any)."""
        return f"{self.kind}:{self.name}"

    def check_source(self, source: str, field: str = "source") -> None:
        """Refuse a non-admin caller acting under any source but its own, kind and name both."""
        if self.may("admin") or source == self.source:
            return
        raise Forbidden(
            f"token {self.name!r} acts as {self.source!r}, not {source!r}",
            details=[ErrorDetail(field=field, message="the source is bound to the token", allowed=self.source)],
        )


LOCAL_ADMIN = Principal("local", frozenset({"admin"}))
"""The caller when no tokens are configured (loopback-only servers)."""

PUBLIC = Principal("public", frozenset())
"""The caller of a public route when tokens are configured."""


def _describe(error: ValidationError) -> str:
    """Each problem as `entry N: field: message`, never echoing the input (it may be a secret)."""
    problems = []
    for problem in error.errors(include_input=False, include_url=False):
        where = ": ".join(f"entry {part}" if isinstance(part, int) else str(part) for part in problem["loc"])
        problems.append(f"{where}: {problem['msg']}" if where else problem["msg"])
    return "; ".join(problems)


def _check_file_mode(path: Path) -> None:
    """Refuse a tokens file anyone may write: whoever can edit it can grant themselves `admin`."""
    mode = path.stat().st_mode
    if mode & stat.S_IWOTH:
        raise ValueError(
            f"bad tokens in {path}: the file is world-writable (mode {stat.filemode(mode)}), so anyone could add "
            f"an admin token; run `chmod o-w {path}` (better: chmod 600)"
        )


class TokenTable:
    """Every configured token; empty means auth is off."""

    def __init__(self, entries: Iterable[TokenEntry]) -> None:
        self.entries = [(entry.token.encode(), Principal(entry.name, entry.scopes, entry.kind)) for entry in entries]

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
            _check_file_mode(tokens_file)
            sources.append((str(tokens_file), tokens_file.read_text()))
        if os.environ.get(TOKENS_ENV):
            sources.append((TOKENS_ENV, os.environ[TOKENS_ENV]))
        shape = "expected a JSON list of {name, token, scopes[, kind]}"
        for where, text in sources:
            try:
                found = _entries.validate_python(json.loads(text))
            except json.JSONDecodeError as exc:
                raise ValueError(f"bad tokens in {where}: {shape}: not JSON ({exc.msg} at {exc.pos})") from None
            except ValidationError as exc:
                raise ValueError(f"bad tokens in {where}: {shape}: {_describe(exc)}") from None
            if not found:
                raise ValueError(f"bad tokens in {where}: the list is empty, which would turn auth off; {shape}")
            entries.extend(found)
        for attribute, what in (("name", "name"), ("token", "token")):
            values = [getattr(entry, attribute) for entry in entries]
            repeated = sorted({value for value in values if values.count(value) > 1})
            if repeated:
                shown = ", ".join(repr(value) for value in repeated) if attribute == "name" else "(not shown)"
                places = " and ".join(where for where, _ in sources)
                raise ValueError(f"bad tokens in {places}: each {what} must be used once; repeated: {shown}")
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


def authorize(request: web.Request) -> None:
    """Refuse a request without a token holding the route's scope (public routes need none) or past its budget;
    set its principal. Called by the app's one middleware before the handler."""
    tokens = request.app[AUTH]
    if not tokens.enabled:
        request[PRINCIPAL] = LOCAL_ADMIN
        return
    scope = required_scope(request)
    if scope is None:
        request[PRINCIPAL] = PUBLIC
        return
    header = request.headers.get("Authorization", "")
    kind, _, token = header.partition(" ")
    if kind.lower() != "bearer" or not token:
        raise Unauthenticated("this route needs `Authorization: Bearer <token>`", scope=scope)
    principal = tokens.authenticate(token.strip())
    if principal is None:
        raise Unauthenticated("unknown token", scope=scope)
    if not principal.may(scope):
        raise Forbidden(f"token {principal.name!r} lacks the {scope!r} scope this route needs", scope=scope)
    run_id = request.match_info.get("run_id")
    if scope == "train" and run_id is not None and not principal.may("admin"):
        request.app[RUNS].check_trainer(run_id, principal.name)
    budget = request.app[TOKEN_BUDGET]
    if budget is not None:
        budget.spend(principal.name)
    request[PRINCIPAL] = principal
