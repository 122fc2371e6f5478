"""One function per command type that applies it to a live run, and the registry mapping `type` to it.

Every applier checks everything first and only then changes the run, so a `CommandRejected` leaves the run
exactly as it was. Each returns the values in force afterwards, which the server stores with the command.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from pydantic import JsonValue

from protocols.commands import (
    CommandRecord,
    CommandResult,
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
    rollback_branch,
)
from trainer.checkpoints import CheckpointError
from trainer.live import LiveRun
from trainer.optim import ADAM_FAMILY, optimizer_name, plan_swap, swap_optimizer, weight_decay_groups
from trainer.schedule import Schedule

log = logging.getLogger("runsteer.trainer")

Effective = dict[str, JsonValue]


class CommandRejected(Exception):
    """The command cannot be applied to this run; the message says why. Nothing was changed."""


def _groups(run: LiveRun, names: list[str] | None) -> list[int]:
    """Indices of the named parameter groups (all when `names` is None)."""
    known = run.group_names()
    if names is None:
        return list(range(len(known)))
    unknown = [name for name in names if name not in known]
    if unknown:
        raise CommandRejected(f"unknown parameter group(s) {', '.join(unknown)}; this run has {', '.join(known)}")
    return [known.index(name) for name in names]


def _group_view(run: LiveRun, indices: list[int]) -> Effective:
    view: Effective = {}
    for index in indices:
        group = run.optimizer.param_groups[index]
        entry: dict[str, JsonValue] = {"lr": float(group["lr"]), "weight_decay": float(group.get("weight_decay", 0.0))}
        for key in ("betas", "momentum", "eps"):
            value = group.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                entry[key] = float(value)
            elif isinstance(value, tuple) and all(isinstance(v, float) for v in value):
                entry[key] = [float(v) for v in value]
        view[run.group_names()[index]] = entry
    return view


def apply_set_hparams(run: LiveRun, command: SetHparams) -> Effective:
    """Learning rate, weight decay, betas, momentum, eps and clipping, for all or the named groups."""
    indices = _groups(run, command.param_groups)
    kind = optimizer_name(run.optimizer) or type(run.optimizer).__name__
    for index in indices:
        group = run.optimizer.param_groups[index]
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
    decay = indices if command.param_groups else weight_decay_groups(run.optimizer.param_groups)
    if command.lr is not None:
        run.set_lr(indices, command.lr)
    for index in indices:
        group = run.optimizer.param_groups[index]
        if command.weight_decay is not None and index in decay:
            group["weight_decay"] = command.weight_decay
        if command.betas is not None:
            group["betas"] = tuple(command.betas)
        if command.momentum is not None:
            group["momentum"] = command.momentum
        if command.eps is not None:
            group["eps"] = (group["eps"][0], command.eps) if isinstance(group["eps"], tuple) else command.eps
    if command.grad_clip is not None:
        run.grad_clip = command.grad_clip
    effective: Effective = {"groups": _group_view(run, indices), "grad_clip": run.grad_clip}
    first = run.optimizer.param_groups[indices[0]]
    effective["lr"] = float(first["lr"])
    effective["weight_decay"] = float(first.get("weight_decay", 0.0))
    return effective


def apply_set_schedule(run: LiveRun, command: SetSchedule) -> Effective:
    """Replace the schedule from this step on; groups keep their learning rates relative to the first."""
    current = [float(group["lr"]) for group in run.optimizer.param_groups]
    peak = command.peak_lr if command.peak_lr is not None else current[0]
    if current[0] > 0.0:
        peaks = tuple(peak * lr / current[0] for lr in current)
    else:
        peaks = tuple(peak for _ in current)
    run.schedule = Schedule(
        kind=command.kind,
        peak_lrs=peaks,
        start_step=run.step,
        warmup_steps=command.warmup_steps,
        horizon_steps=command.horizon_steps,
        floor=command.floor,
        decay_fraction=command.decay_fraction,
    )
    run.apply_schedule()
    state = run.schedule.state()
    return {**state.model_dump(), "lr": float(run.optimizer.param_groups[0]["lr"])}


def apply_set_optimizer(run: LiveRun, command: SetOptimizer) -> Effective:
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
        plan = plan_swap(run.optimizer, command.name, overrides, command.carry_state)
    except ValueError as exc:
        raise CommandRejected(str(exc)) from exc
    previous = optimizer_name(run.optimizer) or type(run.optimizer).__name__
    swap_optimizer(run.optimizer, plan)
    if command.lr is not None:
        run.set_lr(list(range(len(run.optimizer.param_groups))), command.lr)
    return {
        "optimizer": command.name,
        "previous": previous,
        "carried": list(plan.carried),
        "dropped": list(plan.dropped),
        "lr": float(run.optimizer.param_groups[0]["lr"]),
        "groups": _group_view(run, list(range(len(run.optimizer.param_groups)))),
    }


def apply_set_data_mix(run: LiveRun, command: SetDataMix) -> Effective:
    """New domain weights; unknown domains and a mix with no weight left are rejected by the sampler."""
    if run.sampler is None:
        raise CommandRejected("this run has no data sampler to change the mix of")
    try:
        mix = run.sampler.set_weights(dict(command.weights))
    except ValueError as exc:
        raise CommandRejected(str(exc)) from exc
    return {"data_mix": dict(mix)}


def _checkpoint_view(run: LiveRun, checkpoint_id: str) -> Effective:
    info = run.checkpoints.find(checkpoint_id=checkpoint_id)
    return {
        "checkpoint_id": info.checkpoint_id,
        "step": info.step,
        "branch": info.branch,
        "path": info.path,
        "sha256": info.sha256,
        "tag": info.tag,
        "healthy": info.healthy,
    }


def apply_save_checkpoint(run: LiveRun, command: SaveCheckpoint) -> Effective:
    """Save now: to the checkpoint directory when there is one, always to the in-memory ring."""
    info = run.save_checkpoint(command.tag, to_disk=True)
    return _checkpoint_view(run, info.checkpoint_id)


def _new_branch(run: LiveRun, requested: str | None, base: str, step: int) -> str:
    if requested is not None:
        if requested in run.branches:
            raise CommandRejected(f"branch {requested!r} already exists; name a new one")
        return requested
    return rollback_branch(base, step, run.branches)


def apply_rollback(run: LiveRun, command: Rollback) -> Effective:
    """Restore a checkpoint onto a new branch; optionally skip the batches the original run saw next."""
    if command.step is not None and command.step > run.step:
        raise CommandRejected(
            f"step {command.step} is beyond the run's current step {run.step}; name a step <= {run.step}"
        )
    try:
        info = run.checkpoints.find(
            checkpoint_id=command.checkpoint_id,
            step=command.step,
            branch=run.branch,
            latest_healthy=command.latest_healthy,
        )
    except CheckpointError as exc:
        raise CommandRejected(str(exc)) from exc
    if command.skip_batches and (run.sampler is None or not hasattr(run.sampler, "skip")):
        raise CommandRejected("skip_batches needs a sampler that can skip; this run has none")
    branch = _new_branch(run, command.branch, run.branch, info.step)
    started = time.perf_counter()
    try:
        source = run.load_checkpoint(info)
    except CheckpointError as exc:
        raise CommandRejected(str(exc)) from exc
    if command.skip_batches and run.sampler is not None:
        run.sampler.skip(command.skip_batches)
    previous_branch, previous_step = run.branch, run.step
    run.move_to(info.step, branch)
    return {
        "checkpoint_id": info.checkpoint_id,
        "step": info.step,
        "branch": branch,
        "from_branch": previous_branch,
        "from_step": previous_step,
        "skipped_batches": command.skip_batches,
        "source": source,
        "restore_ms": round((time.perf_counter() - started) * 1e3, 3),
    }


def apply_pause(run: LiveRun, command: Pause) -> Effective:
    """Hold the loop at this boundary; commands keep being applied and heartbeats keep going."""
    if run.paused:
        raise CommandRejected("the run is already paused")
    run.paused = True
    run.set_status("paused", f"paused at step {run.step}")
    return {"paused": True, "step": run.step}


def apply_resume(run: LiveRun, command: Resume) -> Effective:
    """Let a paused loop go on."""
    if not run.paused:
        raise CommandRejected("the run is not paused")
    run.paused = False
    run.set_status("running", f"resumed at step {run.step}")
    return {"paused": False, "step": run.step}


def apply_stop(run: LiveRun, command: Stop) -> Effective:
    """Write the final checkpoint, mark the run finished; `poll` then raises `StopTraining`."""
    effective: Effective = {"stopped": True, "step": run.step}
    if command.final_checkpoint:
        info = run.save_checkpoint("final", to_disk=True)
        effective["checkpoint_id"] = info.checkpoint_id
        effective["path"] = info.path
    run.stopped = True
    run.paused = False
    run.set_status("finished", f"stopped by command at step {run.step}")
    return effective


def apply_evaluate(run: LiveRun, command: Evaluate) -> Effective:
    """Evaluate now on every domain's held-out split and record the results as metrics of this step."""
    if run.evaluator is None:
        raise CommandRejected("this run was started without an evaluation function")
    values = run.evaluator(command.max_batches)
    if values is None:
        return {"scheduled": True, "step": run.step}
    run.record(run.step, values)
    return {name: value for name, value in values.items() if math.isfinite(value)}


APPLIERS: dict[str, Callable[[LiveRun, Any], Effective]] = {
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


def apply_command(run: LiveRun, record: CommandRecord) -> CommandResult:
    """Apply one command record to the run: `applied` with the effective values, or `rejected`/`failed` with why.

    The only door through which a command changes a run; a distributed wrapper broadcasts the records before it
    and gathers the results after it.
    """
    step = run.step
    try:
        effective = APPLIERS[record.command.type](run, record.command)
        result = CommandResult(status="applied", step=step, effective=effective)
    except CommandRejected as exc:
        result = CommandResult(status="rejected", step=step, message=str(exc)[:2000])
    except Exception as exc:
        log.exception("runsteer: command %s (%s) failed", record.id, record.command.type)
        result = CommandResult(status="failed", step=step, message=f"{type(exc).__name__}: {exc}"[:2000])
    run.last_applied_seq = record.seq
    return result
