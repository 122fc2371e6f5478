"""Submitting over a run's stream needs the scope the route table gives `POST .../commands`, refused alike."""

from __future__ import annotations

import pytest

from protocols import CommandEnvelope, Pause
from protocols.errors import RunsteerError
from tests.server.test_auth import client_for, prepare, secured
from tests.serving import ServerThread

__all__ = ["secured"]


@pytest.mark.parametrize(("caller", "source"), [("reader", "user:reader"), ("operator", "user:alice")])
def test_a_refused_submit_gets_the_same_error_body_over_the_stream_as_over_rest(
    secured: ServerThread, caller: str, source: str
) -> None:
    """A token without the `command` scope, or acting under another name, gets the same refusal both ways."""
    fixture = prepare(secured)
    envelope = CommandEnvelope(command=Pause(), source=source)
    with client_for(secured, caller) as client:
        with pytest.raises(RunsteerError) as over_rest:
            client.submit(fixture.run_id, envelope)
        with client.stream(fixture.run_id) as events, pytest.raises(RunsteerError) as over_stream:
            events.submit(envelope)
    assert over_rest.value.body is not None and over_rest.value.body == over_stream.value.body
