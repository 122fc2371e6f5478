"""Event fan-out to websocket subscribers through bounded per-client queues.

The broadcaster serialises each event once and only ever calls `put_nowait`; a subscriber
whose queue is full is closed with `CLOSE_SLOW_CONSUMER`, so one slow client can never slow
the server or the other clients.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from protocols.constants import CLOSE_SLOW_CONSUMER
from protocols.events import Event

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 5.0


@dataclass(eq=False)
class Subscriber:
    """One websocket client: the runs it follows (None: all), its queue and its writer task."""

    socket: web.WebSocketResponse
    run_id: str | None
    queue: asyncio.Queue[str]
    name: str
    transport: asyncio.Transport | None
    writer: asyncio.Task[None] | None = None
    dropped: bool = False
    sent: int = field(default=0)

    def wants(self, run_id: str) -> bool:
        """True when this client follows `run_id`."""
        return self.run_id is None or self.run_id == run_id


class Broadcaster:
    """Holds the subscribers and hands every published event to those that follow its run."""

    def __init__(self, queue_size: int) -> None:
        self.queue_size = queue_size
        self.subscribers: set[Subscriber] = set()
        self.on_drop: Callable[[Subscriber], None] = lambda subscriber: None
        """Called for each client closed as too slow."""
        self._closing: set[asyncio.Task[None]] = set()

    def subscribe(
        self, request: web.Request, socket: web.WebSocketResponse, run_id: str | None, name: str
    ) -> Subscriber:
        """Register a client and start the task that writes its queue to its socket."""
        queue: asyncio.Queue[str] = asyncio.Queue(maxsize=self.queue_size)
        subscriber = Subscriber(socket, run_id, queue, name, request.transport)
        subscriber.writer = asyncio.create_task(self._drain(subscriber), name=f"ws-writer-{name}")
        self.subscribers.add(subscriber)
        return subscriber

    async def unsubscribe(self, subscriber: Subscriber) -> None:
        """Forget a client and stop its writer task."""
        self.subscribers.discard(subscriber)
        if subscriber.writer is not None and subscriber.writer is not asyncio.current_task():
            subscriber.writer.cancel()
            await asyncio.gather(subscriber.writer, return_exceptions=True)

    def publish(self, event: Event, text: str | None = None) -> None:
        """Queue `event` (`text`: its JSON, when the caller has it) for every subscriber of its run; never waits."""
        if not self.subscribers:
            return
        text = text or event.model_dump_json()
        for subscriber in list(self.subscribers):
            if subscriber.wants(event.run_id):
                self.offer(subscriber, text)

    def offer(self, subscriber: Subscriber, text: str) -> None:
        """Queue one message for one subscriber, dropping the subscriber if its queue is full."""
        if subscriber.dropped:
            return
        try:
            subscriber.queue.put_nowait(text)
        except asyncio.QueueFull:
            self._drop(subscriber)

    def _drop(self, subscriber: Subscriber) -> None:
        subscriber.dropped = True
        self.subscribers.discard(subscriber)
        if subscriber.writer is not None:
            subscriber.writer.cancel()
        log.warning("closing slow websocket client %s: %d events unread", subscriber.name, subscriber.queue.qsize())
        self.on_drop(subscriber)
        task = asyncio.create_task(self._close_slow(subscriber))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_slow(self, subscriber: Subscriber) -> None:
        reason = f"too slow: more than {self.queue_size} events unread".encode()
        try:
            await asyncio.wait_for(subscriber.socket.close(code=CLOSE_SLOW_CONSUMER, message=reason), CLOSE_TIMEOUT_S)
        except (TimeoutError, ConnectionError, RuntimeError):
            pass
        # A client that stopped reading cannot take the close handshake either; cut the connection.
        if subscriber.transport is not None and not subscriber.transport.is_closing():
            subscriber.transport.abort()

    async def _drain(self, subscriber: Subscriber) -> None:
        socket = subscriber.socket
        while True:
            text = await subscriber.queue.get()
            try:
                await socket.send_str(text)
            except (ConnectionError, RuntimeError):
                return
            subscriber.sent += 1

    async def close_all(self, code: int, reason: str) -> None:
        """Close every subscriber (server shutdown)."""
        subscribers = list(self.subscribers)
        self.subscribers.clear()
        for subscriber in subscribers:
            if subscriber.writer is not None:
                subscriber.writer.cancel()
        await asyncio.gather(
            *(
                asyncio.wait_for(s.socket.close(code=code, message=reason.encode()), CLOSE_TIMEOUT_S)
                for s in subscribers
            ),
            return_exceptions=True,
        )
        await asyncio.gather(*self._closing, return_exceptions=True)
