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

Every step records `loss` (read from the model's outputs) and `lr`; HF's own logs are recorded beside them, its
training values as `hf/<name>` and its evaluation values under their `eval_*` names.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler
from torch import Tensor, nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from trainer.appliers import CommandRejected
from trainer.io import Transport
from trainer.live import Sampler
from trainer.steer import Steer, SteerConfig, StopTraining

METRIC_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_./:-")


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


class SteerCallback(TrainerCallback):
    """Takes runsteer commands at every step boundary of a Hugging Face `Trainer` and reports its metrics."""

    def __init__(
        self,
        server: str | None = None,
        *,
        sampler: Sampler | None = None,
        config: SteerConfig | None = None,
        transport_factory: Callable[[], Transport] | None = None,
    ) -> None:
        """`config` defaults to checkpoints under `<output_dir>/runsteer` and a snapshot every 25 steps."""
        self.server = server
        self.sampler = sampler
        self.config = config
        self.transport_factory = transport_factory
        self.steer: Steer | None = None
        """The hook, from `on_train_begin` on."""
        self._args: TrainingArguments | None = None
        self._losses: list[Tensor] = []
        self._lr = 0.0
        self._evaluate_requested = False
        self._hook: torch.utils.hooks.RemovableHandle | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Register the run and apply what is already waiting, at step `global_step`."""
        model: nn.Module = kwargs["model"]
        optimizer = unwrap_optimizer(kwargs["optimizer"])
        config = self.config or SteerConfig(
            run_name=args.run_name or "hf", checkpoint_dir=Path(args.output_dir or ".") / "runsteer", snapshot_every=25
        )
        config.grad_clip = float(args.max_grad_norm or 0.0)
        config.run_config = {
            "framework": f"transformers {transformers.__version__}",
            "model": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "max_steps": state.max_steps,
            "learning_rate": args.learning_rate,
            **config.run_config,
        }
        self._args = args
        self.steer = Steer(
            model,
            optimizer,
            scheduler=unwrap_scheduler(kwargs.get("lr_scheduler")),
            sampler=self.sampler,
            evaluate=self._request_evaluation,
            server=self.server,
            config=config,
            transport_factory=self.transport_factory,
        )
        self._hook = model.register_forward_hook(self._capture_loss)
        self._boundary(args, state, control)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Note the learning rate this optimizer step uses (a Python float: no device sync)."""
        if self.steer is not None:
            self._lr = float(self.steer.live.optimizer.param_groups[0]["lr"])

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Record the step just done, then apply commands at the boundary before the next one."""
        if self.steer is None:
            return
        values = {"lr": self._lr}
        if self._losses:
            # The one host-device sync of the step: the mean of its micro-batch losses.
            values["loss"] = float(torch.stack(self._losses).mean())
            self._losses.clear()
        self.steer.record(state.global_step - 1, **values)
        self._boundary(args, state, control)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Record HF's logs: evaluation values at the boundary's step, training values at the step just done."""
        if self.steer is None or not logs:
            return
        values = log_values(logs)
        evaluation = {k: v for k, v in values.items() if k.startswith("eval_")}
        training = {k: v for k, v in values.items() if k not in evaluation}
        if evaluation:
            self.steer.record(state.global_step, **evaluation)
        if training:
            self.steer.record(max(0, state.global_step - 1), **training)

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
        if self.steer is not None:
            self.steer.close(status, message)

    def _boundary(self, args: TrainingArguments, state: TrainerState, control: TrainerControl) -> None:
        assert self.steer is not None
        try:
            step = self.steer.boundary(state.global_step)
        except StopTraining:
            control.should_training_stop = True
            return
        if step != state.global_step:
            # A rollback: the run goes on from the checkpoint's step, and HF's stop-at-max_steps follows it.
            state.global_step = step
            control.should_training_stop = step >= state.max_steps
        args.max_grad_norm = self.steer.live.grad_clip
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
        loss = getattr(output, "loss", None)
        if module.training and isinstance(loss, Tensor):
            self._losses.append(loss.detach())
