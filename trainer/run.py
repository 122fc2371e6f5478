"""The built-in run: a small byte-level GPT on a mixture of domains that ship with Python, steered live.

One step reads top to bottom: poll for commands, draw a batch, forward, loss (log-sum-exp once), backward,
gradient statistics and clipping, optimizer step, update statistics, one read of every metric, record.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.data import MixtureSampler, builtin_domains, text_file_domain
from trainer.distributed import RankSampler, place, replicate
from trainer.io import IOConfig, Transport
from trainer.metrics import UPDATE_EVERY, GradientStats, due_at, lm_loss, read_scalars
from trainer.model import GPT, GPTConfig
from trainer.schedule import Schedule
from trainer.steer import Steer, SteerConfig, StopTraining

log = logging.getLogger("runsteer.trainer")


@dataclass(frozen=True)
class Preset:
    """Model size and training settings of a named preset."""

    model: GPTConfig
    batch_size: int
    lr: float
    steps: int
    warmup_steps: int
    domain_bytes: int
    """Bytes read per domain (train and held-out together)."""
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    z_loss: float = 0.0
    eval_every: int = 250
    eval_batches: int = 4
    attn_every: int = 10
    """Measure `attn_logit_max/<layer>` every N steps: it needs an extra q·k product (~3 ms on a `cpu-tiny` step)."""
    update_every: int = UPDATE_EVERY
    """Measure `update_ratio` every N steps: it copies every parameter before the optimizer step (`UPDATE_EVERY`)."""
    snapshot_every: int = 25
    checkpoint_every: int = 250


PRESETS: dict[str, Preset] = {
    "cpu-tiny": Preset(
        model=GPTConfig(block_size=64, n_layer=4, n_head=4, n_embd=128),
        batch_size=16,
        lr=3e-3,
        steps=2000,
        warmup_steps=50,
        domain_bytes=400_000,
    ),
    "gpu-small": Preset(
        model=GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=384),
        batch_size=64,
        lr=1e-3,
        steps=5000,
        warmup_steps=200,
        domain_bytes=4_000_000,
        eval_every=500,
        eval_batches=16,
        snapshot_every=100,
        checkpoint_every=500,
    ),
}


@dataclass
class RunConfig:
    """One built-in run: a field per `runsteer train` flag."""

    server: str = "http://127.0.0.1:8765"
    """Control server URL."""
    preset: str = "cpu-tiny"
    """Model and training preset: cpu-tiny or gpu-small."""
    steps: int | None = None
    """Total steps; the preset's when left out."""
    lr: float | None = None
    """Peak learning rate of the cosine schedule; the preset's when left out."""
    run_name: str = "builtin"
    """Run name shown by the server."""
    checkpoint_dir: Path | None = None
    """Write checkpoint files here (besides the in-memory ring)."""
    seed: int = 0
    """Seed of the model and the data."""
    device: str = "auto"
    """auto (CUDA when available), cpu or cuda."""
    token: str | None = None
    """Bearer token."""
    run_id: str | None = None
    """Re-attach to an existing run id."""
    qk_layernorm: bool = False
    """Normalise queries and keys per head."""
    z_loss: float | None = None
    """z-loss weight (1e-4 is the published value); the preset's (off) when left out."""
    domain_files: list[Path] = field(default_factory=list)
    """Extra domains from the user's text files; each is named after its file's stem."""
    inject_spikes: list[int] = field(default_factory=list)
    """Poisoned batch indices: the step that trains on one runs at `spike_factor` times the learning rate."""
    spike_factor: float = 100.0
    """Learning-rate multiplier of a poisoned batch's step (see `inject_spikes`)."""
    process_group_timeout_s: float | None = None
    """Under torchrun: the timeout of the training process group's collectives (torch's default when left out)."""
    io: IOConfig = field(default_factory=IOConfig)


def resolve_device(device: str) -> torch.device:
    """The torch device for `auto`, `cpu` or `cuda`; asking for CUDA without it is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, not {device!r}")
    return torch.device(device)


def keep_freed_memory() -> bool:
    """Have glibc keep the memory a step frees for the next step, instead of handing it back to the kernel and
    faulting it in again, zeroed (which also evicts the caches): a `cpu-tiny` step took 1,000 to 8,000 fresh pages,
    the more the more it allocates, so the full metric set looked up to 8% dearer than a plain step (with this, within
    2%; both steps 2 to 5% faster). The process keeps its peak heap. False where the C library is not glibc: nothing
    is changed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    # M_MMAP_THRESHOLD (-3): blocks up to 32 MiB (glibc's most) come from the heap, not from mmap and munmap each
    # time; M_TRIM_THRESHOLD (-1): the heap's free top is given back only past 1 GiB.
    return bool(mallopt(-3, 32 << 20)) and bool(mallopt(-1, 1 << 30))


class BuiltinRun:
    """Builds the model, data, optimizer, schedule and hook of a built-in run, and trains it."""

    def __init__(self, config: RunConfig, transport_factory: Callable[[], Transport] | None = None) -> None:
        if config.preset not in PRESETS:
            raise ValueError(f"unknown preset {config.preset!r}; choose one of {', '.join(PRESETS)}")
        preset = PRESETS[config.preset]
        model_config = GPTConfig(**{**preset.model.__dict__, "qk_layernorm": config.qk_layernorm})
        self.config = config
        self.preset = preset
        self.steps = config.steps if config.steps is not None else preset.steps
        self.z_loss = config.z_loss if config.z_loss is not None else preset.z_loss
        self.rank, self.world, self.device = place(resolve_device(config.device), config.process_group_timeout_s)
        keep_freed_memory()  # the process is the run's: its allocator settings are the run's to choose
        torch.manual_seed(config.seed)
        domains = builtin_domains(preset.domain_bytes)
        domains += [text_file_domain(path.stem, path, preset.domain_bytes) for path in config.domain_files]
        sampler = MixtureSampler(
            domains, batch_size=preset.batch_size, block_size=model_config.block_size, seed=config.seed
        )
        # Under torchrun every rank trains on its slice of the same global batch, so N ranks see what one would.
        self.sampler = RankSampler(sampler, self.rank, self.world) if self.world > 1 else sampler
        self.model = GPT(model_config).to(self.device)
        self.net = replicate(self.model, self.device)
        """What the step runs forward through: the model, or its DDP wrapper under torchrun."""
        lr = config.lr if config.lr is not None else preset.lr
        self.optimizer = torch.optim.AdamW(
            self.model.param_groups(preset.weight_decay), lr=lr, betas=(0.9, 0.95), eps=1e-8
        )
        peaks = tuple(lr for _ in self.optimizer.param_groups)
        horizon = max(self.steps, preset.warmup_steps + 1)
        schedule = Schedule(
            "cosine", peaks, warmup_steps=min(preset.warmup_steps, horizon - 1), horizon_steps=horizon, floor=0.1
        )
        self.stats = GradientStats(self.model.blocks_of_parameters(), update_every=preset.update_every)
        n_params = sum(p.numel() for p in self.model.parameters())
        steer_config = SteerConfig(
            server=config.server,
            token=config.token,
            run_name=config.run_name,
            run_id=config.run_id,
            checkpoint_dir=config.checkpoint_dir,
            snapshot_every=preset.snapshot_every,
            checkpoint_every=preset.checkpoint_every if config.checkpoint_dir else 0,
            grad_clip=preset.grad_clip,
            run_config={
                "preset": config.preset,
                "steps": self.steps,
                "seed": config.seed,
                "device": str(self.device),
                "ranks": self.world,
                "parameters": n_params,
                "batch_size": preset.batch_size,
                "block_size": model_config.block_size,
                "n_layer": model_config.n_layer,
                "n_embd": model_config.n_embd,
                "qk_layernorm": config.qk_layernorm,
                "z_loss": self.z_loss,
            },
            io=config.io,
        )
        self.steer = Steer(
            self.model,
            self.optimizer,
            schedule=schedule,
            sampler=self.sampler,
            evaluate=self.evaluate,
            config=steer_config,
            transport_factory=transport_factory,
        )
        self.tokens_per_step = preset.batch_size // self.world * model_config.block_size
        self.history: list[tuple[str, int, float]] = []
        """(branch, step, loss) of every step trained, in order."""

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        """bf16 autocast on CUDA; nothing on the CPU, where float32 keeps runs bit-for-bit repeatable."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step; returns every metric of the step, read from the device once."""
        started = time.perf_counter()
        spike = self.sampler.index in self.config.inject_spikes
        inputs, targets, domain_ids = (t.to(self.device, non_blocking=True) for t in self.sampler.next_batch())
        measure = due_at(step, self.preset.attn_every)
        with self.autocast():
            logits = self.net(inputs, measure_attention=measure)
        out = lm_loss(logits, targets, domain_ids, self.sampler.names, self.z_loss)
        torch.autograd.backward(out.loss)
        self.stats.before_step(step, self.steer.grad_clip)
        if spike:
            saved = [group["lr"] for group in self.optimizer.param_groups]
            for group in self.optimizer.param_groups:
                group["lr"] *= self.config.spike_factor
        self.optimizer.step()
        if spike:
            for group, lr in zip(self.optimizer.param_groups, saved, strict=True):
                group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        norms = self.stats.after_step()
        scalars = dict(out.scalars)
        if measure:
            for layer, value in enumerate(self.model.attention_logit_max()):
                scalars[f"attn_logit_max/{layer}"] = value
        # The one host-device sync of the step: every metric comes back in a single transfer.
        values = read_scalars(scalars, self.sampler.names, out.domain_sums, out.domain_counts, norms)
        elapsed = time.perf_counter() - started
        group = self.optimizer.param_groups[0]
        values["lr"] = float(group["lr"])
        values["weight_decay"] = float(group.get("weight_decay", 0.0))
        values["step_time_ms"] = elapsed * 1e3
        values["tokens_per_s"] = self.tokens_per_step / elapsed
        values["nonfinite"] = float(any(v != v or v in (float("inf"), float("-inf")) for v in values.values()))
        return values

    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None) -> dict[str, float]:
        """Mean loss on each domain's held-out split (`eval_loss/<domain>`) and their mean (`eval_loss`)."""
        self.model.eval()
        batches = max_batches or self.preset.eval_batches
        results: dict[str, float] = {}
        for name in self.sampler.names:
            losses = []
            for inputs, targets in self.sampler.eval_batches(name, batches):
                with self.autocast():
                    logits = self.model(inputs.to(self.device))
                losses.append(lm_loss(logits, targets.to(self.device)).scalars["loss"])
            results[f"eval_loss/{name}"] = float(torch.stack(losses).mean())
        results["eval_loss"] = sum(results.values()) / len(results)
        self.model.train()
        return results

    def train(self, on_step: Callable[[int, dict[str, float]], None] | None = None) -> int:
        """Train until the run's step reaches `steps` or a `stop` command; returns the steps trained here."""
        steer, trained, iteration = self.steer, 0, 0
        with steer:
            while True:
                step = steer.poll(iteration)
                if step >= self.steps:
                    steer.save_checkpoint("end", to_disk=True)
                    break
                values = self.train_step(step)
                steer.record(step, **values)
                self.history.append((steer.branch, step, values.get("loss", float("nan"))))
                if on_step is not None:
                    on_step(step, values)
                if self.preset.eval_every and (step + 1) % self.preset.eval_every == 0:
                    steer.record(step, **self.evaluate())
                trained += 1
                iteration += 1
        return trained


__all__ = ["PRESETS", "BuiltinRun", "Preset", "RunConfig", "StopTraining", "resolve_device"]
