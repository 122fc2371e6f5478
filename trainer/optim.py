"""The optimizer registry and the in-place hot swap that carries compatible moment state.

A swap changes the class of the existing optimizer object in place instead of handing out a new one, so
that every reference the training loop, an LR scheduler or a GradScaler holds keeps working.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from protocols.commands import OptimizerName

ADAM_FAMILY = ("adamw", "adam", "nadam", "radam")


def optimizer_classes() -> dict[OptimizerName, type[torch.optim.Optimizer]]:
    """Every optimizer `set_optimizer` may name that the installed torch provides."""
    classes: dict[OptimizerName, type[torch.optim.Optimizer]] = {
        "adamw": torch.optim.AdamW,
        "adam": torch.optim.Adam,
        "sgd": torch.optim.SGD,
        "rmsprop": torch.optim.RMSprop,
        "nadam": torch.optim.NAdam,
        "radam": torch.optim.RAdam,
        "adagrad": torch.optim.Adagrad,
    }
    adafactor = getattr(torch.optim, "Adafactor", None)
    if adafactor is not None:
        classes["adafactor"] = adafactor
    return classes


def optimizer_name(optimizer: torch.optim.Optimizer) -> OptimizerName | None:
    """The registry name of an optimizer's class, or None for a class outside the registry."""
    for name, cls in optimizer_classes().items():
        if type(optimizer) is cls:
            return name
    return None


def group_name(group: dict[str, Any], index: int) -> str:
    """A parameter group's name: its `name` key, else `group<index>`."""
    name = group.get("name")
    return str(name) if name else f"group{index}"


DECAYS = "decays"
"""The param-group key recording whether a group takes a weight decay given without `param_groups`."""


def weight_decay_groups(param_groups: list[dict[str, Any]]) -> list[int]:
    """The groups a weight decay given without `param_groups` applies to (`set_hparams`, `set_optimizer`).

    Each group's part is fixed the first time a command asks, and kept in the group (so checkpoints, rollbacks and
    swaps keep it): a group whose weight decay is 0 then, beside groups that decay, is a deliberate no-decay group
    (norm weights, biases, often embeddings) and is changed only when named; every other group decays. So setting
    the decay to 0 and back later never reaches the no-decay group, and a run with no group decaying at first
    (one group, or all at 0) has every group take the value.
    """
    if any(DECAYS not in group for group in param_groups):
        zero = [float(group.get("weight_decay", 0.0)) == 0.0 for group in param_groups]
        split = not all(zero)
        for group, is_zero in zip(param_groups, zero, strict=True):
            group.setdefault(DECAYS, not (split and is_zero))
    return [index for index, group in enumerate(param_groups) if group[DECAYS]]


@dataclass
class SwapPlan:
    """What a swap will build: the new class, its per-group settings, and what state it carries."""

    name: OptimizerName
    cls: type[torch.optim.Optimizer]
    groups: list[dict[str, Any]]
    carried: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def _hparams_for(name: OptimizerName, old: dict[str, Any], overrides: dict[str, Any], decays: bool) -> dict[str, Any]:
    """The constructor settings of `name` for one group: the old group's values where they still mean the same;
    an overriding weight decay only where `decays` (see `weight_decay_groups`)."""
    merged: dict[str, Any] = {key: old[key] for key in ("lr", "weight_decay") if key in old}
    if overrides.get("lr") is not None:
        merged["lr"] = overrides["lr"]
    if overrides.get("weight_decay") is not None and decays:
        merged["weight_decay"] = overrides["weight_decay"]
    betas = overrides.get("betas") or old.get("betas")
    momentum = overrides.get("momentum")
    if momentum is None:
        momentum = old.get("momentum")
    eps = overrides.get("eps")
    if eps is None and isinstance(old.get("eps"), float):
        eps = old["eps"]
    if name in ADAM_FAMILY:
        if betas is not None:
            merged["betas"] = tuple(betas)
        if eps is not None:
            merged["eps"] = eps
    elif name == "sgd":
        # Adam's beta1 plays the part of SGD's momentum when the old optimizer had no momentum of its own.
        if momentum is None:
            momentum = betas[0] if betas is not None else 0.9
        merged["momentum"] = momentum
    elif name == "rmsprop":
        merged["momentum"] = 0.0 if momentum is None else momentum
        if betas is not None:
            merged["alpha"] = betas[1]
        if eps is not None:
            merged["eps"] = eps
    elif name == "adagrad":
        if eps is not None:
            merged["eps"] = eps
    elif name == "adafactor" and eps is not None:
        merged["eps"] = (None, eps)
    return merged


def plan_swap(
    optimizer: torch.optim.Optimizer, name: OptimizerName, overrides: dict[str, Any], carry_state: bool
) -> SwapPlan:
    """Work out a swap without touching the optimizer (beyond fixing the groups' weight-decay parts); raises
    ValueError when `name` is not available."""
    classes = optimizer_classes()
    if name not in classes:
        raise ValueError(f"optimizer {name!r} is not available in torch {torch.__version__}")
    decaying = weight_decay_groups(optimizer.param_groups)
    groups: list[dict[str, Any]] = []
    for index, group in enumerate(optimizer.param_groups):
        settings = _hparams_for(name, group, overrides, index in decaying)
        extra = {key: value for key, value in group.items() if key not in _known_keys(group)}
        groups.append({"params": group["params"], **extra, **settings})
    plan = SwapPlan(name=name, cls=classes[name], groups=groups)
    old_name = optimizer_name(optimizer)
    if carry_state:
        plan.carried, plan.dropped = _describe_carry(old_name, name, optimizer)
    else:
        plan.dropped = sorted(_state_keys(optimizer))
    return plan


def _known_keys(group: dict[str, Any]) -> set[str]:
    """Keys of a param group that belong to the optimizer class (everything but user extras like `name`)."""
    optimizer_keys = {
        "params",
        "lr",
        "weight_decay",
        "betas",
        "eps",
        "momentum",
        "dampening",
        "nesterov",
        "alpha",
        "centered",
        "amsgrad",
        "maximize",
        "foreach",
        "capturable",
        "differentiable",
        "fused",
        "momentum_decay",
        "decoupled_weight_decay",
        "lr_decay",
        "initial_accumulator_value",
        "beta2_decay",
        "d",
        "initial_lr",
        "param_names",
    }
    return optimizer_keys & set(group)


def _state_keys(optimizer: torch.optim.Optimizer) -> set[str]:
    keys: set[str] = set()
    for state in optimizer.state.values():
        keys.update(state)
    return keys


REFUSED: dict[tuple[str, str], str] = {
    ("sgd", "adam-family"): "a first moment without a second one would step up to |momentum|/|gradient| times lr",
}
"""Carries that are never made, and why: the reason goes into the swap's `dropped` list."""


def _family(name: OptimizerName | None) -> str | None:
    return "adam-family" if name in ADAM_FAMILY else name


def _carry_map(old: OptimizerName | None, new: OptimizerName) -> list[tuple[str, str]]:
    """(new key, old key) pairs of state that mean the same thing in both optimizers; `_carry_value` converts.

    Each pair keeps the update the new optimizer makes no larger than it would make itself from its own history:
    second moments travel bias-corrected (an estimate of E[g^2]) and are re-biased for the new optimizer's step
    count, and a first moment travels only with a second moment to scale it (or into SGD, whose buffer is the
    same sum of past gradients that Adam's exp_avg/(1-beta1) is).
    """
    if old is None or (_family(old), _family(new)) in REFUSED:
        return []
    if old in ADAM_FAMILY and new in ADAM_FAMILY:
        return [("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq"), ("step", "step")]
    if old in ADAM_FAMILY and new == "rmsprop":
        return [("square_avg", "exp_avg_sq"), ("step", "step")]
    if old == "rmsprop" and new in ADAM_FAMILY:
        return [("exp_avg_sq", "square_avg"), ("step", "step")]
    if old in ADAM_FAMILY and new == "sgd":
        return [("momentum_buffer", "exp_avg")]
    if old in ADAM_FAMILY and new == "adafactor":
        return [("row_var|col_var|variance", "exp_avg_sq"), ("step", "step")]
    return []


def _describe_carry(
    old: OptimizerName | None, new: OptimizerName, optimizer: torch.optim.Optimizer
) -> tuple[list[str], list[str]]:
    present = _state_keys(optimizer)
    if old == new:
        return sorted(present), []
    carried: list[str] = []
    used: set[str] = set()
    for new_key, old_key in _carry_map(old, new):
        if old_key in present:
            carried.append(old_key if new_key == old_key else f"{old_key}->{new_key}")
            used.add(old_key)
    if new == "nadam" and "step" in used:
        carried.append("mu_product (recomputed from step)")
    reason = REFUSED.get((str(_family(old)), str(_family(new))))
    dropped = [f"{key} ({reason})" if reason and key != "step" else key for key in sorted(present - used)]
    return carried, dropped


def _unbiased(value: Tensor, beta: float, step: float) -> Tensor:
    """An exponential average's estimate of its mean: divided by 1 - beta^step, the weight its terms sum to."""
    return value / (1.0 - beta**step) if step > 0 else value.clone()


def _carry_value(
    old_name: OptimizerName | None,
    new_name: OptimizerName,
    old_state: dict[str, Any],
    old_group: dict[str, Any],
    new_group: dict[str, Any],
    param: Tensor,
) -> dict[str, Any]:
    """The new optimizer's state for one parameter, converted from the old one's where compatible."""
    if old_name == new_name:
        state = {key: (value.clone() if isinstance(value, Tensor) else value) for key, value in old_state.items()}
        return _complete_state(new_name, state, new_group, param)
    state = {}
    old_step = float(old_state["step"]) if "step" in old_state else 0.0
    for new_key, old_key in _carry_map(old_name, new_name):
        if old_key not in old_state:
            continue
        value = old_state[old_key]
        if new_key == "row_var|col_var|variance":
            estimate = _unbiased(value, old_group["betas"][1], old_step)
            if param.dim() > 1:
                state["row_var"] = estimate.mean(dim=-1, keepdim=True)
                state["col_var"] = estimate.mean(dim=-2, keepdim=True)
            else:
                state["variance"] = estimate
        elif new_key == "square_avg":
            state[new_key] = _unbiased(value, old_group["betas"][1], old_step)
        elif new_key == "exp_avg_sq" and old_key == "square_avg":
            # Re-biased so that Adam's own bias correction at this step gives back the RMSprop estimate.
            state[new_key] = _unbiased(value, old_group["alpha"], old_step) * (1.0 - new_group["betas"][1] ** old_step)
        elif new_key == "momentum_buffer" and old_key == "exp_avg":
            # SGD's buffer sums gradients (b = m*b + g) where Adam averages them (m = b1*m + (1-b1)*g).
            state[new_key] = value / (1.0 - old_group["betas"][0])
        elif new_key == "step":
            state[new_key] = torch.tensor(old_step)
        else:
            state[new_key] = value.clone()
    if not state:
        return {}
    return _complete_state(new_name, state, new_group, param)


def _complete_state(name: OptimizerName, state: dict[str, Any], group: dict[str, Any], param: Tensor) -> dict[str, Any]:
    """Fill the keys a partially carried state lacks, since torch only initialises a state that is empty."""
    step = state.get("step")
    if step is None:
        step = torch.tensor(0.0)
        state["step"] = step
    if name in ADAM_FAMILY:
        state.setdefault("exp_avg", torch.zeros_like(param, memory_format=torch.preserve_format))
        state.setdefault("exp_avg_sq", torch.zeros_like(param, memory_format=torch.preserve_format))
        if name == "nadam":
            beta1 = group["betas"][0]
            decay = group.get("momentum_decay", 4e-3)
            steps = int(float(step))
            mu_product = math.prod(beta1 * (1.0 - 0.5 * 0.96 ** (t * decay)) for t in range(1, steps + 1))
            state["mu_product"] = torch.tensor(float(mu_product))
        if group.get("amsgrad"):
            state.setdefault("max_exp_avg_sq", state["exp_avg_sq"].clone())
    elif name == "rmsprop":
        state.setdefault("square_avg", torch.zeros_like(param, memory_format=torch.preserve_format))
        if group.get("momentum", 0) > 0:
            state.setdefault("momentum_buffer", torch.zeros_like(param, memory_format=torch.preserve_format))
        if group.get("centered"):
            state.setdefault("grad_avg", torch.zeros_like(param, memory_format=torch.preserve_format))
    elif name == "sgd":
        state.pop("step", None)
        if group.get("momentum", 0) == 0:
            state.pop("momentum_buffer", None)
    elif name == "adagrad":
        state.setdefault("sum", torch.zeros_like(param, memory_format=torch.preserve_format))
    return _conform(state, state_template(name, group, param))


_TEMPLATES: dict[tuple[Any, ...], dict[str, Tensor]] = {}


def state_template(name: OptimizerName, group: dict[str, Any], param: Tensor) -> dict[str, Tensor]:
    """The state a fresh optimizer of this kind and group settings gives a parameter of this dtype, device and
    rank after one step: the keys, dtypes and devices a carried state must have."""
    settings = {key: value for key, value in group.items() if key not in ("params", "initial_lr", "param_names")}
    key = (name, param.dtype, param.device, param.dim(), repr(sorted(settings.items(), key=lambda item: item[0])))
    if key not in _TEMPLATES:
        probe = torch.zeros((2,) * param.dim(), dtype=param.dtype, device=param.device, requires_grad=True)
        probe.grad = torch.ones_like(probe)
        optimizer = optimizer_classes()[name]([{**settings, "params": [probe]}])  # type: ignore[call-arg]
        optimizer.step()
        _TEMPLATES[key] = {k: v for k, v in optimizer.state[probe].items() if isinstance(v, Tensor)}
    return _TEMPLATES[key]


def _conform(state: dict[str, Any], template: dict[str, Tensor]) -> dict[str, Any]:
    """The carried state with exactly the template's keys, each in the template's dtype and on its device
    (scalars such as `step` stay where torch keeps them); empty, so the optimizer starts fresh, if a key is missing."""
    if set(template) - set(state):
        return {}
    conformed: dict[str, Any] = {}
    for key, reference in template.items():
        value = state[key]
        if not isinstance(value, Tensor):
            value = torch.tensor(float(value))
        conformed[key] = value.to(dtype=reference.dtype, device=reference.device)
    return conformed


def swap_optimizer(optimizer: torch.optim.Optimizer, plan: SwapPlan) -> None:
    """Turn `optimizer` into `plan.cls` in place, carrying the planned state."""
    old_name = optimizer_name(optimizer)
    fresh = plan.cls(plan.groups)  # type: ignore[call-arg]
    carry = bool(plan.carried)
    new_state: dict[Tensor, dict[str, Any]] = {}
    if carry:
        for old_group, new_group in zip(optimizer.param_groups, fresh.param_groups, strict=True):
            for param in old_group["params"]:
                if optimizer.state.get(param):
                    converted = _carry_value(old_name, plan.name, optimizer.state[param], old_group, new_group, param)
                    if converted:
                        new_state[param] = converted
    optimizer.__class__ = plan.cls
    optimizer.defaults = fresh.defaults
    optimizer.param_groups = fresh.param_groups
    optimizer.state.clear()
    optimizer.state.update(new_state)
    optimizer._zero_grad_profile_name = fresh._zero_grad_profile_name
    _rewrap_scheduler_step(optimizer)


def _rewrap_scheduler_step(optimizer: torch.optim.Optimizer) -> None:
    """An LR scheduler wraps the instance's `step` around the old class's function; point it at the new one."""
    wrapped: Callable[..., Any] | None = optimizer.__dict__.get("step")
    if wrapped is None or not getattr(wrapped, "_wrapped_by_lr_sched", False):
        return
    cls = type(optimizer)

    def step(*args: Any, **kwargs: Any) -> Any:
        optimizer._opt_called = True  # type: ignore[attr-defined]
        return cls.step(optimizer, *args, **kwargs)

    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = step  # type: ignore[method-assign]
