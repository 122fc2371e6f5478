"""Shared pieces of the benchmarks: a server in its own process, percentiles, RSS, summaries."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dashboard.cli import die_with_parent
from protocols.client.sync import Client
from protocols.policy import Policy, RateLimit
from protocols.records import RunInfo, RunRegistration

REPO = Path(__file__).resolve().parent.parent

UNLIMITED = Policy(rate_limit=RateLimit(max_commands=100_000, per_seconds=1.0))
"""A policy whose rate limit a benchmark never reaches (the default allows 120 commands a minute)."""


class Server:
    """`python -m control_server` on a free loopback port with a fresh SQLite file (or `db`), as a separate process."""

    def __init__(self, workdir: Path | None = None, db: str | None = None, flags: tuple[str, ...] = ()) -> None:
        self._tmp = None if workdir is not None else tempfile.TemporaryDirectory(prefix="runsteer-bench-")
        self.dir = workdir if workdir is not None else Path(self._tmp.name)  # type: ignore[union-attr]
        self.db = self.dir / "bench.db"
        self.db_arg = db or str(self.db)
        self.port_file = self.dir / "bench.port"
        self.log_path = self.dir / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.flags = flags
        """More `runsteer server` flags (e.g. `--event-loop asyncio`)."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 30.0, port: int = 0) -> Server:
        command = [
            sys.executable,
            "-m",
            "control_server",
            "--port",
            str(port),
            "--db",
            self.db_arg,
            "--port-file",
            str(self.port_file),
            *self.flags,
        ]
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            # The server dies with the benchmark, even when the benchmark is killed outright.
            self.process = subprocess.Popen(
                command,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent if sys.platform == "linux" else None,
            )
        deadline = time.monotonic() + timeout_s
        while not self.port_file.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start within {timeout_s} s:\n{self.log()}")
            time.sleep(0.05)
        self.port = int(self.port_file.read_text())
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def rss_mib(self) -> float:
        """The server's resident set size (VmRSS) in MiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def cpu_s(self) -> float:
        """User + system CPU seconds the server has used so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._tmp is not None:
            self._tmp.cleanup()


def register(client: Client, name: str) -> RunInfo:
    """Register a run with a policy the benchmark will not trip."""
    return client.register_run(RunRegistration(name=name, policy=UNLIMITED))


def percentiles_ms(samples_s: list[float]) -> dict[str, float]:
    """p50/p90/p99/max (and mean) of durations given in seconds, in milliseconds."""
    if not samples_s:
        return {"n": 0}
    ordered = sorted(samples_s)
    n = len(ordered)

    def at(q: float) -> float:
        return ordered[min(n - 1, max(0, round(q * (n - 1))))] * 1000

    return {
        "n": n,
        "mean": sum(ordered) / n * 1000,
        "p50": at(0.50),
        "p90": at(0.90),
        "p99": at(0.99),
        "max": ordered[-1] * 1000,
    }


def format_ms(stats: dict[str, float]) -> str:
    if not stats.get("n"):
        return "no samples"
    return (
        f"n={int(stats['n'])}  p50={stats['p50']:.2f}  p90={stats['p90']:.2f}  p99={stats['p99']:.2f}  "
        f"max={stats['max']:.2f}  mean={stats['mean']:.2f} ms"
    )


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--summary-json", type=Path, help="also write the headline figures here (for run_all)")
    return parser


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """`--preset` and `--device` of the built-in run, so a benchmark of it also runs `gpu-small` on a GPU."""
    from trainer.run import PRESETS

    parser.add_argument(
        "--preset", choices=tuple(PRESETS), default="cpu-tiny", help="built-in run preset (%(default)s)"
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="cpu", help="where it trains (default %(default)s)"
    )


def device_name(device: Any) -> str:
    """A torch device as a figure's label: `cpu`, or `cuda:0 (NVIDIA H100 80GB HBM3)`."""
    import torch

    if device.type != "cuda":
        return str(device)
    return f"{device} ({torch.cuda.get_device_name(device)})"


def write_summary(path: Path | None, summary: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(summary, indent=2))
