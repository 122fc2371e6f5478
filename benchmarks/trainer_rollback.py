"""Rollback time on the built-in run (`cpu-tiny`, or `--preset`): from the in-memory ring, from the checkpoint
file, and a plain `torch.load` of that same file for reference.

Each rollback is the whole `rollback` applier at a step boundary (find, load, verify, restore model, optimizer,
schedule, sampler and RNG, move to a new branch). Prints figures; asserts nothing.
Run: `python -m benchmarks.trainer_rollback` (~30 s); on a GPU: `--preset gpu-small --device cuda`.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._common import Server, add_run_arguments, device_name, format_ms, load_average, percentiles_ms
from protocols.commands import Rollback
from trainer.appliers import apply_rollback
from trainer.run import BuiltinRun, RunConfig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=30, help="rollbacks of each kind (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default %(default)s)")
    add_run_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with Server() as server, tempfile.TemporaryDirectory(prefix="runsteer-rollback-") as tmp:
        run = BuiltinRun(
            RunConfig(
                server=server.url,
                steps=10**9,
                run_name="rollback",
                checkpoint_dir=Path(tmp),
                preset=args.preset,
                device=args.device,
            )
        )
        steer = run.steer
        for iteration in range(3):
            steer.record(iteration, **run.train_step(steer.poll(iteration)))
        info = steer.save_checkpoint("bench")
        entry = steer.checkpoints.entries[info.checkpoint_id]
        ring_copy = entry.state
        times: dict[str, list[float]] = {"memory": [], "disk": [], "sha256": [], "torch.load": []}
        for _ in range(args.repeats):
            for kind in times:
                started = time.perf_counter()
                if kind == "torch.load":
                    torch.load(info.path, map_location="cpu", weights_only=True)
                elif kind == "sha256":
                    hashlib.sha256(Path(info.path).read_bytes()).hexdigest()
                else:
                    entry.state = ring_copy if kind == "memory" else None
                    effective = apply_rollback(steer.live, Rollback(checkpoint_id=info.checkpoint_id))
                    assert effective["source"] == kind
                times[kind].append(time.perf_counter() - started)
        parameters = sum(p.numel() for p in run.model.parameters())
        size_mib = Path(info.path).stat().st_size / 2**20
        steer.close()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.preset} on {device_name(run.device)}, "
        f"load average {load_average()}; "
        f"{parameters / 1e6:.2f}M parameters, checkpoint file {size_mib:.1f} MiB (model, AdamW moments, the rest)"
    )
    labels = {
        "memory": "rollback from the in-memory ring",
        "disk": "rollback from the file (sha256 + torch.load + restore)",
        "sha256": "  of which: sha256 of the file",
        "torch.load": "plain torch.load of the same file",
    }
    for kind, label in labels.items():
        print(f"{label:<56} {format_ms(percentiles_ms(times[kind]))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
