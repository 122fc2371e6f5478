"""Every command, sent through the real server to a built-in run, checked by its effect on the run."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import torch

from protocols.client import Client
from protocols.errors import RequestRejected
from tests.trainer.helpers import deliver, result_of, train
from trainer.metrics import lm_loss
from trainer.run import BuiltinRun
from trainer.schedule import Schedule

MakeRun = Callable[..., BuiltinRun]

pytestmark = pytest.mark.slow
"""Each test trains the built-in model for real: left out of the fast loop."""


def _apply(client: Client, run: BuiltinRun, command: dict, iteration: int):  # type: ignore[no-untyped-def]
    """Deliver a command, apply it at the boundary before `iteration`, and return its final record."""
    record = deliver(client, run.steer, command)
    run.steer.poll(iteration)
    return result_of(client, run.steer, record)


def test_set_hparams_changes_only_the_named_group(make_run: MakeRun, client: Client) -> None:
    """weight_decay and eps on group `no_decay` land in that group's optimizer settings and nowhere else."""
    run = make_run()
    train(run, range(2))
    record = _apply(
        client,
        run,
        {"type": "set_hparams", "weight_decay": 0.3, "eps": 1e-6, "param_groups": ["no_decay"], "grad_clip": 0.5},
        2,
    )
    decay, no_decay = run.optimizer.param_groups
    assert record.status == "applied" and record.applied_step == 2
    assert no_decay["weight_decay"] == 0.3 and no_decay["eps"] == 1e-6
    assert decay["weight_decay"] == 0.1 and decay["eps"] == 1e-8
    assert run.steer.grad_clip == 0.5
    assert record.effective is not None and record.effective["groups"]["no_decay"]["weight_decay"] == 0.3


def test_new_lr_under_the_cosine_schedule_is_current_and_the_schedule_continues(
    make_run: MakeRun, client: Client
) -> None:
    """After lr=1e-4 mid-cosine, the lr is 1e-4 now and later steps follow the cosine scaled by new/old."""
    run = make_run(steps=200)
    run.steer.live.schedule = Schedule("cosine", (3e-3, 3e-3), warmup_steps=2, horizon_steps=30)
    train(run, range(10))
    original = run.steer.live.schedule
    _apply(client, run, {"type": "set_hparams", "lr": 1e-4}, 10)
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    train(run, range(10, 15))
    run.steer.poll(20)
    ratio = 1e-4 / original.lrs(10)[0]
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(original.lrs(20)[0] * ratio)


def test_set_schedule_replaces_the_lr_curve_from_the_step_it_lands(make_run: MakeRun, client: Client) -> None:
    """A linear schedule with warmup set at step 5 drives the optimizer's lr on later steps."""
    run = make_run()
    train(run, range(5))
    record = _apply(
        client,
        run,
        {
            "type": "set_schedule",
            "kind": "linear",
            "peak_lr": 2e-3,
            "warmup_steps": 4,
            "horizon_steps": 20,
            "floor": 0.1,
        },
        5,
    )
    assert record.status == "applied"
    expected = Schedule("linear", (2e-3, 2e-3), start_step=5, warmup_steps=4, horizon_steps=20, floor=0.1)
    for step in range(5, 30, 3):
        run.steer.poll(step)
        assert run.optimizer.param_groups[0]["lr"] == pytest.approx(expected.lrs(step)[0])


def test_set_optimizer_carries_the_moments_it_says_it_carries(make_run: MakeRun, client: Client) -> None:
    """AdamW to NAdam through the server keeps exp_avg and exp_avg_sq tensors as reported in the result."""
    run = make_run()
    train(run, range(3))
    param = run.optimizer.param_groups[0]["params"][0]
    moments = {key: run.optimizer.state[param][key].clone() for key in ("exp_avg", "exp_avg_sq")}
    record = _apply(client, run, {"type": "set_optimizer", "name": "nadam", "lr": 1e-3}, 3)
    assert record.status == "applied" and record.effective is not None
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(record.effective["carried"])
    assert type(run.optimizer) is torch.optim.NAdam
    for key, value in moments.items():
        assert torch.equal(run.optimizer.state[param][key], value)
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert train(run, range(3, 5))[-1] < 10


def test_rollback_restores_the_checkpoint_and_replays_the_original_losses(make_run: MakeRun, client: Client) -> None:
    """After a rollback the parameters equal the checkpoint's and the next losses equal the original run's."""
    run = make_run()
    train(run, range(4))
    saved = _apply(client, run, {"type": "save_checkpoint", "tag": "before"}, 4)
    params_at_save = [p.detach().clone() for p in run.model.parameters()]
    original = train(run, range(4, 10))
    record = _apply(
        client, run, {"type": "rollback", "checkpoint_id": saved.effective["checkpoint_id"], "branch": "retry"}, 10
    )
    assert record.status == "applied" and record.effective["source"] == "memory"
    assert run.steer.step == 4 and run.steer.branch == "retry"
    assert all(torch.equal(a, b) for a, b in zip(params_at_save, run.model.parameters(), strict=True))
    assert train(run, range(10, 16)) == original


def test_rollback_from_disk_by_step_skipping_batches_trains_on_the_later_batches(
    make_run: MakeRun, client: Client
) -> None:
    """Rollback by step, from the verified file, with skip_batches=3 resumes on the batch 3 past the checkpoint's."""
    run = make_run(steps=60)
    train(run, range(4))
    _apply(client, run, {"type": "save_checkpoint"}, 4)
    index_at_save = run.sampler.index
    model_at_save = {k: v.clone() for k, v in run.model.state_dict().items()}
    train(run, range(4, 8))
    for entry in run.steer.checkpoints.entries.values():
        entry.state = None  # drop the ring copies so the restore must read the file
    record = _apply(client, run, {"type": "rollback", "step": 6, "skip_batches": 3}, 8)
    assert record.status == "applied" and record.effective["source"] == "disk"
    assert record.effective["step"] == 4 and record.effective["branch"] == "main.r4"
    assert run.sampler.index == index_at_save + 3
    inputs, targets, _ = run.sampler.batch_at(index_at_save + 3)
    reference = run.model.__class__(run.model.config)
    reference.load_state_dict(model_at_save)
    with torch.no_grad():
        expected = lm_loss(reference(inputs), targets).scalars["loss"].item()
    assert run.train_step(run.steer.poll(8))["loss"] == pytest.approx(expected, rel=1e-6)


def test_bad_commands_are_rejected_with_a_reason_and_change_nothing(make_run: MakeRun, client: Client) -> None:
    """Momentum for AdamW, an unknown group, an unknown checkpoint and a needless resume are refused."""
    run = make_run()
    train(run, range(2))
    run.steer.poll(2)
    groups_before = [{k: v for k, v in g.items() if k != "params"} for g in run.optimizer.param_groups]
    params_before = [p.detach().clone() for p in run.model.parameters()]
    bad = [
        ({"type": "set_hparams", "momentum": 0.5}, "no momentum"),
        ({"type": "set_hparams", "lr": 0.1, "param_groups": ["nope"]}, "unknown parameter group"),
        ({"type": "set_data_mix", "weights": {"nope": 1.0}}, "unknown"),
        ({"type": "rollback", "checkpoint_id": "missing"}, "no checkpoint"),
        ({"type": "resume"}, "not paused"),
        ({"type": "set_optimizer", "name": "sgd", "betas": [0.9, 0.9]}, "takes no betas"),
    ]
    for command, reason in bad:
        try:
            record = _apply(client, run, command, 2)
        except RequestRejected as refused:  # the server may know enough to refuse it before the trainer sees it
            assert reason in str(refused)
            continue
        assert record.status == "rejected" and reason in record.message, record
    assert [{k: v for k, v in g.items() if k != "params"} for g in run.optimizer.param_groups] == groups_before
    assert all(torch.equal(a, b) for a, b in zip(params_before, run.model.parameters(), strict=True))
    assert run.steer.branch == "main" and run.steer.step == 2


def test_data_mix_command_shifts_the_domains_the_run_trains_on(make_run: MakeRun, client: Client) -> None:
    """After set_data_mix arithmetic=18, about 90% of the next batches' rows are arithmetic."""
    run = make_run()
    record = _apply(client, run, {"type": "set_data_mix", "weights": {"arithmetic": 18.0}}, 0)
    assert record.effective["data_mix"]["arithmetic"] == pytest.approx(0.9)
    ids = torch.cat([run.sampler.next_batch()[2] for _ in range(40)])
    assert (ids == run.sampler.names.index("arithmetic")).float().mean().item() == pytest.approx(0.9, abs=0.05)


def test_evaluate_records_eval_losses_for_every_domain(make_run: MakeRun, client: Client) -> None:
    """`evaluate` answers with eval_loss and eval_loss/<domain>, and stores them as metrics of that step."""
    run = make_run()
    train(run, range(3))
    record = _apply(client, run, {"type": "evaluate", "max_batches": 1}, 3)
    assert set(record.effective) == {"eval_loss", "eval_loss/prose", "eval_loss/code", "eval_loss/arithmetic"}
    history = client.metrics_history(run.steer.run_id, keys=["eval_loss/code"])
    assert history.series["eval_loss/code"].steps == [3]


def test_pause_holds_the_loop_while_it_heartbeats_and_takes_commands(make_run: MakeRun, client: Client) -> None:
    """While paused no step runs, a set_hparams is still applied, the run shows paused; resume goes on."""
    run = make_run(steps=10_000)
    steps: list[int] = []
    worker = threading.Thread(target=run.train, args=(lambda step, values: steps.append(step),))
    worker.start()
    try:
        while len(steps) < 3:
            time.sleep(0.01)
        paused = client.submit(run.steer.run_id, {"type": "pause"}, wait=True, timeout_s=10)
        assert paused.status == "applied"
        count = len(steps)
        lr = client.submit(run.steer.run_id, {"type": "set_hparams", "lr": 5e-4}, wait=True, timeout_s=10)
        time.sleep(0.6)
        assert lr.status == "applied" and len(steps) == count
        assert run.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)
        assert client.get_run(run.steer.run_id).status == "paused"
        client.submit(run.steer.run_id, {"type": "resume"}, wait=True, timeout_s=10)
        deadline = time.monotonic() + 10
        while len(steps) == count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(steps) > count
    finally:
        client.submit(run.steer.run_id, {"type": "stop", "final_checkpoint": False})
        worker.join(20)
