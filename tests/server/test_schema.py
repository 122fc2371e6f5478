"""The wire protocol's JSON Schema: printed by `runsteer schema`, served by the API, kept as a committed snapshot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

import protocols
from protocols.client import Client
from protocols.schema import protocol_schema
from tests.server.helpers import raw_request

SNAPSHOT = Path(protocols.__file__).parent / "schema.json"
REGENERATE = "python -m protocols.entry schema > protocols/schema.json"


def validator_for(schema: dict[str, Any], definition: str) -> jsonschema.Draft202012Validator:
    """A validator of one `$defs` entry of the protocol schema."""
    return jsonschema.Draft202012Validator({"$ref": f"#/$defs/{definition}", "$defs": schema["$defs"]})


def test_runsteer_schema_prints_a_valid_json_schema_of_the_protocol() -> None:
    """The command's output is a Draft 2020-12 schema equal to the generated one."""
    printed = subprocess.run(
        [sys.executable, "-m", "protocols.entry", "schema"], capture_output=True, text=True, timeout=60, check=True
    )
    schema = json.loads(printed.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema == protocol_schema()
    assert {"Command", "CommandEnvelope", "CommandRecord", "Event", "ErrorBody", "Policy"} <= set(schema["$defs"])


@pytest.mark.parametrize(
    ("envelope", "valid"),
    [
        pytest.param({"command": {"type": "set_hparams", "lr": 0.001}, "source": "agent:rules"}, True, id="good"),
        pytest.param({"command": {"type": "set_hparams", "lr": -1}}, False, id="negative-lr"),
        pytest.param({"command": {"type": "warp"}}, False, id="unknown-type"),
        pytest.param({"command": {"type": "pause"}, "extra": 1}, False, id="extra-field"),
    ],
)
def test_the_schema_accepts_what_the_server_accepts(envelope: dict[str, Any], valid: bool) -> None:
    """A third party validating with the schema alone agrees with the models on these envelopes."""
    validator = validator_for(protocol_schema(), "CommandEnvelope")
    assert validator.is_valid(envelope) is valid


def test_the_committed_schema_snapshot_matches_the_models() -> None:
    """protocols/schema.json is what the models generate; a change to the wire contract must update it."""
    committed = json.loads(SNAPSHOT.read_text())
    generated = protocol_schema()
    changed = sorted(
        name
        for name in set(committed["$defs"]) | set(generated["$defs"])
        if committed["$defs"].get(name) != generated["$defs"].get(name)
    )
    assert committed == generated, (
        f"protocols/schema.json is out of date (changed definitions: {', '.join(changed) or 'top level'}); "
        f"if the wire change is intended, regenerate it with `{REGENERATE}` and commit it"
    )


def test_the_server_serves_the_same_schema(client: Client) -> None:
    """`GET /api/v1/schema` is public and returns the generated schema."""
    answer = raw_request(client.server, "GET", "/api/v1/schema")
    assert answer.status == 200
    assert answer.json() == protocol_schema()


def test_the_schema_says_what_makes_a_checkpoint_unhealthy_and_nothing_that_does_not_happen() -> None:
    """The LLM agent reads these texts: a checkpoint is unhealthy when a NaN or infinite metric came since the one
    before it; nothing else (no flag) marks it."""
    definitions = protocol_schema()["$defs"]
    healthy = definitions["CheckpointInfo"]["properties"]["healthy"]["description"]
    latest_healthy = definitions["Rollback"]["properties"]["latest_healthy"]["description"]
    for text in (healthy, latest_healthy):
        assert "NaN or infinite" in text and "flag" not in text, text
