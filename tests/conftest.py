"""Shared fixtures: a real server on a loopback port with a fresh SQLite file per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from control_server.config import ServerConfig
from protocols.client import Client
from tests.serving import ServerThread


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    """A real server on 127.0.0.1 with a temporary store."""
    running = ServerThread(ServerConfig(port=0, db=tmp_path / "runsteer.db", heartbeat_timeout_s=30.0)).start()
    yield running
    running.stop()


@pytest.fixture
def server_url(server: ServerThread) -> str:
    """Base URL of the test server."""
    return server.url


@pytest.fixture
def client(server_url: str) -> Iterator[Client]:
    """A blocking client of the test server."""
    with Client(server_url) as connected:
        yield connected
