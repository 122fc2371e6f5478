"""The trainer's parts on their own: schedules, optimizer swap, checkpoints, metrics, the sampler."""

from __future__ import annotations

import math
import resource
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.trainer.helpers import TensorCalls
from trainer.checkpoints import CheckpointError, CheckpointStore
from trainer.data import MixtureSampler, arithmetic_domain, builtin_domains
from trainer.metrics import GradientStats, lm_loss, read_scalars
from trainer.model import GPT, GPTConfig
from trainer.optim import plan_swap, swap_optimizer
from trainer.run import BuiltinRun
from trainer.schedule import Schedule


def _tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32))


def _step(model: GPT, optimizer: torch.optim.Optimizer, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 256, (4, 17), generator=generator)
    loss = lm_loss(model(idx[:, :-1]), idx[:, 1:]).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_schedules_warm_up_then_reach_their_floor_at_the_horizon() -> None:
    """Every kind starts its warmup at floor*peak and cosine/linear/wsd end at floor*peak at the horizon."""
    for kind in ("cosine", "linear", "wsd"):
        schedule = Schedule(kind, (1.0,), start_step=10, warmup_steps=5, horizon_steps=50, floor=0.1)
        assert schedule.lrs(10) == [pytest.approx(0.1)]
        assert schedule.lrs(15) == [pytest.approx(1.0)]
        assert schedule.lrs(60) == [pytest.approx(0.1)]
    wsd = Schedule("wsd", (1.0,), warmup_steps=0, horizon_steps=100, decay_fraction=0.2)
    assert wsd.factor(79) == 1.0 and wsd.factor(90) == pytest.approx(0.5)
    inverse = Schedule("inverse_sqrt", (1.0,), warmup_steps=4)
    assert inverse.factor(16) == pytest.approx(0.5)


def test_new_lr_under_a_schedule_becomes_current_and_scales_the_rest() -> None:
    """Setting lr mid-schedule makes it the current value and scales the remaining curve by new/current."""
    schedule = Schedule("cosine", (1.0, 0.5), horizon_steps=100, floor=0.0)
    current = schedule.lrs(50)
    rescaled = schedule.rescaled(50, 0, current[0] / 2)
    assert rescaled.lrs(50)[0] == pytest.approx(current[0] / 2)
    assert rescaled.lrs(75)[0] == pytest.approx(schedule.lrs(75)[0] / 2)
    assert rescaled.lrs(75)[1] == pytest.approx(schedule.lrs(75)[1])


def test_adam_to_adamw_swap_carries_both_moments_in_place() -> None:
    """Swapping Adam for AdamW keeps the same optimizer object and its exp_avg/exp_avg_sq tensors' values."""
    model = _tiny_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    _step(model, optimizer)
    param = next(model.parameters())
    before = {key: value.clone() for key, value in optimizer.state[param].items()}
    plan = plan_swap(optimizer, "adamw", {"weight_decay": 0.05}, carry_state=True)
    swap_optimizer(optimizer, plan)
    assert type(optimizer) is torch.optim.AdamW
    assert set(plan.carried) == {"exp_avg", "exp_avg_sq", "step"}
    for key, value in before.items():
        assert torch.equal(optimizer.state[param][key], value)
    assert optimizer.param_groups[0]["weight_decay"] == 0.05
    _step(model, optimizer, seed=1)


def test_adam_to_sgd_swap_turns_the_first_moment_into_the_momentum_buffer() -> None:
    """SGD's momentum buffer after the swap is Adam's exp_avg / (1 - beta1), as the result says."""
    model = _tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.99))
    _step(model, optimizer)
    param = next(model.parameters())
    exp_avg = optimizer.state[param]["exp_avg"].clone()
    plan = plan_swap(optimizer, "sgd", {}, carry_state=True)
    swap_optimizer(optimizer, plan)
    assert plan.carried == ["exp_avg->momentum_buffer"] and "exp_avg_sq" in plan.dropped
    assert torch.allclose(optimizer.state[param]["momentum_buffer"], exp_avg / 0.2)
    assert optimizer.param_groups[0]["momentum"] == pytest.approx(0.8)
    _step(model, optimizer, seed=1)


@pytest.mark.parametrize("name", ["rmsprop", "nadam", "radam", "adagrad", "adafactor", "sgd", "adam"])
def test_every_optimizer_swap_keeps_training_under_an_lr_scheduler(name: str) -> None:
    """After a swap the user's optimizer object and its LR scheduler step with the new algorithm."""
    model = _tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    _step(model, optimizer)
    scheduler.step()
    swap_optimizer(optimizer, plan_swap(optimizer, name, {}, carry_state=True))  # type: ignore[arg-type]
    weights = [p.detach().clone() for p in model.parameters()]
    _step(model, optimizer, seed=2)
    scheduler.step()
    assert type(optimizer).__name__.lower() == name
    assert any(not torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))


def test_checkpoint_files_are_verified_and_a_corrupt_one_is_refused(tmp_path: Path) -> None:
    """A file whose bytes no longer match its recorded sha256 is refused instead of loaded."""
    store = CheckpointStore(tmp_path, ring_size=1)
    info, _ = store.save({"w": torch.arange(4.0)}, branch="main", step=3)
    reopened = CheckpointStore(tmp_path)
    assert torch.equal(reopened.load(info.checkpoint_id)["w"], torch.arange(4.0))
    data = bytearray(Path(info.path).read_bytes())
    data[-10] ^= 0xFF
    Path(info.path).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        CheckpointStore(tmp_path).load(info.checkpoint_id)
    assert not list(tmp_path.glob(".*.tmp"))


def test_retention_keeps_the_newest_files_and_every_tagged_one(tmp_path: Path) -> None:
    """Past `keep_files`, the oldest untagged files are deleted and reported; tagged ones stay."""
    store = CheckpointStore(tmp_path, ring_size=2, keep_files=2)
    tagged, _ = store.save({"s": 0}, branch="main", step=0, tag="keep")
    evicted_all = []
    for step in range(1, 5):
        _, evicted = store.save({"s": step}, branch="main", step=step)
        evicted_all += evicted
    assert [info.step for info in evicted_all] == [1, 2]
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == sorted(
        Path(e.info.path).name for e in store.entries.values()
    )
    assert Path(tagged.path).exists()
    assert store.find(step=2, branch="main").step == 0


def test_loss_and_logit_statistics_match_their_definitions() -> None:
    """`loss` is cross-entropy, `logit_z` the mean log-sum-exp, `logit_max` the max |logit|, per domain too."""
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11) * 3
    targets = torch.randint(0, 11, (3, 5))
    ids = torch.tensor([0, 2, 0])
    out = lm_loss(logits, targets, ids, ["a", "b", "c"], z_loss=1e-4)
    values = read_scalars(out.scalars, ["a", "b", "c"], out.domain_sums, out.domain_counts)
    ce = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1))
    assert values["loss"] == pytest.approx(ce.item(), rel=1e-5)
    assert values["logit_z"] == pytest.approx(logits.logsumexp(-1).mean().item(), rel=1e-5)
    assert values["logit_max"] == pytest.approx(logits.abs().max().item())
    rows = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)
    assert values["loss/a"] == pytest.approx(((rows[0] + rows[2]) / 2).item(), rel=1e-5)
    assert values["loss/c"] == pytest.approx(rows[1].item(), rel=1e-5)
    assert "loss/b" not in values
    assert out.loss.item() == pytest.approx(ce.item() + 1e-4 * logits.logsumexp(-1).square().mean().item(), rel=1e-5)


def test_gradient_statistics_match_torch_and_clip_like_clip_grad_norm() -> None:
    """Global and per-block grad norms, clipping, param norm and update ratio equal their plain definitions."""
    model = _tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = GradientStats(model.blocks_of_parameters())
    idx = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(0))
    lm_loss(model(idx[:, :-1]), idx[:, 1:]).loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    expected = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    before = [p.detach().clone() for p in model.parameters()]
    stats.before_step(0, max_norm=0.01)
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    optimizer.step()
    values = read_scalars({}, gradients=stats.after_step())
    assert values["grad_norm"] == pytest.approx(expected.item(), rel=1e-5)
    assert clipped.item() == pytest.approx(0.01, rel=1e-3)
    block0 = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.blocks[0].parameters()]))
    assert values["grad_norm/block.0"] == pytest.approx(block0.item() * expected.item() / 0.01, rel=1e-3)
    deltas = [(p - b).norm() for p, b in zip(model.parameters(), before, strict=True)]
    update = torch.linalg.vector_norm(torch.stack(deltas))
    param_norm = torch.linalg.vector_norm(torch.stack([p.norm() for p in model.parameters()]))
    assert values["param_norm"] == pytest.approx(param_norm.item(), rel=1e-5)
    assert values["update_ratio"] == pytest.approx((update / param_norm).item(), rel=1e-4)


def test_the_update_ratio_is_measured_on_due_steps_only_and_other_steps_copy_nothing() -> None:
    """With `update_every=2`, step 3 reports grad and parameter norms but no update ratio, and neither copies a
    parameter nor forms an update; step 4 reports the update ratio of that step's own update, exactly."""
    model = _tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stats = GradientStats(model.blocks_of_parameters(), update_every=2)
    assert [stats.update_due(step) for step in range(4)] == [True, False, True, False]
    for step in (3, 4):
        idx = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(step))
        lm_loss(model(idx[:, :-1]), idx[:, 1:]).loss.backward()
        before = [p.detach().clone() for p in model.parameters()]
        calls = TensorCalls()
        with calls:
            stats.before_step(step, max_norm=0.0)
        optimizer.step()
        with calls:
            norms = stats.after_step()
        values = read_scalars({}, gradients=norms)
        optimizer.zero_grad(set_to_none=True)
        param_norm = math.sqrt(sum(float(p.detach().square().sum()) for p in model.parameters()))
        assert values["param_norm"] == pytest.approx(param_norm, rel=1e-5)
        if step == 3:
            assert "update_ratio" not in values and "grad_norm" in values
            assert len(norms.norms) == 2 * len(stats.params), "a norm per gradient and per parameter, no update's"
            computed = [name for name in calls.calls if name not in ("__get__", "_set_grad_enabled")]
            assert computed == ["_foreach_norm", "_foreach_norm"], "one call for the gradients, one for the parameters"
        else:
            update = math.sqrt(
                sum(float((p.detach() - b).square().sum()) for p, b in zip(model.parameters(), before, strict=True))
            )
            assert values["update_ratio"] == pytest.approx(update / param_norm, rel=1e-4)
    with pytest.raises(ValueError, match="update_every must be >= 0"):
        GradientStats(model.blocks_of_parameters(), update_every=-1)


def test_data_mix_changes_shift_sampled_domain_frequencies() -> None:
    """After weights 1:1:8, about 80% of rows come from the heavy domain; before, about a third."""
    sampler = MixtureSampler(builtin_domains(20_000), batch_size=64, block_size=16, seed=1)

    def share(domain: int) -> float:
        ids = torch.cat([sampler.next_batch()[2] for _ in range(40)])
        return (ids == domain).float().mean().item()

    assert share(2) == pytest.approx(1 / 3, abs=0.05)
    mix = sampler.set_weights({"arithmetic": 8.0})
    assert mix["arithmetic"] == pytest.approx(0.8)
    assert share(2) == pytest.approx(0.8, abs=0.04)


def test_sampler_rejects_unknown_and_zero_mixes_and_changes_nothing() -> None:
    """An unknown domain, a negative weight or an all-zero mix raise and leave the weights as they were."""
    sampler = MixtureSampler([arithmetic_domain(5000)], batch_size=2, block_size=8, seed=0)
    for bad in ({"nope": 1.0}, {"arithmetic": -1.0}, {"arithmetic": 0.0}, {"arithmetic": math.nan}):
        with pytest.raises(ValueError):
            sampler.set_weights(bad)
    assert sampler.weights == {"arithmetic": 1.0}


def test_batches_are_a_function_of_seed_and_index() -> None:
    """The same index gives the same batch, so restoring the index replays the data exactly."""
    sampler = MixtureSampler(builtin_domains(20_000), batch_size=4, block_size=16, seed=3)
    first = [sampler.next_batch() for _ in range(3)]
    sampler.load_state_dict({"index": 1, "weights": sampler.weights, "seed": 3})
    assert all(torch.equal(a, b) for a, b in zip(first[1], sampler.next_batch(), strict=True))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings")
def test_a_builtin_step_reuses_the_memory_the_step_before_freed(make_run: Callable[..., BuiltinRun]) -> None:
    """Once warm, a `cpu-tiny` step takes no fresh pages from the kernel (it took 1,000 to 2,400 a step while glibc
    handed freed memory back after each)."""
    run = make_run()
    faults = []
    for step in range(1, 8):  # the heap grows over the first few steps
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        run.train_step(step)
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
    assert sorted(faults[4:])[1] < 100, faults
