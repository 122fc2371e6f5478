"""What the Hugging Face and Lightning callbacks share: a `Steer` built at train start, the health metrics
(trainer/health.py) of every step with its loss and learning rate, and the boundary between steps.

A framework keeps its own step counter (HF's `global_step`, Lightning's `trainer.global_step`) and calls
`end_step` after each optimizer and scheduler step; the returned `Boundary` says what the framework must change:
stop, move its step counter after a rollback, or take a new clipping threshold.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from trainer.health import LOGIT_EVERY, Health
from trainer.io import Transport
from trainer.live import Evaluator, Sampler
from trainer.metrics import UPDATE_EVERY
from trainer.steer import Steer, SteerConfig, StopTraining

METRIC_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_./:-")
"""The characters a metric name may hold (protocols' `MetricName`); a framework's log entry with others is left out."""


class Boundary(NamedTuple):
    """What a step boundary asks of the framework (a named tuple: built every step, and the cheapest to build)."""

    step: int
    """The run's step; after a rollback it differs from the framework's counter, which must be set to it."""
    stop: bool
    grad_clip: float
    """The clipping threshold now in force (0: off)."""


class FrameworkSteer:
    """One steered run inside a framework's callback: per-step loss, lr and health, and the boundary between steps."""

    def __init__(
        self,
        server: str | None,
        sampler: Sampler | None,
        config: SteerConfig | None,
        transport_factory: Callable[[], Transport] | None,
        health: bool,
        logit_every: int = LOGIT_EVERY,
        update_every: int = UPDATE_EVERY,
    ) -> None:
        self.server = server
        self.measure_health = health
        self.logit_every = logit_every
        self.update_every = update_every
        self.sampler = sampler
        self.config = config
        self.transport_factory = transport_factory
        self.steer: Steer | None = None
        """The hook, from train start on."""
        self.health: Health | None = None
        """The model's health metrics, from train start on."""
        self._losses: list[Tensor] = []
        self._lr = 0.0

    def start(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        evaluate: Evaluator,
        config: SteerConfig,
        run_config: dict[str, Any],
    ) -> Steer:
        """Register the run (with the framework's settings in its config) and start the I/O threads."""
        config.run_config = {
            "model": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            **run_config,
            **config.run_config,
        }
        self.steer = Steer(
            model,
            optimizer,
            scheduler=scheduler,
            sampler=self.sampler,
            evaluate=evaluate,
            server=self.server,
            config=config,
            transport_factory=self.transport_factory,
        )
        self.health = (
            Health(model, logit_every=self.logit_every, update_every=self.update_every) if self.measure_health else None
        )
        return self.steer

    def begin_step(self, step: int) -> None:
        """Before the step's first forward (attention logits are measured on due steps)."""
        if self.health is not None:
            self.health.begin_step(step)

    def before_optimizer_step(self) -> None:
        """Gradients are final: note the learning rate this step uses and measure the gradients."""
        if self.steer is not None:
            self._lr = float(self.steer.live.optimizer.param_groups[0]["lr"])
        if self.health is not None:
            self.health.before_optimizer_step()

    def after_optimizer_step(self) -> None:
        """The optimizer wrote the parameters: measure the update."""
        if self.health is not None:
            self.health.after_optimizer_step()

    def note_loss(self, loss: Any) -> None:
        """Keep a micro-batch's loss tensor (read once per step, in `end_step`)."""
        if isinstance(loss, Tensor):
            # Lightning hands it over detached already: a detach is a tensor call, which costs microseconds.
            self._losses.append(loss.detach() if loss.requires_grad else loss)

    def end_step(self, done: int) -> Boundary | None:
        """After `done` optimizer steps: record the step just done, then apply commands at the boundary."""
        steer, health = self.steer, self.health
        if steer is None:
            return None
        extra: dict[str, Tensor | float] = {"lr": self._lr}
        losses = self._losses
        if losses:
            extra["loss"] = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
            losses.clear()
        if health is not None:
            # The health metrics and the loss go to the host in one transfer, read a step later (no wait on CUDA).
            steer.record_values(done - 1, health.finish_step(**extra))
        else:
            steer.record(done - 1, **extra)
        return self.boundary(done)

    def boundary(self, step: int) -> Boundary:
        """Apply commands before the run's `step` runs."""
        assert self.steer is not None
        try:
            step = self.steer.boundary(step)
        except StopTraining:
            return Boundary(step, stop=True, grad_clip=self.steer.live.grad_clip)
        return Boundary(step, stop=False, grad_clip=self.steer.live.grad_clip)

    def record(self, step: int, values: dict[str, float]) -> None:
        """Record values the framework reported (its logs, its evaluation)."""
        if self.steer is not None and values:
            self.steer.record(step, **values)

    def close(self, status: str = "finished", message: str = "") -> None:
        """End the run on the server, stop the I/O threads and detach the health hooks."""
        if self.health is not None:
            self.health.close()
        if self.steer is not None:
            self.steer.close(status, message)


class SteeredCallback:
    """The constructor and `steer` of the framework callbacks (mixed in before the framework's callback class)."""

    def __init__(
        self,
        server: str | None = None,
        *,
        sampler: Sampler | None = None,
        config: SteerConfig | None = None,
        transport_factory: Callable[[], Transport] | None = None,
        health: bool = True,
        logit_every: int = LOGIT_EVERY,
        update_every: int = UPDATE_EVERY,
    ) -> None:
        """`sampler` is the `DomainMixture` the framework reads (for `set_data_mix`); `config` defaults to checkpoints
        under the framework's output directory in `runsteer/` and a snapshot every 25 steps; `health=False` records
        the loss and the learning rate only; `logit_every` is how often the output-logit statistics are taken (1:
        every step, at the cost of an exponential per logit), `update_every` how often the update ratio is (1: every
        step, at the cost of a copy of every parameter)."""
        self.run = FrameworkSteer(server, sampler, config, transport_factory, health, logit_every, update_every)

    @property
    def steer(self) -> Steer | None:
        """The hook, from train start on."""
        return self.run.steer
