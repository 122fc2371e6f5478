"""Helpers for agent tests: the scripted trainer as they run it, windows from numbers, a fake LLM API."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from agents.window import RunWindow, WindowTracker
from protocols import (
    MetricsSample,
)
from tests.scripted_trainer import Loss, ScriptedTrainer


def steady_loss(branch: str, step: int) -> float:
    """A slowly falling loss with a little deterministic wiggle."""
    return 3.0 - 0.001 * step + 0.01 * ((step * 7919) % 13 - 6) / 6


def spike_on_main(at: int, height: float = 9.0) -> Loss:
    """`steady_loss`, except that on branch main the loss jumps to `height` from step `at` on."""
    return lambda branch, step: height if branch == "main" and step >= at else steady_loss(branch, step)


def agent_trainer(url: str, **options: Any) -> ScriptedTrainer:
    """The scripted trainer as the agent tests run it: fast steps, a snapshot every 10 steps, two domains, and only
    loss, lr and grad_norm reported (as a minimal hand-written loop does), so only the detectors under test fire."""
    defaults: dict[str, Any] = {
        "steps": 400,
        "step_s": 0.004,
        "snapshot_every": 10,
        "lr": 0.003,
        "loss": steady_loss,
        "health": False,
        "domains": ["prose", "code"],
    }
    return ScriptedTrainer(url, **(defaults | options))


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
