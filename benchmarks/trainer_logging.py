"""The training thread's own cost per step of handing 40 metric values to a logger, in one `cpu-tiny` run:
`Steer.poll` + `Steer.record`, `wandb.log` in offline mode, and TensorBoard's `SummaryWriter.add_scalar` x40.

After every real training step each logger gets the same 40 values, in an order that rotates step by step, and
only the call on the training thread is timed; each logger's background threads or processes run meanwhile.
Needs the optional dependencies: `.venv/bin/python -m pip install -r benchmarks/requirements-trainer.txt`.
wandb runs offline (WANDB_MODE=offline, WANDB_SILENT=true, a temporary WANDB_DIR) and touches no network.
Prints figures; asserts nothing. Run: `python -m benchmarks.trainer_logging` (~1 min).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks._common import Server, load_average
from trainer.run import BuiltinRun, RunConfig

VALUES = 40


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300, help="training steps (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="runsteer-logging-") as tmp:
        os.environ.update(
            {
                "WANDB_MODE": "offline",
                "WANDB_SILENT": "true",
                "WANDB_DIR": tmp,
                "WANDB_CACHE_DIR": tmp,
                "WANDB_CONFIG_DIR": tmp,
                "WANDB_DISABLE_GIT": "true",
            }
        )
        try:
            import wandb
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            print(
                f"missing optional dependency ({exc}); run: "
                ".venv/bin/python -m pip install -r benchmarks/requirements-trainer.txt"
            )
            return 2
        with Server() as server:
            run = BuiltinRun(RunConfig(server=server.url, steps=10**9, run_name="logging"))
            steer = run.steer
            wandb_run = wandb.init(project="runsteer-bench", dir=tmp, mode="offline")
            writer = SummaryWriter(log_dir=str(Path(tmp) / "tensorboard"))
            step = 0

            def runsteer(values: dict[str, float]) -> None:
                steer.poll(step)
                steer.record(step, **values)

            def wandb_log(values: dict[str, float]) -> None:
                wandb_run.log(values, step=step)

            def tensorboard(values: dict[str, float]) -> None:
                for name, value in values.items():
                    writer.add_scalar(name, value, step)

            loggers: dict[str, Callable[[dict[str, float]], None]] = {
                "runsteer poll + record": runsteer,
                "wandb.log (offline)": wandb_log,
                "SummaryWriter.add_scalar x40": tensorboard,
            }
            times: dict[str, list[float]] = {name: [] for name in loggers}
            names = list(loggers)
            for step in range(args.steps):
                metrics = run.train_step(step)
                values = dict(list(metrics.items())[:VALUES])
                values.update({f"extra/{i}": float(i) for i in range(VALUES - len(values))})
                for name in names[step % 3 :] + names[: step % 3]:
                    started = time.perf_counter()
                    loggers[name](values)
                    times[name].append(time.perf_counter() - started)
            wandb_run.finish()
            writer.close()
            steer.close()
    print(
        f"torch {torch.__version__}, wandb {wandb.__version__}, {torch.get_num_threads()} threads, "
        f"load average {load_average()}; {args.steps} steps, {VALUES} values each"
    )
    ours = statistics.median(times["runsteer poll + record"])
    for name, samples in times.items():
        ordered = sorted(samples)
        median = statistics.median(samples)
        print(
            f"  {name:<30} median {median * 1e6:8.1f} us  p90 {ordered[int(0.9 * len(ordered))] * 1e6:8.1f} us  "
            f"p99 {ordered[int(0.99 * len(ordered))] * 1e6:8.1f} us  ({median / ours:.1f}x runsteer)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
