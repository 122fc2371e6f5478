"""The per-step health metrics, computed with fused kernels and one host-device sync per step.

Every value is gathered as a 0-d device tensor and read back with a single `tolist()` at the end of the
step, so that on CUDA the training thread waits on the device once, not once per metric.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


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
    logits: Tensor, targets: Tensor, domain_ids: Tensor | None = None, domains: list[str] | None = None,
    z_loss: float = 0.0,
) -> LossOutput:
    """Cross-entropy with the log-sum-exp computed once and reused for the loss, `logit_z` and the z-loss."""
    flat = logits.float()
    lse = torch.logsumexp(flat, dim=-1)
    nll = lse - flat.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ce = nll.mean()
    loss = ce + z_loss * lse.square().mean() if z_loss > 0.0 else ce
    with torch.no_grad():
        scalars = {"loss": ce.detach(), "logit_max": flat.abs().amax(), "logit_z": lse.mean()}
        if domain_ids is None or not domains:
            return LossOutput(loss, scalars)
        sums = torch.zeros(len(domains), device=logits.device).index_add_(0, domain_ids, nll.detach().mean(dim=1))
        counts = torch.bincount(domain_ids, minlength=len(domains)).float()
    return LossOutput(loss, scalars, sums, counts)


class GradientStats:
    """Gradient norms (global and per block), clipping, parameter norm and update ratio for fixed parameters.

    The update ratio needs the parameters from before the optimizer step; they are copied into buffers
    allocated once, and the update is formed in place in those same buffers after the step.
    """

    def __init__(self, blocks: Sequence[tuple[str, Sequence[Tensor]]]) -> None:
        self.names = [name for name, _ in blocks]
        self.params: list[Tensor] = [param for _, params in blocks for param in params if param.requires_grad]
        device = self.params[0].device
        block_of = [index for index, (_, params) in enumerate(blocks) for param in params if param.requires_grad]
        self._block_index = torch.tensor(block_of, device=device)
        self._before = [torch.empty_like(param) for param in self.params]
        self._scalars: dict[str, Tensor] = {}

    def before_step(self, max_norm: float) -> Tensor:
        """After backward, before the optimizer: measure gradient norms and clip; returns the pre-clip norm."""
        grads = [param.grad if param.grad is not None else torch.zeros_like(param) for param in self.params]
        norms = torch.stack(torch._foreach_norm(grads)).float()
        squares = norms.square()
        per_block = torch.zeros(len(self.names), device=norms.device).index_add_(0, self._block_index, squares)
        total = squares.sum().sqrt()
        if max_norm > 0.0:
            # Reuse the norm just computed instead of letting clip_grad_norm_ compute it again.
            scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads, scale)
        torch._foreach_copy_(self._before, self.params)
        blocks = zip(self.names, per_block.sqrt(), strict=True)
        self._scalars = {"grad_norm": total, **{f"grad_norm/{name}": norm for name, norm in blocks}}
        return total

    def after_step(self) -> dict[str, Tensor]:
        """After the optimizer step: parameter norm and update ratio, plus the gradient norms of `before_step`."""
        torch._foreach_sub_(self._before, self.params)
        updates = torch.stack(torch._foreach_norm(self._before)).float()
        params = torch.stack(torch._foreach_norm(self.params)).float()
        param_norm = params.square().sum().sqrt()
        update_norm = updates.square().sum().sqrt()
        return {**self._scalars, "param_norm": param_norm, "update_ratio": update_norm / (param_norm + 1e-12)}


def read_scalars(
    scalars: dict[str, Tensor], domains: list[str] | None = None,
    domain_sums: Tensor | None = None, domain_counts: Tensor | None = None,
) -> dict[str, float]:
    """Bring every device value to the host at once (one sync); `loss/<domain>` for domains in the batch."""
    parts = [torch.stack([value.detach().float().reshape(()) for value in scalars.values()])]
    if domains and domain_sums is not None and domain_counts is not None:
        parts += [domain_sums.float(), domain_counts.float()]
    flat = torch.cat(parts).tolist()
    values = dict(zip(scalars, flat, strict=False))
    if domains and domain_sums is not None:
        sums, counts = flat[len(scalars) : len(scalars) + len(domains)], flat[len(scalars) + len(domains) :]
        values.update({f"loss/{name}": s / c for name, s, c in zip(domains, sums, counts, strict=True) if c > 0})
    return values


def split_nonfinite(values: dict[str, float]) -> tuple[dict[str, float], list[str]]:
    """Finite values, and the names of those that were NaN or infinite (JSON cannot carry them)."""
    finite: dict[str, float] = {}
    bad: list[str] = []
    for name, value in values.items():
        if math.isfinite(value):
            finite[name] = value
        else:
            bad.append(name)
    return finite, bad
