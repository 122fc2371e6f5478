"""Case study 2: an injected fault (one batch trained at 100x the learning rate), unsteered and with the rule
agent, against the same run without the fault.

`.venv/bin/python -m benchmarks.case_studies.injected_fault` prints final eval loss and steps lost of each run.
"""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks._common import load_average
from benchmarks.case_studies._harness import RunOutcome, RunSpec, conditions, parser, picture, run_all, table, within

STEPS = 500
FAULT_AT = 0.6
"""Where the poisoned batch sits, as a fraction of the run: late enough that an unsteered run has too few steps
left to heal, which is when a fault costs most (PaLM's spikes came late in the run too)."""


def study(
    steps: int, parallel: int, rules: Path | None = None, workdir: Path | None = None
) -> tuple[list[RunOutcome], str]:
    """Run the three and return their outcomes and the conditions line."""
    started, load = time.monotonic(), load_average()
    fault = fault_batch(steps)
    specs = [
        RunSpec("no fault", "fault-none", steps),
        RunSpec(f"fault at batch {fault}, unsteered", "fault", steps, inject_spike=fault),
        RunSpec(f"fault at batch {fault}, rule agent", "fault-agent", steps, inject_spike=fault, steered=True),
    ]
    outcomes = run_all(specs, parallel=parallel, rules=rules, workdir=workdir)
    return outcomes, conditions(started, load, outcomes, parallel)


def fault_batch(steps: int) -> int:
    """The poisoned batch of a run of `steps` steps."""
    return round(steps * FAULT_AT)


def report(outcomes: list[RunOutcome]) -> str:
    """The table: final eval loss against the run without the fault, steps redone and batches skipped."""
    good = outcomes[0].final_eval
    rows = [
        (
            o.spec.label,
            f"{o.final_eval:.4f}",
            within(o.final_eval, good),
            o.steps_redone,
            o.batches_skipped,
            o.interventions() if o.spec.steered else "",
        )
        for o in outcomes
    ]
    headers = ["run", "final eval loss", "vs no fault", "steps redone", "batches skipped", "agent's commands (applied)"]
    return table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    """Run case study 2 and print its table."""
    args = parser(__doc__.splitlines()[0], STEPS).parse_args(argv)
    outcomes, said = study(args.steps, args.parallel, args.rules, args.workdir)
    print(f"case study 2: injected fault, 100x lr on one batch ({args.steps} steps, cpu-tiny, seed 0)")
    print(report(outcomes))
    print(said)
    title = f"Injected fault: one batch at 100x the learning rate ({args.steps} steps, cpu-tiny, seed 0)"
    picture(outcomes, args.plots, "injected_fault", title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
