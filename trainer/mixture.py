"""A weighted mixture over named data domains for framework trainers: `set_data_mix` changes it while it is read.

Hand it to the framework as the training dataset (an `IterableDataset`) and to `SteerCallback(sampler=...)`:

```python
mixture = DomainMixture({"prose": prose_examples, "code": code_examples}, batch_size=8)
trainer = Trainer(model, args, train_dataset=mixture, callbacks=[SteerCallback(server=URL, sampler=mixture)])
```

Sample `i` is drawn from a generator seeded by (seed, i) under the weights in force when it is drawn, so the stream
is the same for the same weights, and restoring `state_dict` replays it: that is what makes a rollback see the same
data again. The data loader must read it in the training process (`num_workers=0`, HF's and Lightning's default),
since a worker process holds a copy that commands do not reach. Loaders that fetch ahead (Accelerate and Lightning
hold one batch) train on that batch before a new mix or a restored position shows.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

import torch
from torch.utils.data import IterableDataset

T = TypeVar("T")


class DomainWeights:
    """Named domains with sampling weights that `set_data_mix` changes, a seed and a position in the stream: the
    part every runsteer sampler shares, and what its checkpoint holds."""

    def __init__(self, names: list[str], seed: int) -> None:
        self.names = names
        self.weights = {name: 1.0 for name in names}
        self.seed = seed
        self.index = 0
        """How far the stream has been read."""

    def set_weights(self, weights: dict[str, float]) -> dict[str, float]:
        """Change some domains' weights (others keep theirs); returns the normalised mix in force."""
        unknown = sorted(set(weights) - set(self.names))
        if unknown:
            raise ValueError(f"unknown domain(s) {', '.join(unknown)}; this run has {', '.join(self.names)}")
        negative = sorted(name for name, weight in weights.items() if not weight >= 0.0)
        if negative:
            raise ValueError(f"weights must be finite and non-negative: {', '.join(negative)}")
        merged = {**self.weights, **weights}
        if sum(merged.values()) <= 0.0:
            raise ValueError("the mix would give every domain weight zero")
        self.weights = merged
        return self.mix()

    def mix(self) -> dict[str, float]:
        """The weights normalised to sum to one."""
        total = sum(self.weights.values())
        return {name: weight / total for name, weight in self.weights.items()}

    def state_dict(self) -> dict[str, Any]:
        """Position, weights and seed."""
        return {"index": self.index, "weights": dict(self.weights), "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved."""
        self.index = int(state["index"])
        self.weights = dict(state["weights"])
        self.seed = int(state["seed"])


class DomainMixture(DomainWeights, IterableDataset[T], Generic[T]):
    """An endless stream of examples from weighted domains; `Stateful`, skippable, reweighted live."""

    def __init__(
        self,
        domains: Mapping[str, Sequence[T]],
        *,
        batch_size: int = 1,
        seed: int = 0,
        weights: Mapping[str, float] | None = None,
    ) -> None:
        if not domains:
            raise ValueError("a mixture needs at least one domain")
        empty = sorted(name for name, examples in domains.items() if len(examples) == 0)
        if empty:
            raise ValueError(f"domain(s) {', '.join(empty)} have no examples")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        super().__init__(list(domains), seed)
        self.domains = dict(domains)
        self.batch_size = batch_size
        """Examples one training step draws (per-device batch times gradient accumulation); `skip` counts in it."""
        if weights:
            self.set_weights(dict(weights))

    def draw(self, index: int) -> tuple[str, T]:
        """The domain and example at position `index` under the current weights; does not move the stream."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        probs = torch.tensor([self.weights[name] for name in self.names], dtype=torch.float64)
        name = self.names[int(torch.multinomial(probs, 1, generator=generator))]
        examples = self.domains[name]
        return name, examples[int(torch.randint(len(examples), (1,), generator=generator))]

    def __iter__(self) -> Iterator[T]:
        while True:
            _, example = self.draw(self.index)
            self.index += 1
            yield example

    def skip(self, batches: int) -> None:
        """Skip the next `batches` steps' worth of examples."""
        self.index += batches * self.batch_size
