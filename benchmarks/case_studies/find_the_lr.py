"""Case study 4: find the learning rate within one run, against a 5-point fixed-lr sweep.

The steered runs start 10x too low, 10x too high and at the default, each watched by the rule agent with the
shipped rules (their `[lr_probe]` table included). `.venv/bin/python -m benchmarks.case_studies.find_the_lr`
prints the final eval loss of every run, the sweep's best point, each steered run against it and the steps each
trained (thrown-away branches included), and writes docs/case_study_find_the_lr.png.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks._common import load_average
from benchmarks.case_studies._harness import (
    RunOutcome,
    RunSpec,
    conditions,
    finished_outcomes,
    parser,
    picture,
    run_all,
    table,
    within,
)

SWEEP = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
"""The fixed learning rates of the reference sweep (the cpu-tiny default is 3e-3)."""
STEERED: tuple[tuple[str, float | None], ...] = (
    ("steered from 3e-4 (10x too low)", 3e-4),
    ("steered from 3e-2 (10x too high)", 3e-2),
    ("steered from the default 3e-3", None),
)
"""Where the steered runs start: the rule agent with the shipped rules (and their `[lr_probe]` table) watches each."""
STEPS = 500
GOAL_GAP = 0.02
"""Goal: each steered run ends within 2% of the sweep's best final eval loss..."""
GOAL_COMPUTE = 1.25
"""...having trained at most 1.25x the steps of one run (a fifth of the sweep's compute), thrown-away ones included."""


def sweep_specs(steps: int) -> list[RunSpec]:
    """The sweep's runs, unsteered."""
    return [RunSpec(f"sweep lr {lr:g}", f"sweep-{lr:g}", steps, lr=lr) for lr in SWEEP]


def steered_specs(steps: int) -> list[RunSpec]:
    """The steered runs."""
    return [RunSpec(label, f"steered-{lr or 'default'}", steps, lr=lr, steered=True) for label, lr in STEERED]


def study(
    steps: int, parallel: int, rules: Path | None = None, workdir: Path | None = None, sweep_from: Path | None = None
) -> tuple[list[RunOutcome], str]:
    """Run the sweep (or read it from `sweep_from`) and the steered runs; outcomes and the conditions line."""
    started, load = time.monotonic(), load_average()
    if sweep_from is not None:
        sweep = finished_outcomes(sweep_from, sweep_specs(steps))
        steered = run_all(steered_specs(steps), parallel=parallel, rules=rules, workdir=workdir)
        outcomes = sweep + steered
    else:
        outcomes = run_all(sweep_specs(steps) + steered_specs(steps), parallel=parallel, rules=rules, workdir=workdir)
    return outcomes, conditions(started, load, outcomes, parallel)


def best_of(outcomes: Sequence[RunOutcome]) -> RunOutcome:
    """The sweep point with the lowest final eval loss."""
    return min((o for o in outcomes if not o.spec.steered), key=lambda o: o.final_eval)


def met(outcome: RunOutcome, best: RunOutcome) -> bool:
    """Whether a steered run reached the goal: within 2% of the best at no more than 1.25x the steps."""
    return (
        outcome.final_eval <= best.final_eval * (1 + GOAL_GAP)
        and outcome.trained_steps <= GOAL_COMPUTE * outcome.spec.steps
    )


def report(outcomes: Sequence[RunOutcome]) -> str:
    """The table (every run against the sweep's best) and a line per goal."""
    best = best_of(outcomes)
    rows = []
    for o in outcomes:
        start = f"{o.spec.lr:g}" if o.spec.lr is not None else "3e-3 (default)"
        compute = f"{o.trained_steps} ({o.trained_steps / o.spec.steps:.2f}x)"
        goal = ("met" if met(o, best) else "not met") if o.spec.steered else ("best" if o is best else "")
        commands = o.interventions() if o.spec.steered else ""
        rows.append(
            (o.spec.label, start, f"{o.final_eval:.4f}", within(o.final_eval, best.final_eval), compute, goal, commands)
        )
    headers = ["run", "start lr", "final eval loss", "vs sweep best", "steps trained", "goal", "agent's commands"]
    sweep_steps = sum(o.trained_steps for o in outcomes if not o.spec.steered)
    default = next((o for o in outcomes if o.spec.steered and o.spec.lr is None), None)
    unsteered_default = next((o for o in outcomes if not o.spec.steered and o.spec.lr == 3e-3), None)
    lines = [
        table(headers, rows),
        "",
        f"best sweep point: lr {best.spec.lr:g}, final eval loss {best.final_eval:.4f}; the sweep trained "
        f"{sweep_steps} steps",
    ]
    if default is not None and unsteered_default is not None:
        lines.append(
            f"default start: steered {default.final_eval:.4f} vs unsteered {unsteered_default.final_eval:.4f} "
            f"({within(default.final_eval, unsteered_default.final_eval)})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run case study 4, print its table and write its picture."""
    args_parser = parser(__doc__.splitlines()[0], STEPS)
    args_parser.add_argument(
        "--sweep-from",
        type=Path,
        default=None,
        help="read the finished sweep from the --workdir of an earlier run of this study (same --steps) instead of "
        "training it again",
    )
    args = args_parser.parse_args(argv)
    outcomes, said = study(args.steps, args.parallel, args.rules, args.workdir, args.sweep_from)
    print(f"case study 4: find the learning rate ({args.steps} steps, cpu-tiny, seed 0)")
    print(report(outcomes))
    print(said)
    title = f"Find the learning rate: a 5-point sweep and 3 steered runs ({args.steps} steps, cpu-tiny, seed 0)"
    picture(outcomes, args.plots, "find_the_lr", title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
