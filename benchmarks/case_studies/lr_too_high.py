"""Case study 1: a learning rate 10x too high, unsteered and with the rule agent, against the run at a good one.

`.venv/bin/python -m benchmarks.case_studies.lr_too_high` prints the final eval loss of each run.
"""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks._common import load_average
from benchmarks.case_studies._harness import RunOutcome, RunSpec, conditions, parser, picture, run_all, table, within

GOOD_LR = 3e-3
"""The cpu-tiny preset's learning rate."""
HIGH_LR = 10 * GOOD_LR
STEPS = 500


def study(
    steps: int, parallel: int, rules: Path | None = None, workdir: Path | None = None
) -> tuple[list[RunOutcome], str]:
    """Run the three and return their outcomes and the conditions line."""
    started, load = time.monotonic(), load_average()
    specs = [
        RunSpec("good lr 3e-3", "lr-good", steps, lr=GOOD_LR),
        RunSpec("lr 3e-2, unsteered", "lr-high", steps, lr=HIGH_LR),
        RunSpec("lr 3e-2, rule agent", "lr-high-agent", steps, lr=HIGH_LR, steered=True),
    ]
    outcomes = run_all(specs, parallel=parallel, rules=rules, workdir=workdir)
    return outcomes, conditions(started, load, outcomes, parallel)


def report(outcomes: list[RunOutcome]) -> str:
    """The table: final eval loss of each run against the good run's, and what the agent did."""
    good = outcomes[0].final_eval
    rows = [
        (o.spec.label, f"{o.final_eval:.4f}", within(o.final_eval, good), o.interventions() if o.spec.steered else "")
        for o in outcomes
    ]
    return table(["run", "final eval loss", "vs good lr", "agent's commands (applied)"], rows)


def main(argv: list[str] | None = None) -> int:
    """Run case study 1 and print its table."""
    args = parser(__doc__.splitlines()[0], STEPS).parse_args(argv)
    outcomes, said = study(args.steps, args.parallel, args.rules, args.workdir)
    print(f"case study 1: learning rate 10x too high ({args.steps} steps, cpu-tiny, seed 0)")
    print(report(outcomes))
    print(said)
    picture(outcomes, args.plots, "lr_too_high", f"Learning rate 10x too high ({args.steps} steps, cpu-tiny, seed 0)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
