"""A small real training loop with `Steer`, run as its own process by the fault tests.

It prints its own record as JSON lines on stdout (a pipe, so no file limit set on the process applies):
`{"run_id"}` once registered, `{"step", "loss", "t"}` after every step, and `{"done", "applied", "lost"}` at
the end with the commands it applied and the samples its spill could not keep.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from trainer.io import IOConfig
from trainer.steer import Steer, SteerConfig


def say(**fields: object) -> None:
    """One JSON line on stdout, flushed at once so the test reads it while the loop runs."""
    print(json.dumps(fields), flush=True)


def main() -> None:
    """Train a linear model for `--steps` steps, one every `--step-s` seconds, steered by `--server`."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--step-s", type=float, default=0.02)
    parser.add_argument("--spill", type=Path, required=True)
    parser.add_argument("--memory-max", type=int, default=20)
    parser.add_argument("--ballast-mb", type=int, default=0, help="a buffer this large makes checkpoints slow to write")
    parser.add_argument("--checkpoint-dir", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = torch.nn.Linear(8, 1)
    model.register_buffer("ballast", torch.zeros(args.ballast_mb * 2**18))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    io = IOConfig(
        poll_wait_s=0.5,
        flush_interval_s=0.1,
        heartbeat_interval_s=0.5,
        retry_min_s=0.05,
        retry_max_s=0.3,
        memory_max_samples=args.memory_max,
        spill_path=args.spill,
    )
    config = SteerConfig(
        server=args.server,
        run_name="loop",
        io=io,
        register_timeout_s=20.0,
        close_timeout_s=40.0,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=1 if args.checkpoint_dir else 0,
        keep_files=10_000,
    )
    steer = Steer(model, optimizer, config=config)
    say(run_id=steer.run_id)
    inputs = torch.randn(64, 8)
    targets = inputs.sum(1, keepdim=True)
    for iteration in range(args.steps):
        step = steer.poll(iteration)
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        value = float(loss)
        steer.record(step, loss=value)
        say(step=step, loss=value, t=time.monotonic())
        time.sleep(args.step_s)
    sent_all = steer.close()
    applied = [{"id": record.id, "seq": record.seq, "step": result.step} for record, result in steer.results]
    say(done=True, sent_all=sent_all, applied=applied, lost=steer.io.buffer.lost)


if __name__ == "__main__":
    main()
