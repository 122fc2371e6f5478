"""The rule policy: TOML rules, relative values, rollback targets, escalation, and the shipped default set."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from agents.decision import Intervention
from agents.rules import RulePolicy, load_rules
from protocols import CheckpointInfo, Rollback, RunState, SetHparams
from tests.agents.helpers import window_of

STEADY = [2.0 + 0.01 * ((i * 7) % 5 - 2) for i in range(100)]
SPIKE_RULES = """
[[rules]]
name = "persistent-spike"
detector = { kind = "ratio", metric = "loss", window = 50, factor = 2.0, for_steps = 5 }
actions = [{ type = "rollback", steps_back = 1, skip_batches = "x2" }, { type = "set_hparams", lr = "x0.5" }]
repeat = { times = 2, actions = [{ type = "pause" }] }

[[rules]]
name = "loss-watch"
detector = { kind = "threshold", metric = "loss", above = 5.0 }
"""


def _state(lr: float = 0.004) -> RunState:
    return RunState(step=105, lr=lr, weight_decay=0.1)


def _checkpoints(*steps: int, branch: str = "main") -> dict[str, CheckpointInfo]:
    return {
        f"{branch}-{s}": CheckpointInfo(checkpoint_id=f"{branch}-{s}", branch=branch, step=s, time=float(s))
        for s in steps
    }


def _spiked(**run):
    return window_of({"loss": [*STEADY, 9.0, 9.0, 9.0, 9.0, 9.0]}, **run)


def _with_state(window, lr=0.004):
    return dataclasses.replace(window, state=_state(lr))


def test_the_shipped_default_rule_set_loads_and_every_rule_cites_its_source(tmp_path: Path):
    """The default file validates, and a comment precedes every rule."""
    rules = load_rules()
    assert len(rules.rules) >= 10 and rules.guardrails.max_rollbacks == 3
    text = (Path(__file__).resolve().parents[2] / "agents" / "default_rules.toml").read_text()
    for block in text.split("[[rules]]")[1:]:
        assert block.lstrip("\n").startswith("#"), block[:80]


def test_a_persistent_spike_rolls_back_before_its_onset_skips_and_halves_the_lr(tmp_path: Path):
    """The newest checkpoint before the onset is restored, 2x the rewind is skipped, lr goes from current x0.5."""
    path = tmp_path / "rules.toml"
    path.write_text(SPIKE_RULES)
    window = _with_state(_spiked(checkpoints=_checkpoints(80, 90, 100, 103)))
    decision = RulePolicy(load_rules(path)).decide(window)
    assert decision is not None and decision.rule == "persistent-spike"
    rollback, cut = decision.commands
    assert rollback == Rollback(checkpoint_id="main-90", skip_batches=20)
    assert isinstance(cut, SetHparams) and cut.lr == pytest.approx(0.002)
    assert "rolled back to step 90 skipping 20 batches" in decision.reason and "lr x0.5" in decision.reason
    assert "lr 0.004 -> 0.002" in decision.describe()


def test_a_rule_escalates_when_it_fired_the_given_times_in_a_row(tmp_path: Path):
    """After one spike intervention from the same rule, the second firing pauses instead."""
    path = tmp_path / "rules.toml"
    path.write_text(SPIKE_RULES)
    past = (
        Intervention(
            rule="persistent-spike",
            decided_tick=1,
            time=1.0,
            command_types=("rollback",),
            command_ids=("a",),
            answered_tick=2,
        ),
    )
    window = _with_state(_spiked(checkpoints=_checkpoints(90), interventions=list(past)))
    decision = RulePolicy(load_rules(path)).decide(window)
    assert decision is not None and [c.type for c in decision.commands] == ["pause"]
    assert "2 times in a row" in decision.reason


def test_rollback_only_targets_checkpoints_on_the_current_lineage(tmp_path: Path):
    """A checkpoint on an abandoned branch is never chosen; the fork's ancestors before the fork are."""
    path = tmp_path / "rules.toml"
    path.write_text(SPIKE_RULES)
    checkpoints = {**_checkpoints(50, 95), **_checkpoints(99, branch="other")}
    window = _with_state(_spiked(checkpoints=checkpoints, branch="main", lineage={}))
    decision = RulePolicy(load_rules(path)).decide(window)
    assert decision is not None and decision.commands[0] == Rollback(checkpoint_id="main-95", skip_batches=10)


def test_an_unknown_current_lr_is_said_in_the_reason_and_no_lr_command_is_built(tmp_path: Path):
    """Without a run state or an lr metric, lr x0.5 cannot be computed and is left out."""
    path = tmp_path / "rules.toml"
    path.write_text(SPIKE_RULES)
    decision = RulePolicy(load_rules(path)).decide(_spiked(checkpoints=_checkpoints(90)))
    assert decision is not None and [c.type for c in decision.commands] == ["rollback"]
    assert "current value is unknown" in decision.reason


def test_a_rule_without_actions_raises_an_alert_only():
    """A firing alert-only rule gives a decision with no commands."""
    rules = load_rules()
    window = window_of({"attn_logit_max/0": [60.0]})
    decision = RulePolicy(rules).decide(window)
    assert decision is not None and decision.rule == "attention-logits-warning" and not decision.intervenes


RULE_HEAD = '[[rules]]\nname = "a"\ndetector = { kind = "nonfinite" }\n'
"""A rule's first lines, before the actions a bad-rule case varies."""


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('[[rules]]\nname = "a"\ndetector = { kind = "spike" }', "metric"),
        (
            RULE_HEAD + 'actions = [{ type = "set_hparams", lr = "x-1" }]',
            "lr",
        ),
        (
            RULE_HEAD + 'actions = [{ type = "set_hparams", eps = "x2" }]',
            "cannot be relative",
        ),
        (
            '[[rules]]\nname = "a"\ndetector = { kind = "nonfinite" }\nactions = [{ type = "set_hparams", lr = 50.0 }]',
            "not a valid set_hparams",
        ),
        ('[[rules]]\nname = "a"\ndetector = { kind = "bogus" }', "kind"),
        (
            '[guardrails]\nmax_change_factor = 0.5\n[[rules]]\nname = "a"\ndetector = { kind = "nonfinite" }',
            "max_change_factor",
        ),
        ("[[rules]\n", "not valid TOML"),
    ],
)
def test_an_invalid_rule_file_is_refused_naming_the_problem(tmp_path: Path, text: str, problem: str):
    """Bad detectors, actions, relative values, guardrails or TOML fail at load time with the field named."""
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=problem):
        load_rules(path)


def test_after_a_rollback_a_relative_lr_is_taken_of_the_lr_at_the_checkpoint_step(tmp_path: Path):
    """With a warming-up lr, lr x0.5 after rolling back to step 90 halves step 90's lr, not the newer, higher one."""
    path = tmp_path / "rules.toml"
    path.write_text(SPIKE_RULES)
    lrs = [0.001 * (1 + step / 10) for step in range(105)]
    window = window_of({"loss": [*STEADY, 9.0, 9.0, 9.0, 9.0, 9.0], "lr": lrs}, checkpoints=_checkpoints(90))
    decision = RulePolicy(load_rules(path)).decide(window)
    assert decision is not None
    rollback, cut = decision.commands
    assert rollback == Rollback(checkpoint_id="main-90", skip_batches=20)
    assert isinstance(cut, SetHparams) and cut.lr == pytest.approx(0.5 * lrs[90])
    assert f"lr {lrs[90]:.4g} -> {0.5 * lrs[90]:.4g}" in decision.describe()


def _every_tenth(measured: dict[int, float], steps: int) -> list[float | None]:
    """A metric reported every 10 steps only, as the built-in run measures `attn_logit_max/*`."""
    return [measured.get(step) for step in range(steps)]


def test_attention_logit_growth_in_warm_up_rolls_back_to_step_0_and_cuts_the_lr_of_that_step():
    """cpu-tiny at lr 3e-2 (measured: layer 0 at 0.26, 5.7, 41 at steps 0, 10, 20) goes back to the step-0 snapshot
    with lr x0.1 of step 0's warm-up lr, not of the higher lr in force at step 20."""
    lrs = [3e-2 * (0.1 + 0.9 * step / 50) for step in range(21)]
    logits = {
        "attn_logit_max/0": _every_tenth({0: 0.26, 10: 5.7, 20: 41.1}, 21),
        "attn_logit_max/1": _every_tenth({0: 0.23, 10: 4.0, 20: 43.2}, 21),
    }
    window = window_of(
        {"loss": [5.4 - 0.1 * step for step in range(21)], "lr": lrs, **logits}, checkpoints=_checkpoints(0)
    )
    decision = RulePolicy(load_rules()).decide(window)
    assert decision is not None and decision.rule == "attention-logit-growth" and decision.severity == "critical"
    rollback, cut = decision.commands
    assert rollback == Rollback(checkpoint_id="main-0", skip_batches=0)
    assert isinstance(cut, SetHparams) and cut.lr == pytest.approx(0.1 * lrs[0])
    assert "rolled back to step 0" in decision.reason and "lr x0.1" in decision.reason


@pytest.mark.parametrize(
    "measured",
    [
        {0: 0.26, 10: 0.32, 20: 0.38},  # cpu-tiny at the good lr 3e-3, layer 0, steps 0-20 (measured)
        {120: 8.51, 130: 14.67, 140: 17.36},  # the same run's largest 20-step rise (8.9), layer 0 at steps 120-140
    ],
)
def test_attention_logit_growth_stays_quiet_on_the_good_learning_rate(measured: dict[int, float]):
    """The rises of a healthy cpu-tiny run stay under the rule's 20: no decision at all."""
    last = max(measured) + 1
    window = window_of(
        {"loss": [2.5] * last, "lr": [3e-3] * last, "attn_logit_max/0": _every_tenth(measured, last)},
        checkpoints=_checkpoints(0, 25, 50, 75, 100, 125),
    )
    assert RulePolicy(load_rules()).decide(window) is None
