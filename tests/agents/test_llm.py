"""The LLM agent against a real HTTP server speaking the OpenAI-compatible (and Anthropic) API with scripted answers."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time

import pytest

from agents.guardrails import GuardrailConfig, Guardrails
from agents.llm import AnthropicMessages, LLMPolicy, OpenAIChat, make_backend, parse_answer, summarize
from agents.runtime import AgentRuntime
from protocols import RunState, SetHparams
from protocols.client import AsyncClient
from tests.agents.helpers import FakeLLM, agent_trainer, window_of
from tests.polling import wait_until

HALVE = json.dumps({"command": {"type": "set_hparams", "lr": 0.0015}, "reason": "loss flat at lr 0.003; halving"})


@pytest.fixture
async def llm():
    server = await FakeLLM().start()
    yield server
    await server.stop()


def _window():
    window = window_of({"loss": [3.0 - 0.01 * i for i in range(30)], "grad_norm": [1.0] * 30})
    return dataclasses.replace(window, state=RunState(step=29, lr=0.003, weight_decay=0.1))


def _policy(llm: FakeLLM, **backend) -> LLMPolicy:
    return LLMPolicy(OpenAIChat(base_url=llm.url, model="m", **backend), every_steps=10)


async def test_a_valid_answer_becomes_a_decision_and_the_request_carries_schema_and_summary(llm, monkeypatch):
    """The model sees the command schema and the run summary; its command comes back validated, key sent."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    llm.script.append(HALVE)
    policy = LLMPolicy(make_backend("openai", llm.url, "m"), every_steps=10)
    decision = await policy.decide(_window())
    assert decision is not None and decision.commands == (SetHparams(lr=0.0015),)
    assert "halving" in decision.reason and "lr 0.003 -> 0.0015" in decision.describe()
    request = llm.requests[0]
    assert request["headers"]["Authorization"] == "Bearer sk-test" and request["body"]["model"] == "m"
    system, user = request["body"]["messages"]
    assert '"set_hparams"' in system["content"] and '"discriminator"' in system["content"]
    summary = json.loads(user["content"])
    assert summary["settings"]["lr"] == 0.003 and summary["metrics"]["loss"]["latest_step"] == 29


async def test_an_answer_that_is_not_json_is_logged_and_dropped(llm, caplog):
    """Prose instead of JSON yields no decision and a logged reason."""
    llm.script.append("I think you should lower the learning rate.")
    policy = _policy(llm)
    with caplog.at_level(logging.WARNING, "runsteer.agents.llm"):
        assert await policy.decide(_window()) is None
    assert "not JSON" in policy.dropped[0] and "nothing sent" in caplog.text


async def test_an_answer_with_an_invalid_command_is_dropped_naming_the_field(llm):
    """A negative learning rate fails the protocol's validation and is dropped."""
    llm.script.append(json.dumps({"command": {"type": "set_hparams", "lr": -1}, "reason": "x"}))
    policy = _policy(llm)
    assert await policy.decide(_window()) is None
    assert "lr" in policy.dropped[0] and "not a valid command" in policy.dropped[0]


async def test_a_timeout_is_dropped_without_waiting_past_the_limit(llm):
    """A model slower than the timeout gives no decision, within about the timeout."""
    llm.script.append(("sleep", 3.0))
    policy = _policy(llm, timeout_s=0.3)
    started = time.monotonic()
    assert await policy.decide(_window()) is None
    assert time.monotonic() - started < 2.0 and "did not answer within 0.3 s" in policy.dropped[0]


async def test_a_429_is_retried_after_retry_after_and_then_answered(llm):
    """Two 429s with Retry-After 0 are retried; the third request's answer is used."""
    llm.script += [("status", 429, 0), ("status", 429, 0), HALVE]
    decision = await _policy(llm).decide(_window())
    assert decision is not None and len(llm.requests) == 3


async def test_persistent_429s_give_up_after_the_retries(llm):
    """Three 429s in a row exhaust two retries and drop the call."""
    llm.script += [("status", 429, 0)] * 3 + [HALVE]
    policy = _policy(llm)
    assert await policy.decide(_window()) is None
    assert "429" in policy.dropped[0] and len(llm.requests) == 3


async def test_the_anthropic_messages_api_is_spoken_with_its_headers(llm, monkeypatch):
    """x-api-key and anthropic-version are sent to /v1/messages and the text block is parsed."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", "ak-test")
    llm.script.append(HALVE)
    backend = make_backend("anthropic", llm.root, "claude")
    assert isinstance(backend, AnthropicMessages)
    decision = await LLMPolicy(backend, every_steps=10).decide(_window())
    assert decision is not None
    headers, body = llm.requests[0]["headers"], llm.requests[0]["body"]
    assert headers["x-api-key"] == "ak-test" and headers["anthropic-version"] == "2023-06-01"
    assert body["system"].startswith("You watch") and body["messages"][0]["role"] == "user"


def test_answers_in_code_fences_and_null_commands_parse():
    """A fenced JSON answer parses; a null command is a valid 'do nothing'."""
    command, reason = parse_answer("```json\n" + HALVE + "\n```")
    assert command == SetHparams(lr=0.0015) and reason
    assert parse_answer('{"command": null, "reason": "fine"}') == (None, "fine")


def test_the_model_is_asked_on_schedule_not_every_step(llm):
    """After an answer the model is not asked again until `every_steps` more steps."""
    policy = _policy(llm)
    window = _window()
    assert policy.due(window) == ""
    policy.asked_at_tick = window.tick
    assert policy.due(window) is None
    assert policy.due(dataclasses.replace(window, tick=window.tick + 10)) == ""
    assert summarize(window)["trigger"] == "scheduled check"


async def test_an_out_of_bounds_answer_is_never_sent_and_a_valid_one_is_applied(server_url, llm, caplog):
    """Against a real server and trainer: lr x100 is held back by the guardrails; the next, valid answer applies."""
    caplog.set_level(logging.INFO, "runsteer.agents")
    llm.script += [json.dumps({"command": {"type": "set_hparams", "lr": 0.3}, "reason": "go faster"}), HALVE]
    trainer = agent_trainer(server_url, steps=100_000, step_s=0.01).start()
    guardrails = Guardrails(GuardrailConfig(cooldown_steps=5), "agent:llm")
    async with AsyncClient(server_url) as client:
        policy = LLMPolicy(OpenAIChat(base_url=llm.url, model="m"), every_steps=15)
        agent = AgentRuntime(client, trainer.run_id, policy, guardrails, mode="act", tick_s=0.2)
        task = asyncio.create_task(agent.run())
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, wait_until, lambda: trainer.applied, 30.0, "the valid answer applied"
            )
        finally:
            agent.stop()
            await task
    trainer.close()
    assert [r.command for r in trainer.applied] == [SetHparams(lr=0.0015)]
    assert trainer.applied[0].source == "agent:llm" and "halving" in trainer.applied[0].reason
    assert "x100 (limit x10)" in caplog.text
