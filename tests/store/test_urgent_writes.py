"""Urgent writes (a command's) are committed ahead of the ordinary writes queued before them, in groups of their own."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from control_server.store import Db, make_store


@pytest.mark.both_stores
def test_an_urgent_write_commits_before_the_ordinary_writes_queued_ahead_of_it(store_db: Path | str) -> None:
    """While the writer is busy, 50 ordinary writes and then an urgent one are queued: the urgent one runs next, in a
    group of its own, and the ordinary ones after it, in the order they came."""
    store = make_store(store_db)
    store.open()
    ran: list[tuple[str, int]] = []
    started, release = threading.Event(), threading.Event()

    def blocker(db: Db) -> None:
        started.set()
        release.wait(10)

    def named(name: str) -> Callable[[Db], None]:
        def op(db: Db) -> None:
            ran.append((name, store.commits))

        return op

    async def crowd() -> None:
        busy = asyncio.ensure_future(store.write(blocker))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        ordinary = [asyncio.ensure_future(store.write(named(f"o{index}"))) for index in range(50)]
        urgent = asyncio.ensure_future(store.write(named("urgent"), urgent=True))
        await asyncio.sleep(0.05)  # every write is in the writer's queue
        release.set()
        await asyncio.gather(busy, urgent, *ordinary)

    try:
        asyncio.run(crowd())
    finally:
        store.close()
    assert [name for name, _ in ran] == ["urgent", *(f"o{index}" for index in range(50))]
    assert ran[0][1] < ran[1][1], "the urgent write was committed in a group of its own"
