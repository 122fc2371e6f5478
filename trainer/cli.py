"""`runsteer train`: the built-in run, steerable from the server it registers with."""

from __future__ import annotations

import argparse
import atexit
import gc
import logging
import sys

from protocols.errors import RunsteerError
from protocols.flags import add_config_flags, config_values
from trainer.distributed import launch, without_option
from trainer.run import BuiltinRun, RunConfig

log = logging.getLogger("runsteer.trainer")


def build_parser() -> argparse.ArgumentParser:
    """The `runsteer train` flags: one per `RunConfig` field (generated from it), `--quiet` for the console and
    `--nproc-per-node` for the launcher."""
    parser = argparse.ArgumentParser(
        prog="runsteer train", description="Train the built-in byte-level GPT, steered live."
    )
    add_config_flags(parser, RunConfig, skip=NOT_FLAGS, env={"token": "RUNSTEER_TOKEN"})
    parser.add_argument("--quiet", action="store_true", help="print no per-step progress")
    parser.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        metavar="N",
        help="train on N ranks of this machine: runs `torchrun --nproc-per-node N -m trainer` with the other flags",
    )
    return parser


NOT_FLAGS = frozenset({"io"})
"""RunConfig fields set by code, not on the command line (the I/O tuning of the hook)."""

CONSOLE_FLAGS = frozenset({"quiet", "nproc_per_node"})
"""Flags about this command's console output and its launcher (torchrun), which no run configuration holds."""


def main(argv: list[str] | None = None) -> int:
    """Run `runsteer train`; returns the process exit status."""
    arguments = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(arguments)
    if args.nproc_per_node is not None:
        return launch(args.nproc_per_node, without_option(arguments, "--nproc-per-node"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = RunConfig(**config_values(args, RunConfig))
    try:
        run = BuiltinRun(config)
    except (ValueError, OSError, RunsteerError) as exc:
        print(f"runsteer train: {exc}", file=sys.stderr)
        return 2
    if run.rank == 0:
        print(
            f"run {run.steer.run_id or '(not registered yet)'} on {config.server}: preset {config.preset}, "
            f"{run.steps} steps, device {run.device}",
            flush=True,
        )

    def progress(step: int, values: dict[str, float]) -> None:
        if not args.quiet and run.rank == 0 and step % 50 == 0:
            print(
                f"step {step:6d} [{run.steer.branch}] loss {values['loss']:.4f} lr {values['lr']:.2e} "
                f"{values['step_time_ms']:.1f} ms/step",
                flush=True,
            )

    # Interpreter shutdown otherwise runs full collections over torch's object graph (over a second here);
    # freezing the heap at exit skips them, so the process ends well within a second of the final checkpoint.
    atexit.register(gc.freeze)
    trained = run.train(progress)
    if run.rank == 0:
        print(f"done: {trained} steps trained, run at step {run.steer.step} on branch {run.steer.branch}", flush=True)
    return 0
