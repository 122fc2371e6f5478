"""Step-time overhead of the `Steer` hook on the built-in `cpu-tiny` run, and its training-thread cost per step.

Steered and plain steps are interleaved in blocks in one process, so machine load hits both alike. Prints
figures; asserts nothing. Run: `python -m benchmarks.trainer_overhead [--steps N]` (starts its own server).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from trainer.run import BuiltinRun, RunConfig


def start_server(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`python -m control_server` on a free port with a temporary store."""
    port_file = directory / "port"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "control_server",
            "--port",
            "0",
            "--db",
            str(directory / "db.sqlite"),
            "--port-file",
            str(port_file),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while not port_file.exists():
        time.sleep(0.05)
    return process, f"http://127.0.0.1:{port_file.read_text().strip()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=400, help="steps of each kind")
    parser.add_argument("--block", type=int, default=20, help="steps per interleaved block")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        process, url = start_server(Path(tmp))
        try:
            run = BuiltinRun(RunConfig(server=url, steps=10**9, run_name="overhead"))
            steer = run.steer
            plain, steered, hook = [], [], []
            extra = {f"extra_{i}": float(i) for i in range(40)}
            iteration = 0
            for _ in range(args.steps // args.block):
                for _ in range(args.block):
                    started = time.perf_counter()
                    run.train_step(iteration)
                    plain.append(time.perf_counter() - started)
                    iteration += 1
                for _ in range(args.block):
                    started = time.perf_counter()
                    step = steer.poll(iteration)
                    values = run.train_step(step)
                    steer.record(step, **values)
                    steered.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    steer.poll(iteration)
                    steer.record(step, **extra)
                    hook.append(time.perf_counter() - started)
                    iteration += 1
            steer.close()
        finally:
            process.terminate()
            process.wait(10)
    plain_ms, steered_ms = statistics.median(plain) * 1e3, statistics.median(steered) * 1e3
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {run.device}")
    print(f"plain step (full metrics, no hook): median {plain_ms:.2f} ms")
    print(f"steered step (poll + step + record): median {steered_ms:.2f} ms")
    print(f"hook overhead: {100 * (steered_ms - plain_ms) / plain_ms:+.2f}% of step time")
    print(
        f"poll + record of 40 values on the training thread: median {statistics.median(hook) * 1e6:.1f} us, "
        f"p99 {sorted(hook)[int(0.99 * len(hook))] * 1e6:.1f} us"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
