"""The websocket stream: fan-out to many readers, a never-reading client closed as too slow, submits over the socket."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from control_server.config import ServerConfig
from protocols import (
    CLOSE_SLOW_CONSUMER,
    CommandEnvelope,
    CommandEvent,
    LogEvent,
    LogReport,
    MetricsBatch,
    MetricsEvent,
    MetricsSample,
    NotFound,
    Pause,
    RequestRejected,
    RunEvent,
    RunRegistration,
    SetDataMix,
    SetHparams,
    StreamReply,
    StreamSubmit,
)
from protocols.client import AsyncClient, Client
from protocols.client.aio import AsyncEventStream
from tests.polling import wait_until
from tests.server.helpers import raw_request, register
from tests.serving import ServerThread

READERS = 50
SLOW_QUEUE = 4
BULK_SAMPLES = 10_000
"""Samples per bulky event (about 0.7 MB of JSON): a handful fill a never-reading client's socket buffers."""


@pytest.fixture
def small_queue_server(tmp_path: Path) -> Iterator[ServerThread]:
    """A server that closes a websocket client once SLOW_QUEUE events wait unsent for it."""
    config = ServerConfig(port=0, db=tmp_path / "runsteer.db", subscriber_queue=SLOW_QUEUE, heartbeat_timeout_s=600)
    running = ServerThread(config).start()
    yield running
    running.stop()


def scrape(url: str) -> dict[str, float]:
    """Unlabelled samples of the server's Prometheus exposition, by sample name."""
    text = raw_request(url, "GET", "/metrics").body.decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


class NeverReader:
    """A websocket client on a raw socket with a tiny receive buffer that reads nothing until told to."""

    def __init__(self, port: int, path: str) -> None:
        self.socket = socket.socket()
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.socket.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.socket.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.socket.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head
        self._buffer = b""

    def read_until_close(self, timeout_s: float = 10.0) -> tuple[int, str, int]:
        """Read every frame the server had queued up to its close frame: (close code, reason, data frames before)."""
        self.socket.settimeout(timeout_s)
        frames = 0
        while True:
            opcode, payload = self._frame()
            if opcode == 0x8:
                (code,) = struct.unpack(">H", payload[:2])
                return code, payload[2:].decode(), frames
            frames += 1

    def close(self) -> None:
        self.socket.close()

    def _frame(self) -> tuple[int, bytes]:
        header = self._take(2)
        opcode, length = header[0] & 0x0F, header[1] & 0x7F
        if length == 126:
            (length,) = struct.unpack(">H", self._take(2))
        elif length == 127:
            (length,) = struct.unpack(">Q", self._take(8))
        return opcode, self._take(length)

    def _take(self, size: int) -> bytes:
        while len(self._buffer) < size:
            chunk = self.socket.recv(1 << 16)
            if not chunk:
                raise EOFError("the server closed the connection without a close frame")
            self._buffer += chunk
        taken, self._buffer = self._buffer[:size], self._buffer[size:]
        return taken


async def poll_until(probe, timeout_s: float = 10.0, what: str = ""):  # type: ignore[no-untyped-def]
    """Poll `probe` on the event loop until it is truthy."""
    deadline = time.monotonic() + timeout_s
    while not (value := probe()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)
    return value


async def test_fifty_readers_get_every_event_in_order_while_a_never_reader_is_closed_as_too_slow(
    small_queue_server: ServerThread,
) -> None:
    """Readers see every event, gap-free, in order; the never-reader is closed with 4008 and a reason; REST stays quick.

    The never-reader follows every run, so bulky metrics on a second run fill its socket buffers quickly
    without making the fifty readers of the first run parse megabytes.
    """
    url = small_queue_server.url
    async with AsyncClient(url) as rest, AsyncClient(url) as watchers:
        run_id = (await rest.register_run(RunRegistration(name="watched"))).run_id
        bulk_run = (await rest.register_run(RunRegistration(name="bulk"))).run_id
        received: list[list[MetricsEvent | LogEvent]] = [[] for _ in range(READERS)]

        async def read(stream: AsyncEventStream, into: list[MetricsEvent | LogEvent]) -> None:
            async for event in stream:
                assert isinstance(event, MetricsEvent | LogEvent), event
                into.append(event)
                if isinstance(event, LogEvent):
                    return

        streams = [watchers.stream(run_id) for _ in range(READERS)]
        for stream in streams:
            await stream.__aenter__()
        slow = NeverReader(small_queue_server.port, "/api/v1/stream")
        try:
            await poll_until(
                lambda: scrape(url)["runsteer_websocket_clients"] == READERS + 1, what="every client subscribed"
            )
            readers = [asyncio.create_task(read(stream, into)) for stream, into in zip(streams, received, strict=True)]
            bulk = MetricsBatch(
                samples=[MetricsSample(step=i, time=1.0, values={"loss": 1.0}) for i in range(BULK_SAMPLES)]
            )
            pushed = 0
            rest_latencies: list[float] = []
            dropped_after = 0
            while not dropped_after or pushed < dropped_after + 5:
                sample = MetricsSample(step=pushed, time=1.0, values={"loss": 1.0 / (1 + pushed)})
                await rest.push_metrics(run_id, MetricsBatch(samples=[sample]))
                pushed += 1
                if not dropped_after:
                    await rest.push_metrics(bulk_run, bulk)
                await poll_until(
                    lambda n=pushed: min(len(r) for r in received) >= n, what=f"event {pushed} at every reader"
                )
                started = time.monotonic()
                await rest.get_run(run_id)
                rest_latencies.append(time.monotonic() - started)
                if not dropped_after and scrape(url)["runsteer_websocket_clients_dropped_total"] == 1:
                    dropped_after = pushed
                    closing = asyncio.create_task(asyncio.to_thread(slow.read_until_close))
                assert pushed < 200, "the never-reading client was never closed"
            await rest.push_reports(run_id, [LogReport(message="done")])
            await asyncio.wait_for(asyncio.gather(*readers), 30)
            code, reason, frames_before_close = await asyncio.wait_for(closing, 30)
            remaining = scrape(url)["runsteer_websocket_clients"]
        finally:
            slow.close()
            for stream in streams:
                await stream.close()

    assert code == CLOSE_SLOW_CONSUMER
    assert "too slow" in reason and str(SLOW_QUEUE) in reason
    assert frames_before_close < 2 * dropped_after, "the never-reader was sent events after it was dropped"
    assert remaining == READERS
    for events in received:
        assert [type(event) for event in events] == [MetricsEvent] * pushed + [LogEvent]
        assert [event.samples[0].step for event in events[:-1]] == list(range(pushed))
        ids = [event.event_id for event in events]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert received.count(received[0]) == READERS, "every reader saw the same events"
    assert max(rest_latencies) < 1.0, f"REST slowed down: {max(rest_latencies):.3f} s"


def test_a_never_reader_of_a_runs_own_stream_is_closed_as_too_slow(small_queue_server: ServerThread) -> None:
    """On a run's stream too, a client that stops reading is closed with 4008 once its queue overflows."""
    with Client(small_queue_server.url) as client:
        run_id = register(client, "ignored")
        slow = NeverReader(small_queue_server.port, f"/api/v1/runs/{run_id}/stream")
        try:
            wait_until(lambda: scrape(small_queue_server.url)["runsteer_websocket_clients"] == 1, what="subscribed")
            bulk = MetricsBatch(
                samples=[MetricsSample(step=i, time=1.0, values={"loss": 1.0}) for i in range(BULK_SAMPLES)]
            )
            pushes = 0
            while scrape(small_queue_server.url)["runsteer_websocket_clients_dropped_total"] == 0:
                client.push_metrics(run_id, bulk)
                pushes += 1
                assert pushes < 100, "the never-reading client was never closed"
            code, reason, frames = slow.read_until_close()
        finally:
            slow.close()
        assert client.get_run(run_id).status == "running"
    assert code == CLOSE_SLOW_CONSUMER and "too slow" in reason
    assert frames <= pushes - SLOW_QUEUE


def test_a_command_submitted_over_the_stream_is_stored_and_its_event_follows(client: Client) -> None:
    """StreamSubmit → StreamReply with the stored record; the queued command event arrives on the same stream."""
    run_id = register(client)
    with client.stream(run_id) as stream:
        record = stream.submit(CommandEnvelope(command=SetHparams(lr=0.003), source="script:ws", reason="over ws"))
        event = stream.next_event(timeout_s=5)
    assert record.status == "queued" and record.source == "script:ws"
    assert isinstance(event, CommandEvent) and event.record == record
    assert client.get_command(run_id, record.id) == record


def test_a_refused_submit_over_the_stream_gets_an_error_reply_naming_the_field(client: Client) -> None:
    """A policy refusal over the socket comes back as a StreamReply error with the field and allowed values."""
    run_id = register(client, domains=["web"])
    with client.stream(run_id) as stream:
        with pytest.raises(RequestRejected) as refused:
            stream.submit(CommandEnvelope(command=SetDataMix(weights={"math": 1.0})))
    assert refused.value.body is not None and refused.value.body.error == "policy_violation"
    assert [(d.field, d.allowed) for d in refused.value.details] == [("command.weights.math", "web")]
    assert client.list_commands(run_id) == []


async def test_garbage_and_binary_frames_get_error_replies_and_harm_no_one(server: ServerThread) -> None:
    """Non-JSON text, a wrong-shaped message and a binary frame each get an error reply; the socket and others go on."""
    async with AsyncClient(server.url) as client, aiohttp.ClientSession() as session:
        run_id = (await client.register_run(RunRegistration(name="garbage"))).run_id
        async with client.stream(run_id) as bystander:
            socket_ = await session.ws_connect(f"{server.url.replace('http', 'ws')}/api/v1/runs/{run_id}/stream")
            try:
                await socket_.send_str("this is not json")
                not_json = StreamReply.model_validate_json(await socket_.receive_str(timeout=5))
                await socket_.send_str('{"op": "submit", "envelope": {"command": {"type": "warp"}}}')
                bad_shape = StreamReply.model_validate_json(await socket_.receive_str(timeout=5))
                await socket_.send_bytes(b"\x00\xff\x00")
                binary = StreamReply.model_validate_json(await socket_.receive_str(timeout=5))
                good = StreamSubmit(ref="ok-1", envelope=CommandEnvelope(command=Pause()))
                await socket_.send_str(good.model_dump_json())
                messages = [await socket_.receive_str(timeout=5) for _ in range(2)]
            finally:
                await socket_.close()
            seen = await asyncio.wait_for(bystander.next_event(), 5)

    assert not_json.error is not None and not_json.error.error == "malformed_json"
    assert not_json.error.details[0].message.startswith("Invalid JSON")
    assert bad_shape.error is not None and bad_shape.error.details[0].field == "envelope.command"
    assert binary.error is not None and binary.error.error == "bad_frame"
    replies = [StreamReply.model_validate_json(m) for m in messages if '"op":"reply"' in m]
    assert len(replies) == 1 and replies[0].ref == "ok-1" and replies[0].record is not None
    assert isinstance(seen, CommandEvent) and seen.record == replies[0].record


SAME_INPUTS = {
    "not-json": "this is not json",
    "unknown-type": '{"command": {"type": "warp"}}',
    "negative-lr": '{"command": {"type": "set_hparams", "lr": -1}}',
    "unknown-domain": '{"command": {"type": "set_data_mix", "weights": {"math": 1.0}}}',
    "bad-source": '{"command": {"type": "pause"}, "source": "robot"}',
}
"""Refused envelopes, each sent both to `POST .../commands` and over the run's stream."""


@pytest.mark.parametrize("text", SAME_INPUTS.values(), ids=SAME_INPUTS.keys())
async def test_the_streams_submit_door_answers_exactly_as_rest_does(server: ServerThread, text: str) -> None:
    """The same bad envelope gets the same error body (code, message, fields, allowed values) over the socket as
    over REST, and neither stores a command."""
    async with AsyncClient(server.url) as client, aiohttp.ClientSession() as session:
        run_id = (await client.register_run(RunRegistration(name="doors", domains=["web"]))).run_id
        rest = await asyncio.to_thread(
            raw_request, server.url, "POST", f"/api/v1/runs/{run_id}/commands", text.encode()
        )
        socket_ = await session.ws_connect(f"{server.url.replace('http', 'ws')}/api/v1/runs/{run_id}/stream")
        try:
            await socket_.send_str(text)
            reply = StreamReply.model_validate_json(await socket_.receive_str(timeout=5))
        finally:
            await socket_.close()
        assert await client.list_commands(run_id) == []
    assert rest.status in (400, 422) and reply.error == rest.error


def test_the_all_runs_stream_carries_every_runs_events_and_refuses_submits(client: Client) -> None:
    """`/api/v1/stream` follows runs registered after it opened; submitting there is answered with an error."""
    with client.stream() as everything:
        first, second = register(client, "first"), register(client, "second")
        client.push_metrics(first, MetricsBatch(samples=[MetricsSample(step=1, time=1.0, values={"loss": 1.0})]))
        client.submit(second, Pause())
        events = [everything.next_event(timeout_s=5) for _ in range(4)]
        with pytest.raises(RequestRejected) as refused:
            everything.submit(CommandEnvelope(command=Pause()))
    assert [(type(e).__name__, e.run_id) for e in events if e is not None] == [
        ("RunEvent", first),
        ("RunEvent", second),
        ("MetricsEvent", first),
        ("CommandEvent", second),
    ]
    assert all(isinstance(e, RunEvent | MetricsEvent | CommandEvent) for e in events)
    assert "run's stream" in str(refused.value)


def test_the_stream_of_an_unknown_run_is_refused_with_404(client: Client) -> None:
    """Opening a stream for a run that does not exist fails the handshake with 404."""
    with pytest.raises(NotFound) as refused:
        client.stream("no-such-run")
    assert refused.value.status == 404
