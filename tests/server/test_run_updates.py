"""Concurrent changes to one run never overwrite each other."""

from __future__ import annotations

import asyncio

import pytest

from protocols import Heartbeat, Policy, RateLimit, RunRegistration, RunState
from protocols.client import AsyncClient
from tests.serving import ServerThread

pytestmark = pytest.mark.both_stores


async def test_a_policy_set_while_heartbeats_arrive_is_kept(server: ServerThread) -> None:
    """Heartbeats racing a policy change (each a read-modify-write around a commit) do not bring the old policy back."""
    async with AsyncClient(server.url) as client:
        run_id = (await client.register_run(RunRegistration(name="racing"))).run_id
        policy = Policy(rate_limit=RateLimit(max_commands=1000, per_seconds=60.0))
        heartbeats = [client.push_reports(run_id, [Heartbeat(state=RunState(step=step))]) for step in range(40)]
        await asyncio.gather(*heartbeats[:20], client.set_policy(run_id, policy), *heartbeats[20:])
        run = await client.get_run(run_id)
    assert run.policy == policy
