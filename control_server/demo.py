"""`runsteer demo`: the control server, the built-in training run, the rule agent and the dashboard.

Each part runs as its own process, talking only through the server's public API, exactly as
they would when started by hand; this module only starts them, prints where to look, and
stops them all on Ctrl-C (or when the training run ends, with `--exit-when-done`).
"""

from __future__ import annotations

import argparse
import importlib.util
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from protocols.client import Client
from protocols.errors import RunsteerError

RUN_NAME = "demo"


@dataclass
class Part:
    """One process of the demo."""

    name: str
    module: str
    """The module whose `main` this part runs; the part is skipped when it is not installed."""
    args: list[str]
    process: subprocess.Popen[bytes] | None = None


def available(module: str) -> bool:
    """True when `module` can be imported in this installation."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def start(part: Part, log_dir: Path) -> None:
    """Start a part with its output in `log_dir/<name>.log`."""
    command = [sys.executable, "-m", "protocols.entry", *part.args]
    with open(log_dir / f"{part.name}.log", "ab") as log:  # the child keeps its own copy of the descriptor
        part.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def wait_for_port(port_file: Path, server: Part, timeout_s: float = 30.0) -> int:
    """The server's port once it listens."""
    deadline = time.monotonic() + timeout_s
    while not port_file.exists():
        if server.process is not None and server.process.poll() is not None:
            raise RuntimeError("the server exited during start-up; see its log")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start within {timeout_s:g} s")
        time.sleep(0.05)
    return int(port_file.read_text())


def wait_for_run(url: str, timeout_s: float = 120.0) -> str | None:
    """The run id of the demo's training run once it registered."""
    deadline = time.monotonic() + timeout_s
    with Client(url) as client:
        while time.monotonic() < deadline:
            try:
                runs = [run for run in client.list_runs() if run.name == RUN_NAME and run.status == "running"]
            except RunsteerError:
                runs = []
            if runs:
                return runs[0].run_id
            time.sleep(0.2)
    return None


def stop_all(parts: list[Part]) -> None:
    """SIGTERM every part (newest first), then SIGKILL what has not exited after 10 s."""
    for part in reversed(parts):
        if part.process is not None and part.process.poll() is None:
            part.process.send_signal(signal.SIGTERM)
    for part in reversed(parts):
        if part.process is not None:
            try:
                part.process.wait(10)
            except subprocess.TimeoutExpired:
                part.process.kill()


def main(argv: list[str] | None = None) -> int:
    """Entry point of `runsteer demo`."""
    parser = argparse.ArgumentParser(prog="runsteer demo", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=8765, help="control server port (default %(default)s)")
    parser.add_argument("--dashboard-port", type=int, default=8501, help="dashboard port (default %(default)s)")
    parser.add_argument("--data-dir", type=Path, default=Path("runsteer-data"), help="store, checkpoints and logs")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    parser.add_argument("--exit-when-done", action="store_true", help="stop everything when the training run ends")
    parser.add_argument(
        "--fault-at",
        type=int,
        default=300,
        help="poison this batch (it trains at 100x the lr) so the rule agent has a spike to roll back; 0: none "
        "(default %(default)s)",
    )
    args = parser.parse_args(argv)
    data_dir: Path = args.data_dir
    log_dir = data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    port_file = data_dir / "server.port"
    port_file.unlink(missing_ok=True)
    server = Part(
        "server",
        "control_server.cli",
        [
            "server",
            "--port",
            str(args.port),
            "--db",
            str(data_dir / "runsteer.db"),
            "--port-file",
            str(port_file),
        ],
    )
    parts = [server]
    try:
        start(server, log_dir)
        port = wait_for_port(port_file, server)
        url = f"http://127.0.0.1:{port}"
        print(f"runsteer demo: control server at {url} (logs in {log_dir})", flush=True)
        trainer = Part(
            "trainer",
            "trainer.cli",
            [
                "train",
                "--server",
                url,
                "--run-name",
                RUN_NAME,
                "--checkpoint-dir",
                str(data_dir / "checkpoints"),
                *(["--steps", str(args.steps)] if args.steps else []),
                *(["--inject-spike", str(args.fault_at)] if args.fault_at else []),
            ],
        )
        training = available(trainer.module)
        if training:
            start(trainer, log_dir)
            parts.append(trainer)
            run_id = wait_for_run(url)
            print(
                f"runsteer demo: training run {run_id} (follow it: runsteer watch {run_id} --server {url})", flush=True
            )
            if args.fault_at:
                print(
                    f"runsteer demo: batch {args.fault_at} is poisoned; watch the rule agent roll it back", flush=True
                )
            if run_id is not None:
                for part in (
                    Part("agent", "agents.cli", ["agent", "rules", "--run", run_id, "--server", url, "--mode", "act"]),
                    Part(
                        "dashboard",
                        "dashboard.cli",
                        [
                            "dashboard",
                            "--server",
                            url,
                            "--port",
                            str(args.dashboard_port),
                        ],
                    ),
                ):
                    if available(part.module):
                        start(part, log_dir)
                        parts.append(part)
                        print(f"runsteer demo: started the {part.name}", flush=True)
            if any(part.name == "dashboard" for part in parts):
                print(f"runsteer demo: dashboard at http://127.0.0.1:{args.dashboard_port}", flush=True)
        print("runsteer demo: running; Ctrl-C stops everything", flush=True)
        while True:
            time.sleep(0.5)
            if server.process is not None and server.process.poll() is not None:
                print("runsteer demo: the server exited; see its log", file=sys.stderr)
                return 1
            if args.exit_when_done and training and trainer.process is not None and trainer.process.poll() is not None:
                print(f"runsteer demo: the training run ended (exit code {trainer.process.returncode})", flush=True)
                return trainer.process.returncode
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:
        print(f"runsteer demo: {exc}", file=sys.stderr)
        return 1
    finally:
        stop_all(parts)
