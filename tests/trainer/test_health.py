"""Health metrics for models runsteer did not write: tiny HF GPT-2 and Llama built from configs, plain modules."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from tests.trainer.helpers import SYNC_CALLS, TensorCalls
from trainer.health import Health, find_attention, find_blocks
from trainer.model import GPT, GPTConfig

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402

VOCAB = 64


def gpt2(attn: str = "sdpa") -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        n_positions=32,
        vocab_size=VOCAB,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation=attn,
    )
    return GPT2LMHeadModel(config)


def llama(attn: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config)


def batch(seed: int = 0) -> Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def test_blocks_are_found_from_the_module_tree_of_gpt2_llama_the_builtin_and_a_plain_module() -> None:
    """Embeddings, each repeated layer, the final norm and an untied head; top-level children without layers."""
    assert [name for name, _ in find_blocks(gpt2())] == ["embed", "block.0", "block.1", "final_norm"]
    assert [name for name, _ in find_blocks(llama())] == [
        "embed",
        "block.0",
        "block.1",
        "block.2",
        "final_norm",
        "head",
    ]
    builtin = GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32))
    assert [name for name, _ in find_blocks(builtin)] == ["embed", "block.0", "block.1", "final_norm"]
    plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert [name for name, _ in find_blocks(plain)] == ["0", "2"]
    for model in (gpt2(), llama(), builtin, plain):
        found = [id(p) for _, params in find_blocks(model) for p in params]
        assert sorted(found) == sorted(id(p) for p in model.parameters())
    assert list(find_attention(gpt2())) == ["0", "1"] and list(find_attention(llama())) == ["0", "1", "2"]
    assert find_attention(plain) == {}


@pytest.mark.parametrize("make", [gpt2, llama], ids=["gpt2", "llama"])
def test_gradient_parameter_update_and_logit_values_equal_a_direct_computation(make: Callable[[], nn.Module]) -> None:
    """Every value `end_step` returns equals the same quantity computed by hand from the model's tensors."""
    model = make()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    health = Health(model, attention_every=0)
    health.watch_output(model)
    health.watch_optimizer(optimizer)
    health.begin_step(0)
    ids = batch()
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    values = health.end_step(loss=out.loss.detach())

    def norm(tensors: Iterable[Tensor]) -> float:
        return math.sqrt(sum(float(t.detach().double().square().sum()) for t in tensors))

    assert values["grad_norm"] == pytest.approx(norm(grads.values()), rel=1e-5)
    for block, params in find_blocks(model):
        ids_ = {id(p) for p in params}
        expected = norm(p.grad for p in model.parameters() if id(p) in ids_)
        assert values[f"grad_norm/{block}"] == pytest.approx(expected, rel=1e-5), block
    param_norm = norm(model.parameters())
    assert values["param_norm"] == pytest.approx(param_norm, rel=1e-5)
    update = norm(p.detach() - b for p, b in zip(model.parameters(), before, strict=True))
    assert values["update_ratio"] == pytest.approx(update / param_norm, rel=1e-4)
    logits = out.logits.detach()
    assert values["loss"] == pytest.approx(out.loss.item(), rel=1e-6)
    assert values["logit_max"] == pytest.approx(logits.abs().max().item(), rel=1e-6)
    assert values["logit_z"] == pytest.approx(logits.logsumexp(-1).mean().item(), rel=1e-5)
    assert values["nonfinite"] == values["nonfinite_grad"] == values["nonfinite_param"] == 0.0
    assert not any(name.startswith("attn_logit_max") for name in values)


def manual_attention_max(model: nn.Module, ids: Tensor) -> dict[str, float]:
    """Each layer's max of q·k/sqrt(d) over causal positions, from the attention module's own inputs."""
    inputs: dict[str, tuple[Tensor, dict[str, Any]]] = {}
    handles = [
        module.register_forward_pre_hook(
            lambda m, args, kwargs, layer=layer: inputs.__setitem__(
                layer, (args[0] if args else kwargs["hidden_states"], kwargs)
            ),
            with_kwargs=True,
        )
        for layer, module in find_attention(model).items()
    ]
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    result: dict[str, float] = {}
    for layer, module in find_attention(model).items():
        hidden, kwargs = inputs[layer]
        batch_size, length, _ = hidden.shape
        with torch.no_grad():
            if hasattr(module, "c_attn"):
                q, k, _ = module.c_attn(hidden).split(module.embed_dim, dim=2)
                q = q.view(batch_size, length, -1, module.head_dim).transpose(1, 2)
                k = k.view(batch_size, length, -1, module.head_dim).transpose(1, 2)
            else:
                q = module.q_proj(hidden).view(batch_size, length, -1, module.head_dim).transpose(1, 2)
                k = module.k_proj(hidden).view(batch_size, length, -1, module.head_dim).transpose(1, 2)
                q, k = apply_rotary_pos_emb(q, k, *kwargs["position_embeddings"])
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            causal = torch.ones(length, length, dtype=torch.bool).tril()
            result[layer] = float(logits.masked_select(causal.expand_as(logits)).max())
    return result


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("make", [gpt2, llama], ids=["gpt2", "llama"])
def test_attention_logit_max_equals_a_manual_q_dot_k_over_sqrt_d(make: Callable[[str], nn.Module], attn: str) -> None:
    """`attn_logit_max/<layer>` equals max q·k/sqrt(d) over the causal positions, under sdpa and eager attention."""
    model = make(attn)
    with torch.no_grad():
        for module in find_attention(model).values():
            for param in module.parameters():
                param.mul_(8.0)  # logits well away from zero, so the comparison means something
    health = Health(model, attention_every=1)
    ids = batch(1)
    health.begin_step(0)
    model(ids).logits.sum().backward()
    values = health.end_step()
    expected = manual_attention_max(model, ids)
    assert expected and min(expected.values()) > 0.5
    for layer, value in expected.items():
        assert values[f"attn_logit_max/{layer}"] == pytest.approx(value, rel=1e-4), layer


def test_attention_probe_matches_the_builtin_models_own_measurement() -> None:
    """On the built-in GPT the hooks see the same logits as the model's explicit q·k measurement."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32))
    health = Health(model, attention_every=1)
    health.begin_step(0)
    model(batch(2)[:, :16] % 256, measure_attention=True)
    values = health.end_step()
    own = [float(value) for value in model.attention_logit_max()]
    assert [values[f"attn_logit_max/{i}"] for i in range(2)] == pytest.approx(own, rel=1e-5)


def test_attention_hooks_are_attached_only_on_due_steps_and_removed_by_end_step() -> None:
    """Off-steps run with no hook on any attention module; due steps attach them and `end_step` takes them off."""
    model = gpt2()
    health = Health(model, attention_every=3)
    modules = list(find_attention(model).values())
    for step in range(4):
        health.begin_step(step)
        hooked = all(module._forward_pre_hooks and module._forward_hooks for module in modules)
        assert hooked == (step % 3 == 0)
        assert step % 3 == 0 or not any(module._forward_pre_hooks or module._forward_hooks for module in modules)
        model(batch(step))
        values = health.end_step()
        assert ("attn_logit_max/0" in values) == (step % 3 == 0)
        assert not any(module._forward_pre_hooks or module._forward_hooks for module in modules)


def syncs_of_a_step(make: Callable[[], nn.Module], with_health: bool) -> tuple[list[str], dict[str, float]]:
    """The host reads of one optimizer step of two micro-batches, with every health metric on or without Health."""
    model = make()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    health = Health(model, attention_every=1)
    if with_health:
        health.watch_output(model)
        health.watch_optimizer(optimizer)
    counter = TensorCalls(SYNC_CALLS)
    values: dict[str, float] = {}
    with counter:
        if with_health:
            health.begin_step(0)
        for micro in range(2):
            ids = batch(micro)
            model(ids, labels=ids).loss.backward()
        optimizer.step()
        if with_health:
            values = health.end_step()
    return counter.calls, values


@pytest.mark.parametrize("make", [gpt2, llama], ids=["gpt2", "llama"])
def test_a_full_step_adds_one_device_read(make: Callable[[], nn.Module]) -> None:
    """A due step with every metric on (attention, logits through the hook, two micro-batches) adds exactly one
    host read (`tolist`) to those the model and optimizer make themselves (AdamW reads its step count on CPU)."""
    plain, _ = syncs_of_a_step(make, with_health=False)
    measured, values = syncs_of_a_step(make, with_health=True)
    assert Counter(measured) - Counter(plain) == Counter(["tolist"])
    assert Counter(plain) - Counter(measured) == Counter()
    assert "attn_logit_max/1" in values and "update_ratio" in values and "logit_z" in values


def test_a_plain_module_gets_gradient_and_nonfinite_flags() -> None:
    """A plain module with no attention and no logits: grad norms per child and the non-finite flags."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    health = Health(model)
    health.watch_optimizer(optimizer)
    health.begin_step(0)
    model(torch.randn(3, 4)).square().sum().backward()
    expected = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model[2].parameters()])))
    optimizer.step()
    values = health.end_step()
    assert values["grad_norm/2"] == pytest.approx(expected, rel=1e-5)
    assert values["nonfinite"] == 0.0
    health.begin_step(1)
    model(torch.randn(3, 4)).square().sum().backward()
    model[0].weight.grad[0, 0] = float("nan")
    optimizer.step()
    values = health.end_step()
    assert values["nonfinite_grad"] == values["nonfinite_param"] == values["nonfinite"] == 1.0


def test_float_values_handed_to_end_step_pass_through_without_a_device_read() -> None:
    """Floats the loop already holds (the loss it read, the lr) come back as they are, with no host read added."""
    health = Health(nn.Linear(3, 2))
    counter = TensorCalls(SYNC_CALLS)
    with counter:
        health.begin_step(0)
        values = health.end_step(loss=2.5, lr=1e-3)
    assert counter.calls == []
    assert values == {"loss": 2.5, "lr": 1e-3, "nonfinite_grad": 0.0, "nonfinite_param": 0.0, "nonfinite": 0.0}


def test_frozen_and_unused_parameters_count_as_zero_gradients_and_the_rest_match_torch() -> None:
    """A frozen child and a child the forward skips report a zero gradient norm; the others, the global norm, the
    parameter norm (trainable parameters) and the update ratio equal their definitions."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"frozen": nn.Linear(4, 4), "used": nn.Linear(4, 4), "unused": nn.Linear(4, 4)})
    model["frozen"].requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    health = Health(model)
    health.watch_optimizer(optimizer)
    health.begin_step(0)
    model["used"](model["frozen"](torch.randn(3, 4))).square().sum().backward()
    used = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model["used"].parameters()])))
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    optimizer.step()
    values = health.end_step()
    assert values["grad_norm/frozen"] == values["grad_norm/unused"] == 0.0
    assert values["grad_norm/used"] == pytest.approx(used, rel=1e-5) == pytest.approx(values["grad_norm"], rel=1e-6)
    param_norm = float(torch.linalg.vector_norm(torch.stack([p.detach().norm() for p in trainable])))
    deltas = [(p.detach() - b).norm() for p, b in zip(trainable, before, strict=True)]
    update = float(torch.linalg.vector_norm(torch.stack(deltas)))
    assert values["param_norm"] == pytest.approx(param_norm, rel=1e-5)
    assert values["update_ratio"] == pytest.approx(update / param_norm, rel=1e-4)


def test_the_update_ratio_comes_every_update_every_steps_and_equals_that_steps_update() -> None:
    """With `update_every=3`, step 1 reports the gradient and parameter norms and the flags but no update ratio;
    step 3 reports the ratio of its own update, as computed by hand."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    health = Health(model, update_every=3)
    health.watch_optimizer(optimizer)
    for step in (1, 3):
        health.begin_step(step)
        model(torch.randn(5, 6)).square().mean().backward()
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        values = health.end_step()
        param_norm = math.sqrt(sum(float(p.detach().square().sum()) for p in model.parameters()))
        assert values["param_norm"] == pytest.approx(param_norm, rel=1e-5)
        assert values["nonfinite"] == values["nonfinite_param"] == values["nonfinite_grad"] == 0.0
        if step == 1:
            assert "update_ratio" not in values and values["grad_norm"] > 0
        else:
            update = math.sqrt(
                sum(float((p.detach() - b).square().sum()) for p, b in zip(model.parameters(), before, strict=True))
            )
            assert values["update_ratio"] == pytest.approx(update / param_norm, rel=1e-4)
