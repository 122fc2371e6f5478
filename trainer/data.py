"""Byte-level data domains that ship with Python, and a seeded, resumable domain-mixture sampler.

Every batch is a pure function of (seed, batch index, mixture weights), so a rollback that restores the
sampler's state replays exactly the batches the original run saw, and skipping N batches is an index bump.
"""

from __future__ import annotations

import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from trainer.mixture import DomainWeights

EVAL_FRACTION = 0.1
"""The tail of every domain held out for evaluation."""


@dataclass(frozen=True)
class Domain:
    """One data domain: its train and held-out byte streams."""

    name: str
    train: Tensor
    eval: Tensor

    def blocks(self, size: int, split: str = "train") -> list[Tensor]:
        """The split cut into consecutive blocks of `size` bytes: examples for a framework's dataset."""
        data = self.train if split == "train" else self.eval
        return list(data[: len(data) // size * size].view(-1, size))


def _split(name: str, data: bytes) -> Domain:
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.long)
    cut = int(len(tokens) * (1.0 - EVAL_FRACTION))
    return Domain(name, tokens[:cut], tokens[cut:])


def prose_domain(max_bytes: int) -> Domain:
    """English prose: the Python documentation topics in `pydoc_data`."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    return _split("prose", text.encode("utf-8")[:max_bytes])


def code_domain(max_bytes: int) -> Domain:
    """Python source from the standard library, files in sorted order until `max_bytes`."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chunks: list[bytes] = []
    total = 0
    for path in sorted(stdlib.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return _split("code", b"\n".join(chunks)[:max_bytes])


def arithmetic_domain(max_bytes: int, seed: int = 0) -> Domain:
    """Synthetic sums and products such as `417+86=503`, one per line, from a fixed seed."""
    rng = random.Random(seed)
    lines: list[str] = []
    total = 0
    while total < max_bytes:
        a, b = rng.randrange(1000), rng.randrange(1000)
        line = f"{a}+{b}={a + b}\n" if rng.random() < 0.5 else f"{a}*{b}={a * b}\n"
        lines.append(line)
        total += len(line)
    return _split("arithmetic", "".join(lines).encode()[:max_bytes])


def text_file_domain(name: str, path: Path, max_bytes: int) -> Domain:
    """A user's own text file as a domain."""
    data = path.read_bytes()[:max_bytes]
    if len(data) < 1024:
        raise ValueError(f"domain {name!r}: {path} has {len(data)} bytes; at least 1024 are needed")
    return _split(name, data)


def builtin_domains(max_bytes: int) -> list[Domain]:
    """The three domains every built-in run trains on."""
    return [prose_domain(max_bytes), code_domain(max_bytes), arithmetic_domain(max_bytes)]


class MixtureSampler(DomainWeights):
    """Draws (inputs, targets, domain ids) batches from weighted domains; `Stateful` and skippable."""

    def __init__(
        self,
        domains: list[Domain],
        *,
        batch_size: int,
        block_size: int,
        seed: int,
        weights: dict[str, float] | None = None,
    ) -> None:
        if not domains:
            raise ValueError("a sampler needs at least one domain")
        for domain in domains:
            if len(domain.train) <= block_size + 1 or len(domain.eval) <= block_size + 1:
                raise ValueError(f"domain {domain.name!r} is shorter than one block of {block_size + 1} bytes")
        super().__init__([domain.name for domain in domains], seed)
        self.domains = domains
        self.batch_size = batch_size
        self.block_size = block_size
        if weights:
            self.set_weights(weights)

    def next_batch(self) -> tuple[Tensor, Tensor, Tensor]:
        """The batch at the current index, then advance: inputs and targets (B, T) and domain ids (B,)."""
        batch = self.batch_at(self.index)
        self.index += 1
        return batch

    def batch_at(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        """The batch at `index` under the current weights; does not move the sampler."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        probs = torch.tensor([self.weights[name] for name in self.names], dtype=torch.float64)
        ids = torch.multinomial(probs, self.batch_size, replacement=True, generator=generator)
        rows = torch.empty(self.batch_size, self.block_size + 1, dtype=torch.long)
        starts = torch.rand(self.batch_size, generator=generator, dtype=torch.float64)
        for row, (domain_id, start) in enumerate(zip(ids.tolist(), starts.tolist(), strict=True)):
            data = self.domains[domain_id].train
            offset = int(start * (len(data) - self.block_size - 1))
            rows[row] = data[offset : offset + self.block_size + 1]
        return rows[:, :-1], rows[:, 1:], ids

    def skip(self, batches: int) -> None:
        """Skip the next `batches` batches."""
        self.index += batches

    def eval_batches(self, domain: str, max_batches: int) -> list[tuple[Tensor, Tensor]]:
        """Fixed, evenly spaced blocks of one domain's held-out split, at most `max_batches` batches."""
        data = self.domains[self.names.index(domain)].eval
        span = self.block_size + 1
        blocks = max(1, min(max_batches * self.batch_size, (len(data) - 1) // span))
        stride = (len(data) - span) // max(1, blocks - 1) if blocks > 1 else 0
        rows = torch.stack([data[i * stride : i * stride + span] for i in range(blocks)])
        return [(chunk[:, :-1], chunk[:, 1:]) for chunk in torch.split(rows, self.batch_size)]
