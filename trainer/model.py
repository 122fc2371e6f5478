"""A small byte-level GPT in the style of nanoGPT, with the knobs the instability literature names.

QK-layernorm (Wortsman et al., 2023) normalises queries and keys per head so attention logits cannot grow
without bound; the maximum pre-softmax attention logit per layer can be measured on chosen steps only,
since it needs the explicit q·k product that scaled-dot-product attention otherwise never materialises.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class GPTConfig:
    """Model shape and options."""

    vocab_size: int = 256
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    qk_layernorm: bool = False


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention through `F.scaled_dot_product_attention`."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.q_norm = nn.LayerNorm(self.head_dim) if config.qk_layernorm else None
        self.k_norm = nn.LayerNorm(self.head_dim) if config.qk_layernorm else None
        self.logit_max: Tensor | None = None
        """The max pre-softmax logit of the last forward that measured it (a 0-d tensor, not synced)."""
        self._future_mask: Tensor | None = None

    def _future(self, length: int, device: torch.device) -> Tensor:
        """The (T, T) mask of future positions, built once per length and device and kept (not in the state dict)."""
        mask = self._future_mask
        if mask is None or mask.shape[0] != length or mask.device != device:
            mask = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
            self._future_mask = mask
        return mask

    def forward(self, x: Tensor, measure: bool = False) -> Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        self.logit_max = None
        if measure:
            with torch.no_grad():
                # Masked in place and scaled after the max: dividing by a positive constant is monotone, so
                # this equals the max of the scaled logits, without two more passes over the (B, H, T, T) product.
                raw = (q @ k.transpose(-2, -1)).masked_fill_(self._future(length, x.device), float("-inf"))
                self.logit_max = (raw.amax() / math.sqrt(self.head_dim)).float()
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out: Tensor = self.proj(y.transpose(1, 2).reshape(batch, length, width))
        return out


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(config.n_embd, 4 * config.n_embd, bias=False),
            nn.GELU(),
            nn.Linear(4 * config.n_embd, config.n_embd, bias=False),
        )

    def forward(self, x: Tensor, measure: bool = False) -> Tensor:
        x = x + self.attn(self.ln1(x), measure)
        out: Tensor = x + self.mlp(self.ln2(x))
        return out


class GPT(nn.Module):
    """Token and position embeddings, `n_layer` blocks, a final norm and a tied output head."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: Tensor, measure_attention: bool = False) -> Tensor:
        """Output logits (B, T, vocab); with `measure_attention`, each layer keeps its max attention logit."""
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(positions)
        for block in self.blocks:
            x = block(x, measure_attention)
        return F.linear(self.ln_f(x), self.wte.weight)

    def attention_logit_max(self) -> list[Tensor]:
        """Each layer's last measured max attention logit."""
        return [m.logit_max for m in self.modules() if isinstance(m, CausalSelfAttention) and m.logit_max is not None]

    def param_groups(self, weight_decay: float) -> list[dict[str, object]]:
        """Two named groups: matrices decay; vectors (norm weights and biases) do not."""
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        return [
            {"name": "decay", "params": decay, "weight_decay": weight_decay},
            {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
        ]

    def blocks_of_parameters(self) -> list[tuple[str, Sequence[Tensor]]]:
        """Parameters split per block for `grad_norm/<module>`: embeddings, each block, the final norm."""
        return [
            ("embed", [self.wte.weight, self.wpe.weight]),
            *((f"block.{i}", list(block.parameters())) for i, block in enumerate(self.blocks)),
            ("ln_f", list(self.ln_f.parameters())),
        ]
