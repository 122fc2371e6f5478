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
from typing import TYPE_CHECKING, TypeGuard

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


class GradientStats:
    """Gradient norms (global and per block), clipping, parameter norm and update ratio for fixed parameters.

    The update ratio needs the parameters from before the optimizer step; they are copied into views of one
    flat buffer allocated once, the update is formed in place there after the step, and its norm is a single
    reduction over that buffer.
    """

    def __init__(self, blocks: Sequence[tuple[str, Sequence[Tensor]]], *, track_updates: bool = True) -> None:
        self.names = [name for name, _ in blocks]
        self.params: list[Tensor] = [param for _, params in blocks for param in params if param.requires_grad]
        device = self.params[0].device
        block_of = [index for index, (_, params) in enumerate(blocks) for param in params if param.requires_grad]
        self._block_index = torch.tensor(block_of, device=device)
        self._block_keys = [f"grad_norm/{name}" for name in self.names]
        self._per_block = torch.zeros(len(self.names), device=device)
        self.track_updates = track_updates
        """Without it, no copy of the parameters is kept and `update_ratio` is not reported."""
        self.sharded = any(is_dtensor(param) for param in self.params)
        """FSDP2 (`fully_shard`): every value is this rank's shard's, combined across ranks where they are reported
        (trainer/distributed.py); clipping alone needs the global norm at once."""
        dtypes = {param.dtype for param in self.params}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        shards = self._shards(self.params)
        sizes = [param.numel() for param in shards] if track_updates else []
        self._flat_before = torch.empty(sum(sizes), dtype=dtype, device=device)
        self._before = [
            self._flat_before[end - size : end].view_as(param)
            for end, size, param in zip(accumulate(sizes), sizes, shards, strict=False)
        ]
        self._copied = False
        self._scalars: dict[str, Tensor] = {}

    @torch.no_grad()
    def before_step(self, max_norm: float) -> Tensor:
        """After backward, before the optimizer: measure gradient norms and clip; returns the pre-clip norm."""
        params = self._shards(self.params)
        grads = self._shards([p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params])
        squares = torch.stack(torch._foreach_norm(grads)).float().square_()
        per_block = self._per_block.zero_().index_add_(0, self._block_index, squares).sqrt()
        total = squares.sum().sqrt()
        if max_norm > 0.0:
            # Reuse the norm just computed instead of letting clip_grad_norm_ compute it again (sharded: its shard's).
            norm = self._global_norm() if self.sharded else total
            scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads, scale)
        if self.track_updates:
            torch._foreach_copy_(self._before, params)
            self._copied = True
        self._scalars = {"grad_norm": total, **dict(zip(self._block_keys, per_block.unbind(), strict=True))}
        return total

    @property
    def pending(self) -> bool:
        """True between `before_step` and `after_step`."""
        return bool(self._scalars)

    @torch.no_grad()
    def after_step(self) -> dict[str, Tensor]:
        """After the optimizer step: parameter norm and update ratio, plus the gradient norms of `before_step`.

        The update ratio is reported only when `before_step` copied the parameters since the last call.
        """
        params = self._shards(self.params)
        param_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(params)))
        scalars, self._scalars = {**self._scalars, "param_norm": param_norm}, {}
        if self._copied:
            torch._foreach_sub_(self._before, params)
            scalars["update_ratio"] = torch.linalg.vector_norm(self._flat_before) / (param_norm + 1e-12)
            self._copied = False
        return scalars

    def _shards(self, tensors: list[Tensor]) -> list[Tensor]:
        """This rank's shards of DTensors (looked up each time: FSDP2 may replace them), else the tensors."""
        return [t.to_local() if is_dtensor(t) else t for t in tensors] if self.sharded else tensors

    def _global_norm(self) -> Tensor:
        """The norm of every shard's gradients together: one all-reduce on the model's own process group."""
        grads = [param.grad for param in self.params if param.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        return norm.full_tensor() if is_dtensor(norm) else norm


def is_dtensor(tensor: Tensor) -> TypeGuard[DTensor]:
    """True for a DTensor (an FSDP2 shard), without importing torch.distributed for plain tensors."""
    return type(tensor).__name__ == "DTensor"


def read_scalars(
    scalars: dict[str, Tensor],
    domains: list[str] | None = None,
    domain_sums: Tensor | None = None,
    domain_counts: Tensor | None = None,
) -> dict[str, float]:
    """Bring every device value to the host at once (one sync); `loss/<domain>` for domains in the batch."""
    stacked = _stacked(scalars)
    if domains and domain_sums is not None and domain_counts is not None:
        stacked = torch.cat([stacked, domain_sums.float(), domain_counts.float()])
    flat = stacked.tolist()
    values = dict(zip(scalars, flat, strict=False))
    if domains and domain_sums is not None:
        sums, counts = flat[len(scalars) : len(scalars) + len(domains)], flat[len(scalars) + len(domains) :]
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
    ) -> None:
        self.names = list(scalars)
        self.floats = floats
        self.then = then
        """Called on the values once read (e.g. to add flags computed from them)."""
        self._event: torch.cuda.Event | None = None
        self._host: Tensor | None = None
        if scalars:
            stacked = _stacked(scalars)
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
        values = dict(zip(self.names, self._host.tolist(), strict=True)) if self._host is not None else {}
        values.update(self.floats)
        if self.then is not None:
            self.then(values)
        return values


def _stacked(scalars: dict[str, Tensor]) -> Tensor:
    """The values as one float32 vector, in the dict's order (one kernel)."""
    return torch.stack([_as_scalar(value) for value in scalars.values()])


def _as_scalar(value: Tensor) -> Tensor:
    """A 0-d float32 tensor without autograd history; the value itself when it already is one (most are)."""
    if value.dim() == 0 and value.dtype == torch.float32 and not value.requires_grad:
        return value
    return value.detach().float().reshape(())


def all_finite(values: dict[str, float]) -> bool:
    """True when no value is NaN or infinite: one test on the sum, which is finite whenever every value is (each value
    is tested only when it is not, or when the sum overflowed)."""
    return math.isfinite(sum(values.values())) or all(math.isfinite(value) for value in values.values())
