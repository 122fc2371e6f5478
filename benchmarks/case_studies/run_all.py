"""All four case studies, one after another, each printing its table and writing its picture (`.venv/bin/python
-m benchmarks.case_studies.run_all`); 20 runs of 500 steps, two at a time."""

from __future__ import annotations

import time

from benchmarks._common import load_average
from benchmarks.case_studies import data_mix_change, find_the_lr, injected_fault, lr_too_high
from benchmarks.case_studies._harness import parser


def main(argv: list[str] | None = None) -> int:
    """Run the case studies in turn and print each table, then the total time."""
    args = parser(__doc__.splitlines()[0], lr_too_high.STEPS).parse_args(argv)
    started, load = time.monotonic(), load_average()
    passes = ["--steps", str(args.steps), "--parallel", str(args.parallel), "--plots", str(args.plots or "")]
    if args.rules is not None:
        passes += ["--rules", str(args.rules)]
    for study in (lr_too_high, injected_fault, data_mix_change, find_the_lr):
        extra = ["--workdir", str(args.workdir / study.__name__.rsplit(".", 1)[1])] if args.workdir else []
        study.main(passes + extra)
        print()
    print(f"all case studies: {time.monotonic() - started:.0f} s; load average {load} before, {load_average()} after")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
