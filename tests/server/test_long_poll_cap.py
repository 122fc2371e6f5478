"""Every waiting request is held at most the server's long-poll cap, whatever wait it asked for."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from control_server.config import ServerConfig
from protocols.client import Client
from protocols.commands import CommandEnvelope, Pause
from protocols.records import RunRegistration
from tests.server.helpers import raw_request
from tests.serving import ServerThread

CAP_S = 0.3


@pytest.fixture
def capped(tmp_path: Path) -> Iterator[ServerThread]:
    """A server whose long-poll cap is short."""
    running = ServerThread(ServerConfig(port=0, db=tmp_path / "runsteer.db", long_poll_max_s=CAP_S)).start()
    yield running
    running.stop()


def test_waiting_for_an_unfinished_command_is_held_no_longer_than_the_cap(capped: ServerThread) -> None:
    """`GET .../commands/{id}?wait=20` on a command nobody answers returns it still queued after about the cap, as
    the trainer's long-poll does, instead of holding the connection for the 20 s asked."""
    with Client(capped.url) as client:
        run_id = client.register_run(RunRegistration(name="capped")).run_id
        record = client.submit(run_id, CommandEnvelope(command=Pause(), source="user:ann"))
        started = time.monotonic()
        answer = raw_request(capped.url, "GET", f"/api/v1/runs/{run_id}/commands/{record.id}?wait=20")
        held = time.monotonic() - started
    assert answer.status == 200 and json.loads(answer.body)["status"] == "queued"
    assert CAP_S * 0.8 <= held < 5.0
