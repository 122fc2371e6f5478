"""The per-step health metrics, computed with fused kernels and read back in one transfer per step.

Every value is gathered as a 0-d device tensor and brought to the host in a single copy at the end of the step,
so that on CUDA the training thread waits on the device at most once, not once per metric (`HostValues` does not
wait at all: its copy runs behind the step's kernels and is read a step later).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING, Any, TypeGuard, cast

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


@dataclass
class LossOutput:
    """The loss to backpropagate and the loss statistics, still on the device."""

    loss: Tensor
    """Cross-entropy plus the z-loss term when z-loss is on."""
    scalars: dict[str, Tensor]
    """`loss` (cross-entropy alone), `logit_max` and `logit_z`."""
    domain_sums: Tensor | None = None
    """Per-domain sum of row losses; with `domain_counts` it gives `loss/<domain>` once on the host."""
    domain_counts: Tensor | None = None


def lm_loss(
    logits: Tensor,
    targets: Tensor,
    domain_ids: Tensor | None = None,
    domains: list[str] | None = None,
    z_loss: float = 0.0,
) -> LossOutput:
    """Cross-entropy with the log-sum-exp computed once and reused for the loss, `logit_z` and the z-loss.

    The loss goes through fused `F.cross_entropy`; its log-sum-exp per token is recovered exactly as the
    per-token loss plus the target logit (a gather of one value per token), instead of a second pass over
    the logits and a second backward through them.
    """
    flat = logits.float().reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    nll = F.cross_entropy(flat, flat_targets, reduction="none")
    ce = nll.mean()
    if z_loss > 0.0:
        lse = nll + flat.gather(1, flat_targets.unsqueeze(1)).squeeze(1)
        loss = ce + z_loss * lse.square().mean()
    else:
        loss = ce
    with torch.no_grad():
        if z_loss <= 0.0:
            lse = nll + flat.gather(1, flat_targets.unsqueeze(1)).squeeze(1)
        scalars = {"loss": ce.detach(), **logit_scalars(flat, lse.detach())}
        if domain_ids is None or not domains:
            return LossOutput(loss, scalars)
        rows = nll.detach().view(targets.shape).mean(dim=1)
        sums = torch.zeros(len(domains), device=logits.device).index_add_(0, domain_ids, rows)
        counts = torch.bincount(domain_ids, minlength=len(domains)).float()
    return LossOutput(loss, scalars, sums, counts)


@torch.no_grad()
def logit_scalars(logits: Tensor, lse: Tensor | None = None) -> dict[str, Tensor]:
    """`logit_max` (the largest |logit|) and `logit_z` (the mean log-sum-exp, log Z) of output logits.

    `lse` is the per-token log-sum-exp when the caller already has it (as the loss does). Else the mean log Z comes
    from the fused log-softmax kernel, through the identity log_softmax(x)_0 = x_0 - log Z, which holds for every
    row: mean(log Z) = mean(x_0) - mean(log_softmax(x)_0). On the CPU that kernel takes half the time of
    `torch.logsumexp`, whose exponential runs as a separate, slower pass.
    """
    flat = logits.detach().reshape(-1, logits.shape[-1])
    low, high = torch.aminmax(flat)
    logit_max = torch.maximum(high, low.neg()).float()
    if lse is not None:
        return {"logit_max": logit_max, "logit_z": lse.float().mean()}
    flat = flat.float()
    logit_z = flat[:, 0].mean() - F.log_softmax(flat, dim=-1)[:, 0].mean()
    return {"logit_max": logit_max, "logit_z": logit_z}


def due_at(step: int, every: int) -> bool:
    """Whether a measurement taken every `every` steps (0: never) is due at `step`: the one cadence rule of the
    sampled health values (update ratio, logit and attention statistics), so every rank and loop agrees."""
    return every > 0 and step % every == 0


UPDATE_EVERY = 10
"""Default steps between update-ratio measurements, as for the logit statistics. The ratio's copy of every parameter
and its update norm cost 0.5 to 3 ms of an 80 to 87 ms `cpu-tiny` step (the more when the allocator hands freed memory
back after each step, see `trainer.run.keep_freed_memory`) and three kernel launches on a GPU, a tenth of that every
10 steps. The ratio follows the learning rate and the weights, which move slowly; the gradient norms, whose spikes
come in one step, are measured every step."""


class GradientStats:
    """Gradient norms (global and per block), clipping, parameter norm and update ratio for fixed parameters.

    The device computes only each parameter's norms (one fused `torch._foreach_norm` over the gradients, one over the
    parameters and, on steps that measure it, the update); they come back with the step's other values in one
    transfer, and the block, global and parameter norms and the ratio are finished on the host from them
    (`GradientNorms.finish`): a few float operations there, instead of a dozen tensor calls, each costing
    microseconds on the CPU. The update ratio needs the parameters from before the optimizer step; on the steps
    `update_every` names they are copied into views of one flat buffer allocated once, and the update is formed in
    place there after the step.
    """

    def __init__(self, blocks: Sequence[tuple[str, Sequence[Tensor]]], *, update_every: int = UPDATE_EVERY) -> None:
        if update_every < 0:
            raise ValueError(f"update_every must be >= 0 (0: never, 1: every step), not {update_every}")
        self.names = [name for name, _ in blocks]
        self.params: list[Tensor] = [param for _, params in blocks for param in params if param.requires_grad]
        device = self.params[0].device
        counts = [sum(1 for param in params if param.requires_grad) for _, params in blocks]
        # The parameters are listed block by block, so a block's norms are one slice of them.
        self._block_slices = [
            (f"grad_norm/{name}", end - count, end)
            for name, count, end in zip(self.names, counts, accumulate(counts), strict=True)
        ]
        self.update_every = update_every
        """Measure `update_ratio` on steps divisible by this (1: every step, 0: never). Other steps neither copy the
        parameters nor take the update's norm."""
        self.sharded = any(is_dtensor(param) for param in self.params)
        """FSDP2 (`fully_shard`): every value is this rank's shard's, combined across ranks where they are reported
        (trainer/distributed.py); clipping alone needs the global norm at once."""
        dtypes = {param.dtype for param in self.params}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        shards = self._shards(self.params)
        sizes = [param.numel() for param in shards] if update_every > 0 else []
        self._flat_before = torch.empty(sum(sizes), dtype=dtype, device=device)
        self._before = [
            self._flat_before[end - size : end].view_as(param)
            for end, size, param in zip(accumulate(sizes), sizes, shards, strict=False)
        ]
        self._copied = False
        self._fused_copy = device.type != "cpu"
        """`torch._foreach_copy_` is one kernel on a GPU; on the CPU it has none, and one `copy_` per parameter takes
        less than half its time."""
        self._grad_norms: Sequence[Tensor] | None = None

    def update_due(self, step: int) -> bool:
        """Whether `step` measures the update ratio (see `update_every`)."""
        return due_at(step, self.update_every)

    @torch.no_grad()
    def before_step(self, step: int, max_norm: float) -> None:
        """After backward, before the optimizer of `step`: measure the gradients' norms (before clipping) and clip to
        `max_norm` when it is > 0; on steps that measure the update ratio, copies the parameters for it."""
        params = self._shards(self.params)
        grads = self._shards(cast("list[Tensor]", [param.grad for param in self.params]))  # None: no gradient
        try:
            norms = torch._foreach_norm(grads, dtype=torch.float32)
        except TypeError:  # a parameter that got no gradient this step counts as one whose gradient is zero
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]
            norms = torch._foreach_norm(grads, dtype=torch.float32)
        if max_norm > 0.0:
            # The norm just computed, not computed again by clip_grad_norm_ (sharded: the norm over every shard).
            norm = self._global_norm() if self.sharded else torch.linalg.vector_norm(torch.stack(norms))
            scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads, scale)
        if self.update_due(step):
            if self._fused_copy:
                torch._foreach_copy_(self._before, params)
            else:
                for before, param in zip(self._before, params, strict=True):
                    before.copy_(param)
            self._copied = True
        self._grad_norms = norms

    @property
    def pending(self) -> bool:
        """True between `before_step` and `after_step`."""
        return self._grad_norms is not None

    @torch.no_grad()
    def after_step(self) -> GradientNorms:
        """After the optimizer step: the norms of the parameters and of their update, beside the gradients' norms of
        `before_step`, still on the device. The update ratio is reported only when `before_step` copied the parameters
        since the last call."""
        params = self._shards(self.params)
        measured = params
        if self._copied:
            torch._foreach_sub_(self._before, params)
            measured = [*params, self._flat_before]
            self._copied = False
        grad_norms, self._grad_norms = self._grad_norms or [], None
        return GradientNorms(self, [*grad_norms, *torch._foreach_norm(measured, dtype=torch.float32)], bool(grad_norms))

    def finish(self, norms: list[float], with_gradients: bool) -> dict[str, float]:
        """The named values from the per-parameter norms of `after_step`, once on the host."""
        count = len(self.params)
        values: dict[str, float] = {}
        if with_gradients:
            grads, norms = norms[:count], norms[count:]
            values["grad_norm"] = math.hypot(*grads)
            for key, start, end in self._block_slices:
                values[key] = math.hypot(*grads[start:end])
        param_norm = math.hypot(*norms[:count])
        values["param_norm"] = param_norm
        if len(norms) > count:
            values["update_ratio"] = norms[count] / (param_norm + 1e-12)
        return values

    def _shards(self, tensors: list[Tensor]) -> list[Tensor]:
        """This rank's shards of DTensors (looked up each time: FSDP2 may replace them), else the tensors."""
        return [t.to_local() if is_dtensor(t) else t for t in tensors] if self.sharded else tensors

    def _global_norm(self) -> Tensor:
        """The norm of every shard's gradients together: one all-reduce on the model's own process group."""
        grads = [param.grad for param in self.params if param.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        return norm.full_tensor() if is_dtensor(norm) else norm


@dataclass
class GradientNorms:
    """One step's per-parameter norms (0-d float32 device tensors), which `read_scalars` or `HostValues` bring back
    with the step's other values and finish into `grad_norm`, `grad_norm/<block>`, `param_norm` and `update_ratio`."""

    stats: GradientStats
    norms: list[Tensor]
    with_gradients: bool
    """False when the optimizer stepped without `before_step` (no gradient norms among `norms`)."""

    def finish(self, norms: list[float]) -> dict[str, float]:
        """The named values from `norms` read back as floats, in the order of `self.norms`."""
        return self.stats.finish(norms, self.with_gradients)


def is_dtensor(tensor: Tensor) -> TypeGuard[DTensor]:
    """True for a DTensor (an FSDP2 shard), without importing torch.distributed for plain tensors."""
    return type(tensor).__name__ == "DTensor"


def read_scalars(
    scalars: dict[str, Tensor],
    domains: list[str] | None = None,
    domain_sums: Tensor | None = None,
    domain_counts: Tensor | None = None,
    gradients: GradientNorms | None = None,
) -> dict[str, float]:
    """Bring every device value to the host at once (one sync): `scalars`, `loss/<domain>` for domains in the batch,
    and the gradient statistics finished from their per-parameter norms."""
    stacked = _stacked(scalars, gradients)
    if domains and domain_sums is not None and domain_counts is not None:
        stacked = torch.cat([stacked, domain_sums.float(), domain_counts.float()])
    flat = stacked.tolist()
    values, end = _unpacked(flat, list(scalars), gradients)
    if domains and domain_sums is not None:
        sums, counts = flat[end : end + len(domains)], flat[end + len(domains) :]
        values.update({f"loss/{name}": s / c for name, s, c in zip(domains, sums, counts, strict=True) if c > 0})
    return values


class HostValues:
    """A step's device scalars (and floats) on their way to the host in one transfer. On CUDA the copy is queued
    behind the step's kernels into pinned memory, so gathering them does not wait for the GPU; `read` waits only
    for a copy that has not landed yet (a step later it has, and the loop never stalls on the device)."""

    def __init__(
        self,
        scalars: dict[str, Tensor],
        floats: dict[str, float],
        then: Callable[[dict[str, float]], None] | None = None,
        gradients: GradientNorms | None = None,
    ) -> None:
        self.names = list(scalars)
        self.gradients = gradients
        """Finished into named values once read (see `GradientStats`)."""
        self.floats = floats
        self.then = then
        """Called on the values once read (e.g. to add flags computed from them)."""
        self._event: torch.cuda.Event | None = None
        self._host: Tensor | None = None
        if scalars or gradients is not None:
            stacked = _stacked(scalars, gradients)
            if stacked.is_cuda:
                self._host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
                self._host.copy_(stacked, non_blocking=True)
                self._event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                self._event.record()
            else:
                self._host = stacked

    def read(self) -> dict[str, float]:
        """The values as floats (the device ones first, then the floats handed over)."""
        if self._event is not None:
            self._event.synchronize()
        values, _ = _unpacked(self._host.tolist() if self._host is not None else [], self.names, self.gradients)
        values.update(self.floats)
        if self.then is not None:
            self.then(values)
        return values


def _unpacked(flat: list[float], names: list[str], gradients: GradientNorms | None) -> tuple[dict[str, float], int]:
    """The values `_stacked` packed, read back: the named ones, then the gradient statistics finished from their
    norms; and where they end in `flat`."""
    values = dict(zip(names, flat, strict=False))
    end = len(names)
    if gradients is not None:
        end += len(gradients.norms)
        values.update(gradients.finish(flat[len(names) : end]))
    return values, end


def _stacked(scalars: dict[str, Tensor], gradients: GradientNorms | None = None) -> Tensor:
    """The values as one float32 vector, in the dict's order, then the gradient statistics' norms (one kernel)."""
    tensors = [_as_scalar(value) for value in scalars.values()]
    if gradients is not None:
        tensors += gradients.norms
    return torch.stack(tensors)


def _as_scalar(value: Tensor) -> Tensor:
    """A 0-d float32 tensor without autograd history; the value itself when it already is one (most are)."""
    if value.dim() == 0 and value.dtype == torch.float32 and not value.requires_grad:
        return value
    return value.detach().float().reshape(())


def as_floats(values: dict[str, Any]) -> bool:
    """Make the values floats in place (a tensor is read with one sync each); returns whether every one is finite.

    The common case costs one `sum`: when it is a float, no value is a tensor or another type with arithmetic of its
    own, and what is not a float is an int or a bool, which those who build wire models from the values take as
    floats (`to_sample`, the checkpoint's metrics). Otherwise each value that is not a float is converted.
    """
    try:
        total = sum(values.values())
    except TypeError:  # a string, say: `float` says what is wrong with it
        total = None
    if type(total) is not float:
        for name, value in values.items():
            if type(value) is not float:
                values[name] = float(value)
        total = sum(values.values())
    return math.isfinite(total) or all(math.isfinite(value) for value in values.values())


def all_finite(values: dict[str, float]) -> bool:
    """True when no value is NaN or infinite: one test on the sum, which is finite whenever every value is (each value
    is tested only when it is not, or when the sum overflowed)."""
    return math.isfinite(sum(values.values())) or all(math.isfinite(value) for value in values.values())
