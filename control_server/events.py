"""Event ids, durable event rows and publication to the stream."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from control_server.fanout import Broadcaster
from control_server.store import Db, Store
from protocols.events import Event, event_adapter

EventFactory = Callable[[int, float], Event]


class EventLog:
    """Hands out increasing event ids and publishes events after the write that holds them commits."""

    def __init__(self, store: Store, broadcaster: Broadcaster) -> None:
        self.store = store
        self.broadcaster = broadcaster
        last_id = store.read_now(lambda db: db.execute("SELECT COALESCE(MAX(event_id), 0) FROM events").fetchone()[0])
        # Events that are only streamed (metrics, heartbeats) are not stored, so the stored maximum alone could
        # hand out an id again after a restart; starting at the clock in microseconds keeps ids increasing.
        self._next_id = max(int(last_id) + 1, time.time_ns() // 1000)
        self.listeners: list[Callable[[Event], None]] = []
        """Called with every published event (e.g. the Prometheus counters)."""

    def make(self, build: EventFactory) -> Event:
        """Build an event with the next id and the current time."""
        event_id = self._next_id
        self._next_id += 1
        return build(event_id, time.time())

    def publish(self, event: Event) -> None:
        """Send a committed event to subscribers and listeners."""
        for listener in self.listeners:
            listener(event)
        self.broadcaster.publish(event)

    async def record(
        self,
        event: Event,
        also: Callable[[Db], Any] | None = None,
        before_publish: Callable[[], None] | None = None,
    ) -> None:
        """Store the event (with `also`, in the same transaction); once committed, run `before_publish`, publish."""

        def op(db: Db) -> None:
            if also is not None:
                also(db)
            insert_event(db, event)

        await self.store.write(op)
        if before_publish is not None:
            before_publish()
        self.publish(event)

    async def history(self, run_id: str, *, after: int, kinds: frozenset[str], limit: int) -> list[Event]:
        """Stored events of a run after `after`, oldest first."""

        kind_filter = f"AND kind IN ({', '.join('?' * len(kinds))})" if kinds else ""

        def op(db: Db) -> list[str]:
            rows = db.execute(
                f"SELECT body FROM events WHERE run_id = ? AND event_id > ? {kind_filter} ORDER BY event_id LIMIT ?",
                (run_id, after, *sorted(kinds), limit),
            ).fetchall()
            return [body for (body,) in rows]

        return [event_adapter.validate_json(body, strict=False) for body in await self.store.read(op)]


def insert_event(db: Db, event: Event) -> None:
    """Insert one event row."""
    db.execute(
        "INSERT INTO events (event_id, run_id, kind, time, body) VALUES (?, ?, ?, ?, ?)",
        (event.event_id, event.run_id, event.kind, event.time, event.model_dump_json()),
    )
