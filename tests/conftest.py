"""Shared fixtures: a real server on a loopback port with a fresh store per test (SQLite, or PostgreSQL too)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from control_server.config import ServerConfig
from protocols.client import Client
from tests.postgres import LocalPostgres
from tests.serving import ServerThread

STORES = ("sqlite", pytest.param("postgres", marks=pytest.mark.slow))
"""The stores `both_stores` tests run on; those on PostgreSQL need the session's cluster, so the fast loop skips
them."""
_databases = itertools.count()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "both_stores: run the module's server tests on SQLite and on PostgreSQL")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked `both_stores` run once per store."""
    if metafunc.definition.get_closest_marker("both_stores") and "store_kind" in metafunc.fixturenames:
        metafunc.parametrize("store_kind", STORES, indirect=True)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[LocalPostgres]:
    """One throwaway PostgreSQL cluster for the whole session, owned by an unprivileged user, removed at the end."""
    cluster = LocalPostgres(fast=True).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def store_kind(request: pytest.FixtureRequest) -> str:
    """The store the test's server uses: SQLite unless the test is parametrized over both."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
def store_db(store_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Path | str:
    """A fresh store for one server: a SQLite file, or an empty database in the session's cluster."""
    if store_kind == "postgres":
        cluster: LocalPostgres = request.getfixturevalue("postgres_cluster")
        return cluster.create_database(f"test_{next(_databases)}")
    return tmp_path / "runsteer.db"


@pytest.fixture
def server(store_db: Path | str) -> Iterator[ServerThread]:
    """A real server on 127.0.0.1 with a temporary store."""
    running = ServerThread(ServerConfig(port=0, db=store_db, heartbeat_timeout_s=30.0)).start()
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
