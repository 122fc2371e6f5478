"""A shortened case study 2 with real processes: a server, `runsteer train --inject-spike` and the rule agent
(`runsteer agent rules --mode act`, the shipped default rules) rolling back past the poisoned batch."""

from __future__ import annotations

import statistics

import pytest

from benchmarks.case_studies._harness import RunSpec, run_all

STEPS = 160
FAULT = 100
"""The poisoned batch: the step that trains on it runs at 100x the learning rate (`--inject-spike`)."""


@pytest.mark.slow
def test_the_rule_agent_rolls_back_past_an_injected_fault_skips_it_and_the_run_recovers():
    """The default rules roll the run back to a checkpoint before the fault, skip the poisoned batch, cut the
    learning rate, and the run finishes on the new branch with its loss back below where it was before the fault."""
    spec = RunSpec("fault, rule agent", "fault-test", STEPS, inject_spike=FAULT, steered=True)
    (outcome,) = run_all([spec], parallel=1)

    rollbacks = outcome.applied("rollback")
    assert len(rollbacks) == 1, outcome.interventions()
    effective = rollbacks[0].effective or {}
    assert effective["from_step"] > FAULT >= effective["step"]
    assert effective["step"] + effective["skipped_batches"] > FAULT, "the poisoned batch was replayed"
    assert "persistent-spike" in rollbacks[0].id
    assert [command.command.type for command in outcome.agent_commands()] == ["rollback", "set_hparams"]
    assert all(command.status == "applied" for command in outcome.agent_commands())

    assert outcome.branch != "main"
    assert max(outcome.loss) == STEPS - 1, "the run did not train to its last step"
    before = statistics.fmean(outcome.loss[step] for step in range(FAULT - 20, FAULT))
    end = statistics.fmean(outcome.loss[step] for step in range(STEPS - 20, STEPS))
    assert end < before
    assert max(outcome.loss[step] for step in range(FAULT + 1, STEPS)) < 1.5 * before, "a spike is left in the run"
