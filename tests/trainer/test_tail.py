"""The training thread's lean paths give what the general ones give: the model's state from a plan made once, the
schedule's learning rates from a table, and samples handed to the sender without waking it."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from protocols.client import Client
from protocols.records import CheckpointInfo, RunRegistration
from tests.trainer.conftest import FAST_IO
from trainer.checkpoints import CheckpointStore
from trainer.io import FlushItem, IOWorker, SampleItem
from trainer.live import LR_TABLE_STEPS, LiveRun, ModelState, OptimizerState
from trainer.schedule import Schedule


def _same(planned: dict[str, Any], torch_state: dict[str, Any]) -> bool:
    return list(planned) == list(torch_state) and all(planned[key] is torch_state[key] for key in torch_state)


def test_model_state_is_torchs_state_dict_for_tied_weights_and_buffers() -> None:
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    gpt2 = GPT2LMHeadModel(config)
    normed = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    normed.register_buffer("scratch", torch.zeros(2), persistent=False)
    for model in (gpt2, normed):
        assert _same(ModelState().capture(model), model.state_dict(keep_vars=True))
    # A reassigned parameter is seen by the next capture: the plan holds where it lives, not the tensor.
    normed[0].weight = nn.Parameter(torch.ones(4, 3))
    state = ModelState()
    state.capture(normed)
    normed[0].bias = nn.Parameter(torch.ones(4))
    assert _same(state.capture(normed), normed.state_dict(keep_vars=True))


def test_model_state_with_a_state_dict_hook_is_torchs_own() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))

    def rename(module: nn.Module, state: OrderedDict[str, Any], prefix: str, local: Any) -> None:
        state[f"{prefix}extra"] = torch.ones(1)

    model[1]._register_state_dict_hook(rename)
    captured = ModelState().capture(model)
    assert "1.extra" in captured and list(captured) == list(model.state_dict(keep_vars=True))


def test_optimizer_state_is_torchs_state_dict_across_groups_added_and_a_swap() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    optimizer = torch.optim.AdamW([{"params": model[0].parameters()}], lr=1e-3)
    state = OptimizerState()

    def step() -> None:
        model(torch.randn(5, 3)).sum().backward()
        optimizer.step()

    for change in (step, lambda: optimizer.add_param_group({"params": model[1].parameters(), "lr": 1e-2}), step):
        change()
        ours, theirs = state.capture(optimizer), optimizer.state_dict()
        assert ours["param_groups"] == theirs["param_groups"]
        assert list(ours["state"]) == list(theirs["state"])
        assert all(ours["state"][key] is theirs["state"][key] for key in theirs["state"])
    optimizer.param_groups = [{**group, "params": list(group["params"])} for group in optimizer.param_groups]
    assert state.capture(optimizer)["param_groups"] == optimizer.state_dict()["param_groups"]


def test_learning_rates_from_the_table_follow_the_schedule_and_its_replacement() -> None:
    model = nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule = Schedule("cosine", (1e-3,), warmup_steps=5, horizon_steps=200, floor=0.1)
    live = LiveRun(model, optimizer, checkpoints=CheckpointStore(None), emit=lambda item: None, schedule=schedule)
    for step in [*range(0, 2 * LR_TABLE_STEPS + 3), 7, 3]:  # across table refills, and back (a rollback)
        live.step = step
        live.apply_schedule()
        assert optimizer.param_groups[0]["lr"] == schedule.lrs(step)[0]
    live.schedule = schedule.rescaled(3, 0, 5e-4)
    live.apply_schedule()
    assert optimizer.param_groups[0]["lr"] == live.schedule.lrs(3)[0] == 5e-4


def test_samples_appended_without_a_wake_are_sent_in_order_and_a_flush_waits_for_them(
    server_url: str, client: Client
) -> None:
    worker = IOWorker(lambda: Client(server_url), RunRegistration(name="tail"), FAST_IO)
    worker.start()
    try:
        assert worker.registered.wait(10.0)
        for step in range(50):
            worker.samples.append(SampleItem("main", step, time.time(), {"loss": float(step)}))
        flush = FlushItem()
        worker.outbox.put(flush)
        assert flush.done.wait(10.0), "the flush waited for the samples appended before it"
        assert worker.sent_samples == 50
        assert worker.run_info is not None
        history = client.metrics_history(worker.run_info.run_id, keys=["loss"])
        assert history.series["loss"].steps == list(range(50))
    finally:
        worker.stop(5.0)


def test_snapshot_infos_built_without_validating_again_equal_validated_ones_and_bad_ones_are_refused() -> None:
    """Periodic snapshots after the first skip re-validating their info: it is the info validation makes, and a
    new branch, tag or metric name is validated afresh (and refused when bad, before anything is copied)."""
    store = CheckpointStore(None)
    state = {"weight": nn.Parameter(torch.ones(3)), "step": 1}
    metrics = {"loss": 1.5, "grad_norm/block.0": 0.25}
    try:
        infos = [store.save(state, branch="main", step=step, to_disk=False, metrics=metrics)[0] for step in (25, 50)]
        for info in infos:
            validated = CheckpointInfo.model_validate(info.model_dump())
            assert info == validated and info.model_dump_json() == validated.model_dump_json()
        for bad in ({"branch": "no spaces"}, {"metrics": {"bad name": 1.0}}, {"step": -1}, {"tag": "a/b"}):
            options: dict[str, Any] = {"branch": "main", "step": 75, "metrics": metrics, **bad}
            with pytest.raises(ValidationError):
                store.save(state, to_disk=False, **options)
        assert [entry.info.step for entry in store.entries.values()] == [25, 50]
    finally:
        store.close()
