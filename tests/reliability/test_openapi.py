"""The OpenAPI document: generated from `protocols`, in step with the server's routes, and a property-based
test that drives every REST operation in it with generated and malformed input against a real server."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jsonschema
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control_server.config import ServerConfig
from control_server.routes import HANDLERS, check_handlers
from protocols import Pause, RunRegistration
from protocols.client import Client
from protocols.openapi import ROUTES, openapi_document
from tests.server.helpers import raw_request, row_counts
from tests.server.test_auth import ROUTES as AUTH_TABLE
from tests.server.test_auth import SERVED
from tests.serving import ServerThread

DOCUMENT = openapi_document()
SCHEMAS: dict[str, Any] = DOCUMENT["components"]["schemas"]


def test_the_protocol_route_table_names_exactly_the_servers_routes_with_their_scopes() -> None:
    """Every served route is in `protocols.openapi.ROUTES`, nothing else is, and each scope there (the one the
    server enforces) is the one the auth table test proves over HTTP."""
    described = {route.key: route.scope for route in ROUTES}
    assert set(described) == set(SERVED)
    assert described == {key: scope for key, (scope, _) in AUTH_TABLE.items()}


def test_the_server_serves_the_generated_document_and_its_schemas_are_valid(client: Client) -> None:
    """`/api/v1/openapi.json` is `openapi_document()`; its schemas check as JSON Schema 2020-12; every $ref resolves."""
    answer = raw_request(client.server, "GET", "/api/v1/openapi.json")
    assert answer.status == 200 and answer.json() == json.loads(json.dumps(DOCUMENT))
    assert DOCUMENT["openapi"].startswith("3.1")
    for schema in SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(schema)
    text = json.dumps(DOCUMENT)
    for ref in {part.split('"')[0] for part in text.split('"$ref": "')[1:]}:
        assert ref.removeprefix("#/components/schemas/") in SCHEMAS, ref
    assert {(path, method.upper()) for path, item in DOCUMENT["paths"].items() for method in item} == {
        (route.path, route.method) for route in ROUTES
    }


# Strategies built from the document's JSON Schemas


def from_schema(schema: dict[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    """Values of the JSON Schema subset pydantic writes ($ref, anyOf/oneOf, const, enum and the basic types)."""
    if "$ref" in schema:
        return st.deferred(lambda: from_schema(SCHEMAS[schema["$ref"].split("/")[-1]], depth + 1))
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    for key in ("oneOf", "anyOf"):
        if key in schema:
            return st.one_of([from_schema(option, depth) for option in schema[key]])
    kind = schema.get("type")
    if kind == "object":
        return objects(schema, depth)
    if kind == "array":
        if "prefixItems" in schema:
            return st.tuples(*(from_schema(item, depth) for item in schema["prefixItems"])).map(list)
        items = from_schema(schema.get("items", {}), depth) if depth < 4 else st.none()
        low = schema.get("minItems", 0)
        return st.lists(items, min_size=low, max_size=max(low, min(schema.get("maxItems", 4), 4)))
    if kind == "string":
        if "pattern" in schema:
            return st.from_regex(schema["pattern"], fullmatch=True)
        return st.text(max_size=min(schema.get("maxLength", 40), 40))
    if kind == "integer":
        low = schema["minimum"] if "minimum" in schema else schema.get("exclusiveMinimum", -(2**70) - 1) + 1
        high = schema["maximum"] if "maximum" in schema else schema.get("exclusiveMaximum", 2**70 + 1) - 1
        return st.integers(low, high)
    if kind == "number":
        return st.floats(
            schema.get("minimum", schema.get("exclusiveMinimum")),
            schema.get("maximum", schema.get("exclusiveMaximum")),
            exclude_min="exclusiveMinimum" in schema,
            exclude_max="exclusiveMaximum" in schema,
            allow_nan=False,
        )
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return JUNK


def objects(schema: dict[str, Any], depth: int) -> st.SearchStrategy[dict[str, Any]]:
    properties: dict[str, Any] = schema.get("properties", {})
    required = set(schema.get("required", []))
    if not properties:
        names = from_schema(schema.get("propertyNames", {"type": "string"}), depth)
        values = from_schema(schema.get("additionalProperties", {}), depth + 1) if depth < 4 else st.none()
        return st.dictionaries(names, values, max_size=3)
    return st.fixed_dictionaries(
        {name: from_schema(sub, depth + 1) for name, sub in properties.items() if name in required},
        optional={name: from_schema(sub, depth + 1) for name, sub in properties.items() if name not in required},
    )


JUNK: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
"""Any JSON value at all."""


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[Any]) -> Any:
    """A valid value with one field replaced by junk, removed, or an unknown field added."""
    value = draw(valid)
    if not isinstance(value, dict) or not value:
        return draw(JUNK)
    key = draw(st.sampled_from(sorted(value)))
    action = draw(st.sampled_from(["replace", "remove", "add"]))
    if action == "replace":
        value[key] = draw(JUNK)
    elif action == "remove":
        del value[key]
    else:
        value[draw(st.text(min_size=1, max_size=10))] = draw(JUNK)
    return value


def body_bytes(route_schema: dict[str, Any] | None) -> st.SearchStrategy[bytes | None]:
    """Valid bodies, mutated ones, any JSON, non-finite numbers, broken JSON and raw bytes."""
    raw = st.one_of(
        st.binary(max_size=64),
        st.just(b""),
        st.just(b"{"),
        st.just(b'{"x": NaN}'),
        st.just(b"[Infinity]"),
        st.just(b"\xff\xfe"),
    )
    dumped = JUNK.map(lambda value: json.dumps(value).encode())
    if route_schema is None:
        return st.one_of(st.none(), raw, dumped)
    valid = from_schema(route_schema)
    shaped = st.one_of(valid, valid, mutated(valid)).map(lambda value: json.dumps(value).encode())
    return st.one_of(shaped, shaped, dumped, raw)


def query_strings(parameters: list[dict[str, Any]]) -> st.SearchStrategy[dict[str, str]]:
    """Query parameters: the documented ones with valid or junk values, plus unknown names; `wait` stays short."""

    def value(parameter: dict[str, Any]) -> st.SearchStrategy[str]:
        if parameter["name"] == "wait":
            valid: st.SearchStrategy[str] = st.floats(0, 0.2).map(str)
        else:
            valid = from_schema(parameter["schema"]).map(
                lambda item: item if isinstance(item, str) else json.dumps(item)
            )
        junk = st.sampled_from(["", "-1", "nan", "inf", "1e999", "99999999999999999999999", "true", "[]", "%00"])
        return st.one_of(valid, junk, st.text(max_size=20))

    named = {parameter["name"]: value(parameter) for parameter in parameters if parameter["in"] == "query"}
    unknown = st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=8), max_size=2)
    return st.tuples(st.fixed_dictionaries({}, optional=named), unknown).map(lambda pair: {**pair[1], **pair[0]})


OPERATIONS = [
    (path, method.upper(), operation)
    for path, item in DOCUMENT["paths"].items()
    for method, operation in item.items()
    if "101" not in operation["responses"]
]
"""Every REST operation (the websocket handshakes are covered by the stream tests)."""


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, dict[str, str]]]:
    """One server for all generated requests, with a run and a command to aim valid path parameters at."""
    db: Path = tmp_path_factory.mktemp("fuzz") / "runsteer.db"
    server = ServerThread(ServerConfig(port=0, db=db, heartbeat_timeout_s=600, long_poll_max_s=0.2)).start()
    with Client(server.url) as client:
        run_id = client.register_run(RunRegistration(name="fuzzed", domains=["prose", "code"])).run_id
        command_id = client.submit(run_id, Pause()).id
    yield server, {"run_id": run_id, "command_id": command_id}
    server.stop()


@pytest.mark.slow
@pytest.mark.parametrize(("path", "method", "operation"), OPERATIONS, ids=[f"{m} {p}" for p, m, _ in OPERATIONS])
def test_generated_and_malformed_requests_never_get_a_5xx_never_hang_and_store_nothing_when_refused(
    fuzzed: tuple[ServerThread, dict[str, str]], path: str, method: str, operation: dict[str, Any]
) -> None:
    """For each operation in the OpenAPI document: any input is answered within 5 s with a status below 500,
    and an answer of 4xx leaves every store table as it was."""
    server, known = fuzzed
    body_schema = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    identifiers = {
        name: st.one_of(st.just(known[name]), st.just(known[name]), st.text(min_size=1, max_size=70))
        for name in ("run_id", "command_id")
        if "{" + name + "}" in path
    }

    @settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        ids=st.fixed_dictionaries(identifiers),
        query=query_strings(operation["parameters"]),
        body=body_bytes(body_schema),
    )
    def drive(ids: dict[str, str], query: dict[str, str], body: bytes | None) -> None:
        target = path.format(**{name: quote(value, safe="") for name, value in ids.items()})
        if query:
            target += "?" + urlencode(query)
        before = row_counts(server.config.db)
        started = time.monotonic()
        answer = raw_request(server.url, method, target, body)
        assert time.monotonic() - started < 5.0, f"{method} {target} took too long"
        assert answer.status < 500, (method, target, body, answer.body[:500])
        if answer.status >= 400:
            assert answer.error.error, "refusals carry the protocol's error body"
            assert row_counts(server.config.db) == before, (method, target, body, answer.status)

    drive()
    assert raw_request(server.url, "GET", "/healthz").status == 200


def test_a_handler_without_a_route_or_a_route_without_a_handler_stops_the_server_from_starting() -> None:
    """The server serves the protocol's table: a handler with no row (so no scope), or a row with no handler, is
    refused at start-up, naming it."""

    async def unlisted(request: web.Request) -> web.Response:
        return web.Response(text="never served")

    with pytest.raises(RuntimeError, match="unlisted"):
        check_handlers({**HANDLERS, "unlisted": unlisted})
    without_alerts = {name: handler for name, handler in HANDLERS.items() if name != "raise_alert"}
    with pytest.raises(RuntimeError, match="raise_alert"):
        check_handlers(without_alerts)
