"""The newest step seen in metrics is never put back by a heartbeat that was committing meanwhile."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from control_server.auth import LOCAL_ADMIN
from control_server.events import EventLog
from control_server.fanout import Broadcaster
from control_server.runs import RunRegistry
from control_server.store import SqliteStore
from protocols import Heartbeat, Policy, RunRegistration, RunState


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[RunRegistry]:
    store = SqliteStore(tmp_path / "runsteer.db")
    store.open()
    try:
        yield RunRegistry(store, EventLog(store, Broadcaster(64)), default_policy=Policy(), heartbeat_timeout_s=30.0)
    finally:
        await asyncio.get_running_loop().run_in_executor(None, store.close)


async def test_a_step_noted_while_a_heartbeat_commits_survives_the_heartbeat(registry: RunRegistry) -> None:
    """A heartbeat for step 10 reads the run, then waits on its commit; metrics for step 20 arrive meanwhile; when
    the heartbeat's commit lands the run is still at step 20 (the two take turns under the run's lock)."""
    run, _ = await registry.register(RunRegistration(name="racing"), LOCAL_ADMIN)
    write = registry.store.write
    committing, release = asyncio.Event(), asyncio.Event()

    async def slow_write(op: Callable[[Any], Any], **options: Any) -> Any:
        committing.set()
        await release.wait()
        return await write(op, **options)

    registry.store.write = slow_write  # type: ignore[method-assign]
    heartbeat = asyncio.create_task(registry.apply_reports(run.run_id, [Heartbeat(state=RunState(step=10))]))
    await committing.wait()

    metrics = asyncio.create_task(registry.note_step(run.run_id, "main", 20))
    await asyncio.sleep(0.05)
    release.set()
    await asyncio.gather(heartbeat, metrics)
    assert registry.get(run.run_id).step == 20
