"""Event ids, durable event rows, and publication to the stream in the order writes commit.

Every event is emitted inside the write that causes it (`EventLog.write`), so its id comes from
the store in that transaction: with one SQLite writer a counter, with PostgreSQL a sequence drawn
under the run's lock; either way a run's ids increase in the order its writes commit. Stored
events are inserted there too; streamed-only ones (metrics, heartbeats) are not.

On SQLite the events are published once the write commits. On a store shared by several servers
each write also announces what it emitted (the stored events by id range, the streamed ones in
full), and every server, this one included, publishes what it hears in the order heard, which is
commit order: so a websocket client of any server sees every event of every run, in order, once.

Services keep their caches (runs, open commands) with `watchers`, called with each event of every
server: with this server's own at once after the commit (a caller reads its own writes), with the
others' when heard, skipping one older than what the cache already holds (`_ahead`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from control_server.fanout import Broadcaster
from control_server.store import Db, Store
from protocols.events import CommandEvent, Event, MetricsEvent, RunEvent, RunStateEvent, event_adapter
from protocols.records import MetricsSample

log = logging.getLogger(__name__)

EventFactory = Callable[[int, float], Event]
Result = TypeVar("Result")

STREAMED_ONLY = (MetricsEvent, RunStateEvent)
"""Events sent to watchers but not stored (history has its own tables for what they carry)."""
CATCH_UP_EVENTS = 10_000
"""Most stored events of one run resent after announcements may have been missed."""
ANNOUNCE_HEADER_BYTES = 200
"""Room left in an announcement for everything but the streamed events' JSON."""


class Emitter:
    """What an op passed to `EventLog.write` emits its events with: ids from the store, stored rows inserted."""

    def __init__(self, store: Store, db: Db) -> None:
        self.store = store
        self.db = db
        self.events: list[Event] = []

    def __call__(self, build: EventFactory) -> Event:
        """Build the next event (stored unless it is a metrics or run_state event) and return it."""
        (event_id,) = self.store.event_ids(self.db, 1)
        event = build(event_id, time.time())
        if not isinstance(event, STREAMED_ONLY):
            insert_event(self.db, event)
        self.events.append(event)
        return event


class EventLog:
    """Runs writes that emit events and publishes the events, once committed, in commit order."""

    def __init__(self, store: Store, broadcaster: Broadcaster) -> None:
        self.store = store
        self.broadcaster = broadcaster
        self.server_id = uuid.uuid4().hex[:12]
        self.listeners: list[Callable[[Event], None]] = []
        """Called with every event this server emitted, once published (e.g. the Prometheus counters)."""
        self.watchers: list[Callable[[Event], None]] = []
        """Called with every published event, this server's and the others', before its subscribers get it."""
        self.resyncs: list[Callable[[], Awaitable[None]]] = []
        """Called when announcements may have been missed, to reload what the watchers keep."""
        self._own: dict[tuple[str, int], list[tuple[Event, str | None]]] = {}
        """This server's announced events by (run, first id), until heard back (written by the writer thread)."""
        self._sent: dict[str, int] = {}
        """Per run, the id of the last event relayed to subscribers (a shared store's relay only)."""
        self._ahead: dict[tuple[str, ...], int] = {}
        """Per cached thing (`_cache_key`), the id of this server's newest event not heard back yet."""
        self._heard: asyncio.Queue[str | None] = asyncio.Queue()
        if store.shared:
            loop = asyncio.get_running_loop()

            def heard(payload: str | None) -> None:
                loop.call_soon_threadsafe(self._heard.put_nowait, payload)

            store.listen(heard)

    async def write(self, run_id: str, op: Callable[[Db, Emitter], Result], *, urgent: bool = False) -> Result:
        """Run `op` holding the run's lock (ahead of other writes when `urgent`, see `Store.write`); once committed,
        publish what it emitted (see the module docstring)."""
        announced: list[tuple[str, int]] = []

        def run(db: Db) -> tuple[Result, list[Event]]:
            for own in announced:  # run again after its group was undone: those were never sent
                self._own.pop(own, None)
            announced.clear()
            emit = Emitter(self.store, db)
            result = op(db, emit)
            if emit.events and self.store.shared:
                announced.extend(self._announce(db, run_id, emit.events))
            return result, emit.events

        try:
            result, events = await self.store.write(run, run=run_id, urgent=urgent)
        except BaseException:
            for own in announced:
                self._own.pop(own, None)
            raise
        for event in events:
            self._watch(event)
            if self.store.shared:
                key = _cache_key(event)
                if key is not None:
                    self._ahead[key] = event.event_id
            else:
                self._send(event, own=True)
        return result

    async def relay(self) -> None:
        """Publish what every server announces, in the order heard (runs for the app's life on a shared store)."""
        while True:
            payload = await self._heard.get()
            try:
                if payload is None:
                    await self._catch_up()
                else:
                    await self._relay(payload)
            except Exception:  # one bad announcement must not end the relay
                log.exception("could not relay an announcement")

    async def _catch_up(self) -> None:
        """After announcements may have been missed: reload the watchers' caches, and send subscribers the stored
        events of every run relayed before that came after the last one sent (streamed ones of the gap are gone)."""
        log.warning("announcements may have been missed; reloading runs and open commands, resending stored events")
        self._own.clear()
        self._ahead.clear()
        for resync in self.resyncs:
            await resync()
        for run_id, last in list(self._sent.items()):
            for event in await self.history(run_id, after=last, kinds=frozenset(), limit=CATCH_UP_EVENTS):
                # Also to the watchers: one committed after the reload read is in no cache yet, and its
                # announcement, when heard, is not sent twice (see `_relay`).
                self._watch(event)
                self._send(event, own=False)

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

    def sample_chunks(self, samples: list[MetricsSample]) -> list[list[MetricsSample]]:
        """`samples` cut into pieces whose metrics event fits one announcement (one piece when nothing is announced)."""
        limit = self.store.announce_limit - ANNOUNCE_HEADER_BYTES
        if limit <= 0:
            return [samples]
        chunks: list[list[MetricsSample]] = []
        start, size = 0, 0
        for index, sample in enumerate(samples):
            length = _json_bound(sample)
            if size + length > limit and index > start:
                chunks.append(samples[start:index])
                start, size = index, 0
            size += length
        chunks.append(samples[start:])
        return chunks

    def _announce(self, db: Db, run_id: str, events: list[Event]) -> list[tuple[str, int]]:
        """Announce `events` in as few notifications as fit, and remember them as this server's own.

        A notification is a JSON header line (this server, the run, the first and last id, how many of them are
        stored) followed by one line per streamed event, in full: other servers read the stored ones back."""
        limit = self.store.announce_limit - ANNOUNCE_HEADER_BYTES
        keys: list[tuple[str, int]] = []
        part: list[tuple[Event, str | None]] = []
        size = 0
        for event in [*events, None]:
            text = event.model_dump_json() if isinstance(event, STREAMED_ONLY) else None
            if part and (event is None or size + len(text or "") > limit):
                header = {"server": self.server_id, "run": run_id, "first": part[0][0].event_id}
                header |= {"last": part[-1][0].event_id, "stored": sum(1 for _, line in part if line is None)}
                lines = [json.dumps(header), *(line for _, line in part if line is not None)]
                self.store.announce(db, "\n".join(lines))
                keys.append((run_id, part[0][0].event_id))
                self._own[keys[-1]] = part
                part, size = [], 0
            if event is not None:
                part.append((event, text))
                size += len(text or "") + 1
        return keys

    async def _relay(self, payload: str) -> None:
        head, *streamed = payload.split("\n")
        header: dict[str, Any] = json.loads(head)
        run_id, first, last = header["run"], int(header["first"]), int(header["last"])
        if header["server"] == self.server_id:
            for event, text in self._own.pop((run_id, first), []):
                key = _cache_key(event)
                if key is not None and self._ahead.get(key) == event.event_id:
                    del self._ahead[key]
                if event.event_id > self._sent.get(run_id, 0):  # else `_catch_up` sent it already
                    self._send(event, own=True, text=text)
            return
        events: list[tuple[Event, str | None]] = [
            (event_adapter.validate_json(line, strict=False), line) for line in streamed
        ]
        if header["stored"]:

            def op(db: Db) -> list[str]:
                rows = db.execute(
                    "SELECT body FROM events WHERE run_id = ? AND event_id BETWEEN ? AND ? ORDER BY event_id",
                    (run_id, first, last),
                ).fetchall()
                return [body for (body,) in rows]

            events += [(event_adapter.validate_json(body, strict=False), None) for body in await self.store.read(op)]
        for event, text in sorted(events, key=lambda pair: pair[0].event_id):
            key = _cache_key(event)
            if key is None or event.event_id > self._ahead.get(key, 0):
                self._watch(event)
            if event.event_id > self._sent.get(run_id, 0):  # else `_catch_up` sent it already
                self._send(event, own=False, text=text)

    def _watch(self, event: Event) -> None:
        for watcher in self.watchers:
            watcher(event)

    def _send(self, event: Event, *, own: bool, text: str | None = None) -> None:
        """Send the event (`text`: its JSON, when at hand) to subscribers, and when ours to listeners."""
        if own:
            for listener in self.listeners:
                listener(event)
        self.broadcaster.publish(event, text)
        if self.store.shared:
            self._sent[event.run_id] = event.event_id


SAMPLE_JSON_BYTES = 140
"""At most what a sample's JSON takes beside its keys and values (braces, field names, step, time, a comma)."""
VALUE_JSON_BYTES = 28
"""At most what a value takes beside its key: quotes, colon, comma and the longest float (-1.7976931348623157e+308)."""


def _json_bound(sample: MetricsSample) -> int:
    """An upper bound on the length of `sample`'s JSON, without building it (names are ASCII, unescaped)."""
    return (
        SAMPLE_JSON_BYTES
        + len(sample.branch)
        + sum(len(key) + VALUE_JSON_BYTES for key in sample.values)
        + sum(len(key) + 3 for key in sample.nonfinite)
    )


def _cache_key(event: Event) -> tuple[str, ...] | None:
    """What a watcher caches from `event`: a run, or one command (None: nothing)."""
    if isinstance(event, RunEvent | RunStateEvent):
        return ("run", event.run_id)
    if isinstance(event, CommandEvent):
        return ("command", event.run_id, event.record.id)
    return None


def insert_event(db: Db, event: Event) -> None:
    """Insert one event row."""
    db.execute(
        "INSERT INTO events (event_id, run_id, kind, time, body) VALUES (?, ?, ?, ?, ?)",
        (event.event_id, event.run_id, event.kind, event.time, event.model_dump_json()),
    )
