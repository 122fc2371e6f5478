"""The built-in run as torchrun starts it, for the distributed tests: `torchrun ... worker.py --out DIR ...`.

With `--plan`, rank 0 submits each planned command through the server in time for its loop iteration (`lead`)
and waits until its I/O thread fetched it, so the command lands at a known step; every rank then writes its final
state to `DIR/rank<r>.pt` for the test to compare. Without a plan the run trains until a command or a fault ends it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch

from protocols.client import Client
from trainer.io import IOConfig
from trainer.optim import optimizer_name
from trainer.run import BuiltinRun, RunConfig
from trainer.steer import Steer

FAST_IO = IOConfig(poll_wait_s=0.5, flush_interval_s=0.1, heartbeat_interval_s=0.5, retry_max_s=0.5)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--plan", type=Path, help="JSON: {iteration: [command, ...]}")
    parser.add_argument("--unreadable-eval-on-rank", type=int, default=-1)
    parser.add_argument("--die-rank", type=int, default=-1)
    parser.add_argument("--die-at", type=int, default=-1)
    parser.add_argument("--process-group-timeout", type=float, default=None)
    return parser.parse_args()


def lead(steer: Steer) -> int:
    """How many boundaries before the one meant to apply a command rank 0 hands it over: one under torchrun (every
    rank learns of it at the next boundary and applies it at the one after), none in one process."""
    return 1 if steer.ranks is not None else 0


def deliver(client: Client, steer: Steer, command: dict[str, Any]) -> None:
    """Submit `command` and wait until the poller fetched it, so the next boundary takes it (`lead`)."""
    assert steer.run_id is not None
    before = steer.io.inbox.qsize()
    client.submit(steer.run_id, command)
    deadline = time.monotonic() + 30
    while steer.io.inbox.qsize() <= before:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{command['type']} was not delivered")
        time.sleep(0.005)


def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    run = BuiltinRun(
        RunConfig(
            server=args.server,
            steps=args.steps,
            checkpoint_dir=args.out / "checkpoints",
            run_name="distributed",
            io=FAST_IO,
            process_group_timeout_s=args.process_group_timeout,
        )
    )
    steer = run.steer
    if run.rank == args.unreadable_eval_on_rank:

        def unreadable(max_batches: int | None) -> dict[str, float]:
            raise OSError(f"held-out data unreadable on rank {run.rank}")

        steer.live.evaluator = unreadable
    if args.plan is None:

        def fault(step: int, values: dict[str, float]) -> None:
            if run.rank == args.die_rank and step == args.die_at:
                (args.out / "died_at").touch()
                os.kill(os.getpid(), signal.SIGKILL)

        run.train(fault)
        return
    plan = {int(iteration): commands for iteration, commands in json.loads(args.plan.read_text()).items()}
    with Client(args.server) as client, steer:
        for iteration in range(args.steps):
            if run.rank == 0:
                for command in plan.get(iteration + lead(steer), []):
                    deliver(client, steer, command)
            step = steer.poll(iteration)
            steer.record(step, **run.train_step(step))
    state = {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "optimizer_name": optimizer_name(run.optimizer),
        "step": steer.step,
        "branch": steer.branch,
        "sampler": run.sampler.state_dict(),
        "results": [(record.command.type, result.status, result.message) for record, result in steer.results],
        "run_id": steer.run_id,
    }
    torch.save(state, args.out / f"rank{run.rank}.pt")


if __name__ == "__main__":
    main()
