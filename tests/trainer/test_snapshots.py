"""In-memory snapshots copied off the training thread: the copy overlaps the next step and is exact."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from protocols.client import Client
from tests.trainer.helpers import deliver, result_of, train
from trainer.checkpoints import CheckpointStore, detached_copy
from trainer.run import BuiltinRun

MakeRun = Callable[..., BuiltinRun]


def same(a: Any, b: Any) -> bool:
    """Bit-for-bit equality of two nested states (tensors by `torch.equal` on dtype and values)."""
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@pytest.mark.slow
def test_a_rollback_restores_bit_for_bit_the_snapshot_whose_copy_overlapped_training(
    make_run: MakeRun, client: Client
) -> None:
    """A periodic snapshot copied in the background while steps ran restores exactly the model and optimizer
    state of the boundary it was taken at."""
    run = make_run()
    run.steer.config.snapshot_every = 4
    assert run.steer.checkpoints.overlap
    train(run, range(4))
    step = run.steer.poll(4)  # takes the step-4 snapshot; the copy runs while step 4 trains
    expected = {"model": detached_copy(run.model.state_dict()), "optimizer": detached_copy(run.optimizer.state_dict())}
    run.steer.record(step, **run.train_step(step))
    train(run, range(5, 9))
    snapshot = run.steer.checkpoints.find(step=4, branch="main")
    record = deliver(client, run.steer, {"type": "rollback", "checkpoint_id": snapshot.checkpoint_id})
    run.steer.poll(9)
    assert result_of(client, run.steer, record).effective["source"] == "memory"
    assert same(run.model.state_dict(), expected["model"])
    assert same(run.optimizer.state_dict(), expected["optimizer"])


def test_the_next_optimizer_step_waits_for_the_background_copy() -> None:
    """An optimizer step straight after a snapshot (no forward to hide the copy behind) still leaves the
    snapshot holding the values from before the step: the step's pre-hook waits for the copy."""
    torch.manual_seed(0)
    model = nn.Linear(4096, 2048)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    store = CheckpointStore(None, ring_size=2)
    for _ in range(2):
        model(torch.randn(8, 4096)).square().mean().backward()
        optimizer.step()
        state = {"model": model.state_dict(keep_vars=True), "optimizer": optimizer.state_dict()}
        expected = detached_copy(state)
        info, _ = store.save(state, branch="main", step=1, to_disk=False)
        optimizer.step()
        assert not torch.equal(model.weight.detach(), expected["model"]["weight"])
        assert same(store.load(info.checkpoint_id), expected)
    store.close()


@pytest.mark.slow
def test_rollback_to_latest_healthy_works_after_the_run_turned_non_finite(make_run: MakeRun, client: Client) -> None:
    """However many unhealthy snapshots and files follow it, retention keeps the newest healthy checkpoint, so a
    run blown up by lr 10 (inside the documented range) is recovered with `rollback latest_healthy`."""
    run = make_run()
    run.steer.config.snapshot_every = 2
    run.steer.config.checkpoint_every = 4
    run.steer.checkpoints.ring_size = 2
    run.steer.checkpoints.keep_files = 2
    train(run, range(5))
    record = deliver(client, run.steer, {"type": "set_hparams", "lr": 10.0})
    run.steer.poll(5)
    assert result_of(client, run.steer, record).status == "applied"
    losses = train(run, range(5, 25))
    assert not math.isfinite(losses[-1])
    infos = [entry.info for entry in run.steer.checkpoints.entries.values()]
    newest_healthy = max(info.step for info in infos if info.healthy)
    assert any(not info.healthy and info.step > newest_healthy for info in infos)
    record = deliver(client, run.steer, {"type": "rollback", "latest_healthy": True})
    run.steer.poll(25)
    result = result_of(client, run.steer, record)
    assert result.status == "applied", result.message
    assert result.effective is not None and result.effective["step"] == newest_healthy < 10
    assert all(bool(torch.isfinite(param).all()) for param in run.model.parameters())
    record = deliver(client, run.steer, {"type": "set_hparams", "lr": 1e-4})
    assert all(math.isfinite(loss) for loss in train(run, range(25, 28)))


def test_two_rings_and_another_global_optimizer_hook_live_side_by_side() -> None:
    """Two rings in one process (two runs) and someone else's global step hook: steps run, snapshots stay exact."""
    torch.manual_seed(0)
    model = nn.Linear(64, 32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stores = [CheckpointStore(None), CheckpointStore(None)]
    calls: list[int] = []
    other = register_optimizer_step_pre_hook(lambda *_: calls.append(1))
    try:
        for step in range(3):
            model(torch.randn(4, 64)).sum().backward()
            state = {"model": model.state_dict(keep_vars=True), "optimizer": optimizer.state_dict()}
            expected = detached_copy(state)
            infos = [store.save(state, branch="main", step=step, to_disk=False)[0] for store in stores]
            optimizer.step()
            optimizer.zero_grad()
            for store, info in zip(stores, infos, strict=True):
                assert same(store.load(info.checkpoint_id), expected)
        assert len(calls) == 3
    finally:
        other.remove()
        for store in stores:
            store.close()
