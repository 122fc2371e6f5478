"""The asyncio client, on aiohttp: the same calls as `Client`, awaited."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import Any
from uuid import uuid4

import aiohttp

from protocols.client.core import (
    HttpRequest,
    Model,
    Requests,
    ServerList,
    auth_headers,
    decode,
    envelope_of,
    parse_stream_message,
    stream_url,
)
from protocols.commands import Command, CommandDecision, CommandEnvelope, CommandRecord, CommandResult
from protocols.constants import CommandStatus
from protocols.errors import ServerUnavailable, StreamClosed, error_for_status
from protocols.events import Event, StreamReply, StreamSubmit
from protocols.policy import Policy
from protocols.records import (
    AlertReport,
    CheckpointInfo,
    MetricsAck,
    MetricsBatch,
    MetricsHistory,
    RunInfo,
    RunRegistration,
    RunReport,
)


class AsyncClient:
    """Talks to a runsteer server from asyncio code; one aiohttp session per client."""

    def __init__(self, server: str = "http://127.0.0.1:8765", *, token: str | None = None) -> None:
        self.servers = ServerList(server)
        """Several URLs separated by commas: requests go to the first that accepts a connection."""
        self.token = token
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers={"Content-Type": "application/json", **auth_headers(self.token)},
                connector=aiohttp.TCPConnector(limit=64),
            )
        return self._session

    @property
    def server(self) -> str:
        """The base URL in use."""
        return self.servers.current

    async def send(self, request: HttpRequest[Model]) -> Model:
        """Send one request and decode its answer, failing over past servers that refuse the connection."""
        for attempt in range(len(self.servers.urls)):
            try:
                async with self._http().request(
                    request.method,
                    self.server + request.target,
                    data=request.body,
                    timeout=aiohttp.ClientTimeout(total=request.timeout_s),
                ) as response:
                    body = await response.read()
                    status = response.status
            except aiohttp.ClientConnectorError as exc:  # not connected: nothing was sent, another may take it
                if attempt == len(self.servers.urls) - 1:
                    raise ServerUnavailable(f"{self.server} unreachable: {exc!r}") from exc
                self.servers.fail_over()
                continue
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                raise ServerUnavailable(f"{self.server} unreachable: {exc!r}") from exc
            return decode(request, status, body)
        raise AssertionError("unreachable")

    async def register_run(self, registration: RunRegistration) -> RunInfo:
        """Register a run (or re-attach to `registration.run_id`)."""
        return await self.send(Requests.register_run(registration))

    async def list_runs(self) -> list[RunInfo]:
        """Every run, newest first."""
        return (await self.send(Requests.list_runs())).runs

    async def get_run(self, run_id: str) -> RunInfo:
        """One run."""
        return await self.send(Requests.get_run(run_id))

    async def set_policy(self, run_id: str, policy: Policy) -> RunInfo:
        """Replace a run's policy (admin scope)."""
        return await self.send(Requests.set_policy(run_id, policy))

    async def submit(
        self,
        run_id: str,
        command: Command | CommandEnvelope | dict[str, Any],
        *,
        source: str | None = None,
        reason: str | None = None,
        command_id: str | None = None,
        hold: bool = False,
        wait: bool = False,
        timeout_s: float = 60.0,
    ) -> CommandRecord:
        """Submit a command (held for a person's approval with `hold`).

        With `wait`, return once it is applied, rejected or failed (or `timeout_s` passed).
        """
        envelope = envelope_of(command, source=source, reason=reason, command_id=command_id, hold=hold)
        record = await self.send(Requests.submit(run_id, envelope))
        return await self.wait_for(run_id, record.id, timeout_s=timeout_s) if wait else record

    async def wait_for(self, run_id: str, command_id: str, *, timeout_s: float = 60.0) -> CommandRecord:
        """Return once the command is finished or `timeout_s` passes, with its latest record."""
        deadline = time.monotonic() + timeout_s
        while True:
            request, last = Requests.wait_for(run_id, command_id, deadline)
            record = await self.send(request)
            if record.finished or last:
                return record

    async def list_commands(
        self, run_id: str, *, status: CommandStatus | None = None, after_seq: int = 0, limit: int = 1000
    ) -> list[CommandRecord]:
        """Command records in `seq` order."""
        request = Requests.list_commands(run_id, status=status, after_seq=after_seq, limit=limit)
        return (await self.send(request)).commands

    async def get_command(self, run_id: str, command_id: str) -> CommandRecord:
        """One command record."""
        return await self.send(Requests.get_command(run_id, command_id))

    async def approve(
        self, run_id: str, command_id: str, *, source: str = "user:anonymous", reason: str = ""
    ) -> CommandRecord:
        """Release a command held in `pending_approval`."""
        decision = CommandDecision(source=source, reason=reason)
        return await self.send(Requests.decide(run_id, command_id, decision, approve=True))

    async def reject(
        self, run_id: str, command_id: str, *, source: str = "user:anonymous", reason: str = ""
    ) -> CommandRecord:
        """Refuse a command held in `pending_approval`."""
        decision = CommandDecision(source=source, reason=reason)
        return await self.send(Requests.decide(run_id, command_id, decision, approve=False))

    async def next_commands(self, run_id: str, *, after_seq: int, wait_s: float = 20.0) -> list[CommandRecord]:
        """Long-poll: commands with `seq > after_seq` ready to apply, as soon as there is one (or `[]`)."""
        return (await self.send(Requests.next_commands(run_id, after_seq=after_seq, wait_s=wait_s))).commands

    async def report_result(self, run_id: str, command_id: str, result: CommandResult) -> CommandRecord:
        """Answer a delivered command."""
        return await self.send(Requests.report_result(run_id, command_id, result))

    async def push_metrics(self, run_id: str, batch: MetricsBatch) -> MetricsAck:
        """Store a batch of metric samples."""
        return await self.send(Requests.push_metrics(run_id, batch))

    async def push_reports(self, run_id: str, reports: Iterable[RunReport]) -> int:
        """Store heartbeats, status changes, checkpoints, logs and alerts; returns how many were taken."""
        return (await self.send(Requests.push_reports(run_id, reports))).accepted

    async def metrics_history(
        self,
        run_id: str,
        *,
        keys: Iterable[str] = (),
        branch: str = "main",
        since_step: int = 0,
        max_points: int | None = None,
    ) -> MetricsHistory:
        """Metric history of one branch, downsampled on the server when `max_points` is given."""
        request = Requests.metrics_history(
            run_id, keys=keys, branch=branch, since_step=since_step, max_points=max_points
        )
        return await self.send(request)

    async def raise_alert(self, run_id: str, alert: AlertReport) -> None:
        """Put an alert on the run's feed (agents and scripts; needs the `command` scope)."""
        await self.send(Requests.raise_alert(run_id, alert))

    async def list_events(
        self, run_id: str, *, after: int = 0, kinds: Iterable[str] = (), limit: int = 1000
    ) -> list[Event]:
        """Stored events (commands, status changes, checkpoints, alerts, logs) after event id `after`."""
        return (await self.send(Requests.list_events(run_id, after=after, kinds=kinds, limit=limit))).events

    async def list_checkpoints(self, run_id: str, *, branch: str | None = None) -> list[CheckpointInfo]:
        """The run's checkpoints, oldest first."""
        return (await self.send(Requests.list_checkpoints(run_id, branch=branch))).checkpoints

    def stream(self, run_id: str | None = None) -> AsyncEventStream:
        """The live stream of one run (or all runs): `async with client.stream(run_id) as events`."""
        return AsyncEventStream(self._http(), self.servers, run_id)


class AsyncEventStream:
    """A live websocket stream: `async for event in stream`; `submit` sends a command over it."""

    def __init__(self, session: aiohttp.ClientSession, servers: ServerList, run_id: str | None) -> None:
        self._session = session
        self._servers = servers
        self._run_id = run_id
        self._socket: aiohttp.ClientWebSocketResponse | None = None
        self._pending: deque[Event] = deque()

    async def __aenter__(self) -> AsyncEventStream:
        """Open the socket on the client's current server, failing over past those that refuse the connection."""
        for attempt in range(len(self._servers.urls)):
            url = stream_url(self._servers.current, self._run_id)
            try:
                self._socket = await self._session.ws_connect(url, max_msg_size=16 * 2**20, heartbeat=20.0)
                return self
            except aiohttp.WSServerHandshakeError as exc:
                raise error_for_status(exc.status, None, f"stream refused: HTTP {exc.status}") from exc
            except (aiohttp.ClientError, OSError) as exc:
                if attempt == len(self._servers.urls) - 1:
                    raise ServerUnavailable(f"cannot open stream {url}: {exc!r}") from exc
                self._servers.fail_over()
        raise AssertionError("unreachable")

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the socket."""
        if self._socket is not None:
            await self._socket.close()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        while True:
            event = await self.next_event()
            if event is None:
                return
            yield event

    async def next_event(self) -> Event | None:
        """The next event; None once the stream closed cleanly."""
        if self._pending:
            return self._pending.popleft()
        while True:
            message = await self._receive()
            if message is None:
                return None
            if not isinstance(message, StreamReply):
                return message

    async def submit(self, envelope: CommandEnvelope) -> CommandRecord:
        """Submit a command over the socket and return its stored record; events seen meanwhile are kept."""
        ref = uuid4().hex
        assert self._socket is not None, "use the stream inside `async with`"
        await self._socket.send_str(StreamSubmit(ref=ref, envelope=envelope).model_dump_json())
        while True:
            message = await self._receive()
            if message is None:
                raise ServerUnavailable("stream closed before the command was answered")
            if not isinstance(message, StreamReply):
                self._pending.append(message)
            elif message.ref == ref:
                if message.record is not None:
                    return message.record
                raise error_for_status(400, message.error, "command refused")

    async def _receive(self) -> Event | StreamReply | None:
        assert self._socket is not None, "use the stream inside `async with`"
        message = await self._socket.receive()
        if message.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
            return parse_stream_message(message.data)
        if message.type == aiohttp.WSMsgType.ERROR:
            raise ServerUnavailable(f"stream failed: {message.data!r}")
        code = self._socket.close_code or 1006
        if code in (1000, 1001):
            return None
        raise StreamClosed(code, str(message.extra or ""))


__all__ = ["AsyncClient", "AsyncEventStream"]
