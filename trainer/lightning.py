"""Steer a PyTorch Lightning run with one callback: `L.Trainer(callbacks=[SteerCallback(server=URL)])`.

Only Lightning's public `Callback` hooks are used. The step boundary is `on_train_batch_end`: the optimizer and the
step-interval schedulers have stepped, `trainer.global_step` counts the step just done, and the loop checks
`trainer.should_stop` before the next batch. The callback hands the same `LiveRun` as the plain hook to the same
appliers, with Lightning's parts in it:

- the optimizer is `trainer.optimizers[0]` (Lightning's automatic optimization has one; a swap changes it in place);
- the scheduler is `trainer.lr_scheduler_configs[0].scheduler`; a new learning rate scales its `base_lrs`, and a
  `LambdaLR` follows `set_schedule`;
- clipping is `trainer.gradient_clip_val`;
- rollback restores module, optimizer, scheduler and RNG in place and moves `trainer.global_step`, on a new branch;
- `stop` writes the final checkpoint and sets `trainer.should_stop`;
- `evaluate` runs the fit's own validation loop now and records what `validation_step` logs, under its names;
- the data mix is a `DomainMixture` the user serves from `train_dataloader` and passes as `sampler=`.

Every step records `loss` and `lr` and the health metrics of trainer/health.py, read back in one transfer; every
`log_every_n_steps` steps, what the module logged with `self.log` is recorded beside them as `pl/<name>`. What
`training_step` returns feeds them: the loss tensor, or a dict with `loss` and, for the output-logit max and log Z,
`logits` (a dict's other keys are Lightning's as usual).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from trainer.appliers import CommandRejected
from trainer.framework import METRIC_NAME_CHARS, Boundary, SteeredCallback
from trainer.steer import SteerConfig


def set_global_step(trainer: Trainer, step: int) -> None:
    """Move Lightning's optimizer-step count (what `trainer.global_step` and `max_steps` read) to `step`."""
    loop = trainer.fit_loop.epoch_loop
    progress = (
        loop.automatic_optimization.optim_progress.optimizer.step.total
        if trainer.lightning_module.automatic_optimization
        else loop.manual_optimization.optim_step_progress.total
    )
    progress.ready = progress.completed = step


class SteerCallback(SteeredCallback, Callback):
    """Takes runsteer commands at every step boundary of a Lightning `Trainer` and reports its metrics."""

    _trainer: Trainer | None = None
    _seen: dict[str, Any]
    _stepped = -1
    """`global_step` at the last boundary; a batch that ends with it unchanged only accumulated gradients."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Register the run and apply what is already waiting, at step `global_step`."""
        if not trainer.optimizers:
            raise ValueError("runsteer steers the optimizer configure_optimizers returns; this module returned none")
        config = self.run.config or SteerConfig(
            run_name="lightning", checkpoint_dir=Path(trainer.default_root_dir) / "runsteer", snapshot_every=25
        )
        config.grad_clip = float(trainer.gradient_clip_val or 0.0)
        schedulers = trainer.lr_scheduler_configs
        self._trainer = trainer
        self._seen = {}
        self.run.start(
            pl_module,
            trainer.optimizers[0],
            schedulers[0].scheduler if schedulers else None,
            self._evaluate,
            config,
            {"framework": f"lightning {lightning.__version__}", "max_steps": trainer.max_steps},
        )
        self._follow(self.run.boundary(trainer.global_step), trainer, trainer.global_step)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Start the step's health metrics (the step is the last boundary's: `global_step` is a chain of properties)."""
        self.run.begin_step(self._stepped)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        """Gradient norms (before Lightning clips) and the learning rate this step uses."""
        self.run.before_optimizer_step()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Record the step just done, then apply commands at the boundary before the next one (a batch that only
        accumulated gradients adds its loss to the step)."""
        if isinstance(outputs, Mapping):
            self.run.note_loss(outputs.get("loss"))
            logits = outputs.get("logits")
            if isinstance(logits, torch.Tensor) and self.run.health is not None:
                self.run.health.observe_logits(logits)
        else:
            self.run.note_loss(outputs)
        step = trainer.global_step  # a chain of properties: read once
        if step == self._stepped:
            return
        self.run.after_optimizer_step()
        every = int(getattr(trainer, "log_every_n_steps", 0))  # set by Lightning's logger connector, not declared
        if every and step % every == 0:
            self.run.record(step - 1, self._fresh_logs(trainer))
        boundary = self.run.end_step(step)
        if boundary is not None:
            self._follow(boundary, trainer, step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Mark the run finished and stop the I/O threads."""
        self.run.close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Mark the run failed, naming the exception, and stop the I/O threads."""
        self.run.close("failed", f"{type(exception).__name__}: {exception}")

    def _fresh_logs(self, trainer: Trainer) -> dict[str, float]:
        """What the module logged (`self.log`, in training or in a validation) since the last read, as `pl/<name>`;
        a value Lightning still holds from earlier is the same tensor as before and is not recorded again."""
        fresh: dict[str, float] = {}
        for name, value in trainer.logged_metrics.items():
            if self._seen.get(name) is value or not set(name) <= METRIC_NAME_CHARS:
                continue
            self._seen[name] = value
            if isinstance(value, torch.Tensor) and value.numel() == 1 and math.isfinite(float(value)):
                fresh[f"pl/{name}"] = float(value)
        return fresh

    def _follow(self, boundary: Boundary, trainer: Trainer, global_step: int) -> None:
        self._stepped = boundary.step
        if boundary.stop:
            trainer.should_stop = True
            return
        if boundary.step != global_step:
            set_global_step(trainer, boundary.step)
        trainer.gradient_clip_val = boundary.grad_clip

    def _evaluate(self, max_batches: int | None) -> dict[str, float]:
        """Run the fit's validation loop now, as Lightning does between batches; returns what it logged."""
        trainer = self._trainer
        assert trainer is not None
        if max_batches is not None:
            raise CommandRejected(
                "Lightning validates on limit_val_batches of its val_dataloader; leave max_batches out"
            )
        # The same steps as Lightning's own mid-epoch validation (`_TrainingEpochLoop.on_advance_end`), including
        # keeping the logger connector's per-batch state, which the validation loop resets.
        connector = trainer._logger_connector
        first_loop_iter = connector._first_loop_iter
        trainer.validating = True
        try:
            outputs = trainer.fit_loop.epoch_loop.val_loop.run()
        finally:
            trainer.training = True
            connector._first_loop_iter = first_loop_iter
        values = {
            name: float(value)
            for logged in outputs
            for name, value in logged.items()
            if isinstance(value, (torch.Tensor, float, int)) and math.isfinite(float(value))
        }
        if not values:
            raise CommandRejected("validation logged nothing: give the module a validation_step that calls self.log")
        return values
