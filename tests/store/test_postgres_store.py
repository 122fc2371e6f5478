"""The PostgreSQL store keeps the SQLite store's promises: committed before the answer, one failing op undoes only
itself, a newer schema is refused, and two stores on one database decide for a run one after the other."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from control_server.postgres import SCHEMA, SCHEMA_VERSION, PostgresStore
from control_server.series import SeriesCache
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


class Refused(Exception):
    """An op's own refusal (a rate limit, an unknown command)."""


def test_a_pipelined_group_runs_each_op_once_unless_one_fails_after_writing(postgres_cluster: LocalPostgres) -> None:
    """One group of ops: a refusal before any write fails alone and the others run once; an op failing after it
    wrote is undone by running the group again op by op, where only it fails and the others are committed."""
    url = postgres_cluster.create_database("pg_pipelined")
    store = PostgresStore(url)
    store.open()
    calls: dict[str, int] = {}

    def op(run_id: str, *, refuse: str = "") -> Callable[[Db], str]:
        def run(db: Db) -> str:
            calls[run_id] = calls.get(run_id, 0) + 1
            assert db.execute("SELECT COUNT(*) FROM runs WHERE run_id = ?", (run_id,)).fetchone() == (0,)
            if refuse == "before":
                raise Refused(run_id)
            db.execute("INSERT INTO runs (run_id, created_at, body) VALUES (?, ?, ?)", (run_id, time.time(), "{}"))
            if refuse == "after":
                raise Refused(run_id)
            return run_id

        return run

    async def group(ops: list[Callable[[Db], str]]) -> list[object]:
        """Run `ops` as one group: queued while the writer is held by an op that waits for them."""
        release = threading.Event()
        hold = asyncio.ensure_future(store.write(lambda db: release.wait(5)))
        await asyncio.sleep(0.05)
        writes = asyncio.gather(*(store.write(one) for one in ops), return_exceptions=True)
        await asyncio.sleep(0.05)
        release.set()
        await hold
        return await writes

    try:
        first = asyncio.run(group([op("a"), op("b", refuse="before"), op("c")]))
        first_calls = dict(calls)
        calls.clear()
        second = asyncio.run(group([op("d"), op("e", refuse="after"), op("f")]))
        with psycopg.connect(url) as other:
            stored = {row[0] for row in other.execute("SELECT run_id FROM runs")}
    finally:
        store.close()
    assert [str(outcome) for outcome in first] == ["a", "b", "c"] and isinstance(first[1], Refused)
    assert first_calls == {"a": 1, "b": 1, "c": 1}
    assert [str(outcome) for outcome in second] == ["d", "e", "f"] and isinstance(second[1], Refused)
    assert calls == {"d": 2, "e": 2, "f": 1}  # the pipelined pass stopped at "e"
    assert stored == {"a", "c", "d", "f"}


def test_the_pipelined_writer_sends_and_reads_back_every_kind_of_value(postgres_cluster: LocalPostgres) -> None:
    """Text with quotes and backslashes (in run ids too: they travel as an array to the run locks), every byte, floats,
    big integers and NULL go through the writer's pipeline and come back as sent; a statement PostgreSQL refuses
    fails its op alone, and the next groups still run."""
    url = postgres_cluster.create_database("pg_values")
    store = PostgresStore(url)
    store.open()
    odd = 'r "1", {a\\b}'
    blob = bytes(range(256))

    def roundtrip(db: Db) -> tuple[object, ...]:
        db.execute("INSERT INTO runs (run_id, created_at, body) VALUES (?, ?, ?)", (odd, 0.1, "é ' \" ?"))
        db.execute("INSERT INTO metric_steps VALUES (?, ?, ?, ?, ?)", (2**62, -1, 1e-300, 7, blob))
        db.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?)", (1, odd, "log", 2.5, "{}"))
        run = db.execute("SELECT run_id, created_at, body FROM runs").fetchone()
        step = db.execute("SELECT series_id, step, time, packed FROM metric_steps").fetchone()
        missing = db.execute("SELECT MAX(step) FROM metric_steps WHERE series_id = ?", (1,)).fetchone()
        return (*run, *step, *missing)

    def refused(db: Db) -> None:
        db.execute("INSERT INTO no_such_table VALUES (?)", (1,))

    async def groups() -> list[object]:
        first = await asyncio.gather(
            store.write(roundtrip, run=odd), store.write(refused, run="x"), return_exceptions=True
        )
        return [*first, await store.write(lambda db: db.execute("SELECT COUNT(*) FROM runs").fetchone()[0])]

    try:
        values, error, count = asyncio.run(groups())
    finally:
        store.close()
    assert values == (odd, 0.1, "é ' \" ?", 2**62, -1, 1e-300, blob, None)
    assert isinstance(error, psycopg.errors.UndefinedTable)
    assert count == 1


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


def test_a_version_1_database_gains_command_times_and_the_event_sequence(postgres_cluster: LocalPostgres) -> None:
    """Opening a database of schema 1 fills `created_at` from the records and starts event ids above stored ones."""
    url = postgres_cluster.create_database("pg_v1")
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(SCHEMA)
        connection.execute("DROP SEQUENCE runsteer_event_ids")
        connection.execute("DROP INDEX commands_by_time")
        connection.execute("ALTER TABLE commands DROP COLUMN created_at")
        connection.execute(
            "CREATE TABLE runsteer_schema (version INTEGER NOT NULL); INSERT INTO runsteer_schema VALUES (1)"
        )
        connection.execute("INSERT INTO commands VALUES ('r', 'c-1', 1, 'applied', '{\"created_at\": 1234.5}')")
        connection.execute("INSERT INTO events VALUES (%s, 'r', 'log', 0, '{}')", (2**60,))
    store = PostgresStore(url)
    store.open()
    try:
        rows = store.read_now(lambda db: db.execute("SELECT id, created_at FROM commands").fetchall())
        next_id = store.read_now(lambda db: store.event_ids(db, 1))
    finally:
        store.close()
    assert rows == [("c-1", 1234.5)]
    assert next_id[0] > 2**60


def test_two_stores_deciding_for_one_run_take_turns_under_its_lock(postgres_cluster: LocalPostgres) -> None:
    """Two stores on one database both serve; ops that read the next number of a run and insert it, sent to both
    at once in groups that also lock other runs in other orders, get distinct gapless numbers and no deadlock."""
    url = postgres_cluster.create_database("pg_two")
    stores = [PostgresStore(url), PostgresStore(url)]
    for store in stores:
        store.open()

    def take_next(run_id: str) -> Callable[[Db], int]:
        def op(db: Db) -> int:
            number = int(db.execute("SELECT COUNT(*) FROM runs WHERE run_id LIKE ?", (f"{run_id}/%",)).fetchone()[0])
            time.sleep(0.001)  # widen the window between reading and writing
            db.execute("INSERT INTO runs (run_id, created_at, body) VALUES (?, ?, ?)", (f"{run_id}/{number}", 0, "{}"))
            return number

        return op

    async def crowd(store: PostgresStore, order: list[str]) -> list[int]:
        return await asyncio.gather(*(store.write(take_next(run), run=run) for _ in range(20) for run in order))

    async def both() -> list[list[int]]:
        loop = asyncio.get_running_loop()
        return await asyncio.gather(
            *(
                loop.run_in_executor(None, asyncio.run, crowd(store, order))
                for store, order in zip(stores, (["x", "y"], ["y", "x"]), strict=True)
            )
        )

    try:
        first, second = asyncio.run(both())
    finally:
        for store in stores:
            store.close()
    numbers = first[0::2] + second[1::2]  # the "x" ones
    assert sorted(numbers) == list(range(40))
    assert sorted(first[1::2] + second[0::2]) == list(range(40))


def test_the_logged_store_url_hides_the_password() -> None:
    """`runsteer server` logs where it stores; a PostgreSQL password never reaches the log."""
    assert (
        describe_store("postgresql://runsteer:s3cret@db:5432/runsteer") == "postgresql://runsteer:***@db:5432/runsteer"
    )
    assert describe_store("postgresql://runsteer@db/runsteer") == "postgresql://runsteer@db/runsteer"


def test_two_stores_creating_shared_keysets_in_opposite_orders_never_deadlock(postgres_cluster: LocalPostgres) -> None:
    """Keysets belong to no run, so no run lock orders their creation; without `lock_names` these two groups wait
    on each other's uncommitted rows and PostgreSQL aborts one."""
    url = postgres_cluster.create_database("pg_names")
    stores = [PostgresStore(url), PostgresStore(url)]
    for store in stores:
        store.open()
    both_started = threading.Barrier(2)

    def create(store: PostgresStore, order: list[tuple[str, ...]]) -> Callable[[Db], list[int]]:
        cache = SeriesCache(lock_names=store.lock_names)

        def op(db: Db) -> list[int]:
            first = cache.keyset_id(db, order[0])
            with contextlib.suppress(threading.BrokenBarrierError):  # broken: the other store waits for the lock
                both_started.wait(timeout=1)
            time.sleep(0.2)  # the other store is now inside its transaction too
            return [first, cache.keyset_id(db, order[1])]

        return op

    orders = ([("a",), ("b",)], [("b",), ("a",)])
    try:
        with ThreadPoolExecutor(2) as pool:
            first, second = pool.map(
                lambda pair: asyncio.run(pair[0].write(create(*pair))), zip(stores, orders, strict=True)
            )
    finally:
        for store in stores:
            store.close()
    assert first == second[::-1]
    with psycopg.connect(url) as db:
        assert db.execute("SELECT COUNT(*) FROM metric_keysets").fetchone() == (2,)
