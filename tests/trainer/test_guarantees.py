"""The trainer's promises about order and time: replayable runs, bounded bursts, next-boundary delivery, quick stop."""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from protocols.client import Client
from protocols.policy import Policy, RateLimit
from tests.trainer.helpers import deliver
from trainer.run import BuiltinRun

MakeRun = Callable[..., BuiltinRun]
REPO = Path(__file__).resolve().parents[2]

COMMAND_LOG: dict[int, list[dict[str, Any]]] = {
    2: [{"type": "set_hparams", "lr": 1e-3, "weight_decay": 0.05}],
    4: [{"type": "set_data_mix", "weights": {"arithmetic": 4.0}}, {"type": "save_checkpoint"}],
    6: [{"type": "set_optimizer", "name": "nadam"}],
    8: [{"type": "rollback", "step": 5, "skip_batches": 2, "branch": "retry"}],
    10: [{"type": "set_schedule", "kind": "linear", "peak_lr": 2e-3, "warmup_steps": 2, "horizon_steps": 20}],
}
"""Commands by the loop iteration whose boundary applies them, for the original run of the replay test."""


def _train_with(
    run: BuiltinRun, client: Client, iterations: int, at_boundary: Callable[[int, int], list[dict[str, Any]]]
) -> list[tuple[str, int, float]]:
    """Run the loop by hand, delivering `at_boundary(iteration, next_step)` first; (branch, step, loss) per step."""
    curve, next_step = [], 0
    for iteration in range(iterations):
        for command in at_boundary(iteration, next_step):
            deliver(client, run.steer, command)
        step = run.steer.poll(iteration)
        curve.append((run.steer.branch, step, run.train_step(step)["loss"]))
        next_step = step + 1
    return curve


@pytest.mark.slow
def test_same_seed_and_same_command_log_give_the_same_loss_curve(make_run: MakeRun, client: Client) -> None:
    """Replaying a run's command log from the server, each at the step it was applied, repeats every loss exactly."""
    original = make_run(seed=3)
    first = _train_with(original, client, 14, lambda iteration, _: COMMAND_LOG.get(iteration, []))
    assert original.steer.flush()
    log = client.list_commands(original.steer.run_id)
    assert [record.status for record in log] == ["applied"] * 6
    assert first[8][:2] == ("retry", 4) and first[8][2] != first[4][2]  # back to the step-4 checkpoint, 2 batches on

    replay = make_run(seed=3)
    pending = [(record.applied_step, record.command.model_dump(mode="json", exclude_none=True)) for record in log]

    def due(_: int, step: int) -> list[dict[str, Any]]:
        commands = []
        while pending and pending[0][0] == step:
            commands.append(pending.pop(0)[1])
        return commands

    second = _train_with(replay, client, 14, due)
    assert not pending
    assert second == first


def test_a_burst_of_300_commands_is_applied_a_bounded_number_per_boundary_in_seq_order(
    make_run: MakeRun, client: Client
) -> None:
    """300 commands fetched at once are applied `max_commands_per_step` per boundary at most, in seq order, all."""
    run = make_run()
    client.set_policy(run.steer.run_id, Policy(rate_limit=RateLimit(max_commands=1000, per_seconds=60.0)))
    records = [client.submit(run.steer.run_id, {"type": "set_hparams", "weight_decay": i / 1000}) for i in range(300)]
    deadline = time.monotonic() + 20
    while run.steer.io.inbox.qsize() < 300 and time.monotonic() < deadline:
        time.sleep(0.01)
    bound = run.steer.config.max_commands_per_step
    boundaries = -(-300 // bound)
    per_boundary = []
    for iteration in range(boundaries + 2):
        before = len(run.steer.results)
        run.steer.poll(iteration)
        per_boundary.append(len(run.steer.results) - before)
    assert per_boundary == [bound] * (300 // bound) + [300 % bound] + [0, 0]
    results = list(run.steer.results)
    assert [record.seq for record, _ in results] == sorted(record.seq for record in records)
    assert [record.id for record, _ in results] == [record.id for record in records]
    assert all(result.status == "applied" for _, result in results)
    assert [result.step for _, result in results] == [i // bound for i in range(300)]
    assert run.optimizer.param_groups[0]["weight_decay"] == 0.299


@pytest.mark.slow
def test_a_command_submitted_during_step_k_is_applied_before_step_k_plus_1(make_run: MakeRun, client: Client) -> None:
    """Of 100 commands accepted at random moments inside running steps, at least 98 land at the next boundary."""
    run = make_run(steps=10**6)
    step_times: list[float] = []
    worker = threading.Thread(target=run.train, args=(lambda step, values: step_times.append(values["step_time_ms"]),))
    worker.start()
    during: dict[str, int] = {}
    rng = random.Random(0)
    try:
        seen = -1
        for trial in range(100):
            while run.steer.step == seen or len(step_times) < 3:
                time.sleep(0.001)
            seen = run.steer.step
            time.sleep(rng.uniform(0.0, 0.8) * statistics.median(step_times[-10:]) / 1e3)
            record = client.submit(run.steer.run_id, {"type": "set_hparams", "weight_decay": trial / 1000})
            during[record.id] = run.steer.step  # the step running when the server had accepted it
    finally:
        client.submit(run.steer.run_id, {"type": "stop", "final_checkpoint": False})
        worker.join(30)
    applied = {record.id: result.step for record, result in run.steer.results if record.id in during}
    assert len(applied) == 100
    late = [command_id for command_id, step in applied.items() if step > during[command_id] + 1]
    # The target is 99% (benchmarks/trainer_commands.py measures it); 2 late of 100 leave room for a loaded CI.
    assert len(late) <= 2, [(during[c], applied[c]) for c in late]


@pytest.mark.slow
def test_stop_ends_the_training_process_within_a_second_of_the_final_checkpoint(
    client: Client, server_url: str, tmp_path: Path
) -> None:
    """`runsteer train` told to stop writes a final checkpoint, reports finished, and its process ends within 1 s."""
    stderr = tmp_path / "stderr.txt"
    with stderr.open("wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "protocols.entry",
                "train",
                "--server",
                server_url,
                "--steps",
                "1000000",
                "--quiet",
                "--run-name",
                "stopper",
                "--checkpoint-dir",
                str(tmp_path / "ck"),
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    try:
        deadline = time.monotonic() + 120
        while not (runs := [r for r in client.list_runs() if r.name == "stopper" and r.step >= 2]):
            assert process.poll() is None and time.monotonic() < deadline, "the training process did not get going"
            time.sleep(0.05)
        record = client.submit(runs[0].run_id, {"type": "stop"})
        process.wait(60)
        exited = time.time()
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0, stderr.read_text()[-2000:]
    record = client.wait_for(runs[0].run_id, record.id, timeout_s=5)
    assert record.status == "applied" and record.effective is not None
    final = Path(str(record.effective["path"]))
    assert final.parent == tmp_path / "ck" and not list(final.parent.glob(".*.tmp"))
    assert torch.load(final, weights_only=True)["step"] == record.applied_step
    assert 0.0 < exited - os.stat(final).st_mtime < 1.0
    assert client.get_run(runs[0].run_id).status == "finished"
    checkpoints = {c.checkpoint_id: c for c in client.list_checkpoints(runs[0].run_id)}
    assert checkpoints[str(record.effective["checkpoint_id"])].tag == "final"
