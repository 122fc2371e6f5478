"""Case study 3: a data-mix change mid-run (arithmetic dropped from the mix), against the same run without it.

`.venv/bin/python -m benchmarks.case_studies.data_mix_change` prints each domain's eval loss before and after.
"""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks._common import load_average
from benchmarks.case_studies._harness import (
    SCRIPT_SOURCE,
    RunOutcome,
    RunSpec,
    conditions,
    parser,
    picture,
    run_all,
    table,
)
from protocols.commands import SetDataMix

STEPS = 500
DOMAINS = ("prose", "code", "arithmetic")
NEW_MIX = {"prose": 1.0, "code": 1.0, "arithmetic": 0.0}
"""From an even mix of the three domains to prose and code only."""


def study(
    steps: int, parallel: int, rules: Path | None = None, workdir: Path | None = None
) -> tuple[list[RunOutcome], str]:
    """Run the two and return their outcomes and the conditions line."""
    started, load = time.monotonic(), load_average()
    change = change_step(steps)
    command = (change, SetDataMix(weights=NEW_MIX), "case study: stop training on arithmetic")
    specs = [
        RunSpec("even mix throughout", "mix-even", steps),
        RunSpec(f"arithmetic dropped at step {change}", "mix-change", steps, script=(command,)),
    ]
    outcomes = run_all(specs, parallel=parallel, rules=rules, workdir=workdir)
    return outcomes, conditions(started, load, outcomes, parallel)


def change_step(steps: int) -> int:
    """The step the mix changes at: right after the run's mid-run evaluation (cpu-tiny evaluates every 250)."""
    return steps // 2


def report(outcomes: list[RunOutcome]) -> str:
    """The table: eval loss per domain at the evaluation before the change and at the end of each run."""
    rows = []
    for outcome in outcomes:
        before_step = max(step for step in outcome.eval_loss if step < change_step(outcome.spec.steps))
        after_step = max(outcome.eval_loss)
        changed = [r for r in outcome.commands if r.source == SCRIPT_SOURCE and r.status == "applied"]
        label = outcome.spec.label + (f" (applied at step {changed[0].applied_step})" if changed else "")
        before, after = outcome.eval_loss[before_step], outcome.eval_loss[after_step]
        cells = [f"{before[f'eval_loss/{d}']:.3f} → {after[f'eval_loss/{d}']:.3f}" for d in DOMAINS]
        mean = f"{before['eval_loss']:.3f} → {after['eval_loss']:.3f}"
        rows.append((label, f"{before_step} → {after_step}", *cells, mean))
    return table(["run", "eval at steps", *(f"{d} eval loss" for d in DOMAINS), "mean"], rows)


def main(argv: list[str] | None = None) -> int:
    """Run case study 3 and print its table."""
    args = parser(__doc__.splitlines()[0], STEPS).parse_args(argv)
    outcomes, said = study(args.steps, args.parallel, args.rules, args.workdir)
    print(f"case study 3: data-mix change mid-run ({args.steps} steps, cpu-tiny, seed 0)")
    print(report(outcomes))
    print(said)
    picture(outcomes, args.plots, "data_mix_change", f"Data-mix change ({args.steps} steps, cpu-tiny, seed 0)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
