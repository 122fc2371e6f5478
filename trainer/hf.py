"""Steer a Hugging Face `Trainer` with one callback: `Trainer(..., callbacks=[SteerCallback(server=URL)])`.

Only public `TrainerCallback` hooks are used; HF's training loop runs as it is and `train()` returns its
`TrainOutput`. The step boundary is `on_step_end`: the optimizer and the scheduler have stepped, `global_step`
counts the step just done, and the loop has not yet logged, evaluated, saved or checked `should_training_stop`, so a
command applied there takes effect before the next step starts. The callback hands the same `LiveRun` as the plain
hook to the same appliers, with HF's parts in it:

- the optimizer is the torch optimizer inside Accelerate's `AcceleratedOptimizer` (a swap changes it in place);
- the scheduler is HF's `LambdaLR` (lr = base_lr x factor(step)); a new learning rate scales its `base_lrs` and the
  groups' `initial_lr`, so the scheduler's next step keeps the change, and `set_schedule` makes it follow the new
  schedule;
- clipping is `args.max_grad_norm`, which HF reads before every optimizer step;
- rollback restores model, optimizer, scheduler and RNG in place and sets `state.global_step`, on a new branch;
- `stop` writes the final checkpoint and sets `should_training_stop`; `evaluate` sets `should_evaluate`, and HF's
  evaluation reports its `eval_*` metrics through `on_log`;
- the data mix is a `DomainMixture` the user passes both as `train_dataset` and as `sampler=` (trainer/mixture.py).

Every step records `loss` (read from the model's outputs), `lr` and the health metrics of trainer/health.py
(gradient norms per block, parameter norm, update ratio, output-logit max and log Z from the outputs' `logits`,
attention logits of GPT-2 and Llama-family models every 10 steps), read back in one transfer; HF's own logs are
recorded beside them, its training values as `hf/<name>` and its evaluation values under their `eval_*` names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from trainer.appliers import CommandRejected
from trainer.framework import METRIC_NAME_CHARS, Boundary, SteeredCallback
from trainer.steer import SteerConfig


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's wrapper (or the optimizer itself)."""
    inner = optimizer.optimizer if isinstance(optimizer, AcceleratedOptimizer) else optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"runsteer steers a torch optimizer; the Trainer has {type(inner).__name__}")
    return inner


def unwrap_scheduler(scheduler: Any) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The torch scheduler inside Accelerate's wrapper (or the scheduler itself, or None)."""
    inner = scheduler.scheduler if isinstance(scheduler, AcceleratedScheduler) else scheduler
    return inner if isinstance(inner, torch.optim.lr_scheduler.LRScheduler) else None


def log_values(logs: dict[str, Any]) -> dict[str, float]:
    """HF's log entries as runsteer metrics: `eval_*` as they are, the rest as `hf/<name>` (numbers only)."""
    values: dict[str, float] = {}
    for key, value in logs.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not set(key) <= METRIC_NAME_CHARS:
            continue
        values[key if key.startswith("eval_") else f"hf/{key}"] = float(value)
    return values


class SteerCallback(SteeredCallback, TrainerCallback):
    """Takes runsteer commands at every step boundary of a Hugging Face `Trainer` and reports its metrics."""

    _args: TrainingArguments | None = None
    _evaluate_requested = False
    _hook: torch.utils.hooks.RemovableHandle | None = None
    _logged_at = 0
    """`global_step` at HF's last training log (HF divides the summed loss by the steps since, by `global_step`)."""
    _trained_since_log = 0
    """Optimizer steps actually taken since that log: more than `global_step` says once a rollback moved it back."""

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Register the run and apply what is already waiting, at step `global_step`."""
        model: nn.Module = kwargs["model"]
        config = self.run.config or SteerConfig(
            run_name=args.run_name or "hf", checkpoint_dir=Path(args.output_dir or ".") / "runsteer", snapshot_every=25
        )
        config.grad_clip = float(args.max_grad_norm or 0.0)
        self._args = args
        self.run.start(
            model,
            unwrap_optimizer(kwargs["optimizer"]),
            unwrap_scheduler(kwargs.get("lr_scheduler")),
            self._request_evaluation,
            config,
            {
                "framework": f"transformers {transformers.__version__}",
                "max_steps": state.max_steps,
                "learning_rate": args.learning_rate,
            },
        )
        self._logged_at, self._trained_since_log = state.global_step, 0
        self._hook = model.register_forward_hook(self._capture_loss)
        if self.run.health is not None:
            self.run.health.watch_output(model)
        self._follow(self.run.boundary(state.global_step), args, state, control)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Start the step's health metrics."""
        self.run.begin_step(state.global_step)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Gradient norms (HF has clipped by now: above `max_grad_norm`, this is the clipped norm; HF's own
        pre-clip norm is recorded as `hf/grad_norm`) and the learning rate this step uses."""
        self.run.before_optimizer_step()

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Parameter norm and update ratio."""
        self.run.after_optimizer_step()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Record the step just done, then apply commands at the boundary before the next one."""
        self._trained_since_log += 1
        boundary = self.run.end_step(state.global_step)
        if boundary is not None:
            self._follow(boundary, args, state, control)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Record HF's logs: evaluation values at the boundary's step, training values at the step just done.

        After a rollback HF's `loss` divides the loss summed over every step trained since its last log by the
        steps `global_step` advanced, which the rollback made fewer; `hf/loss` is divided by the steps trained.
        """
        values = log_values(logs or {})
        if "hf/loss" in values:
            counted = state.global_step - self._logged_at
            if counted > 0 and self._trained_since_log > 0 and counted != self._trained_since_log:
                values["hf/loss"] *= counted / self._trained_since_log
            self._logged_at, self._trained_since_log = state.global_step, 0
        evaluation = {k: v for k, v in values.items() if k.startswith("eval_")}
        self.run.record(state.global_step, evaluation)
        self.run.record(max(0, state.global_step - 1), {k: v for k, v in values.items() if k not in evaluation})

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Mark the run finished and stop the I/O threads."""
        self.close()

    def close(self, status: str = "finished", message: str = "") -> None:
        """End the run on the server (also for a `train()` that raised) and detach from the model."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.run.close(status, message)

    def _follow(
        self, boundary: Boundary, args: TrainingArguments, state: TrainerState, control: TrainerControl
    ) -> None:
        if boundary.stop:
            control.should_training_stop = True
            return
        if boundary.step != state.global_step:
            # A rollback: the run goes on from the checkpoint's step, and HF's stop-at-max_steps follows it.
            state.global_step = boundary.step
            control.should_training_stop = boundary.step >= state.max_steps
        args.max_grad_norm = boundary.grad_clip
        if self._evaluate_requested:
            self._evaluate_requested = False
            control.should_evaluate = True

    def _request_evaluation(self, max_batches: int | None) -> None:
        """Ask HF to evaluate at this boundary; its metrics arrive through `on_log`."""
        if max_batches is not None:
            raise CommandRejected("the Trainer evaluates its whole eval_dataset; leave max_batches out")
        if self._args is None or self._args.eval_strategy == "no":
            raise CommandRejected(
                "this Trainer has eval_strategy 'no'; give it an eval_dataset and eval_strategy 'steps' or 'epoch'"
            )
        self._evaluate_requested = True

    def _capture_loss(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if module.training:
            self.run.note_loss(getattr(output, "loss", None))
