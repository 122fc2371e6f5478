"""The reference clients take several server URLs and move on past one that refuses connections."""

from __future__ import annotations

import asyncio

from protocols import RunRegistration
from protocols.client import AsyncClient, Client
from tests.postgres import free_port
from tests.serving import ServerThread


def test_sync_client_and_its_stream_fail_over_to_the_server_that_listens(server: ServerThread) -> None:
    """Requests and the websocket stream go to the second URL when nothing listens at the first."""
    servers = f"http://127.0.0.1:{free_port()},{server.url}"
    with Client(servers) as client:
        run = client.register_run(RunRegistration(name="failover"))
        assert client.server == server.url
        assert [listed.run_id for listed in client.list_runs()] == [run.run_id]
    with Client(servers) as fresh, fresh.stream(run.run_id) as events:
        assert fresh.server == server.url
        fresh.submit(run.run_id, {"type": "pause"})
        assert next(iter(events)).kind == "command"


def test_async_client_and_its_stream_fail_over_to_the_server_that_listens(server: ServerThread) -> None:
    """The asyncio twin does the same."""

    async def scenario() -> tuple[str, str, str]:
        servers = f"http://127.0.0.1:{free_port()},{server.url}"
        async with AsyncClient(servers) as client:
            run = await client.register_run(RunRegistration(name="failover"))
        async with AsyncClient(servers) as client, client.stream(run.run_id) as events:
            await client.submit(run.run_id, {"type": "pause"})
            async for event in events:
                return client.server, event.kind, run.run_id
        raise AssertionError("the stream ended")

    used, kind, _ = asyncio.run(scenario())
    assert used == server.url
    assert kind == "command"
