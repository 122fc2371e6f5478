"""The LLM policy: every N steps, or when a detector fires, show a model a compact summary of the run and the
command JSON Schema, and turn its answer (a command or none, plus a reason) into a decision.

Two backends speak the two common APIs over aiohttp: the OpenAI-compatible chat API (OpenAI, vLLM, Ollama,
llama.cpp through a base URL) and Anthropic's Messages API. An answer that is not valid JSON or not a valid
command is logged and dropped; out-of-policy commands are dropped by the guardrails, so nothing invalid is sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import statistics
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import aiohttp
from pydantic import ValidationError

from agents.decision import Decision, changes_of
from agents.rules import RulePolicy
from agents.window import RunWindow
from protocols.client.core import Backoff, retry_after_s
from protocols.commands import Command, command_adapter
from protocols.schema import command_schema

log = logging.getLogger("runsteer.agents.llm")

Api = Literal["openai", "anthropic"]
KEY_ENV: dict[Api, str] = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
RETRY_MAX_S = 30.0
"""The longest wait between LLM retries, whatever Retry-After asks for."""
"""Where each backend reads its API key; a local server may need none."""
ANTHROPIC_VERSION = "2023-06-01"

KEY_METRICS = (
    "loss",
    "eval_loss",
    "grad_norm",
    "update_ratio",
    "param_norm",
    "logit_max",
    "logit_z",
    "tokens_per_s",
)
RECENT_STEPS = 20
RECENT_COMMANDS = 8


class LLMError(Exception):
    """The model could not be asked or did not answer usefully (timeout, rate limit, HTTP error, odd body)."""


class ChatBackend(Protocol):
    """One request to a model: a system prompt and a user message in, the answer's text out."""

    async def complete(self, system: str, user: str) -> str: ...


@dataclass
class HttpBackend:
    """Shared HTTP handling: timeouts, retries on 429 and 5xx honouring Retry-After, errors as `LLMError`."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 60.0
    max_retries: int = 2
    """Retries after a 429 or 5xx answer (so at most `1 + max_retries` requests per question)."""
    max_tokens: int = 512
    session: aiohttp.ClientSession | None = None

    async def _post(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
        url = self.base_url.rstrip("/") + path
        session = self.session or aiohttp.ClientSession()
        backoff = Backoff(0.5, RETRY_MAX_S)
        try:
            for attempt in range(self.max_retries + 1):
                try:
                    async with session.post(
                        url, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=self.timeout_s)
                    ) as response:
                        text = await response.text()
                        if response.status == 429 or response.status >= 500:
                            if attempt == self.max_retries:
                                raise LLMError(f"{url} answered {response.status} {attempt + 1} times: {text[:200]}")
                            wait = backoff.next_delay(retry_after_s(response.headers.get("Retry-After")))
                            log.warning("llm: %s answered %d; retrying in %.1f s", url, response.status, wait)
                            await asyncio.sleep(wait)
                            continue
                        if response.status >= 400:
                            raise LLMError(f"{url} answered {response.status}: {text[:300]}")
                        try:
                            data = json.loads(text)
                        except json.JSONDecodeError as exc:
                            raise LLMError(f"{url} answered with a body that is not JSON: {text[:200]}") from exc
                        if not isinstance(data, dict):
                            raise LLMError(f"{url} answered with JSON that is not an object")
                        return data
                except TimeoutError as exc:
                    raise LLMError(f"{url} did not answer within {self.timeout_s:g} s") from exc
                except aiohttp.ClientError as exc:
                    raise LLMError(f"{url} unreachable: {exc!r}") from exc
            raise LLMError(f"{url}: no answer")
        finally:
            if self.session is None:
                await session.close()


class OpenAIChat(HttpBackend):
    """`POST {base_url}/chat/completions` of the OpenAI-compatible API; `base_url` usually ends in `/v1`."""

    async def complete(self, system: str, user: str) -> str:
        body = {
            "model": self.model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "temperature": 0,
            "max_tokens": self.max_tokens,
            "response_format": {"type": "json_object"},
        }
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        data = await self._post("/chat/completions", body, headers)
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise LLMError(f"chat completion without choices[0].message.content: {str(data)[:200]}") from exc
        if not isinstance(content, str):
            raise LLMError("chat completion content is not text")
        return content


class AnthropicMessages(HttpBackend):
    """`POST {base_url}/v1/messages` of Anthropic's Messages API; `base_url` is e.g. `https://api.anthropic.com`."""

    async def complete(self, system: str, user: str) -> str:
        body = {
            "model": self.model,
            "system": system,
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "messages": [{"role": "user", "content": user}],
        }
        headers = {"anthropic-version": ANTHROPIC_VERSION, **({"x-api-key": self.api_key} if self.api_key else {})}
        data = await self._post("/v1/messages", body, headers)
        blocks = data.get("content")
        if not isinstance(blocks, list):
            raise LLMError(f"message without content blocks: {str(data)[:200]}")
        texts = [block.get("text", "") for block in blocks if isinstance(block, dict) and block.get("type") == "text"]
        text = "".join(str(part) for part in texts)
        if not text:
            raise LLMError("message without a text block")
        return text


def make_backend(
    api: Api, base_url: str, model: str, *, timeout_s: float = 60.0, session: aiohttp.ClientSession | None = None
) -> OpenAIChat | AnthropicMessages:
    """The backend for `api`, with its key from the environment (`OPENAI_API_KEY` or `ANTHROPIC_API_KEY`)."""
    kind = OpenAIChat if api == "openai" else AnthropicMessages
    key = os.environ.get(KEY_ENV[api])
    return kind(base_url=base_url, model=model, api_key=key, timeout_s=timeout_s, session=session)


SYSTEM_PROMPT = """You watch a neural-network training run and may send ONE command to steer it, like a careful \
engineer on call. Intervene only when the numbers call for it; most of the time the right answer is no command.
Answer with a single JSON object and nothing else: {"command": <a command object or null>, "reason": "<one \
sentence a person can read, citing the numbers>"}.
Learning rates and other values are absolute, not relative. A command moving a value by more than 10x at once, \
or outside the run policy's bounds, will be dropped.
The command JSON Schema:
"""


def system_prompt() -> str:
    """The instructions and the command JSON Schema from `protocols`."""
    return SYSTEM_PROMPT + json.dumps(command_schema(), separators=(",", ":"))


def summarize(window: RunWindow, trigger: str = "") -> dict[str, Any]:
    """A compact picture of the run: recent and long-run statistics, settings, and recent commands with effects."""
    metrics: dict[str, Any] = {}
    for name in [*KEY_METRICS, *sorted(n for n in window.metrics if n.startswith(("eval_loss/", "loss/")))]:
        series = window.series(name)
        if series is not None and len(series):
            metrics[name] = _stats(series.last_points())
    layers = [window.metrics[n].latest for n in window.matching("attn_logit_max/*")]
    if layers:
        metrics["attn_logit_max (max over layers, latest)"] = round(max(p[1] for p in layers if p is not None), 4)
    state = window.state.model_dump(exclude={"param_groups"}) if window.state is not None else None
    return {
        "run": {
            "run_id": window.run_id,
            "status": window.status,
            "branch": window.branch,
            "step": window.step,
            "config": dict(window.config),
            "domains": list(window.domains),
        },
        "settings": state,
        "policy_bounds": {key: bounds.model_dump() for key, bounds in window.policy.bounds.items()},
        "metrics": metrics,
        "non_finite_recently": {str(step): list(names) for step, names in sorted(window.nonfinite.items())[-5:]},
        "recent_commands": [_command_view(record, window) for record in window.commands[-RECENT_COMMANDS:]],
        "trigger": trigger or "scheduled check",
    }


def _stats(points: list[tuple[int, float]]) -> dict[str, Any]:
    values = [v for _, v in points]
    recent = values[-RECENT_STEPS:]
    return {
        "latest": round(values[-1], 5),
        "latest_step": points[-1][0],
        "recent_mean": round(statistics.fmean(recent), 5),
        "recent_min": round(min(recent), 5),
        "recent_max": round(max(recent), 5),
        "window_mean": round(statistics.fmean(values), 5),
        "window_first": round(values[0], 5),
        "window_first_step": points[0][0],
    }


def _command_view(record: Any, window: RunWindow) -> dict[str, Any]:
    view: dict[str, Any] = {
        "seq": record.seq,
        "command": record.command.model_dump(exclude_none=True),
        "source": record.source,
        "status": record.status,
        "reason": record.reason,
        "applied_step": record.applied_step,
    }
    loss = window.series("loss")
    if record.applied_step is not None and loss is not None:
        points = loss.last_points()
        before = [v for s, v in points if record.applied_step - RECENT_STEPS <= s < record.applied_step]
        after = [v for s, v in points if s >= record.applied_step][:RECENT_STEPS]
        if before and after:
            view["loss_mean_before_after"] = [round(statistics.fmean(before), 4), round(statistics.fmean(after), 4)]
    return view


def parse_answer(text: str) -> tuple[Command | None, str]:
    """The command (or None) and reason in a model's answer; raises ValueError naming what is wrong."""
    body = text.strip()
    fenced = re.search(r"```(?:json)?\s*(\{.*\})\s*```", body, re.DOTALL)
    if fenced:
        body = fenced.group(1)
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        raise ValueError(f"answer is not JSON ({exc.msg}): {text[:200]!r}") from exc
    if not isinstance(data, dict) or "command" not in data:
        raise ValueError(f'answer must be an object {{"command": ..., "reason": ...}}: {text[:200]!r}')
    reason = data.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError("answer has no reason")
    if data["command"] is None:
        return None, reason.strip()
    try:
        command = command_adapter.validate_python(data["command"], strict=False)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'command'}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"not a valid command: {problems}") from exc
    return command, reason.strip()


class LLMPolicy:
    """Asks a model every `every_steps` steps, or when one of `triggers`' detectors fires (once per rule and period)."""

    def __init__(
        self, backend: ChatBackend, *, every_steps: int = 200, triggers: RulePolicy | None = None, name: str = "llm"
    ) -> None:
        self.backend = backend
        self.every_steps = every_steps
        self.triggers = triggers
        self.name = name
        self.asked_at_tick: int | None = None
        self.last_trigger: tuple[str, int] | None = None
        self.answers: list[str] = []
        """Every raw answer received, for the log and for tests."""
        self.dropped: list[str] = []
        """Why each unusable answer (or failed call) was dropped."""

    def due(self, window: RunWindow) -> str | None:
        """Why the model should be asked now ('' for the schedule), or None when it should not."""
        if window.step < 0:
            return None
        if self.triggers is not None:
            fired = self.triggers.decide(window)
            if fired is not None:
                key = (fired.rule, window.tick // max(1, self.every_steps))
                if key != self.last_trigger:
                    self.last_trigger = key
                    return f"detector {fired.rule} fired: {fired.reason}"
        if self.asked_at_tick is None or window.tick - self.asked_at_tick >= self.every_steps:
            return ""
        return None

    async def decide(self, window: RunWindow) -> Decision | None:
        """Ask the model when due; its valid command becomes a decision, anything else is logged and dropped."""
        trigger = self.due(window)
        if trigger is None:
            return None
        self.asked_at_tick = window.tick
        user = json.dumps(summarize(window, trigger), separators=(",", ":"), default=str)
        try:
            answer = await self.backend.complete(system_prompt(), user)
        except LLMError as exc:
            self._drop(f"no answer: {exc}")
            return None
        self.answers.append(answer)
        try:
            command, reason = parse_answer(answer)
        except ValueError as exc:
            self._drop(str(exc))
            return None
        if command is None:
            log.info("llm: no command at step %d: %s", window.step, reason)
            return None
        return Decision(
            rule=self.name,
            reason=f"{reason} (model's words)",
            commands=(command,),
            step=window.step,
            changes=changes_of(command, window),
        )

    def _drop(self, why: str) -> None:
        self.dropped.append(why)
        log.warning("llm: answer dropped, nothing sent: %s", why)
