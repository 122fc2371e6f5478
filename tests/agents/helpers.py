"""Helpers for agent tests: a small scripted trainer on the real client, windows from numbers, a fake LLM API."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from agents.window import RunWindow, WindowTracker
from protocols import (
    CheckpointInfo,
    CheckpointSaved,
    CommandRecord,
    CommandResult,
    Heartbeat,
    MetricsBatch,
    MetricsSample,
    Policy,
    RunRegistration,
    RunState,
)
from protocols.client import Client
from protocols.errors import RunsteerError

Loss = Callable[[str, int], float]
"""The loss the scripted trainer reports at (branch, step)."""


def steady_loss(branch: str, step: int) -> float:
    """A slowly falling loss with a little deterministic wiggle."""
    return 3.0 - 0.001 * step + 0.01 * ((step * 7919) % 13 - 6) / 6


def spike_on_main(at: int, height: float = 9.0) -> Loss:
    """`steady_loss`, except that on branch main the loss jumps to `height` from step `at` on."""
    return lambda branch, step: height if branch == "main" and step >= at else steady_loss(branch, step)


@dataclass
class ScriptedTrainer:
    """A trainer thread on the real `Client`: registers, reports metrics, heartbeats and snapshots, long-polls
    commands and answers them (set_hparams changes `lr`, rollback moves to a new branch, pause holds)."""

    url: str
    loss: Loss = steady_loss
    steps: int = 400
    step_s: float = 0.004
    snapshot_every: int = 10
    lr: float = 0.003
    policy: Policy | None = None
    name: str = "scripted"
    run_id: str = ""
    step: int = 0
    branch: str = "main"
    paused: bool = False
    applied: list[CommandRecord] = field(default_factory=list)
    checkpoints: dict[str, CheckpointInfo] = field(default_factory=dict)
    hold_at: int | None = None
    """Stop stepping (but keep answering commands) once this step is reached, until `release()`."""

    def __post_init__(self) -> None:
        self.client = Client(self.url)
        self.poller = Client(self.url)
        """The long-poll has its own connection, as a real trainer's I/O thread does."""
        registration = RunRegistration(name=self.name, domains=["prose", "code"], policy=self.policy)
        self.run_id = self.client.register_run(registration).run_id
        self._stop = threading.Event()
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._train, daemon=True),
            threading.Thread(target=self._poll, daemon=True),
        ]

    def start(self) -> ScriptedTrainer:
        """Start training and polling."""
        self._heartbeat()
        for thread in self._threads:
            thread.start()
        return self

    def release(self) -> None:
        """Let a trainer held at `hold_at` go on."""
        self._released.set()

    def stop(self) -> None:
        """Stop both threads."""
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        self.client.close()
        self.poller.close()

    def state(self) -> RunState:
        """The state a heartbeat carries."""
        return RunState(
            step=self.step,
            branch=self.branch,
            paused=self.paused,
            lr=self.lr,
            weight_decay=0.1,
            optimizer="adamw",
            data_mix={"prose": 0.5, "code": 0.5},
            param_groups=["decay", "no_decay"],
        )

    def _send(self, call: Callable[[], Any]) -> None:
        while not self._stop.is_set():
            try:
                call()
                return
            except (RunsteerError, OSError):  # OSError: protocols' sync Client lets a refused connect through
                time.sleep(0.05)

    def _heartbeat(self) -> None:
        self._send(lambda: self.client.push_reports(self.run_id, [Heartbeat(state=self.state())]))

    def _train(self) -> None:
        while not self._stop.is_set() and self.step < self.steps:
            if self.hold_at is not None and self.step >= self.hold_at and not self._released.is_set():
                time.sleep(0.01)
                continue
            with self._lock:
                if self.paused:
                    step = None
                else:
                    step, branch, lr = self.step, self.branch, self.lr
                    self.step += 1
            if step is None:
                time.sleep(0.01)
                continue
            sample = MetricsSample(
                branch=branch,
                step=step,
                time=time.time(),
                values={"loss": self.loss(branch, step), "lr": lr, "grad_norm": 1.0 + 0.01 * (step % 5)},
            )
            batch = MetricsBatch(samples=[sample])
            self._send(lambda: self.client.push_metrics(self.run_id, batch))  # noqa: B023
            if step % self.snapshot_every == 0:
                info = CheckpointInfo(checkpoint_id=f"{branch}-{step}", branch=branch, step=step, time=time.time())
                self.checkpoints[info.checkpoint_id] = info
                saved = [CheckpointSaved(checkpoint=info)]
                self._send(lambda: self.client.push_reports(self.run_id, saved))  # noqa: B023
            if step % 20 == 0:
                self._heartbeat()
            time.sleep(self.step_s)

    def _poll(self) -> None:
        after = 0
        while not self._stop.is_set():
            try:
                records = self.poller.next_commands(self.run_id, after_seq=after, wait_s=0.5)
            except (RunsteerError, OSError):
                time.sleep(0.05)
                continue
            for record in records:
                after = max(after, record.seq)
                result = self._apply(record)
                self._send(lambda: self.poller.report_result(self.run_id, record.id, result))  # noqa: B023
                self.applied.append(record)
                self._send(lambda: self.poller.push_reports(self.run_id, [Heartbeat(state=self.state())]))

    def _apply(self, record: CommandRecord) -> CommandResult:
        command = record.command
        with self._lock:
            if command.type == "set_hparams" and command.lr is not None:
                self.lr = command.lr
                return CommandResult(status="applied", step=self.step, effective={"lr": self.lr})
            if command.type == "rollback":
                target = self.checkpoints.get(command.checkpoint_id or "")
                if target is None:
                    return CommandResult(status="rejected", step=self.step, message="unknown checkpoint")
                old_branch, old_step = self.branch, self.step
                self.branch, self.step = f"{old_branch}-r{target.step}", target.step
                effective = {
                    "branch": self.branch,
                    "step": target.step,
                    "from_branch": old_branch,
                    "from_step": old_step,
                    "skipped_batches": command.skip_batches,
                }
                return CommandResult(status="applied", step=old_step, effective=effective)
            if command.type == "pause":
                self.paused = True
                return CommandResult(status="applied", step=self.step, effective={"paused": True})
            return CommandResult(status="rejected", step=self.step, message=f"{command.type} not scripted")


def window_of(values: Mapping[str, Sequence[float | None]], **run: Any) -> RunWindow:
    """A window whose metrics are these per-step lists (step = index; None: not reported at that step, as
    `attn_logit_max/*` between measurements); extra keys set tracker fields."""
    tracker = WindowTracker("run-1")
    steps = max(len(series) for series in values.values())
    for step in range(steps):
        present = {
            name: value for name, series in values.items() if step < len(series) and (value := series[step]) is not None
        }
        tracker.add_sample(MetricsSample(step=step, time=1.0, values=present), received_at=1.0)
    for key, value in run.items():
        setattr(tracker, key, value)
    return tracker.window(now=2.0)


@dataclass
class FakeLLM:
    """A real HTTP server speaking the OpenAI chat and Anthropic messages APIs with scripted answers.

    Each script item is a reply body text (the model's content), ("status", code, retry_after) or ("sleep", s).
    """

    script: list[Any] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """Base URL of the OpenAI-style API (`/v1`)."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root(self) -> str:
        """Base URL without `/v1` (Anthropic's convention)."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeLLM:
        """Listen on a free loopback port."""
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._openai)
        app.router.add_post("/v1/messages", self._anthropic)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()

    async def _next(self, request: web.Request) -> str | web.Response:
        self.requests.append({"headers": dict(request.headers), "body": await request.json()})
        item = self.script.pop(0) if self.script else json.dumps({"command": None, "reason": "all fine"})
        if isinstance(item, tuple) and item[0] == "status":
            headers = {"Retry-After": str(item[2])} if item[2] is not None else {}
            return web.json_response({"error": {"message": "slow down"}}, status=item[1], headers=headers)
        if isinstance(item, tuple) and item[0] == "sleep":
            await asyncio.sleep(item[1])
            return json.dumps({"command": None, "reason": "late"})
        return str(item)

    async def _openai(self, request: web.Request) -> web.Response:
        content = await self._next(request)
        if isinstance(content, web.Response):
            return content
        return web.json_response(
            {
                "id": "x",
                "object": "chat.completion",
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                ],
            }
        )

    async def _anthropic(self, request: web.Request) -> web.Response:
        content = await self._next(request)
        if isinstance(content, web.Response):
            return content
        return web.json_response(
            {
                "id": "m",
                "type": "message",
                "role": "assistant",
                "content": [{"type": "text", "text": content}],
                "stop_reason": "end_turn",
            }
        )
