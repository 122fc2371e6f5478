"""`runsteer train`: the built-in run, steerable from the server it registers with."""

from __future__ import annotations

import argparse
import atexit
import gc
import logging
import os
import sys
from pathlib import Path

from protocols.errors import RunsteerError
from trainer.distributed import launch, without_option
from trainer.run import PRESETS, BuiltinRun, RunConfig

log = logging.getLogger("runsteer.trainer")


def build_parser() -> argparse.ArgumentParser:
    """The `runsteer train` flags, one per `RunConfig` field."""
    defaults = RunConfig()
    parser = argparse.ArgumentParser(
        prog="runsteer train", description="Train the built-in byte-level GPT, steered live."
    )
    parser.add_argument("--server", default=defaults.server, help="control server URL (default %(default)s)")
    parser.add_argument("--token", default=os.environ.get("RUNSTEER_TOKEN"), help="bearer token (or RUNSTEER_TOKEN)")
    parser.add_argument("--preset", default=defaults.preset, choices=sorted(PRESETS), help="model/training preset")
    parser.add_argument("--steps", type=int, default=None, help="total steps (default: the preset's)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the preset's)")
    parser.add_argument("--run-name", default=defaults.run_name, help="run name shown by the server")
    parser.add_argument("--run-id", default=None, help="re-attach to this existing run id")
    parser.add_argument("--checkpoint-dir", type=Path, default=None, help="write checkpoint files here")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the model and the data")
    parser.add_argument("--device", default=defaults.device, choices=["auto", "cpu", "cuda"], help="where to train")
    parser.add_argument("--qk-layernorm", action="store_true", help="normalise queries and keys per head")
    parser.add_argument("--z-loss", type=float, default=None, help="z-loss weight, e.g. 1e-4 (default off)")
    parser.add_argument(
        "--domain-file",
        type=Path,
        action="append",
        default=[],
        help="add a text file as a data domain named after its stem (repeatable)",
    )
    parser.add_argument(
        "--inject-spike",
        type=int,
        action="append",
        default=[],
        metavar="BATCH",
        help="poison batch BATCH: the step that trains on it runs at --spike-factor x the learning rate (repeatable)",
    )
    parser.add_argument("--spike-factor", type=float, default=defaults.spike_factor, help="see --inject-spike")
    parser.add_argument("--quiet", action="store_true", help="print no per-step progress")
    parser.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        metavar="N",
        help="train on N ranks of this machine: runs `torchrun --nproc-per-node N -m trainer` with the other flags",
    )
    parser.add_argument(
        "--process-group-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="under torchrun: timeout of the training process group's collectives (default: torch's)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `runsteer train`; returns the process exit status."""
    arguments = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(arguments)
    if args.nproc_per_node is not None:
        return launch(args.nproc_per_node, without_option(arguments, "--nproc-per-node"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = RunConfig(
        server=args.server,
        preset=args.preset,
        steps=args.steps,
        lr=args.lr,
        run_name=args.run_name,
        checkpoint_dir=args.checkpoint_dir,
        seed=args.seed,
        device=args.device,
        token=args.token,
        run_id=args.run_id,
        qk_layernorm=args.qk_layernorm,
        z_loss=args.z_loss,
        domain_files=args.domain_file,
        inject_spikes=args.inject_spike,
        spike_factor=args.spike_factor,
        process_group_timeout_s=args.process_group_timeout,
    )
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
