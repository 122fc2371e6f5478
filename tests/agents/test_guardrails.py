"""Guardrails wrap every policy: change factor, run policy bounds, cooldown, budget, one unanswered, rollback cap."""

from __future__ import annotations

import dataclasses
import time

from agents.decision import Decision, Intervention
from agents.guardrails import GuardrailConfig, Guardrails
from protocols import Bounds, CheckpointInfo, CommandRecord, Policy, Rollback, RunState, SetDataMix, SetHparams
from tests.agents.helpers import window_of

SOURCE = "agent:test"
CONFIG = GuardrailConfig(max_change_factor=10.0, cooldown_steps=50, max_interventions_per_hour=3, max_rollbacks=2)


def _window(tick: int = 200, interventions=(), commands=(), policy=None, lr=0.003, paused=False):
    window = window_of({"loss": [2.0] * 5})
    state = RunState(step=200, lr=lr, weight_decay=0.1, paused=paused, data_mix={"prose": 0.5, "code": 0.5})
    return dataclasses.replace(
        window,
        tick=tick,
        interventions=tuple(interventions),
        commands=tuple(commands),
        policy=policy or Policy(),
        state=state,
        now=time.time(),
    )


def _decision(*commands, rule="r") -> Decision:
    return Decision(rule=rule, reason="because", commands=tuple(commands), step=200)


def _done(rule="r", tick=100, types=("set_hparams",), at=None) -> Intervention:
    return Intervention(
        rule=rule,
        decided_tick=tick,
        time=at or time.time(),
        command_types=types,
        command_ids=("x",),
        answered_tick=tick,
    )


def test_a_learning_rate_change_beyond_the_factor_is_blocked():
    """0.003 -> 0.3 is x100 and is dropped; 0.003 -> 0.0003 (x10) passes."""
    guard = Guardrails(CONFIG, SOURCE)
    blocked = guard.review(_decision(SetHparams(lr=0.3)), _window())
    assert blocked.decision is None and "x100 (limit x10)" in blocked.blocked
    assert guard.review(_decision(SetHparams(lr=0.0003)), _window()).decision is not None


def test_a_data_mix_change_beyond_the_factor_is_blocked():
    """Moving a domain from half to a twentieth-and-less of the mix is more than 10x."""
    guard = Guardrails(CONFIG, SOURCE)
    review = guard.review(_decision(SetDataMix(weights={"prose": 0.01})), _window())
    assert review.decision is None and "data_mix.prose" in review.blocked


def test_a_value_outside_the_run_policy_bounds_is_blocked_before_sending():
    """The run policy's bounds are checked locally so an out-of-policy command is never sent."""
    policy = Policy(bounds={"set_hparams.lr": Bounds(min=1e-5, max=0.002)})
    review = Guardrails(CONFIG, SOURCE).review(_decision(SetHparams(lr=0.0025)), _window(policy=policy))
    assert review.decision is None and review.blocked == (
        "set_hparams.lr: 0.0025 is outside the allowed range; allowed [1e-05, 0.002] (run policy)"
    )


def test_no_intervention_during_the_cooldown_after_the_last_answer():
    """Within 50 steps of the last answered intervention, a new one is held back; after it, it passes."""
    guard = Guardrails(CONFIG, SOURCE)
    assert "cooling down" in guard.review(_decision(SetHparams(lr=0.002)), _window(120, [_done(tick=100)])).blocked
    assert guard.review(_decision(SetHparams(lr=0.002)), _window(150, [_done(tick=100)])).decision is not None


def test_no_command_while_an_earlier_one_is_unanswered():
    """An own command still queued (or pending approval) blocks the next decision."""
    open_record = CommandRecord(
        id="r.abc.0",
        run_id="run-1",
        seq=1,
        command=SetHparams(lr=0.001),
        source=SOURCE,
        reason="",
        status="pending_approval",
        created_at=1.0,
        updated_at=1.0,
    )
    review = Guardrails(CONFIG, SOURCE).review(_decision(SetHparams(lr=0.002)), _window(commands=[open_record]))
    assert review.decision is None and "waiting for an answer to r.abc.0" in review.blocked


def test_the_hourly_budget_caps_interventions():
    """Three interventions in the last hour spend a budget of three; older ones do not count."""
    guard = Guardrails(CONFIG, SOURCE)
    recent = [_done(tick=t) for t in (10, 20, 30)]
    assert "hourly budget" in guard.review(_decision(SetHparams(lr=0.002)), _window(500, recent)).blocked
    old = [_done(tick=t, at=time.time() - 4000) for t in (10, 20, 30)]
    assert guard.review(_decision(SetHparams(lr=0.002)), _window(500, old)).decision is not None


def test_past_the_rollback_cap_the_run_is_paused_for_a_person_instead():
    """With two rollbacks spent, a third becomes a pause with a critical reason; if already paused, nothing."""
    guard = Guardrails(CONFIG.model_copy(update={"max_interventions_per_hour": 10}), SOURCE)
    spent = [_done(tick=10, types=("rollback",)), _done(tick=20, types=("rollback", "set_hparams"))]
    review = guard.review(_decision(Rollback(latest_healthy=True)), _window(500, spent))
    assert review.decision is not None and [c.type for c in review.decision.commands] == ["pause"]
    assert review.decision.severity == "critical" and "2 rollbacks already" in review.decision.reason
    assert guard.review(_decision(Rollback(latest_healthy=True)), _window(500, spent, paused=True)).decision is None


def test_alerts_are_not_interventions_but_do_not_repeat_within_the_cooldown():
    """An alert passes while commands cool down, but the same rule's alert is not raised twice in 50 steps."""
    guard = Guardrails(CONFIG, SOURCE)
    alert = Decision(rule="watch", reason="high", step=200)
    assert guard.review(alert, _window(120, [_done(tick=100)])).decision is not None
    said = Intervention(rule="watch", decided_tick=110, time=time.time(), answered_tick=110)
    assert guard.review(alert, _window(120, [said])).decision is None


def test_an_lr_cut_after_a_rollback_is_measured_from_the_checkpoints_lr():
    """Rolled back to step 0 of a warm-up (lr 0.0003), lr 0.00015 is x0.5 and passes though it is x20 below now."""
    window = window_of({"loss": [2.0] * 5, "lr": [0.0003, 0.001, 0.002, 0.003, 0.003]})
    start = CheckpointInfo(checkpoint_id="start", branch="main", step=0, time=1.0)
    window = dataclasses.replace(window, checkpoints=(start,), now=time.time())
    decision = _decision(Rollback(checkpoint_id="start"), SetHparams(lr=0.00015))
    assert Guardrails(CONFIG, SOURCE).review(decision, window).decision == decision
    blocked = Guardrails(CONFIG, SOURCE).review(_decision(SetHparams(lr=0.00015)), window)
    assert blocked.decision is None and "x20" in blocked.blocked
