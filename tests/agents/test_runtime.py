"""The agent runtime against a real server and a scripted trainer: act, propose, dry-run, reconnect and catch up."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import pytest

from agents.guardrails import GuardrailConfig, Guardrails
from agents.rules import RulePolicy, load_rules
from agents.runtime import AgentRuntime, Mode
from protocols import MetricsEvent, MetricsSample
from protocols.client import AsyncClient, Client
from tests.agents.helpers import agent_trainer, spike_on_main
from tests.polling import wait_until
from tests.serving import ServerProcess

RULES = """
[guardrails]
cooldown_steps = 20

[[rules]]
name = "persistent-spike"
detector = { kind = "ratio", metric = "loss", window = 50, factor = 2.0, for_steps = 5, min_points = 20 }
actions = [{ type = "rollback", steps_back = 1, skip_batches = "x2" }, { type = "set_hparams", lr = "x0.5" }]
"""


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "rules.toml"
    path.write_text(RULES)
    return path


def _runtime(client: AsyncClient, run_id: str, rules_file: Path, mode: Mode) -> AgentRuntime:
    rules = load_rules(rules_file)
    return AgentRuntime(
        client,
        run_id,
        RulePolicy(rules),
        Guardrails(rules.guardrails, "agent:rules"),
        mode=mode,
        tick_s=0.2,
        reconnect_max_s=0.5,
    )


async def _in_thread(function, *args):
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


async def test_in_act_mode_a_persistent_spike_is_rolled_back_skipped_and_the_lr_halved(server_url, rules_file, caplog):
    """The agent sends rollback + lr x0.5 as agent:rules with a reason; the trainer applies both and moves on."""
    caplog.set_level(logging.INFO, "runsteer.agents")
    trainer = agent_trainer(server_url, loss=spike_on_main(120), steps=260).start()
    async with AsyncClient(server_url) as client:
        agent = _runtime(client, trainer.run_id, rules_file, "act")
        task = asyncio.create_task(agent.run())
        try:
            await _in_thread(wait_until, lambda: len(trainer.applied) >= 2, 30.0, "the agent's commands")
            await _in_thread(wait_until, lambda: trainer.step >= 200, 30.0, "training on")
        finally:
            agent.stop()
            await task
    trainer.close()
    rollback, cut = trainer.applied[:2]
    assert rollback.command.type == "rollback" and rollback.source == "agent:rules"
    assert rollback.command.checkpoint_id == "main-110" and rollback.command.skip_batches == 20
    assert cut.command.type == "set_hparams" and cut.command.lr == pytest.approx(0.0015)
    assert "loss" in rollback.reason and "rolled back to step 110" in rollback.reason
    assert trainer.branch == "main.r110" and trainer.lr == pytest.approx(0.0015)
    assert len(trainer.applied) == 2, "the healed run needs no further intervention"
    assert "lr 0.003 -> 0.0015" in caplog.text


async def test_in_propose_mode_commands_wait_for_approval_and_the_run_policy_is_untouched(
    server_url, rules_file, client: Client
):
    """The agent's commands are held in pending_approval until a person approves; the run's policy stays as it was."""
    trainer = agent_trainer(server_url, loss=spike_on_main(120), steps=400).start()
    async with AsyncClient(server_url) as aclient:
        agent = _runtime(aclient, trainer.run_id, rules_file, "propose")
        task = asyncio.create_task(agent.run())
        try:
            pending = await _in_thread(
                wait_until, lambda: client.list_commands(trainer.run_id, status="pending_approval"), 30.0, "proposals"
            )
            assert client.get_run(trainer.run_id).policy.approval_required == []
            assert pending[0].command.type == "rollback" and trainer.applied == []
            approved = client.approve(trainer.run_id, pending[0].id, source="user:alice")
            assert approved.status == "queued"
            await _in_thread(wait_until, lambda: trainer.applied, 30.0, "the approved rollback")
        finally:
            agent.stop()
            await task
    trainer.close()
    assert trainer.applied[0].command.type == "rollback"
    assert client.get_run(trainer.run_id).policy.approval_required == []


async def test_in_dry_run_mode_decisions_are_logged_and_nothing_is_sent(server_url, rules_file, client: Client, caplog):
    """A dry-run agent logs what it would do and the run's command list stays empty."""
    caplog.set_level(logging.INFO, "runsteer.agents")
    trainer = agent_trainer(server_url, loss=spike_on_main(120), steps=200).start()
    async with AsyncClient(server_url) as aclient:
        agent = _runtime(aclient, trainer.run_id, rules_file, "dry-run")
        task = asyncio.create_task(agent.run())
        try:
            await _in_thread(wait_until, lambda: agent.decisions, 30.0, "a decision")
        finally:
            agent.stop()
            await task
    trainer.close()
    assert client.list_commands(trainer.run_id) == []
    assert "would act (dry-run)" in caplog.text and "lr 0.003 -> 0.0015" in caplog.text


@pytest.mark.slow
async def test_after_a_dropped_stream_the_agent_reconnects_catches_up_and_acts_on_what_it_missed(
    tmp_path: Path, rules_file, caplog
):
    """With the server restarted while the spike happened, the agent reads the missed steps from history and acts."""
    caplog.set_level(logging.INFO, "runsteer.agents")
    server = ServerProcess(tmp_path / "runsteer.db").start()
    trainer = agent_trainer(server.url, loss=spike_on_main(120), steps=400, hold_at=100).start()
    try:
        async with AsyncClient(server.url) as client:
            agent = _runtime(client, trainer.run_id, rules_file, "act")
            task = asyncio.create_task(agent.run())
            try:
                await _in_thread(wait_until, lambda: agent.tracker.step >= 99, 30.0, "the agent following")
                port = server.port
                await _in_thread(server.stop)
                await _in_thread(lambda: wait_until(lambda: not agent.connected.is_set(), 10.0, "the drop"))
                # Blocking this event loop keeps the agent away while the trainer reports the spike to the new server.
                server.start(port=port)
                trainer.release()
                wait_until(lambda: trainer.step >= 140, 30.0, "the trainer reporting while the agent is away")
                await _in_thread(wait_until, lambda: trainer.applied, 30.0, "the agent acting after the restart")
            finally:
                agent.stop()
                await task
        assert agent.connections >= 2
        assert trainer.applied[0].command.type == "rollback"
        assert trainer.applied[0].command.checkpoint_id == "main-110"
        caught_up = [int(m) for m in re.findall(r"catching up on run \S+ (\d+) steps", caplog.text)]
        assert len(caught_up) >= 2 and sum(caught_up[1:]) > 0, caplog.text[-2000:]
    finally:
        trainer.close()
        server.stop()


class _Recorder:
    """A policy that only notes the step of every window it is shown."""

    name = "recorder"

    def __init__(self) -> None:
        self.steps: list[int] = []

    def decide(self, window):
        self.steps.append(window.step)


async def test_each_step_of_a_streamed_metrics_batch_is_judged_in_turn():
    """A batch of 15 steps is judged 15 times, once at each step, so a metric measured every 10 steps (attention
    logits) is seen at its own step rather than missed because the batch ended at step 14."""
    policy = _Recorder()
    agent = AgentRuntime(None, "run-1", policy, Guardrails(GuardrailConfig(), "agent:rules"))
    samples = [
        MetricsSample(
            step=step, time=1.0, values={"loss": 2.0, **({"attn_logit_max/0": 9.0} if step % 10 == 0 else {})}
        )
        for step in range(15)
    ]
    await agent._take(MetricsEvent(event_id=1, time=1.0, run_id="run-1", samples=samples))
    assert policy.steps == list(range(15))
