"""A shortened case study 4 with real processes: a server, `runsteer train --lr 3e-4` (10x below cpu-tiny's
default) and the rule agent with the shipped rules, whose learning-rate probe finds a better rate within the run."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from agents.lr_probe import KEEP_RULE, PROBE_RULE
from benchmarks.case_studies._harness import RunSpec, run_all
from benchmarks.case_studies.plots import applied_on, draw

STEPS = 170
LOW_LR = 3e-4


@pytest.mark.slow
def test_the_probe_raises_a_learning_rate_ten_times_too_low_and_the_run_ends_better_than_unsteered(
    tmp_path: Path,
) -> None:
    """The probe goes back to the step-0 snapshot after warm-up, tries higher rates on branches from it, keeps a
    higher one, and the steered run's last 20 losses (same batches as the unsteered run's) end lower; the
    picture marks each of the agent's commands on the branch it was applied on."""
    specs = [
        RunSpec("lr 3e-4, unsteered", "low", STEPS, lr=LOW_LR),
        RunSpec("lr 3e-4, rule agent", "low-agent", STEPS, lr=LOW_LR, steered=True),
    ]
    unsteered, steered = run_all(specs, parallel=2)

    commands = steered.agent_commands()
    probe = [r for r in commands if r.id.startswith(f"{PROBE_RULE}.")]
    assert probe and all(r.status == "applied" for r in probe), steered.interventions()
    assert probe[0].command.type == "save_checkpoint"
    assert steered.applied("rollback"), "no candidate branch was tried"
    assert steered.branch != "main" and len(steered.branches) >= 3
    assert any(f"[{KEEP_RULE}]" in line for line in steered.agent_log.splitlines()) or any(
        r.id.startswith(f"{KEEP_RULE}.") for r in commands
    ), steered.agent_log[-3000:]
    final_lr = steered.branches[steered.branch]["lr"]
    assert final_lr[max(final_lr)] > 3 * unsteered.branches["main"]["lr"][STEPS - 1]
    assert steered.trained_steps > STEPS == unsteered.trained_steps

    assert max(steered.loss) == STEPS - 1, "the steered run did not train to its last step"
    end = range(STEPS - 20, STEPS)
    assert statistics.fmean(steered.loss[s] for s in end) < statistics.fmean(unsteered.loss[s] for s in end)

    marked = applied_on(steered)
    assert [record.id for record, _ in marked] == [r.id for r in commands if r.status == "applied"]
    assert {branch for _, branch in marked} <= set(steered.branches)
    picture = draw([unsteered, steered], tmp_path / "find_the_lr.png", "find the lr, shortened")
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
