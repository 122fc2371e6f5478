"""The blocking client: one keep-alive HTTP connection per client, and a websocket stream."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any
from uuid import uuid4

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from protocols.client.core import (
    HttpRequest,
    Model,
    Requests,
    ServerList,
    auth_headers,
    decode,
    envelope_of,
    normalise_base_url,
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

_STALE_CONNECTION_ERRORS = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


class Client:
    """Talks to a runsteer server from ordinary (threaded) code. Not shared between threads.

    `server` may list several URLs separated by commas: a connection goes to the first that accepts it.
    """

    def __init__(self, server: str = "http://127.0.0.1:8765", *, token: str | None = None) -> None:
        self.servers = ServerList(server)
        self.token = token
        self._connection: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()
        self._closings = 0

    def close(self) -> None:
        """Close the connection; a call in flight on another thread (a long-poll) fails at once (ServerUnavailable)."""
        self._closings += 1
        connection = self._connection
        if connection is not None and connection.sock is not None:
            try:
                connection.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, request: HttpRequest[Model]) -> Model:
        """Send one request and decode its answer; a stale keep-alive connection is retried once."""
        closings = self._closings
        with self._lock:
            for attempt in (1, 2):
                reused = self._connection is not None
                try:
                    connection = self._connection or self._connect()
                    self._connection = connection
                    connection.timeout = request.timeout_s
                    if connection.sock is not None:
                        connection.sock.settimeout(request.timeout_s)
                    headers = {"Content-Type": "application/json", **auth_headers(self.token)}
                    connection.request(request.method, request.target, body=request.body, headers=headers)
                    response = connection.getresponse()
                    body = response.read()
                except _STALE_CONNECTION_ERRORS as exc:
                    self._drop_connection()
                    if reused and attempt == 1 and closings == self._closings:
                        continue
                    raise ServerUnavailable(f"{self.server} closed the connection: {exc}") from exc
                except (OSError, http.client.HTTPException) as exc:
                    self._drop_connection()
                    raise ServerUnavailable(f"{self.server} unreachable: {exc}") from exc
                if response.will_close:
                    self._drop_connection()
                return decode(request, response.status, body)
        raise AssertionError("unreachable")

    @property
    def server(self) -> str:
        """The base URL in use."""
        return self.servers.current

    def _connect(self) -> http.client.HTTPConnection:
        """Connect to the current server, failing over to the next ones that refuse (nothing was sent yet)."""
        for attempt in range(len(self.servers.urls)):
            scheme, host, port = normalise_base_url(self.servers.current)
            kind = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
            connection = kind(host, port, timeout=10.0)
            try:
                connection.connect()
            except OSError:
                connection.close()
                if attempt == len(self.servers.urls) - 1:
                    raise
                self.servers.fail_over()
                continue
            connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return connection
        raise AssertionError("unreachable")

    def _drop_connection(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    # Runs

    def register_run(self, registration: RunRegistration) -> RunInfo:
        """Register a run (or re-attach to `registration.run_id`)."""
        return self.send(Requests.register_run(registration))

    def list_runs(self) -> list[RunInfo]:
        """Every run, newest first."""
        return self.send(Requests.list_runs()).runs

    def get_run(self, run_id: str) -> RunInfo:
        """One run."""
        return self.send(Requests.get_run(run_id))

    def set_policy(self, run_id: str, policy: Policy) -> RunInfo:
        """Replace a run's policy (admin scope)."""
        return self.send(Requests.set_policy(run_id, policy))

    # Commands

    def submit(
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

        With `wait`, block until it is applied, rejected or failed (or `timeout_s` passed).
        """
        envelope = envelope_of(command, source=source, reason=reason, command_id=command_id, hold=hold)
        record = self.send(Requests.submit(run_id, envelope))
        return self.wait_for(run_id, record.id, timeout_s=timeout_s) if wait else record

    def wait_for(self, run_id: str, command_id: str, *, timeout_s: float = 60.0) -> CommandRecord:
        """Block until the command is finished or `timeout_s` passes; returns its latest record."""
        deadline = time.monotonic() + timeout_s
        while True:
            request, last = Requests.wait_for(run_id, command_id, deadline)
            record = self.send(request)
            if record.finished or last:
                return record

    def list_commands(
        self, run_id: str, *, status: CommandStatus | None = None, after_seq: int = 0, limit: int = 1000
    ) -> list[CommandRecord]:
        """Command records in `seq` order."""
        return self.send(Requests.list_commands(run_id, status=status, after_seq=after_seq, limit=limit)).commands

    def get_command(self, run_id: str, command_id: str) -> CommandRecord:
        """One command record."""
        return self.send(Requests.get_command(run_id, command_id))

    def approve(
        self, run_id: str, command_id: str, *, source: str = "user:anonymous", reason: str = ""
    ) -> CommandRecord:
        """Release a command held in `pending_approval`."""
        decision = CommandDecision(source=source, reason=reason)
        return self.send(Requests.decide(run_id, command_id, decision, approve=True))

    def reject(
        self, run_id: str, command_id: str, *, source: str = "user:anonymous", reason: str = ""
    ) -> CommandRecord:
        """Refuse a command held in `pending_approval`."""
        decision = CommandDecision(source=source, reason=reason)
        return self.send(Requests.decide(run_id, command_id, decision, approve=False))

    # The trainer's side

    def next_commands(self, run_id: str, *, after_seq: int, wait_s: float = 20.0) -> list[CommandRecord]:
        """Long-poll: commands with `seq > after_seq` ready to apply, as soon as there is one (or `[]`)."""
        return self.send(Requests.next_commands(run_id, after_seq=after_seq, wait_s=wait_s)).commands

    def report_result(self, run_id: str, command_id: str, result: CommandResult) -> CommandRecord:
        """Answer a delivered command."""
        return self.send(Requests.report_result(run_id, command_id, result))

    def push_metrics(self, run_id: str, batch: MetricsBatch) -> MetricsAck:
        """Store a batch of metric samples."""
        return self.send(Requests.push_metrics(run_id, batch))

    def push_reports(self, run_id: str, reports: Iterable[RunReport]) -> int:
        """Store heartbeats, status changes, checkpoints, logs and alerts; returns how many were taken."""
        return self.send(Requests.push_reports(run_id, reports)).accepted

    # History

    def metrics_history(
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
        return self.send(request)

    def raise_alert(self, run_id: str, alert: AlertReport) -> None:
        """Put an alert on the run's feed (agents and scripts; needs the `command` scope)."""
        self.send(Requests.raise_alert(run_id, alert))

    def list_events(self, run_id: str, *, after: int = 0, kinds: Iterable[str] = (), limit: int = 1000) -> list[Event]:
        """Stored events (commands, status changes, checkpoints, alerts, logs) after event id `after`."""
        return (self.send(Requests.list_events(run_id, after=after, kinds=kinds, limit=limit))).events

    def list_checkpoints(self, run_id: str, *, branch: str | None = None) -> list[CheckpointInfo]:
        """The run's checkpoints, oldest first."""
        return self.send(Requests.list_checkpoints(run_id, branch=branch)).checkpoints

    def stream(self, run_id: str | None = None, *, open_timeout_s: float = 10.0) -> EventStream:
        """The live stream of one run (or all runs when `run_id` is None), failing over past unreachable servers."""
        for attempt in range(len(self.servers.urls)):
            try:
                return EventStream(stream_url(self.server, run_id), self.token, open_timeout_s)
            except ServerUnavailable:
                if attempt == len(self.servers.urls) - 1:
                    raise
                self.servers.fail_over()
        raise AssertionError("unreachable")


class EventStream:
    """A live websocket stream: iterate it for events; `submit` sends a command over the same socket."""

    def __init__(self, url: str, token: str | None, open_timeout_s: float) -> None:
        try:
            connection = connect(
                url, additional_headers=auth_headers(token), open_timeout=open_timeout_s, max_size=16 * 2**20
            )
            # Entered like a context manager (websockets >= 17.1 warns on a bare `connect()`); `close()` ends it.
            self._socket: ClientConnection = connection.__enter__()
        except ConnectionClosed as exc:
            raise _closed_error(exc) from exc
        except Exception as exc:  # websockets raises several unrelated types when the handshake fails
            status = getattr(getattr(exc, "response", None), "status_code", 0)
            if status:
                raise error_for_status(status, None, f"stream refused: HTTP {status}") from exc
            raise ServerUnavailable(f"cannot open stream {url}: {exc}") from exc
        self._pending: deque[Event] = deque()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket."""
        self._socket.close()

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self.next_event()
            if event is None:
                return
            yield event

    def next_event(self, timeout_s: float | None = None) -> Event | None:
        """The next event; None when the stream closed cleanly; raises TimeoutError past `timeout_s`."""
        if self._pending:
            return self._pending.popleft()
        while True:
            message = self._receive(timeout_s)
            if message is None:
                return None
            if not isinstance(message, StreamReply):
                return message

    def submit(self, envelope: CommandEnvelope, *, timeout_s: float = 10.0) -> CommandRecord:
        """Submit a command over the socket and return its stored record; events seen meanwhile are kept."""
        ref = uuid4().hex
        self._socket.send(StreamSubmit(ref=ref, envelope=envelope).model_dump_json())
        deadline = time.monotonic() + timeout_s
        while True:
            message = self._receive(max(0.0, deadline - time.monotonic()))
            if message is None:
                raise ServerUnavailable("stream closed before the command was answered")
            if not isinstance(message, StreamReply):
                self._pending.append(message)
                continue
            if message.ref != ref:
                continue
            if message.record is not None:
                return message.record
            raise error_for_status(400, message.error, "command refused")

    def _receive(self, timeout_s: float | None) -> Event | StreamReply | None:
        try:
            raw = self._socket.recv(timeout=timeout_s)
        except ConnectionClosed as exc:
            if exc.rcvd is not None and exc.rcvd.code in (1000, 1001):
                return None
            raise _closed_error(exc) from exc
        return parse_stream_message(raw)


def _closed_error(exc: ConnectionClosed) -> StreamClosed:
    frame = exc.rcvd
    return StreamClosed(frame.code, frame.reason) if frame else StreamClosed(1006, "connection lost")
