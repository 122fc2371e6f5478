"""Schemathesis, a tool runsteer did not write, against the OpenAPI document the server serves: every REST operation
with schema-valid (positive) and schema-breaking (negative) requests, checked by all of schemathesis' default checks
(no 5xx, documented statuses, content types and headers, answers matching their schemas, invalid input refused,
valid input accepted, invalid auth refused)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.failures import FailureGroup

from control_server.auth import TokenEntry, TokenTable
from control_server.config import ServerConfig
from tests.serving import ServerThread

TOKEN = "schemathesis-admin-token-0123456789"
EXAMPLES = 40
"""Requests per operation and mode (positive, negative)."""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """A real server with tokens (so the auth checks mean something) and long-polls capped at 0.2 s."""
    table = TokenTable([TokenEntry(name="root", token=TOKEN, scopes=frozenset({"admin"}))])
    db: Path = tmp_path_factory.mktemp("schemathesis") / "runsteer.db"
    running = ServerThread(ServerConfig(port=0, db=db, long_poll_max_s=0.2), table).start()
    yield running
    running.stop()


def cross_field_refusal(status: int, body: bytes) -> bool:
    """A 422 whose every detail is a rule across fields that JSON Schema cannot state (min <= max, at least one
    field set, ...): pydantic reports those as `Value error`, and each model's description says the rule."""
    if status != 422:
        return False
    details = json.loads(body).get("details", [])
    return bool(details) and all(detail["message"].startswith("Value error") for detail in details)


def operations(url: str) -> list[schemathesis.schemas.APIOperation]:  # type: ignore[name-defined]
    """The REST operations of the served document (the websocket handshakes have their own tests)."""
    schema = schemathesis.openapi.from_url(f"{url}/api/v1/openapi.json")
    found = [result.ok() for result in schema.get_all_operations()]
    return [operation for operation in found if not operation.path.endswith("/stream")]


def exercise(operation, mode: GenerationMode, url: str) -> tuple[list[str], int]:  # type: ignore[no-untyped-def]
    """Send EXAMPLES generated requests to one operation; returns (failures found, cross-field refusals seen)."""
    failures: list[str] = []
    tolerated = 0

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: schemathesis.Case) -> None:
        nonlocal tolerated
        response = case.call(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        if mode is GenerationMode.POSITIVE and cross_field_refusal(response.status_code, response.content):
            tolerated += 1
            return
        try:
            case.validate_response(response)
        except FailureGroup as group:
            failures.append(f"{operation.label} ({mode.value}): {group}"[:2000])

    try:
        check()
    except Unsatisfiable:
        if mode is GenerationMode.POSITIVE:
            raise  # only an operation without inputs has no negative requests
    return failures, tolerated


@pytest.mark.slow
def test_schemathesis_finds_nothing_against_the_served_openapi_document(served: ServerThread) -> None:
    """Every default check of schemathesis passes on every REST operation, for positive and negative requests; the
    only schema-valid bodies refused are those breaking a documented cross-field rule."""
    found = operations(served.url)
    assert len(found) >= 19
    failures: list[str] = []
    tolerated = 0
    for operation in found:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            failed, refused = exercise(operation, mode, served.url)
            failures += failed
            tolerated += refused
    assert failures == [], "\n\n".join(failures)
    assert tolerated < len(found) * EXAMPLES / 4, "cross-field refusals stay the exception"
