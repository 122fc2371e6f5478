"""What a weight decay without `param_groups` means: the groups that decay, never a deliberate no-decay group."""

from __future__ import annotations

from collections.abc import Callable

import torch

from protocols.client import Client
from tests.trainer.conftest import FAST_IO
from tests.trainer.helpers import deliver, result_of, train
from trainer.model import GPT, GPTConfig
from trainer.run import BuiltinRun
from trainer.steer import Steer, SteerConfig

MakeRun = Callable[..., BuiltinRun]


def decays(run: BuiltinRun) -> dict[str, float]:
    return {group["name"]: group["weight_decay"] for group in run.optimizer.param_groups}


def test_weight_decay_without_groups_leaves_the_no_decay_group_at_zero(make_run: MakeRun, client: Client) -> None:
    """`set_hparams` and `set_optimizer` change the decaying group only; naming the no-decay group changes it."""
    run = make_run()
    train(run, range(2))
    assert decays(run) == {"decay": 0.1, "no_decay": 0.0}
    record = deliver(client, run.steer, {"type": "set_hparams", "weight_decay": 0.05})
    run.steer.poll(2)
    assert result_of(client, run.steer, record).status == "applied"
    assert decays(run) == {"decay": 0.05, "no_decay": 0.0}
    record = deliver(client, run.steer, {"type": "set_optimizer", "name": "adam", "weight_decay": 0.02})
    run.steer.poll(3)
    assert result_of(client, run.steer, record).status == "applied"
    assert decays(run) == {"decay": 0.02, "no_decay": 0.0}
    record = deliver(client, run.steer, {"type": "set_hparams", "weight_decay": 0.01, "param_groups": ["no_decay"]})
    run.steer.poll(4)
    assert result_of(client, run.steer, record).status == "applied"
    assert decays(run) == {"decay": 0.02, "no_decay": 0.01}


def test_setting_the_decay_to_zero_and_back_never_reaches_the_no_decay_group(make_run: MakeRun, client: Client) -> None:
    """Once every group is at 0 the no-decay group is still told apart: the parts are fixed at the first command."""
    run = make_run()
    for iteration, value in enumerate((0.0, 0.3)):
        record = deliver(client, run.steer, {"type": "set_hparams", "weight_decay": value})
        run.steer.poll(iteration)
        assert result_of(client, run.steer, record).status == "applied"
    assert decays(run) == {"decay": 0.3, "no_decay": 0.0}


def test_a_run_whose_groups_all_start_at_zero_takes_the_decay_in_every_group(server_url: str, client: Client) -> None:
    """With no group decaying when the run is first steered there is no deliberate no-decay group: all change."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16))
    optimizer = torch.optim.AdamW(model.param_groups(0.0), lr=1e-3)
    with Steer(model, optimizer, config=SteerConfig(server=server_url, run_name="wd", io=FAST_IO)) as steer:
        record = deliver(client, steer, {"type": "set_hparams", "weight_decay": 0.1})
        steer.poll(0)
        assert result_of(client, steer, record).status == "applied"
        assert [group["weight_decay"] for group in optimizer.param_groups] == [0.1, 0.1]
