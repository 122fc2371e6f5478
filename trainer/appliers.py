"""One function per command type that applies it to a live run, and the registry mapping `type` to it.

Every applier checks everything first and only then changes the run, so a `CommandRejected` leaves the run
exactly as it was. Each returns the values in force afterwards, which the server stores with the command.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import JsonValue

from protocols.commands import (
    Evaluate,
    Pause,
    Resume,
    Rollback,
    SaveCheckpoint,
    SetDataMix,
    SetHparams,
    SetOptimizer,
    SetSchedule,
    Stop,
)
from trainer.checkpoints import CheckpointError
from trainer.optim import ADAM_FAMILY, optimizer_name, plan_swap, swap_optimizer, weight_decay_groups
from trainer.schedule import Schedule

if TYPE_CHECKING:
    from trainer.steer import Steer

Effective = dict[str, JsonValue]


class CommandRejected(Exception):
    """The command cannot be applied to this run; the message says why. Nothing was changed."""


def _groups(steer: Steer, names: list[str] | None) -> list[int]:
    """Indices of the named parameter groups (all when `names` is None)."""
    known = steer.group_names()
    if names is None:
        return list(range(len(known)))
    unknown = [name for name in names if name not in known]
    if unknown:
        raise CommandRejected(f"unknown parameter group(s) {', '.join(unknown)}; this run has {', '.join(known)}")
    return [known.index(name) for name in names]


def _group_view(steer: Steer, indices: list[int]) -> Effective:
    view: Effective = {}
    for index in indices:
        group = steer.optimizer.param_groups[index]
        entry: dict[str, JsonValue] = {"lr": float(group["lr"]), "weight_decay": float(group.get("weight_decay", 0.0))}
        for key in ("betas", "momentum", "eps"):
            value = group.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                entry[key] = float(value)
            elif isinstance(value, tuple) and all(isinstance(v, float) for v in value):
                entry[key] = [float(v) for v in value]
        view[steer.group_names()[index]] = entry
    return view


def set_lr(steer: Steer, indices: list[int], lr: float) -> None:
    """Make `lr` the current learning rate of the groups; a running schedule continues from it, scaled."""
    if steer.schedule is not None:
        for index in indices:
            steer.schedule = steer.schedule.rescaled(steer.step, index, lr)
    elif steer.scheduler is not None:
        base_lrs = steer.scheduler.base_lrs
        for index in indices:
            current = float(steer.optimizer.param_groups[index]["lr"])
            if current > 0.0:
                base_lrs[index] *= lr / current
            else:
                base_lrs[index] = lr
    for index in indices:
        steer.optimizer.param_groups[index]["lr"] = lr


def apply_set_hparams(steer: Steer, command: SetHparams) -> Effective:
    """Learning rate, weight decay, betas, momentum, eps and clipping, for all or the named groups."""
    indices = _groups(steer, command.param_groups)
    kind = optimizer_name(steer.optimizer) or type(steer.optimizer).__name__
    for index in indices:
        group = steer.optimizer.param_groups[index]
        if command.betas is not None and "betas" not in group:
            hint = "; use momentum" if "momentum" in group else ""
            raise CommandRejected(f"{kind} has no betas{hint}")
        if command.momentum is not None and "momentum" not in group:
            hint = "; use betas" if "betas" in group else ""
            raise CommandRejected(f"{kind} has no momentum{hint}")
        if command.eps is not None and not isinstance(group.get("eps"), (float, tuple)):
            raise CommandRejected(f"{kind} has no eps")
        if command.weight_decay is not None and "weight_decay" not in group:
            raise CommandRejected(f"{kind} has no weight decay")
    decay = indices if command.param_groups else weight_decay_groups(steer.optimizer.param_groups)
    if command.lr is not None:
        set_lr(steer, indices, command.lr)
    for index in indices:
        group = steer.optimizer.param_groups[index]
        if command.weight_decay is not None and index in decay:
            group["weight_decay"] = command.weight_decay
        if command.betas is not None:
            group["betas"] = tuple(command.betas)
        if command.momentum is not None:
            group["momentum"] = command.momentum
        if command.eps is not None:
            group["eps"] = (group["eps"][0], command.eps) if isinstance(group["eps"], tuple) else command.eps
    if command.grad_clip is not None:
        steer.grad_clip = command.grad_clip
    effective: Effective = {"groups": _group_view(steer, indices), "grad_clip": steer.grad_clip}
    first = steer.optimizer.param_groups[indices[0]]
    effective["lr"] = float(first["lr"])
    effective["weight_decay"] = float(first.get("weight_decay", 0.0))
    return effective


def apply_set_schedule(steer: Steer, command: SetSchedule) -> Effective:
    """Replace the schedule from this step on; groups keep their learning rates relative to the first."""
    current = [float(group["lr"]) for group in steer.optimizer.param_groups]
    peak = command.peak_lr if command.peak_lr is not None else current[0]
    if current[0] > 0.0:
        peaks = tuple(peak * lr / current[0] for lr in current)
    else:
        peaks = tuple(peak for _ in current)
    steer.schedule = Schedule(
        kind=command.kind,
        peak_lrs=peaks,
        start_step=steer.step,
        warmup_steps=command.warmup_steps,
        horizon_steps=command.horizon_steps,
        floor=command.floor,
        decay_fraction=command.decay_fraction,
    )
    for group, lr in zip(steer.optimizer.param_groups, steer.schedule.lrs(steer.step), strict=True):
        group["lr"] = lr
    state = steer.schedule.state()
    return {**state.model_dump(), "lr": float(steer.optimizer.param_groups[0]["lr"])}


def apply_set_optimizer(steer: Steer, command: SetOptimizer) -> Effective:
    """Swap the optimizer in place, carrying compatible state; the result lists what was carried and dropped."""
    if command.name in ADAM_FAMILY and command.momentum is not None:
        raise CommandRejected(f"{command.name} takes betas, not momentum")
    if command.name in ("sgd", "adagrad", "adafactor") and command.betas is not None:
        raise CommandRejected(f"{command.name} takes no betas")
    if command.name in ("adagrad", "adafactor") and command.momentum is not None:
        raise CommandRejected(f"{command.name} takes no momentum")
    overrides: dict[str, Any] = {
        "weight_decay": command.weight_decay,
        "betas": command.betas,
        "momentum": command.momentum,
        "eps": command.eps,
    }
    try:
        plan = plan_swap(steer.optimizer, command.name, overrides, command.carry_state)
    except ValueError as exc:
        raise CommandRejected(str(exc)) from exc
    previous = optimizer_name(steer.optimizer) or type(steer.optimizer).__name__
    swap_optimizer(steer.optimizer, plan)
    if command.lr is not None:
        set_lr(steer, list(range(len(steer.optimizer.param_groups))), command.lr)
    return {
        "optimizer": command.name,
        "previous": previous,
        "carried": list(plan.carried),
        "dropped": list(plan.dropped),
        "lr": float(steer.optimizer.param_groups[0]["lr"]),
        "groups": _group_view(steer, list(range(len(steer.optimizer.param_groups)))),
    }


def apply_set_data_mix(steer: Steer, command: SetDataMix) -> Effective:
    """New domain weights; unknown domains and a mix with no weight left are rejected by the sampler."""
    if steer.sampler is None:
        raise CommandRejected("this run has no data sampler to change the mix of")
    try:
        mix = steer.sampler.set_weights(dict(command.weights))
    except ValueError as exc:
        raise CommandRejected(str(exc)) from exc
    return {"data_mix": dict(mix)}


def _checkpoint_view(steer: Steer, checkpoint_id: str) -> Effective:
    info = steer.checkpoints.find(checkpoint_id=checkpoint_id)
    return {
        "checkpoint_id": info.checkpoint_id,
        "step": info.step,
        "branch": info.branch,
        "path": info.path,
        "sha256": info.sha256,
        "tag": info.tag,
        "healthy": info.healthy,
    }


def apply_save_checkpoint(steer: Steer, command: SaveCheckpoint) -> Effective:
    """Save now: to the checkpoint directory when there is one, always to the in-memory ring."""
    info = steer.save_checkpoint(command.tag, to_disk=True)
    return _checkpoint_view(steer, info.checkpoint_id)


def _new_branch(steer: Steer, requested: str | None, base: str, step: int) -> str:
    if requested is not None:
        if requested in steer.branches:
            raise CommandRejected(f"branch {requested!r} already exists; name a new one")
        return requested
    stem = f"{base[:40]}.r{step}"
    name, suffix = stem, 2
    while name in steer.branches:
        name, suffix = f"{stem}-{suffix}", suffix + 1
    return name


def apply_rollback(steer: Steer, command: Rollback) -> Effective:
    """Restore a checkpoint onto a new branch; optionally skip the batches the original run saw next."""
    try:
        info = steer.checkpoints.find(
            checkpoint_id=command.checkpoint_id,
            step=command.step,
            branch=steer.branch,
            latest_healthy=command.latest_healthy,
        )
    except CheckpointError as exc:
        raise CommandRejected(str(exc)) from exc
    if command.skip_batches and (steer.sampler is None or not hasattr(steer.sampler, "skip")):
        raise CommandRejected("skip_batches needs a sampler that can skip; this run has none")
    branch = _new_branch(steer, command.branch, steer.branch, info.step)
    started = time.perf_counter()
    from_memory = steer.checkpoints.entries[info.checkpoint_id].state is not None
    try:
        state = steer.checkpoints.load(info.checkpoint_id)
    except CheckpointError as exc:
        raise CommandRejected(str(exc)) from exc
    steer.restore(state)
    if command.skip_batches and steer.sampler is not None:
        steer.sampler.skip(command.skip_batches)
    previous_branch, previous_step = steer.branch, steer.step
    steer.move_to(info.step, branch)
    return {
        "checkpoint_id": info.checkpoint_id,
        "step": info.step,
        "branch": branch,
        "from_branch": previous_branch,
        "from_step": previous_step,
        "skipped_batches": command.skip_batches,
        "source": "memory" if from_memory else "disk",
        "restore_ms": round((time.perf_counter() - started) * 1e3, 3),
    }


def apply_pause(steer: Steer, command: Pause) -> Effective:
    """Hold the loop at this boundary; commands keep being applied and heartbeats keep going."""
    if steer.paused:
        raise CommandRejected("the run is already paused")
    steer.paused = True
    steer.report_status("paused", f"paused at step {steer.step}")
    return {"paused": True, "step": steer.step}


def apply_resume(steer: Steer, command: Resume) -> Effective:
    """Let a paused loop go on."""
    if not steer.paused:
        raise CommandRejected("the run is not paused")
    steer.paused = False
    steer.report_status("running", f"resumed at step {steer.step}")
    return {"paused": False, "step": steer.step}


def apply_stop(steer: Steer, command: Stop) -> Effective:
    """Write the final checkpoint, mark the run finished; `poll` then raises `StopTraining`."""
    effective: Effective = {"stopped": True, "step": steer.step}
    if command.final_checkpoint:
        info = steer.save_checkpoint("final", to_disk=True)
        effective["checkpoint_id"] = info.checkpoint_id
        effective["path"] = info.path
    steer.stopped = True
    steer.paused = False
    steer.report_status("finished", f"stopped by command at step {steer.step}")
    return effective


def apply_evaluate(steer: Steer, command: Evaluate) -> Effective:
    """Evaluate now on every domain's held-out split and record the results as metrics of this step."""
    if steer.evaluator is None:
        raise CommandRejected("this run was started without an evaluation function")
    values = steer.evaluator(command.max_batches)
    steer.record(steer.step, **values)
    return {name: value for name, value in values.items() if math.isfinite(value)}


APPLIERS: dict[str, Callable[[Steer, Any], Effective]] = {
    "set_hparams": apply_set_hparams,
    "set_schedule": apply_set_schedule,
    "set_optimizer": apply_set_optimizer,
    "set_data_mix": apply_set_data_mix,
    "save_checkpoint": apply_save_checkpoint,
    "rollback": apply_rollback,
    "pause": apply_pause,
    "resume": apply_resume,
    "stop": apply_stop,
    "evaluate": apply_evaluate,
}
"""Command `type` to the function that applies it; every command type has one."""
