"""Optimizer hot swaps on live runs: no swap kills a run, and no carried state makes a larger step than fresh.

The measure of "no larger step": the L2 norm of the parameter change made by the first optimizer step after a
swap is at most the largest parameter change a fresh optimizer of the new kind, with the same settings, makes in
any of its first 50 steps from the same parameters fed the same gradient (so SGD's momentum and RAdam's rectified
warm-up can build up, as they would on a run that had used them from the start).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from protocols.client import Client
from protocols.policy import Policy, RateLimit
from tests.trainer.conftest import FAST_IO
from tests.trainer.helpers import deliver, result_of, train
from trainer.metrics import UPDATE_EVERY, lm_loss
from trainer.model import GPT, GPTConfig
from trainer.optim import optimizer_classes, optimizer_name, state_template
from trainer.run import BuiltinRun
from trainer.steer import Steer, SteerConfig

MakeRun = Callable[..., BuiltinRun]
NAMES = sorted(optimizer_classes())


def _settings(group: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in group.items() if key not in ("params", "initial_lr", "param_names")}


def largest_fresh_step(optimizer: torch.optim.Optimizer, steps: int = 50) -> float:
    """The largest update norm of a fresh optimizer of the same kind and settings over `steps` steps from the
    current parameters, each fed the current gradient."""
    groups = []
    for group in optimizer.param_groups:
        params = []
        for param in group["params"]:
            copy = param.detach().clone().requires_grad_(True)
            copy.grad = param.grad.detach().clone() if param.grad is not None else None
            params.append(copy)
        groups.append({**_settings(group), "params": params})
    fresh = type(optimizer)(groups)
    flat = [param for group in groups for param in group["params"]]
    largest = 0.0
    for _ in range(steps):
        before = torch._foreach_mul([param.detach() for param in flat], 1.0)
        fresh.step()
        largest = max(largest, update_norm(flat, before))
    return largest


def update_norm(params: list[torch.Tensor], before: list[torch.Tensor]) -> float:
    with torch.no_grad():
        changes = torch._foreach_sub([param.detach() for param in params], before)
        return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(changes))))


def assert_state_like_fresh(optimizer: torch.optim.Optimizer) -> None:
    """Every state tensor has the keys, dtype and device a fresh optimizer of its kind gives it."""
    name = optimizer_name(optimizer)
    assert name is not None
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param)
            if not state:
                continue
            template = state_template(name, group, param)
            assert set(state) == set(template), (name, set(state), set(template))
            for key, value in state.items():
                assert (value.dtype, value.device) == (template[key].dtype, template[key].device), (name, key)


def test_adamw_then_sgd_then_nadam_keeps_the_trainer_training(make_run: MakeRun, client: Client) -> None:
    """The sequence that killed a trainer (NAdam's `mu_product` carried as an integer tensor) is applied, and
    every carried state has the dtypes and devices of a fresh optimizer's."""
    run = make_run()
    train(run, range(3))
    for iteration, name in ((3, "sgd"), (5, "nadam")):
        record = deliver(client, run.steer, {"type": "set_optimizer", "name": name})
        run.steer.poll(iteration)
        assert result_of(client, run.steer, record).status == "applied"
        assert optimizer_name(run.optimizer) == name
        losses = train(run, range(iteration, iteration + 2))
        assert all(math.isfinite(loss) for loss in losses)
        assert_state_like_fresh(run.optimizer)


def test_sgd_to_adamw_drops_the_momentum_it_cannot_scale_and_says_why(make_run: MakeRun, client: Client) -> None:
    """SGD's momentum carried into AdamW with no second moment stepped the loss from 2 to 85,531; it is now
    dropped, the result says why, and the first AdamW step is no larger than a fresh AdamW's."""
    run = make_run()
    train(run, range(2))
    record = deliver(client, run.steer, {"type": "set_optimizer", "name": "sgd", "lr": 0.05})
    run.steer.poll(2)
    assert result_of(client, run.steer, record).status == "applied"
    before = train(run, range(2, UPDATE_EVERY))[-1]
    record = deliver(client, run.steer, {"type": "set_optimizer", "name": "adamw", "lr": 3e-3})
    step = run.steer.poll(UPDATE_EVERY)  # a step that measures the update ratio
    result = result_of(client, run.steer, record)
    assert result.status == "applied" and result.effective is not None
    assert result.effective["carried"] == []
    dropped = [str(item) for item in result.effective["dropped"]]  # type: ignore[union-attr]
    assert any(item.startswith("momentum_buffer (") and "second" in item for item in dropped), dropped
    values = run.train_step(step)
    run.steer.record(step, **values)
    # A fresh AdamW moves each coordinate by at most lr on its first step (the issue saw an update ratio of 0.99999).
    fresh_bound = 3e-3 * math.sqrt(sum(p.numel() for p in run.model.parameters())) / values["param_norm"]
    assert values["update_ratio"] <= 1.05 * fresh_bound and values["loss"] < before + 1.0


@pytest.fixture
def live_run(server_url: str, client: Client) -> Iterator[tuple[Steer, GPT]]:
    """A tiny GPT trained by hand under a `Steer` hook on the test server, with no command rate limit."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32))
    optimizer = torch.optim.AdamW(model.param_groups(0.1), lr=3e-3, betas=(0.9, 0.95))
    steer = Steer(model, optimizer, config=SteerConfig(server=server_url, run_name="swaps", io=FAST_IO))
    assert steer.run_id is not None
    client.set_policy(steer.run_id, Policy(rate_limit=RateLimit(max_commands=10_000, per_seconds=60.0)))
    yield steer, model
    steer.close()


@pytest.mark.slow
def test_every_ordered_pair_of_optimizers_swapped_twice_and_back_keeps_training_with_steps_no_larger_than_fresh(
    live_run: tuple[Steer, GPT], client: Client
) -> None:
    """For every ordered pair (a, b) on one live run: swap to a, then to b twice in a row, then back to a; each
    swap is applied, the loss stays finite, and each first step after a swap obeys the module's measure."""
    steer, model = live_run
    generator = torch.Generator().manual_seed(0)
    iteration = 0
    ratios: dict[tuple[str, str, int], float] = {}

    def step(measure: bool) -> float:
        nonlocal iteration
        run_step = steer.poll(iteration)
        idx = torch.randint(0, 256, (8, 17), generator=generator)
        loss = lm_loss(model(idx[:, :-1]), idx[:, 1:]).loss
        loss.backward()
        ratio = 0.0
        if measure:
            reference = largest_fresh_step(steer.optimizer)
            params = list(model.parameters())
            before = [param.detach().clone() for param in params]
        steer.optimizer.step()
        if measure:
            ratio = update_norm(params, before) / reference
        steer.optimizer.zero_grad(set_to_none=True)
        steer.record(run_step, loss=loss.item())
        iteration += 1
        assert math.isfinite(loss.item())
        return ratio

    for _ in range(3):
        step(measure=False)
    for first, second in itertools.permutations(NAMES, 2):
        for index, name in enumerate((first, second, second, first)):
            deliver(client, steer, {"type": "set_optimizer", "name": name})
            ratios[(first, second, index)] = step(measure=True)
            assert optimizer_name(steer.optimizer) == name
            assert_state_like_fresh(steer.optimizer)
            step(measure=False)
    statuses = {result.status for _, result in steer.results}
    assert statuses == {"applied"}, [result.message for _, result in steer.results if result.status != "applied"]
    assert len(steer.results) == 4 * len(NAMES) * (len(NAMES) - 1)
    worst = max(ratios, key=lambda key: ratios[key])
    assert ratios[worst] <= 1.0 + 1e-6, (worst, ratios[worst])
