"""The Hugging Face callback on a real `Trainer` and a tiny GPT-2 built from a config, against a real server.

Each command's effect is checked where it lives: the optimizer inside Accelerate's wrapper, HF's `LambdaLR`,
`args.max_grad_norm`, the model's parameters, `state.global_step`, the data mixture.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import (
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_utils import TrainOutput

from protocols.client import Client
from protocols.errors import RequestRejected
from tests.trainer.conftest import FAST_IO
from tests.trainer.frameworks import (
    Script,
    built_and_closed,
    byte_domains,
    metrics_of,
    mixture,
    resume_after_a_heartbeat,
    tiny_gpt2,
)
from trainer.hf import SteerCallback
from trainer.mixture import DomainMixture
from trainer.schedule import Schedule
from trainer.steer import SteerConfig


class Probe(TrainerCallback):
    """Hands each step boundary to the test's script (it runs after the steering callback)."""

    def __init__(self, script: Script) -> None:
        self.script = script

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.script.boundary()


class Setup:
    """A tiny GPT-2 `Trainer` steered by `SteerCallback`, with a script acting at known boundaries."""

    def __init__(
        self,
        tmp_path: Path,
        server_url: str,
        client: Client,
        max_steps: int,
        *,
        evaluates: bool = True,
        health: bool = True,
    ) -> None:
        torch.manual_seed(0)
        self.model: GPT2LMHeadModel = tiny_gpt2()
        self.data: DomainMixture[dict[str, torch.Tensor]] = mixture(batch_size=4)
        config = SteerConfig(run_name="hf", checkpoint_dir=tmp_path / "ck", snapshot_every=2, io=FAST_IO)
        self.callback = SteerCallback(server=server_url, sampler=self.data, config=config, health=health)
        self.script = Script(client, lambda: self.callback.steer)
        self.client = client
        args = TrainingArguments(
            output_dir=str(tmp_path / "out"),
            max_steps=max_steps,
            per_device_train_batch_size=4,
            per_device_eval_batch_size=8,
            learning_rate=1e-3,
            warmup_steps=2,
            lr_scheduler_type="linear",
            logging_steps=1,
            eval_strategy="steps" if evaluates else "no",
            eval_steps=10**6,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=0,
        )
        self.trainer = Trainer(
            model=self.model,
            args=args,
            train_dataset=self.data,
            eval_dataset=byte_domains()["prose"][:16] if evaluates else None,
            callbacks=[self.callback, Probe(self.script)],
        )

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer inside Accelerate's wrapper."""
        inner = self.trainer.optimizer.optimizer  # type: ignore[union-attr]
        assert isinstance(inner, torch.optim.Optimizer)
        return inner

    @property
    def scheduler(self) -> Any:
        return self.trainer.lr_scheduler

    def close(self) -> None:
        """End the run (a test that failed midway leaves it open)."""
        self.callback.close()

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def metrics(self, branch: str = "main") -> dict[str, dict[int, float]]:
        return metrics_of(self.client, self.callback.steer, branch)


@pytest.fixture
def setup(tmp_path: Path, server_url: str, client: Client):  # type: ignore[no-untyped-def]
    yield from built_and_closed(lambda max_steps: Setup(tmp_path, server_url, client, max_steps))


def test_hparams_survive_hf_lambdalr_and_a_new_schedule_drives_it(setup) -> None:  # type: ignore[no-untyped-def]
    """lr, weight decay and clipping land in optimizer and args; LambdaLR keeps the new lr; set_schedule drives it."""
    run = setup(12)
    seen: dict[str, Any] = {}
    run.script.at(
        2, lambda: run.script.send("hp", {"type": "set_hparams", "lr": 5e-4, "weight_decay": 0.05, "grad_clip": 0.5})
    )

    def after_hparams() -> None:
        seen["lr3"], seen["wd"], seen["clip"] = run.lr(), run.optimizer.param_groups[0]["weight_decay"], None
        seen["clip"] = run.trainer.args.max_grad_norm
        seen["factor3"] = run.scheduler.lr_lambdas[0](run.scheduler.last_epoch)

    def one_scheduler_step_later() -> None:
        seen["lr4"] = run.lr()
        seen["factor4"] = run.scheduler.lr_lambdas[0](run.scheduler.last_epoch)
        run.script.send("sched", {"type": "set_schedule", "kind": "cosine", "peak_lr": 2e-3, "horizon_steps": 20})

    def after_schedule() -> None:
        seen["lr5"], seen["last5"] = run.lr(), run.scheduler.get_last_lr()[0]

    def later() -> None:
        seen["lr8"], seen["last8"] = run.lr(), run.scheduler.get_last_lr()[0]

    run.script.at(3, after_hparams)
    run.script.at(4, one_scheduler_step_later)
    run.script.at(5, after_schedule)
    run.script.at(8, later)
    output = run.trainer.train()

    assert isinstance(output, TrainOutput) and output.global_step == 12
    assert seen["lr3"] == pytest.approx(5e-4) and seen["wd"] == 0.05 and seen["clip"] == 0.5
    assert seen["lr4"] == pytest.approx(5e-4 * seen["factor4"] / seen["factor3"]), "the scheduler undid the new lr"
    schedule = Schedule("cosine", (2e-3,), start_step=5, horizon_steps=20)
    assert seen["lr5"] == pytest.approx(2e-3) and seen["last5"] == pytest.approx(2e-3)
    assert seen["lr8"] == pytest.approx(schedule.lrs(8)[0]) and seen["last8"] == pytest.approx(seen["lr8"])
    assert run.script.result("hp").status == "applied" and run.script.result("sched").status == "applied"
    metrics = run.metrics()
    for name in (
        "loss",
        "lr",
        "hf/loss",
        "hf/grad_norm",
        "hf/learning_rate",
        "grad_norm",
        "grad_norm/embed",
        "grad_norm/block.1",
        "grad_norm/final_norm",
        "param_norm",
    ):
        assert len(metrics[name]) >= 10, name
    assert sorted(metrics["update_ratio"]) == [0, 10], "the update ratio every 10 steps"
    assert sorted(metrics["attn_logit_max/1"]) == [0, 10], "attention logits every 10 steps, per layer"
    assert sorted(metrics["logit_max"]) == sorted(metrics["logit_z"]) == [0, 10], "output logits every 10 steps"
    assert metrics["nonfinite"][5] == 0.0 and metrics["logit_max"][10] > 0
    assert metrics["lr"][8] == pytest.approx(seen["lr8"]), "the lr recorded is the one the step used"


def test_optimizer_swap_data_mix_and_bad_commands(setup) -> None:  # type: ignore[no-untyped-def]
    """A swap to SGD goes through Accelerate's wrapper and trains; the mix reweights; bad commands change nothing."""
    run = setup(10)
    seen: dict[str, Any] = {}
    run.script.at(2, lambda: run.script.send("swap", {"type": "set_optimizer", "name": "sgd", "lr": 1e-2}))

    def after_swap() -> None:
        seen["type"] = type(run.optimizer)
        seen["params"] = [p.detach().clone() for p in run.model.parameters()]
        steer = run.callback.steer
        assert steer is not None and steer.run_id is not None
        with pytest.raises(RequestRejected) as refused:
            run.client.submit(steer.run_id, {"type": "set_data_mix", "weights": {"nope": 1.0}})
        seen["refused"] = str(refused.value)
        for name, command in {
            "bad_betas": {"type": "set_hparams", "betas": [0.9, 0.99]},
            "bad_eval": {"type": "evaluate", "max_batches": 2},
        }.items():
            run.script.send(name, command)

    def after_bad() -> None:
        seen["moved"] = any(not torch.equal(a, b) for a, b in zip(seen["params"], run.model.parameters(), strict=True))
        seen["momentum"] = all("momentum_buffer" in s for s in run.optimizer.state.values())
        seen["mix_before"] = run.data.mix()
        run.script.send("mix", {"type": "set_data_mix", "weights": {"prose": 1.0, "sums": 0.0}})

    def after_mix() -> None:
        seen["mix"] = run.data.mix()
        seen["drawn"] = {run.data.draw(run.data.index + i)[0] for i in range(40)}

    run.script.at(3, after_swap)
    run.script.at(4, after_bad)
    run.script.at(5, after_mix)
    output = run.trainer.train()

    assert output.global_step == 10, "training went on past the refused commands"
    assert seen["type"] is torch.optim.SGD and seen["moved"] and seen["momentum"]
    assert run.script.result("swap").status == "applied"
    assert "nope" in seen["refused"] and "prose, sums" in seen["refused"], "the server refuses an unknown domain"
    for name, words in {"bad_betas": "betas", "bad_eval": "max_batches"}.items():
        record = run.script.result(name)
        assert record.status == "rejected" and words in record.message, (name, record.message)
    assert seen["mix_before"] == {"prose": 0.5, "sums": 0.5}
    assert seen["mix"] == {"prose": 1.0, "sums": 0.0} and seen["drawn"] == {"prose"}


def test_rollback_evaluate_pause_and_stop_act_on_the_trainer(setup) -> None:  # type: ignore[no-untyped-def]
    """Rollback restores model, optimizer, scheduler, data position and global_step on a new branch; evaluate runs
    HF's evaluation and reports eval_loss; pause holds the loop while heartbeats go on; stop ends with a checkpoint."""
    run = setup(40)
    seen: dict[str, Any] = {}
    steer = lambda: run.callback.steer  # noqa: E731
    run.script.at(2, lambda: run.script.send("save", {"type": "save_checkpoint", "tag": "three"}))

    def after_save() -> None:
        seen["saved"] = {k: v.clone() for k, v in run.model.state_dict().items()}
        seen["saved_index"], seen["saved_epoch"] = run.data.index, run.scheduler.last_epoch

    def rollback() -> None:
        run.script.send("rollback", {"type": "rollback", "step": 3})

    def after_rollback() -> None:
        seen["step"] = run.trainer.state.global_step
        seen["branch"] = steer().branch
        seen["restored"] = all(torch.equal(seen["saved"][k], v) for k, v in run.model.state_dict().items())
        seen["index"], seen["epoch"] = run.data.index, run.scheduler.last_epoch
        run.script.send("eval", {"type": "evaluate"})

    def pause() -> None:
        run.script.send("pause", {"type": "pause"})
        resume_after_a_heartbeat(run.client, steer, lambda: run.trainer.state.global_step, seen)

    run.script.at(3, after_save)
    run.script.at(6, rollback)
    run.script.at(7, after_rollback)
    run.script.at(9, pause)
    run.script.at(11, lambda: run.script.send("stop", {"type": "stop"}))
    output = run.trainer.train()

    assert run.script.result("rollback").status == "applied"
    assert seen["step"] == 3 and seen["branch"] == "main.r3" and seen["restored"]
    assert (seen["index"], seen["epoch"]) == (seen["saved_index"], seen["saved_epoch"])
    assert seen["heartbeat_while_paused"] and seen["held"]
    stop = run.script.result("stop")
    assert stop.status == "applied" and stop.effective is not None and stop.effective["checkpoint_id"]
    assert isinstance(output, TrainOutput) and output.global_step == stop.applied_step < 40
    assert Path(str(stop.effective["path"])).is_file()
    evaluate = run.script.result("eval")
    metrics = run.metrics("main.r3")
    assert evaluate.status == "applied" and evaluate.applied_step in metrics["eval_loss"]
    # HF's first loss log after the rollback sums the loss of 4 steps and divides by 1; hf/loss is their mean.
    assert max(metrics["hf/loss"].values()) < 1.2 * max(metrics["loss"].values())


def test_without_evaluation_evaluate_is_rejected_and_health_false_records_loss_and_lr_only(
    tmp_path: Path, server_url: str, client: Client
) -> None:
    """A Trainer with eval_strategy 'no' refuses evaluate, naming the setting; health=False leaves out the health."""
    run = Setup(tmp_path, server_url, client, 6, evaluates=False, health=False)
    run.script.at(2, lambda: run.script.send("eval", {"type": "evaluate"}))
    try:
        output = run.trainer.train()
        metrics = run.metrics()
    finally:
        run.close()
    record = run.script.result("eval")
    assert output.global_step == 6 and record.status == "rejected" and "eval_strategy" in record.message
    assert sorted(metrics["loss"]) == sorted(metrics["lr"]) == list(range(6))
    assert "grad_norm" not in metrics and "logit_max" not in metrics and "hf/grad_norm" in metrics
