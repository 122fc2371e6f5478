"""The health metrics on CUDA, in float32 and bf16: equal to direct computations, and read through the host copy
that lands a step later. Skipped where torch sees no GPU (CI); `bash benchmarks/cuda.sh` runs the rest on one."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainer.health import Health
from trainer.metrics import GradientStats, read_scalars

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def norm(tensors: list[torch.Tensor]) -> float:
    """The norm of several tensors together, in float64 on the host."""
    return math.sqrt(sum(float(t.double().norm()) ** 2 for t in tensors))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
def test_gradient_statistics_on_cuda_equal_direct_computations(dtype: torch.dtype) -> None:
    """grad_norm per block and in all, param_norm and update_ratio, from the fused calls and the one host copy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(64, 32), nn.Linear(32, 32), nn.Linear(32, 64)).cuda().to(dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stats = GradientStats([(str(i), list(module.parameters())) for i, module in enumerate(model)])
    ids = torch.randint(0, 64, (4, 8), device="cuda")
    model(ids).float().square().mean().backward()
    grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
    before = [p.detach().clone() for p in model.parameters()]
    stats.before_step(0, 0.0)
    optimizer.step()
    values = read_scalars({}, gradients=stats.after_step())
    after = [p.detach() for p in model.parameters()]
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert values["grad_norm"] == pytest.approx(norm(grads), rel=tolerance)
    assert values["grad_norm/1"] == pytest.approx(norm(grads[1:3]), rel=tolerance)
    assert values["param_norm"] == pytest.approx(norm(after), rel=tolerance)
    update = norm([a.float() - b.float() for a, b in zip(after, before, strict=True)])
    assert values["update_ratio"] == pytest.approx(update / norm(after), rel=10 * max(tolerance, 1e-3))


def test_health_on_cuda_is_read_through_a_copy_that_lands_without_a_wait() -> None:
    """`finish_step` queues the copy to pinned memory behind the step; `read` then has every value, finite."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(64, 32), nn.Linear(32, 64)).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    health = Health(model, logit_every=1)
    handle = health.watch_output(model)
    ids = torch.randint(0, 64, (4, 8), device="cuda")
    health.begin_step(0)
    loss = model(ids).float().square().mean()
    loss.backward()
    health.before_optimizer_step(1.0)
    optimizer.step()
    health.after_optimizer_step()
    pending = health.finish_step(loss=loss.detach(), lr=1e-2)
    values = pending.read()
    handle.remove()
    assert {"grad_norm", "param_norm", "update_ratio", "logit_max", "logit_z", "loss", "lr"} <= values.keys()
    assert values["loss"] == pytest.approx(float(loss.detach())) and values["lr"] == 1e-2
    assert values["nonfinite"] == 0.0 and all(math.isfinite(value) for value in values.values())
