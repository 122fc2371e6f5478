"""Health metrics for any `nn.Module` and optimizer, for loops the caller does not own.

`Health` finds the model's blocks from its module tree (the repeated layers such as `transformer.h.<i>` or
`model.layers.<i>`, the embeddings before them, the final norm and the head after them) and its attention
modules, and measures, with no change to the model's code:

- `grad_norm` and `grad_norm/<block>` (`embed`, `block.<i>`, `final_norm`, `head`) and `param_norm`, every step;
- `update_ratio` (the update's norm over the parameter norm) every `update_every` steps: it needs a copy of every
  parameter before the optimizer step, which other steps do not make;
- `logit_max` (largest |logit|) and `logit_z` (mean log Z over every position) of the output logits the loop
  hands over, every `logit_every` steps (the exact values of that step; a log Z costs an exponential per logit);
- `attn_logit_max/<layer>`, the largest pre-softmax attention logit of each layer, every `attention_every` steps;
- `nonfinite`, `nonfinite_grad`, `nonfinite_param`: 1.0 when a value (any, the gradient norm, the parameter
  norm) is NaN or infinite, else 0.0.

Every value stays on the device until `end_step`, which reads them all back in one transfer: one host-device
sync per step (`finish_step` starts the same transfer without waiting for it; `Steer` reads it a step later, so
on CUDA the loop never waits for the GPU). Call the methods from the hooks the loop offers, in this order each
optimizer step:

```python
health = Health(model, attention_every=10, logit_every=10, update_every=10)
health.watch_output(model)           # or health.observe_logits(logits) for each micro-batch's output logits
health.begin_step(step)              # attention hooks, logits and the update ratio on their due steps only
...forward and backward (once per micro-batch)...
health.before_optimizer_step()       # gradients as the optimizer will see them; copies parameters when due
optimizer.step()
health.after_optimizer_step()        # parameter norm and update ratio
values = health.end_step()           # dict of floats; detaches the attention hooks
```

- Hugging Face `TrainerCallback`: `begin_step` in `on_step_begin`, `before_optimizer_step` in
  `on_pre_optimizer_step` (HF has clipped by then, so `grad_norm` here is the clipped norm whenever HF's own
  pre-clip `grad_norm` exceeded `max_grad_norm`), `after_optimizer_step` in `on_optimizer_step`, `end_step` in
  `on_step_end`; logits through `watch_output(model)`, a forward hook reading the output's `logits`.
- Lightning `Callback`: `begin_step` in `on_train_batch_start`, `before_optimizer_step` in
  `on_before_optimizer_step` (before Lightning clips), `after_optimizer_step` and `end_step` in
  `on_train_batch_end` once the optimizer stepped; logits either through `watch_output(module)` or from what
  `training_step` returns: `{"loss": loss, "logits": logits}` hands them to `observe_logits`.
- Any loop: `watch_optimizer(optimizer)` calls the two optimizer methods from torch's own optimizer step hooks.

The attention logits need the q·k product that fused attention never materialises. On due steps a forward
pre-hook on each attention module enters a `TorchFunctionMode` that sees the module's call to
`F.scaled_dot_product_attention` (and recomputes q·k·scale plus its mask, under no_grad) or, for eager
attention, its softmax input; the forward hook leaves it. Other steps run with no hook and no mode at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from trainer.metrics import UPDATE_EVERY, GradientNorms, GradientStats, HostValues, all_finite, due_at, logit_scalars

Blocks = list[tuple[str, list[Tensor]]]

_SOFTMAX = (F.softmax, torch.softmax, Tensor.softmax)


def repeated_layers(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The model's stack of repeated layers: the `ModuleList`/`Sequential` of two or more children of one class
    holding the most parameters (`transformer.h`, `model.layers`), with its path; None when there is none."""
    best: tuple[int, str, nn.Module] | None = None
    for path, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 2:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(param.numel() for param in module.parameters())
        if size > 0 and (best is None or size > best[0]):
            best = (size, path, module)
    return (best[1], best[2]) if best is not None else None


def find_blocks(model: nn.Module) -> Blocks:
    """The model's parameters split into named blocks, in order: `embed` (everything before the repeated layers),
    `block.<i>`, `final_norm` (norm layers after them), `head` (the rest after them). A model without repeated
    layers gets one block per top-level child that holds parameters, named after it. Tied weights count once."""
    owner = {id(param): path for path, module in model.named_modules() for param in module.parameters(recurse=False)}
    modules = dict(model.named_modules())
    stack = repeated_layers(model)
    blocks: dict[str, list[Tensor]] = {}
    seen_layers = False
    for name, param in model.named_parameters():
        if stack is None:
            block = name.split(".", 1)[0] if "." in name else "other"
        else:
            prefix = f"{stack[0]}." if stack[0] else ""
            if name.startswith(prefix):
                seen_layers = True
                block = f"block.{name[len(prefix) :].split('.', 1)[0]}"
            elif not seen_layers:
                block = "embed"
            else:
                module = modules[owner[id(param)]]
                block = "final_norm" if "norm" in type(module).__name__.lower() else "head"
        blocks.setdefault(block, []).append(param)
    return list(blocks.items())


def find_attention(model: nn.Module) -> dict[str, nn.Module]:
    """The model's attention modules (class name ending in `Attention`, outermost only), keyed by layer index
    when each repeated layer holds exactly one, else by module path."""
    found: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        if not type(module).__name__.endswith("Attention"):
            continue
        if any(path.startswith(f"{outer}.") for outer in found):
            continue
        found[path] = module
    stack = repeated_layers(model)
    if stack is not None:
        prefix = f"{stack[0]}." if stack[0] else ""
        layer_of = {path: path[len(prefix) :].split(".", 1)[0] for path in found if path.startswith(prefix)}
        if len(layer_of) == len(found) and len(set(layer_of.values())) == len(found):
            return {layer_of[path]: module for path, module in found.items()}
    return found


def _sdpa_logit_max(
    query: Tensor,
    key: Tensor,
    value: Tensor | None = None,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """The largest logit the softmax inside `F.scaled_dot_product_attention` sees: q·k·scale, plus a float mask."""
    scale = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
    if key.shape[-3] != query.shape[-3]:
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
    raw = query @ key.transpose(-2, -1)
    if is_causal:
        future = torch.ones(raw.shape[-2], raw.shape[-1], dtype=torch.bool, device=raw.device).triu(1)
        raw = raw.masked_fill_(future, float("-inf"))
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        raw = raw.masked_fill_(~attn_mask, float("-inf"))
    elif attn_mask is not None:
        return (raw.float() * scale + attn_mask.float()).amax()
    # Scaling after the max is exact: a positive constant factor is monotone.
    return raw.amax().float() * scale


class _AttentionLogits(TorchFunctionMode):
    """Active only inside one attention module's forward on a due step: keeps the largest attention logit."""

    def __init__(self) -> None:
        super().__init__()
        self.value: Tensor | None = None
        """The largest logit seen since the last reset (a 0-d float32 device tensor)."""

    def keep(self, value: Tensor) -> None:
        self.value = value if self.value is None else torch.maximum(self.value, value)

    def __torch_function__(
        self, func: Callable[..., Any], types: Iterable[type], args: Sequence[Any] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            with torch.no_grad():
                self.keep(_sdpa_logit_max(*args, **kwargs))
        elif func in _SOFTMAX and args and isinstance(args[0], Tensor) and args[0].dim() == 4:
            self.keep(args[0].detach().amax().float())
        return func(*args, **kwargs)


ATTENTION_EVERY = 10
"""Default steps between attention-logit measurements (hooks attached on those steps only)."""
LOGIT_EVERY = 10
"""Default steps between output-logit statistics (a log Z costs an exponential per logit)."""


class Health:
    """Per-step health metrics of a model and its optimizer, gathered on the device and read back once a step."""

    def __init__(
        self,
        model: nn.Module,
        *,
        attention_every: int = ATTENTION_EVERY,
        logit_every: int = LOGIT_EVERY,
        update_every: int = UPDATE_EVERY,
        blocks: Blocks | None = None,
    ) -> None:
        self.model = model
        self.attention_every = attention_every
        """Measure `attn_logit_max/<layer>` on steps divisible by this (0: never)."""
        self.logit_every = logit_every
        """Measure `logit_max` and `logit_z` on steps divisible by this (1: every step, 0: never)."""
        self._logits_due = logit_every > 0
        self.blocks = blocks if blocks is not None else find_blocks(model)
        self.gradients = GradientStats(self.blocks, update_every=update_every)
        """Measures `update_ratio` on steps divisible by `update_every` (1: every step, 0: never)."""
        self.attention = find_attention(model) if attention_every > 0 else {}
        self._step = 0
        self._norms: GradientNorms | None = None
        self._logit_max: Tensor | None = None
        self._logit_z_sum: Tensor | None = None
        self._logit_batches = 0
        self._attention_hooks: list[RemovableHandle] = []
        self._modes: dict[str, _AttentionLogits] = {}
        self._watchers: list[RemovableHandle] = []

    # The step, in order

    def begin_step(self, step: int) -> None:
        """Start a step; on due steps, attach the attention hooks (they stay until `end_step`), take the logits and
        copy the parameters for the update ratio."""
        self._detach_attention()
        self._step = step
        self._logits_due = due_at(step, self.logit_every)
        if self.attention and due_at(step, self.attention_every):
            for layer, module in self.attention.items():
                self._attention_hooks.append(module.register_forward_pre_hook(self._enter(layer)))
                self._attention_hooks.append(module.register_forward_hook(self._leave(layer), always_call=True))

    def observe_logits(self, logits: Tensor) -> None:
        """Take one forward's output logits (B, T, vocab) or (N, vocab): folds in their max and mean log Z (on due
        steps; on others it returns at once)."""
        if not self._logits_due:
            return
        scalars = logit_scalars(logits)  # detached: what follows records nothing for autograd
        if self._logit_max is None or self._logit_z_sum is None:
            self._logit_max, self._logit_z_sum = scalars["logit_max"], scalars["logit_z"]
        else:
            self._logit_max = torch.maximum(self._logit_max, scalars["logit_max"])
            self._logit_z_sum = self._logit_z_sum + scalars["logit_z"]
        self._logit_batches += 1

    def before_optimizer_step(self, max_norm: float = 0.0) -> None:
        """Gradient norms of the gradients as they are now (clipped to `max_norm` afterwards when it is > 0, the
        norms reported being the pre-clip ones); on due steps, copies the parameters for `update_ratio`."""
        self.gradients.before_step(self._step, max_norm)

    def after_optimizer_step(self) -> None:
        """Parameter norm (and on due steps the update ratio), once the optimizer has written the parameters."""
        self._norms = self.gradients.after_step()

    def end_step(self, **extra: Tensor | float) -> dict[str, float]:
        """Every value of the step (and `extra`, such as the loss) as floats, in one host-device transfer."""
        return self.finish_step(**extra).read()

    def finish_step(self, **extra: Tensor | float) -> HostValues:
        """Every value of the step (and `extra`) gathered and on its way to the host in one transfer, read when
        needed: on CUDA a step later costs no wait (`Steer` does so)."""
        self._detach_attention()
        if self.gradients.pending:
            # The optimizer did not step (a GradScaler skipped it): the update is zero and reported as such.
            self.after_optimizer_step()
        scalars: dict[str, Tensor] = {}
        floats: dict[str, float] = {}
        for name, value in extra.items():
            if isinstance(value, Tensor):
                scalars[name] = value
            else:
                floats[name] = float(value)
        if self._logit_max is not None and self._logit_z_sum is not None:
            scalars["logit_max"] = self._logit_max
            scalars["logit_z"] = self._logit_z_sum / self._logit_batches
        for layer, mode in self._modes.items():
            if mode.value is not None:
                scalars[f"attn_logit_max/{layer}"] = mode.value
        norms = self._norms
        self._reset()
        return HostValues(scalars, floats, then=_flag_nonfinite, gradients=norms)

    # Hooks for loops that are not ours

    def watch_output(self, module: nn.Module) -> RemovableHandle:
        """Observe the logits of every training-mode forward of `module`: its output tensor, or the output's
        `logits` (a Hugging Face `ModelOutput`, a dict, or a tuple whose first item is the logits)."""

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not module.training or not self._logits_due:
                return
            logits = _logits_of(output)
            if logits is not None:
                self.observe_logits(logits)

        handle = module.register_forward_hook(hook)
        self._watchers.append(handle)
        return handle

    def watch_optimizer(self, optimizer: torch.optim.Optimizer) -> list[RemovableHandle]:
        """Call `before_optimizer_step` and `after_optimizer_step` from the optimizer's own step hooks."""

        def pre_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self.before_optimizer_step()

        def post_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self.after_optimizer_step()

        handles = [optimizer.register_step_pre_hook(pre_hook), optimizer.register_step_post_hook(post_hook)]
        self._watchers.extend(handles)
        return handles

    def close(self) -> None:
        """Remove every hook this object attached."""
        self._detach_attention()
        for handle in self._watchers:
            handle.remove()
        self._watchers.clear()

    # Internals

    def _enter(self, layer: str) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: Any) -> None:
            self._modes.setdefault(layer, _AttentionLogits()).__enter__()  # type: ignore[no-untyped-call]

        return pre_hook

    def _leave(self, layer: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._modes[layer].__exit__(None, None, None)  # type: ignore[no-untyped-call]

        return hook

    def _detach_attention(self) -> None:
        for handle in self._attention_hooks:
            handle.remove()
        self._attention_hooks.clear()

    def _reset(self) -> None:
        self._norms = None
        self._logit_max = self._logit_z_sum = None
        self._logit_batches = 0
        for mode in self._modes.values():
            mode.value = None


def _flag_nonfinite(values: dict[str, float]) -> None:
    """Add the non-finite flags: of the gradient norm, of the parameter norm, of any value."""
    values["nonfinite_grad"] = float(not math.isfinite(values.get("grad_norm", 0.0)))
    values["nonfinite_param"] = float(not math.isfinite(values.get("param_norm", 0.0)))
    values["nonfinite"] = float(not all_finite(values))


def _logits_of(output: Any) -> Tensor | None:
    """The logits in a model's output, or None when it carries none."""
    if isinstance(output, dict):
        logits = output.get("logits")
    elif isinstance(output, tuple):
        logits = next((item for item in output if isinstance(item, Tensor) and item.dim() >= 2), None)
    else:
        logits = getattr(output, "logits", output)
    return logits if isinstance(logits, Tensor) and logits.dim() >= 2 else None
