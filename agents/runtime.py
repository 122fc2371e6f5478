"""The agent runtime: follow a run's stream, keep its windows, decide, pass guardrails, and act through the client.

Modes: `act` submits commands; `propose` submits them with `hold=True`, so the server keeps each one in
`pending_approval` until a person approves it (a sender can ask to be held, never to skip a hold); `dry-run`
only logs.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import secrets
from collections.abc import Iterable
from typing import Literal

from agents.decision import AsyncPolicy, Decision, Intervention, Policy
from agents.guardrails import Guardrails
from agents.window import DEFAULT_CAPACITY, LEFT_BRANCHES_KEPT, WindowTracker
from protocols.client import AsyncClient
from protocols.client.aio import AsyncEventStream
from protocols.client.core import Backoff
from protocols.commands import Command, CommandRecord
from protocols.errors import RequestRejected, RunsteerError, ServerUnavailable, Unauthorized
from protocols.events import CheckpointEvent, CommandEvent, Event, MetricsEvent, RunEvent, RunStateEvent
from protocols.records import AlertReport

log = logging.getLogger("runsteer.agents")

Mode = Literal["act", "propose", "dry-run"]
MODES: tuple[Mode, ...] = ("act", "propose", "dry-run")
ENDED = ("finished", "failed")
SUBMIT_ATTEMPTS = 3
"""Tries per command while the server is unreachable; the same command id makes a resend harmless."""


class AgentRuntime:
    """Runs one policy on one run until the run ends or `stop()` is called."""

    def __init__(
        self,
        client: AsyncClient,
        run_id: str,
        policy: Policy | AsyncPolicy,
        guardrails: Guardrails,
        *,
        mode: Mode = "act",
        tick_s: float = 5.0,
        reconnect_max_s: float = 5.0,
        capacity: int = DEFAULT_CAPACITY,
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.policy = policy
        self.guardrails = guardrails
        self.mode = mode
        self.source = guardrails.source
        self.tick_s = tick_s
        self.reconnect_max_s = reconnect_max_s
        self.tracker = WindowTracker(run_id, capacity=capacity)
        self.decisions: list[Decision] = []
        """Every decision carried out (sent, proposed, or logged in dry-run), in order."""
        self.connections = 0
        self.connected = asyncio.Event()
        """Set while the stream is open and caught up."""
        self._stopping = asyncio.Event()
        self._alerts_refused = False
        self._blocked_said: set[tuple[str, int]] = set()

    def stop(self) -> None:
        """Ask `run()` to return (from the same event loop)."""
        self._stopping.set()

    async def run(self) -> None:
        """Follow the run, reconnecting and catching up after every drop, until it ends or `stop()`."""
        log.info("agent %s watching run %s in %s mode", self.source, self.run_id, self.mode)
        backoff = Backoff(0.1, self.reconnect_max_s)
        try:
            while not self._stopping.is_set():
                try:
                    async with self.client.stream(self.run_id) as stream:
                        self.connections += 1
                        await self._catch_up()
                        self.connected.set()
                        backoff.reset()
                        await self._evaluate()
                        if self._ended() or await self._follow(stream):
                            return
                except ServerUnavailable as exc:
                    log.warning("agent %s: stream lost (%s); reconnecting", self.source, exc)
                self.connected.clear()
                await self._wait(backoff.next_delay())
        finally:
            self.connected.clear()
            log.info("agent %s stopped watching run %s", self.source, self.run_id)

    async def _follow(self, stream: AsyncEventStream) -> bool:
        """Take in live events until the stream closes (False) or the run ends or the agent stops (True)."""
        events: asyncio.Queue[Event | Exception | None] = asyncio.Queue()
        reader = asyncio.create_task(self._read(stream, events))
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            while True:
                getting = asyncio.create_task(events.get())
                done, _ = await asyncio.wait(
                    {getting, stopping}, timeout=self.tick_s, return_when=asyncio.FIRST_COMPLETED
                )
                if stopping in done:
                    getting.cancel()
                    return True
                if getting not in done:
                    getting.cancel()
                    await self._evaluate()
                    continue
                item = getting.result()
                if item is None:
                    return False
                if isinstance(item, Exception):
                    raise item
                await self._take(item)
                if self._ended():
                    return True
        finally:
            for task in (reader, stopping):
                task.cancel()
            await asyncio.gather(reader, stopping, return_exceptions=True)

    @staticmethod
    async def _read(stream: AsyncEventStream, events: asyncio.Queue[Event | Exception | None]) -> None:
        try:
            async for event in stream:
                events.put_nowait(event)
            events.put_nowait(None)
        except RunsteerError as exc:
            events.put_nowait(exc)

    async def _take(self, event: Event) -> None:
        """Take in one event; the policy judges each new step in turn, as if the steps had streamed in one by one
        (a batch of steps judged only at its last step would hide metrics measured every N steps)."""
        if isinstance(event, MetricsEvent):
            for sample in event.samples:
                if self.tracker.add_sample(sample):
                    await self._evaluate()
        elif isinstance(event, CommandEvent):
            self.tracker.set_command(event.record)
        elif isinstance(event, RunEvent):
            self.tracker.set_run(event.run)
        elif isinstance(event, RunStateEvent) and self.tracker.run is not None:
            self.tracker.set_run(event.apply(self.tracker.run))
        elif isinstance(event, CheckpointEvent):
            self.tracker.set_checkpoint(event.checkpoint, deleted=event.deleted)

    async def _catch_up(self) -> None:
        """Read what the stream may have missed: the run, commands, checkpoints and metrics since the last step."""
        tracker = self.tracker
        first = self.connections == 1 and tracker.run is None
        open_seqs = [r.seq for r in tracker.commands.values() if r.source == self.source and not r.finished]
        after = min(open_seqs) - 1 if open_seqs else tracker.last_seq()
        tracker.set_commands(await self.client.list_commands(self.run_id, after_seq=after, limit=10_000))
        if first:
            tracker.interventions = _past_interventions(tracker.commands.values(), self.source)
        tracker.checkpoints = {c.checkpoint_id: c for c in await self.client.list_checkpoints(self.run_id)}
        run = await self.client.get_run(self.run_id)
        tracker.set_run(run)
        if first:
            # Branches the run left before this agent started (its own earlier life included): a policy that
            # compares branches, like the learning-rate probe, reads them from the window.
            left = [b for b in run.branches if b != tracker.branch][-LEFT_BRANCHES_KEPT:]
            for branch in left:
                stored = await self.client.metrics_history(self.run_id, branch=branch, max_points=tracker.capacity)
                tracker.set_left(stored)
        since = tracker.step + 1 if tracker.step >= 0 else max(0, run.step - tracker.capacity)
        history = await self.client.metrics_history(self.run_id, branch=tracker.branch, since_step=since)
        samples = tracker.history_samples(history)
        log.info("agent %s catching up on run %s: %d steps", self.source, self.run_id, len(samples))
        for sample in samples:
            # Each missed step is judged as if it had streamed in: a spike during the drop is still answered.
            if tracker.add_sample(sample) and self.connections > 1:
                await self._evaluate()
        log.info("agent %s caught up: now at %s step %d", self.source, tracker.branch, tracker.step)

    async def _evaluate(self) -> None:
        """Ask the policy, pass its decision through the guardrails, and carry it out."""
        decided = self.policy.decide(self.tracker.window())
        decision = await decided if inspect.isawaitable(decided) else decided
        if decision is None:
            return
        window = self.tracker.window()
        review = self.guardrails.review(decision, window)
        if review.decision is None:
            said = (decision.rule, len(window.interventions))
            level = logging.DEBUG if said in self._blocked_said else logging.INFO
            self._blocked_said.add(said)
            log.log(level, "agent %s held back %s: %s", self.source, decision.describe(), review.blocked)
            return
        await self._carry_out(review.decision)

    async def _carry_out(self, decision: Decision) -> None:
        window = self.tracker.window()
        key = f"{decision.rule}.{secrets.token_hex(6)}"
        ids = tuple(f"{key}.{index}" for index in range(len(decision.commands)))
        intervention = Intervention(
            rule=decision.rule,
            decided_tick=window.tick,
            time=window.now,
            command_types=tuple(c.type for c in decision.commands),
            command_ids=ids,
        )
        self.tracker.interventions.append(intervention)
        self.decisions.append(decision)
        verb = {"act": "acting", "propose": "proposing", "dry-run": "would act (dry-run)"}[self.mode]
        if not decision.intervenes:
            verb = "alert" if self.mode != "dry-run" else "would alert (dry-run)"
        log.warning("agent %s %s at step %d: %s", self.source, verb, decision.step, decision.describe())
        if self.mode == "dry-run" or not decision.intervenes:
            self._settle(intervention, ())
            if self.mode != "dry-run":
                await self._alert(decision)
            return
        sent: list[str] = []
        for command_id, command in zip(ids, decision.commands, strict=True):
            record = await self._submit(command, command_id, decision.reason)
            if record is None:
                break
            sent.append(command_id)
            self.tracker.set_command(record)
        if len(sent) < len(ids):
            self._settle(intervention, tuple(sent))

    def _settle(self, intervention: Intervention, sent: tuple[str, ...]) -> None:
        """Keep only the commands actually sent; with none, the intervention is answered now."""
        index = self.tracker.interventions.index(intervention)
        updated = Intervention(
            rule=intervention.rule,
            decided_tick=intervention.decided_tick,
            time=intervention.time,
            command_types=intervention.command_types,
            command_ids=sent,
            answered_tick=None if sent else self.tracker.tick,
        )
        self.tracker.interventions[index] = updated
        for command_id in sent:
            record = next((r for r in self.tracker.commands.values() if r.id == command_id), None)
            if record is not None:
                self.tracker.set_command(record)

    async def _submit(self, command: Command, command_id: str, reason: str) -> CommandRecord | None:
        backoff = Backoff(0.2, 1.0)
        for attempt in range(1, SUBMIT_ATTEMPTS + 1):
            try:
                record = await self.client.submit(
                    self.run_id,
                    command,
                    source=self.source,
                    reason=reason[:2000],
                    command_id=command_id,
                    hold=self.mode == "propose",
                )
            except ServerUnavailable as exc:
                log.warning("agent %s: submit %s failed (%s), attempt %d", self.source, command_id, exc, attempt)
                await self._wait(backoff.next_delay())
                continue
            except RunsteerError as exc:
                log.warning("agent %s: %s refused by the server: %s", self.source, command.type, exc)
                return None
            if self.mode == "propose" and record.status != "pending_approval":
                log.error("agent %s: proposal %s was not held for approval (%s)", self.source, record.id, record.status)
            log.info("agent %s: %s %s is %s (seq %d)", self.source, command.type, record.id, record.status, record.seq)
            return record
        return None

    async def _alert(self, decision: Decision) -> None:
        if self._alerts_refused:
            return
        report = AlertReport(
            severity=decision.severity,
            message=decision.describe()[:2000],
            step=max(decision.step, 0),
            source=self.source,
        )
        try:
            await self.client.raise_alert(self.run_id, report)
        except (Unauthorized, RequestRejected) as exc:
            self._alerts_refused = True
            log.warning("agent %s: alerts go to this log only; the server refused one: %s", self.source, exc)
        except ServerUnavailable as exc:
            log.warning("agent %s: alert not delivered: %s", self.source, exc)

    def _ended(self) -> bool:
        run = self.tracker.run
        return run is not None and run.status in ENDED

    async def _wait(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            pass


def _past_interventions(records: Iterable[CommandRecord], source: str) -> list[Intervention]:
    """This agent's interventions from earlier lives, rebuilt from its command ids (`<rule>.<hex>.<index>`)."""
    grouped: dict[str, list[CommandRecord]] = {}
    for record in records:
        if record.source == source and record.id.count(".") == 2:
            grouped.setdefault(record.id.rsplit(".", 1)[0], []).append(record)
    past = []
    for key, group in grouped.items():
        past.append(
            Intervention(
                rule=key.split(".", 1)[0],
                decided_tick=0,
                time=group[0].created_at,
                command_types=tuple(r.command.type for r in group),
                command_ids=tuple(r.id for r in group),
                answered_tick=0 if all(r.finished for r in group) else None,
            )
        )
    return sorted(past, key=lambda i: i.time)
