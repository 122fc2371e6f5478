"""The live-run core: appliers act on a `LiveRun` alone, and rollback refuses a step the run has not reached."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from protocols.client import Client
from protocols.commands import CommandRecord, command_adapter
from tests.trainer.helpers import train
from tests.trainer.test_commands import _apply
from trainer.appliers import apply_command
from trainer.checkpoints import CheckpointStore
from trainer.io import OutItem
from trainer.live import LiveRun
from trainer.run import BuiltinRun

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
    assert applied.status == "applied" and optimizer.param_groups[0]["lr"] == 5e-4 and live.grad_clip == 0.25
    assert saved.status == "applied" and saved.effective is not None and saved.effective["step"] == 3
    assert refused.status == "rejected" and refused.message == "the run is not paused"
    assert live.last_applied_seq == 3
    assert [type(item).__name__ for item in reports] == ["CheckpointSaved"]
