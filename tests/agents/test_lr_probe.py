"""The learning-rate probe's decisions, on windows fed by a scripted trainer that applies each command as the
built-in run's appliers answer it (checkpoint ids, branches, the schedule's lr), through the shipped rule set and
the real guardrails; and the metrics of left branches an agent reads when it starts, against a real server."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

import pytest
from pydantic import JsonValue, ValidationError

from agents.decision import Decision, Intervention
from agents.guardrails import GuardrailConfig, Guardrails
from agents.lr_probe import KEEP_RULE, PROBE_RULE, LrProbe, LrProbeConfig
from agents.rules import RulePolicy, RuleSet, load_rules
from agents.runtime import AgentRuntime
from agents.window import WindowTracker
from protocols.client import AsyncClient, Client
from protocols.commands import Command, CommandRecord, Rollback, SaveCheckpoint, SetHparams
from protocols.constants import CommandStatus
from protocols.records import CheckpointInfo, MetricsSample
from tests.agents.helpers import agent_trainer
from tests.polling import wait_until

SOURCE = "agent:rules"
SNAPSHOT_EVERY = 25
"""As cpu-tiny: a snapshot at step 0 of every branch and every 25 steps."""
UPDATE_RATIO_PER_LR = 4.0
"""The scripted run's update ratio per unit of learning rate (cpu-tiny measures about 4 at 3e-3)."""


def loss_at(step: int, lr: float, best_lr: float) -> float:
    """A falling loss, higher the further (in decades) the learning rate is from `best_lr`: half a decade off
    costs 4.5% at steps 25-49, as 1e-2 against 3e-3 does at cpu-tiny."""
    return 2.0 + 3.0 * math.exp(-step / 40) + 0.6 * math.log10(lr / best_lr) ** 2


@dataclass
class ProbeBench:
    """A scripted run judged step by step by a rule policy behind the guardrails; commands are applied at the
    next step boundary as the trainer's appliers answer them."""

    lr: float
    best_lr: float = 3e-3
    rules: RuleSet = field(default_factory=load_rules)
    step: int = 0
    branch: str = "main"
    trained: int = 0
    decisions: list[Decision] = field(default_factory=list)
    records: list[CommandRecord] = field(default_factory=list)
    reject: str = ""
    """A command type the trainer rejects."""
    update_every: int = 1
    """Report `update_ratio` on steps divisible by this, as the trainer does."""

    def __post_init__(self) -> None:
        self.tracker = WindowTracker("run-1")
        self.policy = RulePolicy(self.rules)
        self.guardrails = Guardrails(self.rules.guardrails, SOURCE)
        self.snapshots: dict[str, tuple[int, str, float]] = {}
        self.snapshotted: set[tuple[str, int]] = set()

    def run(self, until: int) -> ProbeBench:
        """Train until the step reaches `until`, letting the policy act after every step."""
        while self.step < until:
            if self.step % SNAPSHOT_EVERY == 0 and (self.branch, self.step) not in self.snapshotted:
                self._snapshot()
            values = {"loss": loss_at(self.step, self.lr, self.best_lr), "lr": self.lr}
            if self.step % self.update_every == 0:
                values["update_ratio"] = UPDATE_RATIO_PER_LR * self.lr
            sample = MetricsSample(branch=self.branch, step=self.step, time=float(self.trained), values=values)
            self.tracker.add_sample(sample, received_at=float(self.trained))
            self.step += 1
            self.trained += 1
            window = self.tracker.window(now=float(self.trained))
            decision = self.policy.decide(window)
            if decision is None:
                continue
            review = self.guardrails.review(decision, window)
            if review.decision is not None:
                self._carry_out(review.decision)
        return self

    def _carry_out(self, decision: Decision) -> None:
        self.decisions.append(decision)
        ids = tuple(f"{decision.rule}.{len(self.decisions)}.{i}" for i in range(len(decision.commands)))
        intervention = Intervention(
            rule=decision.rule,
            decided_tick=self.tracker.tick,
            time=float(self.trained),
            command_types=tuple(c.type for c in decision.commands),
            command_ids=ids,
            answered_tick=None if decision.commands else self.tracker.tick,
        )
        self.tracker.interventions.append(intervention)
        for command_id, command in zip(ids, decision.commands, strict=True):
            self.tracker.set_command(self._apply(command_id, command, decision.reason))

    def _apply(self, command_id: str, command: Command, reason: str) -> CommandRecord:
        at = self.step
        status: CommandStatus = "applied"
        effective: dict[str, JsonValue] = {}
        message = ""
        if command.type == self.reject:
            status, message = "rejected", "scripted refusal"
        elif isinstance(command, SaveCheckpoint):
            checkpoint_id = self._snapshot()
            effective = {"checkpoint_id": checkpoint_id, "step": self.step, "branch": self.branch, "tag": command.tag}
        elif isinstance(command, Rollback):
            assert command.checkpoint_id is not None
            step, _, lr = self.snapshots[command.checkpoint_id]
            new_branch = f"{self.branch}.r{step}"
            effective = {
                "checkpoint_id": command.checkpoint_id,
                "step": step,
                "branch": new_branch,
                "from_branch": self.branch,
                "from_step": self.step,
                "skipped_batches": 0,
            }
            self.step, self.branch, self.lr = step, new_branch, lr
        elif isinstance(command, SetHparams) and command.lr is not None:
            self.lr = command.lr
            effective = {"lr": self.lr}
        else:
            status, message = "rejected", f"{command.type} not scripted"
        record = CommandRecord(
            id=command_id,
            run_id="run-1",
            seq=len(self.records) + 1,
            command=command,
            source=SOURCE,
            reason=reason[:2000],
            status=status,
            created_at=1.0,
            updated_at=1.0,
            applied_step=at,
            effective=effective,
            message=message,
        )
        self.records.append(record)
        return record

    def _snapshot(self) -> str:
        """Keep the state at this boundary and report it, as the trainer's periodic snapshots and saves do."""
        checkpoint_id = f"{self.branch}-{self.step}-{len(self.snapshots)}"
        self.snapshots[checkpoint_id] = (self.step, self.branch, self.lr)
        self.snapshotted.add((self.branch, self.step))
        self.tracker.set_checkpoint(
            CheckpointInfo(checkpoint_id=checkpoint_id, branch=self.branch, step=self.step, time=1.0)
        )
        return checkpoint_id

    def rules_of(self) -> list[str]:
        """The rule of each of the probe's decisions carried out, in order."""
        return [d.rule for d in self.decisions if d.rule in (PROBE_RULE, KEEP_RULE)]

    def rollbacks(self) -> int:
        """Rollbacks applied."""
        return sum(r.command.type == "rollback" and r.status == "applied" for r in self.records)


def test_a_good_learning_rate_is_left_alone() -> None:
    """At a learning rate whose update ratio sits inside the band, the probe sends nothing all run."""
    bench = ProbeBench(lr=3e-3).run(400)
    assert bench.decisions == []
    assert bench.trained == 400


@pytest.mark.parametrize("update_every", [1, 10])
def test_a_learning_rate_ten_times_too_low_is_raised_tenfold_on_the_branch_that_proved_best(update_every: int) -> None:
    """From 3e-4 the run's first 50 steps are the x1 candidate; the probe goes back to step 0, trains x3.16 and x10
    for 50 steps each, and stays on x10; the same when the update ratio is reported every 10 steps only."""
    bench = ProbeBench(lr=3e-4, update_every=update_every).run(400)
    assert bench.rules_of() == [PROBE_RULE, PROBE_RULE, KEEP_RULE]
    assert [r.command.type for r in bench.records[:4]] == [
        "save_checkpoint",
        "rollback",
        "save_checkpoint",
        "set_hparams",
    ]
    start = bench.records[2].effective or {}
    assert start["step"] == 0 and start["tag"] == "lr-probe-up-0"
    assert "update ratio 0.0012 (median of steps 40-49)" in bench.decisions[0].reason
    assert "too low" in bench.decisions[0].reason
    assert bench.lr == pytest.approx(3e-3)
    assert bench.rollbacks() == 2
    assert bench.trained == 400 + 2 * 50
    assert "scored x1 3.8090, x3.16 3.3590, x10 3.2090" in bench.decisions[-1].reason
    assert "keeping x10, the branch the run is on" in bench.decisions[-1].reason
    assert not bench.decisions[-1].commands


def test_a_learning_rate_ten_times_too_high_is_probed_downwards() -> None:
    """From 3e-2 (no logit metrics here, so no rule acts first) the probe tries x1, x0.316 and x0.1."""
    bench = ProbeBench(lr=3e-2).run(300)
    assert bench.rules_of() == [PROBE_RULE, PROBE_RULE, KEEP_RULE]
    assert "too high" in bench.decisions[0].reason
    assert bench.lr == pytest.approx(3e-3)


def test_the_best_branch_that_is_not_the_last_is_resumed_from_its_end_checkpoint() -> None:
    """When x3.16 beats both x1 and x10 by more than the tolerance, the run goes back to the end of the x3.16
    branch and keeps its rate."""
    bench = ProbeBench(lr=3e-4, best_lr=8e-4).run(400)
    assert bench.rules_of() == [PROBE_RULE, PROBE_RULE, KEEP_RULE]
    keep = bench.records[-1]
    assert isinstance(keep.command, Rollback) and keep.effective is not None
    second_branch_end = bench.records[-4]
    assert second_branch_end.command.type == "save_checkpoint" and second_branch_end.effective is not None
    assert keep.command.checkpoint_id == second_branch_end.effective["checkpoint_id"]
    assert keep.effective["step"] == 50
    assert bench.lr == pytest.approx(3e-4 * math.sqrt(10))
    window = bench.tracker.window()
    assert window.lineage[window.branch] == (second_branch_end.effective["branch"], 50)


def test_a_larger_rate_scoring_within_the_tolerance_of_the_best_is_kept() -> None:
    """x10 scores under 1% above x3.16 (inside the 3% tolerance): the larger rate is kept, the short-branch bias
    against higher rates set aside."""
    bench = ProbeBench(lr=3e-4, best_lr=1.5e-3).run(300)
    assert bench.rules_of() == [PROBE_RULE, PROBE_RULE, KEEP_RULE]
    assert "keeping x10, the branch the run is on" in bench.decisions[-1].reason
    assert bench.lr == pytest.approx(3e-3)


def test_the_probe_stops_early_when_the_next_factor_does_worse() -> None:
    """From 1e-3 with the best at 1e-3 and the band saying too low, x3.16 does worse than x1: x10 is never tried
    and the run returns to the end of its own x1 branch."""
    bench = ProbeBench(lr=1e-3, best_lr=1e-3).run(300)
    assert bench.rules_of() == [PROBE_RULE, KEEP_RULE]
    keep = bench.records[-1]
    assert isinstance(keep.command, Rollback) and keep.effective is not None
    assert keep.command.checkpoint_id == (bench.records[0].effective or {})["checkpoint_id"]
    assert keep.effective["step"] == 50
    assert bench.lr == pytest.approx(1e-3)
    assert "keeping x1" in bench.decisions[-1].reason


def test_without_a_checkpoint_before_warm_up_the_probe_starts_where_the_run_is() -> None:
    """A run that kept no snapshot before warm-up gets a checkpoint saved at the probe's start instead, x1 trains
    on from there, and the candidates branch from it."""
    bench = ProbeBench(lr=3e-4)
    bench.snapshotted.add(("main", 0))
    bench.run(400)
    assert bench.rules_of() == [PROBE_RULE, PROBE_RULE, PROBE_RULE, KEEP_RULE]
    assert (bench.records[0].effective or {})["step"] == 50
    assert "from a checkpoint here" in bench.decisions[0].reason
    assert bench.lr == pytest.approx(3e-3) and bench.trained == 400 + 2 * 50


def test_the_probe_never_starts_without_two_rollbacks_of_budget() -> None:
    """With one rollback allowed (the guardrails' cap), there is no room to try a branch and return from it."""
    shipped = load_rules()
    rules = shipped.model_copy(update={"guardrails": shipped.guardrails.model_copy(update={"max_rollbacks": 1})})
    bench = ProbeBench(lr=3e-4, rules=rules).run(300)
    assert bench.rules_of() == []


def test_a_rejected_probe_command_ends_the_probe_with_a_warning() -> None:
    """When the trainer refuses the rollback to the probe's checkpoint, the probe says why, undoes the new rate
    that came with the refused rollback, and sends no more."""
    bench = ProbeBench(lr=3e-4, reject="rollback").run(200)
    assert bench.rules_of() == [PROBE_RULE, KEEP_RULE]
    assert "rollback was rejected: scripted refusal; the rate sent with it is undone" in bench.decisions[-1].reason
    assert bench.decisions[-1].severity == "warning"
    assert bench.lr == pytest.approx(3e-4)


def test_the_probe_scores_left_branches_from_the_metrics_the_window_kept() -> None:
    """A branch the run left keeps its loss series in the window, so the probe can compare it afterwards."""
    bench = ProbeBench(lr=3e-4).run(75)
    window = bench.tracker.window()
    left = window.left["main"]["loss"]
    assert left.latest is not None and left.latest[0] == 49
    assert window.series("loss") is not None
    assert LrProbe(load_rules().lr_probe or LrProbeConfig(update_ratio=(0.1, 1.0))).decide(window, 3) is None


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"update_ratio": (0.02, 0.01)}, "update_ratio must be [low, high] with low < high"),
        ({"update_ratio": (0.01, 0.02), "score_steps": 60}, "score_steps (60) must not exceed branch_steps (50)"),
        ({"update_ratio": (0.01, 0.02), "factors": (10.0, 3.0)}, "factors must be distinct and increasing"),
        ({"update_ratio": (0.01, 0.02), "factors": (0.5,)}, "factors.0"),
    ],
)
def test_an_inconsistent_probe_table_is_refused_naming_the_field(table: dict[str, object], message: str) -> None:
    """A rule file's `[lr_probe]` table with crossed bounds or factors is refused with the field named."""
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        LrProbeConfig.model_validate(table)


async def test_an_agent_started_after_a_rollback_holds_the_metrics_of_the_branch_the_run_left(
    server_url: str, client: Client
) -> None:
    """An agent that starts (or restarts) after the run went back to a checkpoint reads the stored metrics of the
    branch the run left, so a probe under way can still score it."""
    trainer = agent_trainer(server_url, steps=100_000).start()
    try:
        wait_until(lambda: trainer.step > 40, 30.0, "the trainer passing step 40")
        record = client.submit(trainer.run_id, Rollback(checkpoint_id="main-10"), wait=True)
        assert record.status == "applied"
        wait_until(lambda: trainer.branch != "main" and trainer.step > 20, 30.0, "steps on the new branch")
        async with AsyncClient(server_url) as api:
            runtime = AgentRuntime(
                api, trainer.run_id, RulePolicy(load_rules()), Guardrails(GuardrailConfig(), SOURCE), tick_s=0.2
            )
            task = asyncio.create_task(runtime.run())
            try:
                await asyncio.wait_for(runtime.connected.wait(), 30.0)
            finally:
                runtime.stop()
                await task
        window = runtime.tracker.window()
        assert window.branch == trainer.branch
        left = window.left["main"]["loss"]
        assert left.latest is not None and left.latest[0] >= 40
        assert left.last_points()[0][0] == 1  # the first step the scripted trainer reports
    finally:
        trainer.close()
