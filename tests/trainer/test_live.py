"""The live-run core: appliers act on a `LiveRun` alone, and rollback refuses a step the run has not reached."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from protocols.client import Client
from protocols.commands import CommandRecord, command_adapter
from tests.trainer.conftest import FAST_IO
from tests.trainer.helpers import deliver, train
from tests.trainer.test_commands import _apply
from trainer.appliers import apply_command
from trainer.checkpoints import CheckpointStore
from trainer.health import Health
from trainer.io import OutItem, SavedItem
from trainer.live import LiveRun
from trainer.run import BuiltinRun
from trainer.steer import Steer, SteerConfig

MakeRun = Callable[..., BuiltinRun]


def _record(seq: int, command: dict) -> CommandRecord:  # type: ignore[type-arg]
    now = time.time()
    return CommandRecord(
        id=f"c{seq}",
        run_id="r",
        seq=seq,
        command=command_adapter.validate_python(command),
        source="script:test",
        reason="test",
        status="delivered",
        created_at=now,
        updated_at=now,
    )


def test_rollback_to_a_step_beyond_the_current_one_is_rejected_naming_the_current_step(
    make_run: MakeRun, client: Client
) -> None:
    """rollback step=50 at step 6 is rejected with "current step 6", and the run stays where it was."""
    run = make_run()
    train(run, range(6))
    before = {name: value.clone() for name, value in run.model.state_dict().items()}
    record = _apply(client, run, {"type": "rollback", "step": 50}, 6)
    assert record.status == "rejected" and "current step 6" in record.message
    assert (run.steer.step, run.steer.branch) == (6, "main")
    assert all(torch.equal(before[name], value) for name, value in run.model.state_dict().items())


def test_appliers_change_a_live_run_with_no_hook_and_no_server() -> None:
    """A bare `LiveRun` (what a callback or another rank holds) takes commands; its reports go to `emit`."""
    model = nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    reports: list[OutItem] = []
    live = LiveRun(model, optimizer, checkpoints=CheckpointStore(None), emit=reports.append, grad_clip=1.0)
    live.step = 3
    applied = apply_command(live, _record(1, {"type": "set_hparams", "lr": 5e-4, "grad_clip": 0.25}))
    saved = apply_command(live, _record(2, {"type": "save_checkpoint", "tag": "here"}))
    refused = apply_command(live, _record(3, {"type": "resume"}))
    live.checkpoints.close()
    assert applied.status == "applied" and optimizer.param_groups[0]["lr"] == 5e-4 and live.grad_clip == 0.25
    assert saved.status == "applied" and saved.effective is not None and saved.effective["step"] == 3
    assert refused.status == "rejected" and refused.message == "the run is not paused"
    assert live.last_applied_seq == 3
    assert [type(item).__name__ for item in reports] == ["SavedItem"]
    assert isinstance(reports[0], SavedItem) and reports[0].info.tag == "here" and reports[0].evicted == []


def test_the_plain_hook_with_health_records_health_and_clips_in_the_optimizer(server_url: str, client: Client) -> None:
    """`Steer(health=Health(model))`: each record carries grad norms and update ratio, due ones logit stats, and a
    grad_clip of 1e-3 bounds the next SGD update without the loop clipping anything itself."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 16))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    ids = torch.randint(16, (4, 8))
    config = SteerConfig(run_name="plain-health", io=FAST_IO)
    with Steer(
        model, optimizer, health=Health(model, logit_every=2, update_every=2), server=server_url, config=config
    ) as steer:
        for i in range(4):
            step = steer.poll(i)
            if i == 2:
                deliver(client, steer, {"type": "set_hparams", "grad_clip": 1e-3})
            before = [p.detach().clone() for p in model.parameters()]
            logits = model(ids)
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steer.record(step, loss=loss)
        update = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)])
        steer.flush()
        assert steer.run_id is not None
        series = client.metrics_history(steer.run_id).series
    assert float(update.norm()) <= 1e-3 * 1.0001, "the last step ran with grad_clip 1e-3 in force"
    for name in ("loss", "lr", "grad_norm", "grad_norm/0", "grad_norm/1", "param_norm"):
        assert series[name].steps == [0, 1, 2, 3], name
    assert series["logit_max"].steps == series["logit_z"].steps == [0, 2], "the logit statistics every 2 steps"
    assert series["update_ratio"].steps == [0, 2], "the update ratio every 2 steps"
    assert series["grad_norm"].values[3] > 1e-3, "grad_norm is the norm before clipping"


def test_recorded_ints_bools_and_tensors_arrive_as_floats_and_a_nan_marks_the_checkpoint(
    server_url: str, client: Client
) -> None:
    """`record` takes ints, bools and 0-d tensors beside floats: the server stores floats, the next snapshot's metrics
    are floats, and a NaN among them makes that snapshot unhealthy and is sent as non-finite, not as a value."""
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = SteerConfig(run_name="types", io=FAST_IO)
    with Steer(model, optimizer, server=server_url, config=config) as steer:
        steer.record(0, loss=1.5, tokens=512, warm=True)
        steer.record(1, loss=torch.tensor(2.5), tokens=512)
        healthy = steer.save_checkpoint(to_disk=False)
        steer.record(2, loss=float("nan"), tokens=7, warm=False)
        unhealthy = steer.save_checkpoint(to_disk=False)
        steer.flush()
        assert steer.run_id is not None
        series = client.metrics_history(steer.run_id).series
    assert series["loss"].steps == [0, 1] and series["loss"].values == [1.5, 2.5]
    assert series["tokens"].values == [512.0, 512.0, 7.0] and series["warm"].values == [1.0, 0.0]
    assert all(type(value) is float for value in series["tokens"].values + series["warm"].values)
    assert healthy.healthy and healthy.metrics == {"loss": 2.5, "tokens": 512.0, "lr": 0.1}
    assert all(type(value) is float for value in healthy.metrics.values())
    assert not unhealthy.healthy and unhealthy.metrics == {"tokens": 7.0, "warm": 0.0, "lr": 0.1}


def test_health_values_reach_the_run_before_a_command_or_a_snapshot_that_needs_them(
    server_url: str, client: Client
) -> None:
    """With `health` a step's values are read at the next record (on CUDA their copy never makes the loop wait), but
    a command at the boundary comes after them: the step before a rollback is stored on the branch it trained on,
    and the snapshot right after a non-finite step is marked unhealthy."""
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs = torch.randn(8, 4)
    config = SteerConfig(run_name="read-later", io=FAST_IO, snapshot_every=4)
    with Steer(model, optimizer, health=Health(model), server=server_url, config=config) as steer:
        for i in range(9):
            step = steer.poll(i)
            if i == 3:
                deliver(client, steer, {"type": "rollback", "step": 0})
            poison = float("nan") if step == 3 and steer.branch != "main" else 1.0
            loss = model(inputs).pow(2).mean() * poison
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steer.record(step, loss=loss)
        steer.flush()
        assert steer.run_id is not None
        run_id, branch = steer.run_id, steer.branch
    main = client.metrics_history(run_id, branch="main").series
    assert main["grad_norm"].steps == [0, 1, 2, 3], "the step before the rollback is stored on its own branch"
    assert branch == "main.r0"
    assert client.metrics_history(run_id, branch=branch).series["grad_norm"].steps[:3] == [0, 1, 2]
    snapshots = {info.step: info for info in client.list_checkpoints(run_id, branch=branch)}
    assert snapshots[4].healthy is False, "the snapshot after the non-finite step 3 is unhealthy"
