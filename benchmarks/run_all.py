"""Run every benchmark in turn (each starts its own server process) and print a summary table."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCHMARKS = ("command_round_trip", "fanout", "ingest", "history")


def main() -> int:
    names = sys.argv[1:] or list(BENCHMARKS)
    summaries = []
    with tempfile.TemporaryDirectory(prefix="runsteer-bench-summary-") as tmp:
        for name in names:
            summary_path = Path(tmp) / f"{name}.json"
            command = [sys.executable, "-m", f"benchmarks.{name}", "--summary-json", str(summary_path)]
            print(f"$ {' '.join(command[1:3])}", flush=True)
            started = time.perf_counter()
            finished = subprocess.run(command, cwd=Path(__file__).resolve().parent.parent, check=False)
            took = time.perf_counter() - started
            print(flush=True)
            if finished.returncode != 0 or not summary_path.exists():
                summaries.append(
                    {
                        "benchmark": name,
                        "figure": f"FAILED (exit {finished.returncode})",
                        "target": "",
                        "met": None,
                        "took": took,
                    }
                )
                continue
            summaries.append({**json.loads(summary_path.read_text()), "took": took})
    width = max(len(s["benchmark"]) for s in summaries)
    print(f"{'benchmark':<{width}}  {'target':<22} {'met':<5} {'took':>6}  figure")
    for s in summaries:
        met = {True: "yes", False: "NO", None: "-"}[s["met"]]
        print(f"{s['benchmark']:<{width}}  {s['target']:<22} {met:<5} {s['took']:>5.0f}s  {s['figure']}")
    return 0 if all(s["met"] is not None for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
