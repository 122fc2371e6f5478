"""Shared pieces of the case studies: real `runsteer train` and `runsteer agent rules` processes beside a server
process, and what a finished run's history says (final eval loss, rollbacks, steps redone, batches skipped)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks._common import REPO, Server, load_average
from protocols.client.sync import Client
from protocols.commands import Command, CommandRecord, Stop

AGENT_SOURCE = "agent:rules"
"""The `source` of the rule agent's commands (its default name)."""
SEED = 0
"""Every case study trains the same model on the same data order (`runsteer train --seed`)."""
SCRIPT_SOURCE = "script:case-study"
"""The `source` of the commands a case study sends itself at a fixed step."""
THREADS = "1"
"""Torch threads per training process, so that two runs side by side each get one of the two cores."""


def number(record: CommandRecord, key: str) -> float:
    """A numeric field of a command's effective values (0 when absent)."""
    value = (record.effective or {}).get(key)
    return float(value) if isinstance(value, int | float) else 0.0


@dataclass
class RunSpec:
    """One `runsteer train` process of a case study, optionally watched by the rule agent in act mode."""

    label: str
    name: str
    steps: int
    lr: float | None = None
    steered: bool = False
    inject_spike: int | None = None
    script: Sequence[tuple[int, Command, str]] = ()
    """(step, command, reason): sent by a script through the client once the run reports that step."""


@dataclass
class RunOutcome:
    """What a finished run left on the server."""

    spec: RunSpec
    run_id: str
    branch: str
    step: int
    eval_loss: dict[int, dict[str, float]]
    """Evaluations on the final branch's lineage: step -> {`eval_loss`, `eval_loss/<domain>`}."""
    loss: dict[int, float]
    """Training loss of each step on the final branch's lineage."""
    commands: list[CommandRecord]
    step_ms: float
    """Median wall time of one training step."""
    wall_s: float
    agent_log: str = ""
    branches: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)
    """Every branch the run trained, final or thrown away: `loss`, `lr` and `eval_loss` by step, as trained there."""
    parents: dict[str, tuple[str, int]] = field(default_factory=dict)
    """branch -> (the branch it forked from, the step it started at)."""

    @property
    def final_eval(self) -> float:
        """`eval_loss` at the last evaluation (NaN when the run never evaluated)."""
        return self.eval_loss[max(self.eval_loss)]["eval_loss"] if self.eval_loss else float("nan")

    def agent_commands(self) -> list[CommandRecord]:
        """The agent's commands, in `seq` order."""
        return [record for record in self.commands if record.source == AGENT_SOURCE]

    def applied(self, command_type: str) -> list[CommandRecord]:
        """The agent's commands of one type that the trainer applied."""
        return [r for r in self.agent_commands() if r.command.type == command_type and r.status == "applied"]

    @property
    def trained_steps(self) -> int:
        """Steps trained on every branch, the thrown-away ones included: the compute the run used."""
        return sum(len(series.get("lr", {})) for series in self.branches.values())

    @property
    def steps_redone(self) -> int:
        """Steps trained and then thrown away (by rollbacks): all trained steps less those of the final lineage."""
        return self.trained_steps - len(self.lineage_steps())

    def lineage_steps(self) -> set[int]:
        """The steps of the final branch's lineage (`lr` is recorded even when the loss is not finite)."""
        steps: set[int] = set()
        for branch, first, last in lineage_of(self.parents, self.branch):
            steps |= {s for s in self.branches.get(branch, {}).get("lr", {}) if first <= s <= last}
        return steps

    @property
    def batches_skipped(self) -> int:
        """Batches the agent's rollbacks skipped."""
        return round(sum(number(record, "skipped_batches") for record in self.applied("rollback")))

    def interventions(self) -> str:
        """The agent's applied commands, one short phrase each."""
        words = []
        for record in self.agent_commands():
            if record.status != "applied":
                words.append(f"{record.command.type} {record.status}")
            elif record.command.type == "rollback":
                effective = record.effective or {}
                words.append(
                    f"rollback {effective['from_step']}->{effective['step']} skip {effective['skipped_batches']}"
                )
            elif record.command.type == "set_hparams":
                words.append(f"lr {number(record, 'lr'):.2g} @{record.applied_step}")
            else:
                words.append(f"{record.command.type} @{record.applied_step}")
        return ", ".join(words) or "none"


@dataclass
class Launched:
    """A training process, and its agent process when steered."""

    spec: RunSpec
    trainer: subprocess.Popen[bytes]
    stdout: Path
    agent: subprocess.Popen[bytes] | None = None
    agent_log: Path | None = None
    run_id: str = ""
    started: float = field(default_factory=time.monotonic)
    scripted: int = 0
    """How many of the spec's scripted commands were sent."""
    paused_since: float | None = None


class ServerProcess(Server):
    """`python -m control_server` on a free loopback port, its log file closed in this process once handed over."""

    def start(self, timeout_s: float = 30.0) -> ServerProcess:
        """Start the process and wait until it listens."""
        command = [
            sys.executable,
            "-m",
            "control_server",
            "--port",
            "0",
            "--db",
            str(self.db),
            "--port-file",
            str(self.port_file),
        ]
        self.port_file.unlink(missing_ok=True)  # a kept workdir holds the port of its last server
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env())
        deadline = time.monotonic() + timeout_s
        while not self.port_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start (exit {self.process.poll()}):\n{self.log()}")
            time.sleep(0.05)
        self.port = int(self.port_file.read_text())
        return self


def env() -> dict[str, str]:
    """The environment of the child processes: one torch thread each, the repository importable."""
    return {**os.environ, "OMP_NUM_THREADS": THREADS, "MKL_NUM_THREADS": THREADS, "PYTHONPATH": str(REPO)}


def runsteer(*args: str) -> list[str]:
    """The `runsteer` command line with this interpreter."""
    return [sys.executable, "-m", "protocols.entry", *args]


def launch(server: Server, spec: RunSpec, workdir: Path, rules: Path | None = None) -> Launched:
    """Start `runsteer train` for `spec` and, when steered, `runsteer agent rules --mode act` on its run."""
    out = workdir / f"{spec.name}.out"
    args = [
        "train",
        "--server",
        server.url,
        "--run-name",
        spec.name,
        "--steps",
        str(spec.steps),
        "--seed",
        str(SEED),
        "--device",
        "cpu",
        "--checkpoint-dir",
        str(workdir / f"{spec.name}.ckpt"),
        "--quiet",
    ]
    if spec.lr is not None:
        args += ["--lr", repr(spec.lr)]
    if spec.inject_spike is not None:
        args += ["--inject-spike", str(spec.inject_spike)]
    with open(out, "wb") as stdout, open(workdir / f"{spec.name}.log", "wb") as stderr:
        trainer = subprocess.Popen(runsteer(*args), cwd=REPO, stdout=stdout, stderr=stderr, env=env())
    launched = Launched(spec, trainer, out)
    launched.run_id = _run_id(launched)
    if spec.steered:
        launched.agent_log = workdir / f"{spec.name}.agent.log"
        agent_args = [
            "agent",
            "rules",
            "--run",
            launched.run_id,
            "--server",
            server.url,
            "--mode",
            "act",
            "--tick",
            "1",
        ]
        if rules is not None:
            agent_args += ["--rules", str(rules)]
        with open(launched.agent_log, "wb") as log:
            launched.agent = subprocess.Popen(runsteer(*agent_args), cwd=REPO, stdout=log, stderr=log, env=env())
    return launched


def _run_id(launched: Launched, timeout_s: float = 120.0) -> str:
    """The run id from the trainer's first line (`run <id> on <server>: ...`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = launched.stdout.read_text() if launched.stdout.exists() else ""
        if text.startswith("run ") and "\n" in text:
            run_id = text.split()[1]
            if run_id != "(not":
                return run_id
        if launched.trainer.poll() is not None:
            break
        time.sleep(0.1)
    log = launched.stdout.with_suffix(".log")
    raise RuntimeError(f"{launched.spec.name}: no run id from the trainer:\n{log.read_text()[-3000:]}")


def finish(server: Server, launched: Launched, timeout_s: float = 900.0) -> RunOutcome:
    """Wait for the trainer (and its agent) to end; read the run's outcome from the server."""
    if launched.trainer.wait(timeout_s) != 0:
        log = launched.stdout.with_suffix(".log").read_text()[-3000:]
        raise RuntimeError(f"{launched.spec.name}: trainer exited with {launched.trainer.returncode}:\n{log}")
    wall_s = time.monotonic() - launched.started
    agent_log = ""
    if launched.agent is not None:
        try:
            launched.agent.wait(30)
        except subprocess.TimeoutExpired:
            launched.agent.terminate()
            launched.agent.wait(30)
        assert launched.agent_log is not None
        agent_log = launched.agent_log.read_text(errors="replace")
    return outcome(server.url, launched.spec, launched.run_id, wall_s, agent_log)


def outcome(url: str, spec: RunSpec, run_id: str, wall_s: float = 0.0, agent_log: str = "") -> RunOutcome:
    """A finished run's evaluations (along its final branch's lineage), commands and step time."""
    with Client(url) as client:
        run = client.get_run(run_id)
        commands = client.list_commands(run_id, limit=10_000)
        saved_on = {c.checkpoint_id: c.branch for c in client.list_checkpoints(run_id)}
        parents = forks(commands, saved_on)
        lineage = {branch: (first, last) for branch, first, last in lineage_of(parents, run.branch)}
        evals: dict[int, dict[str, float]] = {}
        losses: dict[int, float] = {}
        times: list[float] = []
        trained: dict[str, dict[str, dict[int, float]]] = {}
        for branch in run.branches:
            history = client.metrics_history(run_id, branch=branch)
            first, last = lineage.get(branch, (1, 0))
            for key, series in history.series.items():
                points = dict(zip(series.steps, series.values, strict=True))
                if key in PLOTTED:
                    trained.setdefault(branch, {})[key] = points
                for step, value in points.items():
                    if not first <= step <= last:
                        continue
                    if key.startswith("eval_loss"):
                        evals.setdefault(step, {})[key] = value
                    elif key == "loss":
                        losses[step] = value
                    elif key == "step_time_ms":
                        times.append(value)
    times.sort()
    return RunOutcome(
        spec=spec,
        run_id=run_id,
        branch=run.branch,
        step=run.step,
        eval_loss=evals,
        loss=losses,
        commands=commands,
        step_ms=times[len(times) // 2] if times else float("nan"),
        wall_s=wall_s,
        agent_log=agent_log,
        branches=trained,
        parents=parents,
    )


PLOTTED = ("loss", "lr", "eval_loss")
"""The series kept of every branch, for the compute count and the pictures."""


def forks(commands: list[CommandRecord], saved_on: dict[str, str]) -> dict[str, tuple[str, int]]:
    """branch -> (parent branch, fork step) from the applied rollbacks; the parent is the branch the checkpoint
    was saved on (another branch than the one left when a probe goes back to its best branch's end)."""
    parents: dict[str, tuple[str, int]] = {}
    for record in commands:
        if record.command.type == "rollback" and record.status == "applied" and record.effective:
            effective = record.effective
            parent = saved_on.get(str(effective.get("checkpoint_id")), str(effective["from_branch"]))
            parents[str(effective["branch"])] = (parent, int(number(record, "step")))
    return parents


def lineage_of(parents: dict[str, tuple[str, int]], final: str) -> list[tuple[str, int, int]]:
    """(branch, first step, last step) of each stretch that leads to `final`, oldest first."""
    stretches: list[tuple[str, int, int]] = []
    branch, start, end = final, 0, 10**9
    while branch in parents:
        parent, fork = parents[branch]
        stretches.append((branch, fork, end))
        branch, end = parent, fork - 1
    stretches.append((branch, start, end))
    return stretches[::-1]


def run_all(
    specs: Sequence[RunSpec], *, parallel: int, rules: Path | None = None, workdir: Path | None = None
) -> list[RunOutcome]:
    """Train every spec against one fresh server process, at most `parallel` at a time; outcomes in spec order.

    Logs, the database and checkpoints go to `workdir` when given (kept), else to a temporary directory."""
    outcomes: dict[str, RunOutcome] = {}
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    with ServerProcess(workdir) as server:
        workdir = server.dir
        waiting = list(specs)
        running: list[Launched] = []
        while waiting or running:
            while waiting and len(running) < parallel:
                running.append(launch(server, waiting.pop(0), workdir, rules))
            for item in running:
                send_script(server, item)
                stop_if_held(server, item)
            done = next((item for item in running if item.trainer.poll() is not None), None)
            if done is None:
                time.sleep(0.1)
                continue
            running.remove(done)
            outcomes[done.spec.name] = finish(server, done)
    return [outcomes[spec.name] for spec in specs]


def finished_outcomes(workdir: Path, specs: Sequence[RunSpec]) -> list[RunOutcome]:
    """The outcomes of runs an earlier `run_all` trained in the kept `workdir`, found by name; every spec's run
    must have finished all its steps there."""
    with ServerProcess(workdir) as server, Client(server.url) as client:
        runs = {run.name: run for run in client.list_runs()}
        found = []
        for spec in specs:
            run = runs.get(spec.name)
            if run is None or run.status != "finished" or run.step + 1 < spec.steps:
                state = "missing" if run is None else f"{run.status} at step {run.step}"
                raise RuntimeError(f"{workdir}: run {spec.name} of {spec.steps} steps is {state}; train it again")
            found.append(outcome(server.url, spec, run.run_id))
        return found


def send_script(server: Server, launched: Launched) -> None:
    """Send the spec's scripted commands whose step the run has reached."""
    script = launched.spec.script
    if launched.scripted == len(script):
        return
    with Client(server.url) as client:
        step = client.get_run(launched.run_id).step
        while launched.scripted < len(script) and script[launched.scripted][0] <= step:
            _, command, reason = script[launched.scripted]
            client.submit(launched.run_id, command, source=SCRIPT_SOURCE, reason=reason)
            launched.scripted += 1


def stop_if_held(server: Server, launched: Launched, patience_s: float = 20.0) -> None:
    """Stop a run that the agent paused for a person (its rollback limit): nobody answers in a case study."""
    if not launched.spec.steered:
        return
    with Client(server.url) as client:
        run = client.get_run(launched.run_id)
        if run.status != "paused":
            launched.paused_since = None
            return
        launched.paused_since = launched.paused_since or time.monotonic()
        if time.monotonic() - launched.paused_since > patience_s:
            client.submit(launched.run_id, Stop(), source=SCRIPT_SOURCE, reason="paused for a person; none here")
            launched.paused_since = float("inf")


def parser(description: str, steps: int) -> argparse.ArgumentParser:
    """Flags every case study takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--plots",
        type=lambda value: Path(value) if value else None,
        default=REPO / "docs",
        help="write the picture (case_study_<name>.png) to this folder, '' for none "
        "(default %(default)s; needs the plots extra, matplotlib)",
    )
    parser.add_argument("--steps", type=int, default=steps, help="steps per run (default %(default)s)")
    parser.add_argument(
        "--parallel",
        type=int,
        default=2,
        help="runs at a time, one torch thread each (default %(default)s, one per core)",
    )
    parser.add_argument("--rules", type=Path, default=None, help="rule file for the agent (the shipped defaults)")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep logs, database and checkpoints here (default: a temporary directory)",
    )
    return parser


def picture(outcomes: Sequence[RunOutcome], folder: Path | None, name: str, title: str) -> None:
    """Draw the study's picture into `folder` (none when None) and say where it went."""
    if folder is None:
        return
    from benchmarks.case_studies.plots import draw  # matplotlib only when a picture is asked for

    print(f"picture: {draw(outcomes, folder / f'case_study_{name}.png', title)}")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table, as pasted into the README."""
    cells = [[str(cell) for cell in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def conditions(started: float, load_before: str, outcomes: Sequence[RunOutcome], parallel: int) -> str:
    """How the figures were taken: load average, cores, runs side by side, step times, wall time."""
    steps = ", ".join(f"{o.spec.label} {o.step_ms:.0f}" for o in outcomes)
    return (
        f"{os.cpu_count()} cores, {parallel} run(s) at a time with {THREADS} torch thread each; load average "
        f"{load_before} before, {load_average()} after; median ms/step: {steps}; "
        f"{time.monotonic() - started:.0f} s in all"
    )


def within(value: float, reference: float) -> str:
    """`value` relative to `reference`, as `+3.1%`."""
    return f"{(value / reference - 1) * 100:+.1f}%"
