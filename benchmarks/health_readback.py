"""What reading the health metrics back costs a GPU loop, and what reading them a step later saves.

An HF `GPT2LMHeadModel` built from a config trains in a plain loop (forward, backward, clip or `Health`, AdamW)
in four kinds of step, interleaved in blocks so that the machine's state hits them alike: no read-back at all,
`loss.item()` each step (what most loops do), the health metrics read back at once (`Health.end_step`, which waits
for the device to finish the step) and read a step later (`Health.finish_step`, read at the next step as `Steer`
does, when its copy has long landed). Two sizes: `tiny` (2 layers of 64, 8 x 64 tokens: the CPU's kernel launches
bound the step) and `small` (6 layers of 384, 64 x 256 tokens: the GPU bounds it). Prints figures; asserts nothing.
Run: `python -m benchmarks.health_readback` (~1 min on a GPU; `--device cpu` runs it on the CPU, where nothing
waits for a device and the two read-backs cost the same).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from benchmarks._common import device_name, load_average
from trainer.health import Health
from trainer.metrics import HostValues

SIZES = {
    "tiny": (
        GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0),
        8,
        64,
    ),
    "small": (
        GPT2Config(vocab_size=256, n_positions=256, n_embd=384, n_layer=6, n_head=6, bos_token_id=0, eos_token_id=0),
        64,
        256,
    ),
}
"""Model config, batch size and sequence length of each size."""
KINDS = ("no read-back", "loss.item()", "health at once", "health a step later")


def steps_of(size: str, device: torch.device) -> Callable[[str], None]:
    """A function training one step of the given kind on a fresh model of `size`."""
    config, batch, length = SIZES[size]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    health = Health(model)
    health.watch_output(model)
    ids = torch.randint(0, config.vocab_size, (batch, length), device=device)
    unread: list[HostValues] = []
    count = 0

    def step(kind: str) -> None:
        nonlocal count
        measured = kind.startswith("health")
        if measured:
            health.begin_step(count)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if measured:
            health.before_optimizer_step(1.0)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if measured:
            health.after_optimizer_step()
        optimizer.zero_grad(set_to_none=True)
        if kind == "loss.item()":
            loss.item()
        elif kind == "health at once":
            health.end_step(loss=loss.detach())
        elif kind == "health a step later":
            while unread:
                unread.pop().read()
            unread.append(health.finish_step(loss=loss.detach()))
        count += 1

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where to train (%(default)s)")
    parser.add_argument("--sizes", nargs="+", choices=tuple(SIZES), default=list(SIZES))
    parser.add_argument("--blocks", type=int, default=12, help="blocks of each kind (default %(default)s)")
    parser.add_argument("--block", type=int, default=20, help="steps per block (default %(default)s)")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    device = torch.device(args.device)
    print(f"torch {torch.__version__} on {device_name(device)}, load average {load_average()}")
    for size in args.sizes:
        step = steps_of(size, device)
        for _ in range(5):
            for kind in KINDS:
                step(kind)
        synchronize(device)
        times: dict[str, list[float]] = {kind: [] for kind in KINDS}
        for block in range(args.blocks * len(KINDS)):
            kind = KINDS[(block + block // len(KINDS)) % len(KINDS)]  # the order rotates each round
            synchronize(device)
            started = time.perf_counter()
            for _ in range(args.block):
                step(kind)
            synchronize(device)
            times[kind].append((time.perf_counter() - started) / args.block)
        base = statistics.median(times["no read-back"])
        figures = ", ".join(
            f"{kind} {statistics.median(samples) * 1e3:.3f} ms ({(statistics.median(samples) / base - 1) * 100:+.1f}%)"
            for kind, samples in times.items()
        )
        print(f"  {size}: median step over blocks of {args.block}: {figures}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
