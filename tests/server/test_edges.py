"""Edges of the wire: every integer has a range, the OpenAPI document and the server agree (tags, map keys, `1.0`,
long request lines), and a JSON object naming a key twice is refused."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import jsonschema
import pytest

from protocols import Pause, RunRegistration
from protocols.base import MAX_WIRE_INT
from protocols.client import Client
from protocols.openapi import openapi_document
from protocols.queries import MAX_KEYS_LENGTH
from protocols.schema import protocol_schema
from tests.server.helpers import raw_request, row_counts
from tests.serving import ServerThread

DOCUMENT = openapi_document()


def integers(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every `{"type": "integer"}` schema in a document, with where it is."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            yield path, node
        for key, child in node.items():
            yield from integers(child, f"{path}/{key}")
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield from integers(child, f"{path}/{index}")


def test_every_integer_in_the_schema_and_the_openapi_document_has_a_range() -> None:
    """Each integer, in bodies, answers, events and query parameters, has a minimum and a maximum within 2^53."""
    found = [*integers(protocol_schema()), *integers(DOCUMENT)]
    assert len(found) > 50
    unbounded = [path for path, schema in found if "minimum" not in schema or "maximum" not in schema]
    assert unbounded == []
    assert max(schema["maximum"] for _, schema in found) <= MAX_WIRE_INT


@pytest.mark.parametrize(
    ("target", "field"),
    [
        ("commands?after={huge}", "after"),
        ("commands/next?after={huge}", "after"),
        ("events?after={huge}", "after"),
        ("metrics?since_step={huge}", "since_step"),
    ],
)
def test_an_integer_of_2_to_the_63_in_a_query_is_a_422_naming_it(client: Client, target: str, field: str) -> None:
    """2^63 and 2^64 overflow SQLite's integers: the server answers 422 naming the parameter, never 500."""
    run_id = client.register_run(RunRegistration(name="edges")).run_id
    for huge in (2**63, 2**64, MAX_WIRE_INT + 1):
        answer = raw_request(client.server, "GET", f"/api/v1/runs/{run_id}/" + target.format(huge=huge))
        assert answer.status == 422, answer.body
        assert [detail.field for detail in answer.error.details] == [field]


def test_an_integer_of_2_to_the_63_in_a_body_is_a_422_naming_it(client: Client, server: ServerThread) -> None:
    """A metric step, a checkpoint size or a rollback step of 2^63 is refused naming the field; nothing is stored."""
    run_id = client.register_run(RunRegistration(name="edges")).run_id
    before = row_counts(server.config.db)
    huge = 2**63
    bodies = {
        "metrics": {"samples": [{"step": huge, "time": 1.0, "values": {"loss": 1.0}}]},
        "events": {
            "reports": [
                {
                    "type": "checkpoint",
                    "checkpoint": {"checkpoint_id": "c", "branch": "main", "step": 1, "time": 1.0, "size_bytes": huge},
                }
            ]
        },
        "commands": {"command": {"type": "rollback", "step": huge}},
    }
    fields = {}
    for route, body in bodies.items():
        answer = raw_request(client.server, "POST", f"/api/v1/runs/{run_id}/{route}", json.dumps(body).encode())
        assert answer.status == 422, answer.body
        fields[route] = [detail.field for detail in answer.error.details]
    assert fields == {
        "metrics": ["samples.0.step"],
        "events": ["reports.0.checkpoint.size_bytes"],
        "commands": ["command.step"],
    }
    assert row_counts(server.config.db) == before


def envelope_validator() -> jsonschema.Draft202012Validator:
    """A validator of command envelopes built from the served OpenAPI document alone."""
    schemas = DOCUMENT["components"]["schemas"]
    return jsonschema.Draft202012Validator(
        {"$ref": "#/components/schemas/CommandEnvelope", "components": {"schemas": schemas}}
    )


@pytest.mark.parametrize(
    ("command", "valid"),
    [
        pytest.param({"type": "set_hparams", "lr": 0.1}, True, id="good"),
        pytest.param({"lr": 0.1}, False, id="no-type"),
        pytest.param({"type": "set_data_mix", "weights": {"web": 1.0}}, True, id="domain"),
        pytest.param({"type": "set_data_mix", "weights": {"../x": 1.0}}, False, id="bad-domain-key"),
        pytest.param({"type": "set_data_mix", "weights": {"": 1.0}}, False, id="empty-domain-key"),
        pytest.param({"type": "evaluate", "max_batches": 3.0}, True, id="integer-as-1.0"),
        pytest.param({"type": "evaluate", "max_batches": 3.5}, False, id="fraction"),
        pytest.param({"type": "set_schedule", "kind": "cosine", "horizon_steps": 1e3}, True, id="integer-as-1e3"),
        pytest.param({"type": "evaluate", "max_batches": True}, False, id="boolean"),
    ],
)
def test_the_openapi_document_and_the_server_agree_on_commands(
    client: Client, command: dict[str, Any], valid: bool
) -> None:
    """A client validating with the served document alone gets the server's verdict: a missing `type`, a map key
    the server refuses, `3.0` for an integer (accepted as 3) and `3.5` (refused)."""
    run_id = client.register_run(RunRegistration(name="agree")).run_id
    envelope = {"command": command, "source": "user:doc"}
    assert envelope_validator().is_valid(envelope) is valid
    answer = raw_request(client.server, "POST", f"/api/v1/runs/{run_id}/commands", json.dumps(envelope).encode())
    assert (answer.status == 202) is valid, answer.body
    if command.get("max_batches") == 3.0:
        assert answer.json()["command"]["max_batches"] == 3 and isinstance(answer.json()["command"]["max_batches"], int)


def test_every_union_variant_requires_its_tag_in_the_documents() -> None:
    """Each command and trainer report needs `type`, each event `kind`, in both the schema and the OpenAPI document."""
    for definitions in (protocol_schema()["$defs"], DOCUMENT["components"]["schemas"]):
        tagged = {
            name: definition
            for name, definition in definitions.items()
            if {"type", "kind"} & set(definition.get("properties", {}))
            and "const" in definition["properties"].get("type", definition["properties"].get("kind", {}))
        }
        assert len(tagged) >= 15
        for name, definition in tagged.items():
            tag = "type" if "type" in definition["properties"] else "kind"
            assert tag in definition.get("required", []), name


def test_a_documented_request_line_at_full_length_is_answered_in_json(client: Client) -> None:
    """`keys` at its documented 20,000 characters, every one percent-encoded (60 kB of request line), is answered
    as JSON; one character more is a JSON 422 naming `keys`, not aiohttp's plain-text 400."""
    run_id = client.register_run(RunRegistration(name="long-line")).run_id
    names = ",".join(f"a/{index:05d}" for index in range(MAX_KEYS_LENGTH // 8))
    names += "," + "b" * (MAX_KEYS_LENGTH - len(names) - 1)
    assert len(names) == MAX_KEYS_LENGTH
    encoded = "".join(f"%{byte:02X}" for byte in names.encode())
    answer = raw_request(client.server, "GET", f"/api/v1/runs/{run_id}/metrics?keys={encoded}")
    assert answer.status == 200 and answer.headers["content-type"].startswith("application/json")
    too_long = raw_request(client.server, "GET", f"/api/v1/runs/{run_id}/metrics?keys={encoded}%41")
    assert too_long.status == 422 and [d.field for d in too_long.error.details] == ["keys"]
    assert quote(names, safe="") != names


@pytest.mark.parametrize(
    "body",
    [
        b'{"command": {"type": "stop", "type": "save_checkpoint"}}',
        b'{"command": {"type": "pause"}, "source": "user:a", "source": "user:b"}',
        b'{"command": {"type": "set_data_mix", "weights": {"web": 1.0, "web": 0.0}}}',
    ],
)
def test_a_json_object_naming_a_key_twice_is_refused_and_nothing_is_stored(
    client: Client, server: ServerThread, body: bytes
) -> None:
    """The last key would win in the server's parser while a proxy or an audit log may read the first: 400
    `bad_request` naming the key; nothing is stored."""
    run_id = client.register_run(RunRegistration(name="twice")).run_id
    before = row_counts(server.config.db)
    answer = raw_request(client.server, "POST", f"/api/v1/runs/{run_id}/commands", body)
    assert answer.status == 400 and "appears twice" in answer.error.message
    assert answer.error.details[0].message == "duplicate key"
    assert row_counts(server.config.db) == before


def test_a_duplicate_key_over_the_stream_gets_an_error_reply(client: Client) -> None:
    """Over the websocket the same message is answered with an error naming the key, and nothing is queued."""
    run_id = client.register_run(RunRegistration(name="twice-ws")).run_id
    with client.stream(run_id) as stream:
        stream._socket.send('{"op": "submit", "ref": "r1", "envelope": {"command": {"type": "stop", "type": "pause"}}}')
        reply = stream._receive(5)
    assert reply is not None and getattr(reply, "ref", None) == "r1"
    assert reply.error is not None and reply.error.details[0].field == "type"  # type: ignore[union-attr]
    assert client.list_commands(run_id) == []
    assert client.submit(run_id, Pause()).status == "queued"


def test_a_standalone_body_without_its_type_is_refused_as_the_document_says(client: Client) -> None:
    """An alert posted without `type` is a 422 naming `type` (the document marks it required); with it, accepted."""
    run_id = client.register_run(RunRegistration(name="typed")).run_id
    target = f"/api/v1/runs/{run_id}/alerts"
    untyped = raw_request(client.server, "POST", target, b'{"message": "look", "source": "user:anonymous"}')
    assert untyped.status == 422 and [(d.field, d.allowed) for d in untyped.error.details] == [("type", "alert")]
    typed = raw_request(
        client.server, "POST", target, b'{"type": "alert", "message": "look", "source": "user:anonymous"}'
    )
    assert typed.status == 200


def test_metric_keys_outside_the_names_alphabet_are_refused(client: Client) -> None:
    """`keys` takes the characters of metric names and commas only (so its longest form fits a request line)."""
    run_id = client.register_run(RunRegistration(name="alphabet")).run_id
    answer = raw_request(client.server, "GET", f"/api/v1/runs/{run_id}/metrics?keys={quote('loss,é')}")
    assert answer.status == 422 and [d.field for d in answer.error.details] == ["keys"]
