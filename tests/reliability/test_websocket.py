"""Huge websocket frames are refused without harming other clients (garbage and binary frames:
tests/server/test_stream.py::test_garbage_and_binary_frames_get_error_replies_and_harm_no_one)."""

from __future__ import annotations

import contextlib

import aiohttp
import pytest

from control_server.routes import MAX_STREAM_MESSAGE
from protocols import MetricsBatch, MetricsSample, RunRegistration
from protocols.client import AsyncClient
from tests.serving import ServerThread


@pytest.mark.parametrize("size", [MAX_STREAM_MESSAGE + 1, 16 * 2**20], ids=["just-over", "16MiB"])
@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
async def test_a_huge_frame_closes_only_its_sender_and_other_watchers_keep_every_event(
    server: ServerThread, binary: bool, size: int
) -> None:
    """A frame over the limit closes that socket: 1009 (message too big), or cut mid-send (1006) when far over;
    a watcher beside it misses nothing."""
    async with AsyncClient(server.url) as client:
        run_id = (await client.register_run(RunRegistration(name="huge"))).run_id
        url = f"{server.url}/api/v1/runs/{run_id}/stream"
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as watcher:
            async with session.ws_connect(url) as attacker:
                huge = b"x" * size
                with contextlib.suppress(ConnectionError):  # the server may cut the socket before the frame is sent
                    await (attacker.send_bytes(huge) if binary else attacker.send_str(huge.decode()))
                closing = await attacker.receive(timeout=10)
                assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
                cut = (aiohttp.WSCloseCode.ABNORMAL_CLOSURE,) if size > 4 * MAX_STREAM_MESSAGE else ()
                assert attacker.close_code in (aiohttp.WSCloseCode.MESSAGE_TOO_BIG, *cut)
            for step in range(20):
                sample = MetricsSample(step=step, time=1.0, values={"loss": float(step)})
                await client.push_metrics(run_id, MetricsBatch(samples=[sample]))
            steps: list[int] = []
            while len(steps) < 20:
                message = await watcher.receive(timeout=10)
                event = message.json()
                if event["kind"] == "metrics":
                    steps += [sample["step"] for sample in event["samples"]]
            assert steps == list(range(20))
            assert not watcher.closed
