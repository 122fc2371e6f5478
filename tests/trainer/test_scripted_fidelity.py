"""The scripted trainer the dashboard and agent tests use answers a rollback as the real trainer does."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from protocols.client import Client
from tests.polling import wait_until
from tests.scripted_trainer import ScriptedTrainer
from tests.trainer.helpers import deliver, result_of, train
from trainer.run import BuiltinRun


@pytest.mark.slow
def test_a_rollback_with_no_branch_named_gets_the_same_branch_and_answer_from_both_trainers(
    make_run: Callable[..., BuiltinRun], client: Client, server_url: str
) -> None:
    """Both open `{branch}.r{step}` and answer with the same effective fields, so tests on the scripted trainer
    (the dashboard's rollback form among them) hold against the real one."""
    run = make_run()
    train(run, range(4))
    delivered = deliver(client, run.steer, {"type": "save_checkpoint"})
    train(run, range(4, 8))
    saved = result_of(client, run.steer, delivered)
    assert saved.effective is not None
    rollback = {"type": "rollback", "checkpoint_id": saved.effective["checkpoint_id"]}
    record = deliver(client, run.steer, rollback)
    train(run, range(8, 9))
    real = result_of(client, run.steer, record)

    with ScriptedTrainer(server_url, step_s=0.01) as scripted:
        wait_until(lambda: scripted.step >= 4)
        checkpoint = client.submit(scripted.run_id, {"type": "save_checkpoint"}, wait=True)
        wait_until(lambda: scripted.step >= checkpoint.applied_step + 3)  # type: ignore[operator]
        assert checkpoint.effective is not None
        scripted_rollback = {"type": "rollback", "checkpoint_id": checkpoint.effective["checkpoint_id"]}
        answer = client.submit(scripted.run_id, scripted_rollback, wait=True)

    assert real.status == answer.status == "applied"
    assert real.effective is not None and answer.effective is not None
    assert set(real.effective) == set(answer.effective)
    assert real.effective["branch"] == f"main.r{real.effective['step']}"
    assert answer.effective["branch"] == f"main.r{answer.effective['step']}"
