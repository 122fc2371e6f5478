"""The Lightning callback on a real `lightning.Trainer` and a small byte-level LightningModule, against a real server.

Each command's effect is checked where it lives: `trainer.optimizers`, `lr_scheduler_configs`,
`gradient_clip_val`, the module's parameters, `trainer.global_step`, `should_stop`, the data mixture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from protocols.client import Client
from tests.trainer.conftest import FAST_IO
from tests.trainer.frameworks import (
    Script,
    built_and_closed,
    byte_domains,
    metrics_of,
    mixture,
    resume_after_a_heartbeat,
)
from trainer.lightning import SteerCallback
from trainer.mixture import DomainMixture
from trainer.schedule import Schedule
from trainer.steer import SteerConfig

pytestmark = [
    # Lightning 2.6 still calls torch's deprecated `LeafSpec()` when it flattens the dataloaders (torch >= 2.10 warns).
    pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning"),
    # One data-loading process is the point: commands must reach the mixture in the training process.
    pytest.mark.filterwarnings(
        "ignore:.*does not have many workers:lightning.fabric.utilities.warnings.PossibleUserWarning"
    ),
]


class ByteLM(L.LightningModule):
    """A small next-byte model: embedding, tanh, projection back to the 256 bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, 32)
        self.head = nn.Linear(32, 256)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(ids)))

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = batch["input_ids"]
        logits = self(ids[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()), logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        loss, logits = self._loss(batch)
        self.log("train_loss", loss)
        return {"loss": loss, "logits": logits.detach()}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch)[0])

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


class Probe(L.Callback):
    """Hands each step boundary to the test's script (it runs after the steering callback)."""

    def __init__(self, script: Script) -> None:
        self.script = script

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.script.boundary()


class Setup:
    """A `lightning.Trainer` on `ByteLM`, steered by `SteerCallback`, with a script acting at known boundaries."""

    def __init__(self, tmp_path: Path, server_url: str, client: Client, max_steps: int, accumulate: int = 1) -> None:
        torch.manual_seed(0)
        self.module = ByteLM()
        self.data: DomainMixture[dict[str, torch.Tensor]] = mixture(batch_size=4)
        config = SteerConfig(run_name="lightning", checkpoint_dir=tmp_path / "ck", snapshot_every=2, io=FAST_IO)
        self.callback = SteerCallback(server=server_url, sampler=self.data, config=config)
        self.script = Script(client, lambda: self.callback.steer)
        self.client = client
        self.trainer = L.Trainer(
            max_steps=max_steps,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=2,
            val_check_interval=10**6,
            check_val_every_n_epoch=None,
            gradient_clip_val=1.0,
            accumulate_grad_batches=accumulate,
            log_every_n_steps=2,
            default_root_dir=tmp_path,
            callbacks=[self.callback, Probe(self.script)],
        )

    def fit(self) -> None:
        val = DataLoader(byte_domains()["prose"][:16], batch_size=8)
        self.trainer.fit(self.module, DataLoader(self.data, batch_size=4), val)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.trainer.optimizers[0]

    @property
    def scheduler(self) -> Any:
        return self.trainer.lr_scheduler_configs[0].scheduler

    def close(self) -> None:
        """End the run (a test that failed midway leaves it open)."""
        self.callback.run.close()

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


@pytest.fixture
def setup(tmp_path: Path, server_url: str, client: Client):  # type: ignore[no-untyped-def]
    yield from built_and_closed(lambda max_steps: Setup(tmp_path, server_url, client, max_steps))


def test_hparams_swap_mix_evaluate_and_bad_commands_act_on_the_lightning_trainer(setup) -> None:  # type: ignore[no-untyped-def]
    """lr survives the LambdaLR, clipping lands in gradient_clip_val, SGD replaces AdamW in trainer.optimizers,
    the mix reweights the stream, the LambdaLR follows a new schedule, evaluate runs validation and reports
    val_loss; bad commands change nothing."""
    run = setup(12)
    seen: dict[str, Any] = {}
    run.script.at(5, lambda: run.script.send("hp", {"type": "set_hparams", "lr": 2e-3, "grad_clip": 0.5}))

    def after_hparams() -> None:
        seen["lr6"], seen["clip"] = run.lr(), run.trainer.gradient_clip_val
        seen["optimizer_id"] = id(run.optimizer)
        run.script.send("swap", {"type": "set_optimizer", "name": "sgd"})
        run.script.send("bad_betas", {"type": "set_hparams", "betas": [0.9, 0.99]})  # applied after the swap
        run.script.send("bad_eval", {"type": "evaluate", "max_batches": 1})

    def after_swap() -> None:
        seen["lr7"] = run.lr()
        seen["type"], seen["same"] = type(run.optimizer), id(run.optimizer) == seen["optimizer_id"]
        seen["params"] = [p.detach().clone() for p in run.module.parameters()]
        run.script.send("mix", {"type": "set_data_mix", "weights": {"prose": 0.0, "sums": 1.0}})
        run.script.send("eval", {"type": "evaluate"})

    def after_mix() -> None:
        seen["moved"] = any(not torch.equal(a, b) for a, b in zip(seen["params"], run.module.parameters(), strict=True))
        seen["drawn"] = {run.data.draw(run.data.index + i)[0] for i in range(40)}
        run.script.send("schedule", {"type": "set_schedule", "kind": "linear", "peak_lr": 1e-2, "horizon_steps": 10})

    def after_schedule() -> None:
        seen["lr10"], seen["last10"] = run.lr(), run.scheduler.get_last_lr()[0]

    def one_scheduler_step_later() -> None:
        seen["lr11"], seen["last11"] = run.lr(), run.scheduler.get_last_lr()[0]

    run.script.at(6, after_hparams)
    run.script.at(7, after_swap)
    run.script.at(9, after_mix)
    run.script.at(10, after_schedule)
    run.script.at(11, one_scheduler_step_later)
    run.fit()

    assert run.trainer.global_step == 12, "training went on past the refused commands"
    assert seen["lr6"] == pytest.approx(2e-3) and seen["lr7"] == pytest.approx(2e-3), "the LambdaLR undid the new lr"
    assert seen["clip"] == 0.5
    assert seen["type"] is torch.optim.SGD and seen["same"] and seen["moved"]
    assert seen["drawn"] == {"sums"}
    schedule = Schedule("linear", (1e-2,), start_step=10, horizon_steps=10)
    assert seen["lr10"] == pytest.approx(1e-2) and seen["last10"] == pytest.approx(1e-2)
    assert seen["lr11"] == pytest.approx(schedule.lrs(11)[0]) and seen["last11"] == pytest.approx(seen["lr11"])
    assert run.script.result("schedule").status == "applied"
    for name, words in {"bad_betas": "betas", "bad_eval": "max_batches"}.items():
        record = run.script.result(name)
        assert record.status == "rejected" and words in record.message, (name, record.message)
    evaluate = run.script.result("eval")
    assert evaluate.status == "applied" and evaluate.effective is not None and evaluate.effective["val_loss"] > 0
    metrics = metrics_of(run.client, run.callback.steer)
    for name in (
        "loss",
        "lr",
        "grad_norm",
        "grad_norm/embed",
        "grad_norm/head",
        "param_norm",
    ):
        assert sorted(metrics[name])[:12] == list(range(12)), name
    assert sorted(metrics["update_ratio"]) == [0, 10], "the update ratio every 10 steps"
    assert sorted(metrics["logit_max"]) == sorted(metrics["logit_z"]) == [0, 10], "the returned logits, every 10 steps"
    assert metrics["lr"][6] == pytest.approx(2e-3) and metrics["val_loss"][evaluate.applied_step] > 0
    assert sorted(metrics["pl/train_loss"]) == [1, 3, 5, 7, 9, 11], "what self.log gave, every log_every_n_steps"
    assert metrics["pl/train_loss"][5] == pytest.approx(metrics["loss"][5], rel=1e-5)
    (validation,) = metrics["pl/val_loss"].values()  # logged once by the validation, and not repeated after
    assert validation == pytest.approx(evaluate.effective["val_loss"])


def test_rollback_pause_and_stop_act_on_the_lightning_trainer(setup) -> None:  # type: ignore[no-untyped-def]
    """Rollback restores module, optimizer, scheduler, data position and global_step on a new branch; pause holds the
    loop while heartbeats go on; stop sets should_stop after a final checkpoint."""
    run = setup(40)
    seen: dict[str, Any] = {}
    steer = lambda: run.callback.steer  # noqa: E731
    run.script.at(2, lambda: run.script.send("save", {"type": "save_checkpoint", "tag": "three"}))

    def after_save() -> None:
        seen["saved"] = {k: v.clone() for k, v in run.module.state_dict().items()}
        seen["saved_at"] = (
            run.data.index,
            run.scheduler.last_epoch,
            float(run.optimizer.state_dict()["state"][0]["step"]),
        )

    def after_rollback() -> None:
        seen["step"], seen["branch"] = run.trainer.global_step, steer().branch
        seen["restored"] = all(torch.equal(seen["saved"][k], v) for k, v in run.module.state_dict().items())
        seen["at"] = (run.data.index, run.scheduler.last_epoch, float(run.optimizer.state_dict()["state"][0]["step"]))

    def pause() -> None:
        run.script.send("pause", {"type": "pause"})
        resume_after_a_heartbeat(run.client, steer, lambda: run.trainer.global_step, seen)

    run.script.at(3, after_save)
    run.script.at(6, lambda: run.script.send("rollback", {"type": "rollback", "step": 3}))
    run.script.at(7, after_rollback)
    run.script.at(9, pause)
    run.script.at(11, lambda: run.script.send("stop", {"type": "stop"}))
    run.fit()

    assert run.script.result("rollback").status == "applied"
    assert seen["step"] == 3 and seen["branch"] == "main.r3" and seen["restored"]
    assert seen["at"] == seen["saved_at"]
    assert seen["heartbeat_while_paused"] and seen["held"]
    stop = run.script.result("stop")
    assert stop.status == "applied" and stop.effective is not None and Path(str(stop.effective["path"])).is_file()
    assert run.trainer.should_stop and run.trainer.global_step == stop.applied_step < 40


def test_gradient_accumulation_makes_one_boundary_and_one_point_per_optimizer_step(
    tmp_path: Path, server_url: str, client: Client
) -> None:
    """With accumulate_grad_batches=2, 12 batches make 6 optimizer steps: 6 recorded steps, each with its health."""
    run = Setup(tmp_path, server_url, client, max_steps=6, accumulate=2)
    try:
        run.fit()
        metrics = metrics_of(client, run.callback.steer)
    finally:
        run.close()
    assert run.trainer.global_step == 6 and run.script.calls == 12
    assert sorted(metrics["loss"]) == sorted(metrics["grad_norm"]) == sorted(metrics["param_norm"]) == list(range(6))
    assert sorted(metrics["update_ratio"]) == [0], "every 10 steps"
