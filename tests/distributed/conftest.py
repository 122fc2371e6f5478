"""Distributed fixtures: a real server with a short heartbeat timeout, and torchrun jobs that never outlive a test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from control_server.config import ServerConfig
from tests.serving import ServerThread

HEARTBEAT_TIMEOUT_S = 10.0
"""The server marks a run lost after this long without a heartbeat; a dead rank must end the run sooner."""
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    """A real server on 127.0.0.1 whose liveness timeout is short enough to test against."""
    config = ServerConfig(port=0, db=tmp_path / "runsteer.db", heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
    running = ServerThread(config).start()
    yield running
    running.stop()


class Job:
    """One `torchrun --standalone --nproc-per-node N worker.py ...` in its own process group."""

    def __init__(self, process: subprocess.Popen[bytes], out: Path) -> None:
        self.process = process
        self.out = out

    def wait(self, timeout_s: float = 120.0) -> int:
        """Wait for torchrun to end; its output is in `out/torchrun.log`."""
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"torchrun still running after {timeout_s} s:\n{self.log()}") from exc

    def log(self) -> str:
        """The tail of what torchrun and its ranks printed."""
        return (self.out / "torchrun.log").read_text(errors="replace")[-6000:]

    def state(self, rank: int) -> dict[str, Any]:
        """What rank `rank` wrote at the end of a planned run."""
        import torch

        state: dict[str, Any] = torch.load(self.out / f"rank{rank}.pt", weights_only=False)
        return state

    def kill(self) -> None:
        """End torchrun and every rank it started."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)


@pytest.fixture
def torchrun(server: ServerThread, tmp_path: Path) -> Iterator[Callable[..., Job]]:
    """Start the worker under torchrun against the test server; every job is killed at the end of the test."""
    jobs: list[Job] = []

    def start(
        nproc: int,
        *args: str,
        plan: dict[int, list[dict[str, Any]]] | None = None,
        worker: str | None = "worker.py",
    ) -> Job:
        """torchrun on `worker` (a script here), or with `worker=None` the `runsteer train --nproc-per-node` CLI."""
        out = tmp_path / f"job{len(jobs)}"
        out.mkdir()
        extra = [*args, "--server", server.url]
        if plan is not None:
            (out / "plan.json").write_text(json.dumps(plan))
            extra += ["--plan", str(out / "plan.json")]
        if worker is None:
            launcher = [sys.executable, "-m", "protocols.entry", "train", f"--nproc-per-node={nproc}"]
            command = [*launcher, "--checkpoint-dir", str(out / "checkpoints"), *extra]
        else:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
            command = [*launcher, str(Path(__file__).with_name(worker)), "--out", str(out), *extra]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        with open(out / "torchrun.log", "wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        jobs.append(Job(process, out))
        return jobs[-1]

    yield start
    for job in jobs:
        job.kill()
