"""The live run: the parts of a training run that commands change, kept apart from the I/O around them.

The plain `Steer` hook, the built-in run, the Hugging Face and Lightning callbacks and a distributed wrapper all
hand a `LiveRun` to the same appliers (`trainer/appliers.py`), so a command means the same in every loop. The live
run never touches the network: what the server must hear about (a status change, a checkpoint written, metrics of an
evaluation) it hands to `emit`, which `Steer` routes to its I/O thread and a rank other than 0 may simply drop.
Applying a command is a pure function of the live run and the command record, so a distributed wrapper can
broadcast the records before `apply_command` and gather the results after it, and every rank changes alike.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from protocols.records import CheckpointInfo, RunReport, RunState, StatusReport
from trainer.checkpoints import CheckpointStore, Parameters
from trainer.io import OutItem, SampleItem, SavedItem
from trainer.metrics import all_finite
from trainer.optim import group_name, optimizer_name, plan_swap, swap_optimizer
from trainer.schedule import Schedule

Evaluator = Callable[[int | None], dict[str, float] | None]
"""Runs evaluation on at most `max_batches` batches per domain (the run's default for None) and returns
`eval_loss` and `eval_loss/<domain>` values; or returns None when it only asked the framework to evaluate at its
next chance (the framework's own evaluation then reports the metrics)."""


class Sampler(Protocol):
    """What `set_data_mix` and rollback need from a data sampler."""

    names: list[str]

    def set_weights(self, weights: dict[str, float]) -> dict[str, float]: ...
    def mix(self) -> dict[str, float]: ...
    def skip(self, batches: int) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


_new_sample = tuple.__new__

LR_TABLE_STEPS = 64
"""How many steps' learning rates `apply_schedule` works out at once."""


class ScheduleFactor:
    """A `LambdaLR` multiplier that makes a torch scheduler follow a runsteer `Schedule`.

    A callable object rather than a function, so `LambdaLR.state_dict` saves it and a rollback restores it.
    """

    def __init__(self, schedule: dict[str, Any], offset: int) -> None:
        self.schedule = schedule
        self.offset = offset
        """The run's step minus the scheduler's `last_epoch` when the schedule was set."""

    def __call__(self, epoch: int) -> float:
        return Schedule.from_state_dict(self.schedule).factor(epoch + self.offset)


class ModelState:
    """`model.state_dict(keep_vars=True)` refilled from a plan made once, so a snapshot does not walk the module tree.

    The plan holds where each parameter and persistent buffer lives (its module's table and name), read anew at each
    capture, so a tensor reassigned since is seen; the module tree itself must stay as it was. A model that torch's
    default would not save that way (state-dict hooks, an overridden `state_dict`, `_save_to_state_dict` or
    `get_extra_state`) gets torch's own `state_dict` every time.
    """

    def __init__(self) -> None:
        self._model: nn.Module | None = None
        self._plan: list[tuple[str, dict[str, Any], str]] | None = None
        self._own = True
        """False once the plan found a module torch's default does not save as the plan would."""
        self._parameters_only = False
        """True when the plan holds no buffer."""

    def capture(self, model: nn.Module) -> dict[str, Any]:
        """The model's parameters and persistent buffers by state-dict key (references, not copies)."""
        if model is not self._model:
            self._model, self._plan, self._own = model, None, True
        if self._plan is None and self._own:
            self._plan = self._make_plan(model)
        if self._plan is None:
            return model.state_dict(keep_vars=True)
        # Without buffers the state is parameters alone, which a snapshot copies off the training thread as a whole.
        state: dict[str, Any] = Parameters() if self._parameters_only else {}
        for key, table, name in self._plan:
            value = table.get(name)
            if value is not None:
                state[key] = value
        return state

    def _make_plan(self, model: nn.Module) -> list[tuple[str, dict[str, Any], str]] | None:
        plan: list[tuple[str, dict[str, Any], str]] = []
        base = nn.Module
        parameters_only = True
        for path, module in model.named_modules(remove_duplicate=False):
            kind = type(module)
            if (
                module._state_dict_hooks
                or module._state_dict_pre_hooks
                or kind.state_dict is not base.state_dict
                or kind._save_to_state_dict is not base._save_to_state_dict
                or kind.get_extra_state is not base.get_extra_state
            ):
                self._own = False
                return None
            prefix = f"{path}." if path else ""
            plan += [(prefix + name, module._parameters, name) for name in module._parameters]
            buffers = [
                (prefix + name, module._buffers, name)
                for name in module._buffers
                if name not in module._non_persistent_buffers_set
            ]
            plan += buffers
            parameters_only = parameters_only and not buffers
        self._parameters_only = parameters_only
        return plan


class OptimizerState:
    """`optimizer.state_dict()` with the parameters' indices worked out once per set of parameter lists.

    Torch numbers the parameters in group order at every call; here the numbering is kept while every group holds
    the same parameter list (held, so its identity cannot be reused) of the same length. An optimizer with
    state-dict hooks or its own `state_dict` gets torch's own every time.
    """

    def __init__(self) -> None:
        self._lists: list[tuple[list[Any], int]] = []
        self._index: dict[int, int] = {}
        self._packed: list[list[int]] = []

    def capture(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's state dict as torch makes it (per-parameter state by reference, not copied)."""
        if (
            type(optimizer).state_dict is not torch.optim.Optimizer.state_dict
            or optimizer._optimizer_state_dict_pre_hooks
            or optimizer._optimizer_state_dict_post_hooks
        ):
            return optimizer.state_dict()
        groups = optimizer.param_groups
        lists = self._lists
        if len(lists) != len(groups) or any(
            group["params"] is not params or len(params) != size
            for group, (params, size) in zip(groups, lists, strict=False)
        ):
            self._number(groups)
        index = self._index
        packed_groups = []
        for group, params in zip(groups, self._packed, strict=True):
            packed = {key: value for key, value in group.items() if key != "params"}
            packed["params"] = params
            packed_groups.append(packed)
        state = {(index[id(key)] if isinstance(key, Tensor) else key): value for key, value in optimizer.state.items()}
        return {"state": state, "param_groups": packed_groups}

    def _number(self, groups: list[dict[str, Any]]) -> None:
        """Number the parameters in group order, as torch does (a parameter in two groups keeps its first number)."""
        index: dict[int, int] = {}
        packed: list[list[int]] = []
        start = 0
        for group in groups:
            params = group["params"]
            for number, param in enumerate(params, start):
                index.setdefault(id(param), number)
            packed.append([index[id(param)] for param in params])
            start += len(params)
        self._lists = [(group["params"], len(group["params"])) for group in groups]
        self._index = index
        self._packed = packed


class LiveRun:
    """Model, optimizer, schedule or scheduler, sampler, checkpoint ring, clipping, step and branch, pause/stop."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        checkpoints: CheckpointStore,
        emit: Callable[[OutItem], None],
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        schedule: Schedule | None = None,
        sampler: Sampler | None = None,
        evaluate: Evaluator | None = None,
        grad_clip: float = 0.0,
        branch: str = "main",
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        """The torch optimizer itself (a framework's wrapper unwrapped), so a swap changes the object all share."""
        self.scheduler = scheduler
        self.sampler = sampler
        self.evaluator = evaluate
        self.checkpoints = checkpoints
        self.emit = emit
        self.emit_sample: Callable[[SampleItem], None] = emit
        """Where `record` hands a step's values; a hook may point it at its sender's sample queue directly."""
        self.grad_clip = grad_clip
        """Gradient clipping threshold (0: off); a loop or callback reads it before each optimizer step."""
        self.step = 0
        self.branch = branch
        self.branches = {branch}
        self.paused = False
        self.stopped = False
        self.last_applied_seq = 0
        self._healthy_since_checkpoint = True
        self._last_values: dict[str, float] = {}
        self._last_finite = True
        self._lambdas: list[Any] = list(getattr(scheduler, "lr_lambdas", []))
        self._model_state = ModelState()
        self._optimizer_state = OptimizerState()
        self._cuda = torch.cuda.is_available()
        self._optimizer_name: tuple[type, str | None] = (type(None), None)
        self._schedule: Schedule | None = None
        self._schedule_state: dict[str, Any] | None = None
        self._lr_table: tuple[tuple[Schedule, list[list[float]]] | None, int] = (None, 0)
        """The schedule's learning rates from a step on, for that schedule object only (a new one starts afresh)."""
        self.schedule = schedule

    @property
    def schedule(self) -> Schedule | None:
        """The runsteer schedule in force, if any; a `LambdaLR` scheduler is made to follow it."""
        return self._schedule

    @schedule.setter
    def schedule(self, schedule: Schedule | None) -> None:
        self._schedule = schedule
        self._schedule_state = schedule.state_dict() if schedule is not None else None
        scheduler = self.scheduler
        if schedule is None or not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            return
        factor = ScheduleFactor(schedule.state_dict(), self.step - scheduler.last_epoch)
        scheduler.lr_lambdas = [factor for _ in scheduler.lr_lambdas]
        scheduler.base_lrs = list(schedule.peak_lrs)
        for group, peak in zip(self.optimizer.param_groups, schedule.peak_lrs, strict=True):
            if "initial_lr" in group:
                group["initial_lr"] = peak

    # Settings

    def group_names(self) -> list[str]:
        """Names of the optimizer's parameter groups."""
        return [group_name(group, index) for index, group in enumerate(self.optimizer.param_groups)]

    def set_lr(self, indices: list[int], lr: float) -> None:
        """Make `lr` the current learning rate of the groups; a running schedule continues from it, scaled.

        Under a torch scheduler (HF's are `LambdaLR`: lr = base_lr x factor(step)) the groups' `base_lrs` and
        `initial_lr` are scaled by new/current, so the scheduler's next step keeps the change instead of undoing it.
        """
        if self.schedule is not None:
            schedule = self.schedule
            for index in indices:
                schedule = schedule.rescaled(self.step, index, lr)
            self.schedule = schedule
        elif self.scheduler is not None:
            base_lrs = self.scheduler.base_lrs
            for index in indices:
                group = self.optimizer.param_groups[index]
                current = float(group["lr"])
                ratio = lr / current if current > 0.0 else None
                base_lrs[index] = base_lrs[index] * ratio if ratio is not None else lr
                if "initial_lr" in group:
                    group["initial_lr"] = group["initial_lr"] * ratio if ratio is not None else lr
        for index in indices:
            self.optimizer.param_groups[index]["lr"] = lr
        self._tell_scheduler()

    def apply_schedule(self) -> None:
        """Write the schedule's learning rates for this step into the optimizer (a no-op without a schedule)."""
        schedule = self._schedule
        if schedule is None:
            return
        table, first = self._lr_table
        index = self.step - first
        if table is None or table[0] is not schedule or not 0 <= index < len(table[1]):
            # Worked out for the next `LR_TABLE_STEPS` steps at once: a step then only looks its rates up.
            table, first, index = (schedule, [schedule.lrs(self.step + k) for k in range(LR_TABLE_STEPS)]), self.step, 0
            self._lr_table = table, first
        for group, lr in zip(self.optimizer.param_groups, table[1][index], strict=True):
            group["lr"] = lr
        if self.scheduler is not None:
            self._tell_scheduler()

    def _tell_scheduler(self) -> None:
        """Make the scheduler's `get_last_lr()` (what HF and Lightning log) the learning rates now in force."""
        if self.scheduler is not None:
            self.scheduler._last_lr = [float(group["lr"]) for group in self.optimizer.param_groups]

    def run_state(self) -> RunState:
        """The settings in force, for heartbeats and the server's view of the run."""
        group = self.optimizer.param_groups[0]
        return RunState(
            step=self.step,
            branch=self.branch,
            paused=self.paused,
            lr=float(group["lr"]),
            weight_decay=float(group.get("weight_decay", 0.0)),
            grad_clip=self.grad_clip,
            optimizer=optimizer_name(self.optimizer),
            schedule=self.schedule.state() if self.schedule is not None else None,
            data_mix=self.sampler.mix() if self.sampler is not None else {},
            param_groups=self.group_names(),
        )

    # Metrics and reports

    def record(self, step: int, values: dict[str, float], finite: bool | None = None) -> None:
        """Hand one step's values to the server (through `emit_sample`) and remember them: the next checkpoint carries
        them and is unhealthy if any was non-finite (`finite`, when the caller knows it already). The caller hands the
        dict over: nothing changes it afterwards."""
        if finite is None:
            finite = all_finite(values)
        if not finite:
            self._healthy_since_checkpoint = False
        self._last_values, self._last_finite = values, finite
        # tuple.__new__ builds the named tuple without running its Python-level constructor.
        self.emit_sample(_new_sample(SampleItem, (self.branch, step, time.time(), values)))

    def report(self, item: RunReport) -> None:
        """Hand a report to the server (through `emit`)."""
        self.emit(item)

    def set_status(self, status: str, message: str) -> None:
        """Tell the server the run changed status (paused, running, finished)."""
        self.emit(StatusReport(status=status, message=message[:2000]))  # type: ignore[arg-type]

    # Checkpoints

    def capture(self) -> dict[str, Any]:
        """Everything a checkpoint restores (references; the store copies them)."""
        state: dict[str, Any] = {
            # Parameters as `nn.Parameter`s: the ring copies those off the training thread (see checkpoints.py).
            "model": self._model_state.capture(self.model),
            "optimizer": self._optimizer_state.capture(self.optimizer),
            "optimizer_name": self._name_of_optimizer(),
            "schedule": self._schedule_state,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "sampler": self.sampler.state_dict() if self.sampler is not None else None,
            "rng": {"torch": torch.get_rng_state()},
            "step": self.step,
            "branch": self.branch,
            "hparams": {"grad_clip": self.grad_clip},
            "last_applied_seq": self.last_applied_seq,
        }
        if self._cuda:
            state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def _name_of_optimizer(self) -> str:
        """The optimizer's registry name (or class name), looked up again only when its class changed (a swap)."""
        kind = type(self.optimizer)
        if self._optimizer_name[0] is not kind:
            self._optimizer_name = (kind, optimizer_name(self.optimizer) or kind.__name__)
        return self._optimizer_name[1] or kind.__name__

    def restore(self, state: dict[str, Any]) -> None:
        """Load a captured state into the model, optimizer, schedule, scheduler, sampler and RNG (not the branch)."""
        self.model.load_state_dict(state["model"])
        saved_name = state["optimizer_name"]
        if saved_name != optimizer_name(self.optimizer):
            swap_optimizer(self.optimizer, plan_swap(self.optimizer, saved_name, {}, carry_state=False))
        self.optimizer.load_state_dict(state["optimizer"])
        if isinstance(self.scheduler, torch.optim.lr_scheduler.LambdaLR):
            # The multipliers in force when the state was saved must be in place before LambdaLR loads their data.
            self.scheduler.lr_lambdas = list(self._lambdas)
        self.schedule = Schedule.from_state_dict(state["schedule"]) if state["schedule"] is not None else None
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.sampler is not None and state["sampler"] is not None:
            self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.grad_clip = float(state["hparams"]["grad_clip"])

    def save_checkpoint(self, tag: str | None = None, *, to_disk: bool = True) -> CheckpointInfo:
        """Snapshot the run now and report it, and what retention evicted, to the server."""
        info, evicted = self.checkpoints.save(
            self.capture(),
            branch=self.branch,
            step=self.step,
            tag=tag,
            to_disk=to_disk,
            healthy=self._healthy_since_checkpoint,
            # Floats, finite ones: a recorded int or bool is kept as it was given (see `as_floats`).
            metrics={k: float(v) for k, v in self._last_values.items() if self._last_finite or math.isfinite(v)},
        )
        self._healthy_since_checkpoint = True
        self.emit(SavedItem(info, evicted))
        return info

    def load_checkpoint(self, info: CheckpointInfo) -> str:
        """Restore the checkpoint's state into the run; returns where it came from (`memory` or `disk`)."""
        entry = self.checkpoints.entries.get(info.checkpoint_id)
        source = "memory" if entry is not None and entry.state is not None else "disk"
        self.restore(self.checkpoints.load(info.checkpoint_id))
        return source

    def move_to(self, step: int, branch: str) -> None:
        """Continue as `step` on `branch` (after a rollback)."""
        self.step = step
        self.branch = branch
        self.branches.add(branch)
