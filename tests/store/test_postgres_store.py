"""The PostgreSQL store keeps the SQLite store's promises: committed before the answer, one failing op undoes only
itself, a newer schema is refused, and a second store on the same database waits until the first closes."""

from __future__ import annotations

import asyncio
import threading
import time

import psycopg
import pytest

from control_server.postgres import SCHEMA_VERSION, PostgresStore
from control_server.store import Db, describe_store
from tests.postgres import LocalPostgres


def insert_run(run_id: str) -> object:
    def op(db: Db) -> str:
        db.execute("INSERT INTO runs (run_id, created_at, body) VALUES (?, ?, ?)", (run_id, time.time(), "{}"))
        return run_id

    return op


def test_a_write_is_committed_when_it_returns_and_a_failing_op_undoes_only_itself(
    postgres_cluster: LocalPostgres,
) -> None:
    """Ops sharing a group: the duplicate insert fails alone, the others are visible to a fresh connection."""
    url = postgres_cluster.create_database("pg_group")
    store = PostgresStore(url)
    store.open()
    try:

        async def group() -> list[object]:
            return await asyncio.gather(
                *(store.write(insert_run(name)) for name in ("a", "b", "a", "c")),  # type: ignore[arg-type]
                return_exceptions=True,
            )

        outcomes = asyncio.run(group())
        with psycopg.connect(url) as other:
            stored = {row[0] for row in other.execute("SELECT run_id FROM runs")}
    finally:
        store.close()
    assert stored == {"a", "b", "c"}
    assert [type(outcome).__name__ for outcome in outcomes].count("UniqueViolation") == 1


def test_a_database_of_a_newer_schema_is_refused(postgres_cluster: LocalPostgres) -> None:
    """A server never writes tables it does not know; it says which versions disagree."""
    url = postgres_cluster.create_database("pg_newer")
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("CREATE TABLE runsteer_schema (version INTEGER NOT NULL)")
        connection.execute("INSERT INTO runsteer_schema VALUES (%s)", (SCHEMA_VERSION + 1,))
    store = PostgresStore(url)
    with pytest.raises(RuntimeError, match=f"schema {SCHEMA_VERSION + 1}; this one reads {SCHEMA_VERSION}"):
        store.open()
    store.close()


def test_a_second_store_stands_by_until_the_first_closes(postgres_cluster: LocalPostgres) -> None:
    """Only one store serves a database at a time; the other opens the moment the first lets go."""
    url = postgres_cluster.create_database("pg_standby")
    first, second = PostgresStore(url), PostgresStore(url)
    first.open()
    opened = threading.Event()
    waiter = threading.Thread(target=lambda: (second.open(), opened.set()))
    waiter.start()
    try:
        assert not opened.wait(1.5), "the second store must wait while the first serves"
        first.close()
        assert opened.wait(10), "the second store takes over once the first closes"
    finally:
        first.close()
        waiter.join(10)
        second.close()


def test_the_logged_store_url_hides_the_password() -> None:
    """`runsteer server` logs where it stores; a PostgreSQL password never reaches the log."""
    assert (
        describe_store("postgresql://runsteer:s3cret@db:5432/runsteer") == "postgresql://runsteer:***@db:5432/runsteer"
    )
    assert describe_store("postgresql://runsteer@db/runsteer") == "postgresql://runsteer@db/runsteer"
