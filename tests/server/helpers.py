"""Shared helpers for the server tests: registering runs, raw HTTP for malformed input, store row counts, polling."""

from __future__ import annotations

import http.client
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from protocols import ErrorBody, RunRegistration
from protocols.client import Client

T = TypeVar("T")

STORE_TABLES = ("commands", "metric_steps", "runs", "events", "checkpoints")
"""The store tables whose row counts tell whether a request stored anything."""


def register(client: Client, name: str = "run", **fields: Any) -> str:
    """Register a run and return its id."""
    return client.register_run(RunRegistration(name=name, **fields)).run_id


@dataclass(frozen=True)
class RawAnswer:
    """A response read without the reference client: status, headers and the decoded error body, if any."""

    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def error(self) -> ErrorBody:
        """The body as the protocol's ErrorBody (fails the test if it is not one)."""
        return ErrorBody.model_validate_json(self.body)

    def json(self) -> Any:
        return json.loads(self.body)


def raw_request(
    base_url: str,
    method: str,
    target: str,
    body: bytes | None = None,
    *,
    token: str | None = None,
    content_type: str = "application/json",
) -> RawAnswer:
    """One HTTP request on a fresh connection, for input the reference client would never send."""
    parts = urlsplit(base_url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        connection.request(method, target, body=body, headers=headers)
        response = connection.getresponse()
        return RawAnswer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


def row_counts(db: Path | str, tables: tuple[str, ...] = STORE_TABLES) -> dict[str, int]:
    """Rows per store table, read straight from the store (read-only, beside the server's connections)."""
    if isinstance(db, str) and db.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(db) as pg:
            return {table: pg.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in tables}  # type: ignore[index]
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return {table: connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in tables}
    finally:
        connection.close()
