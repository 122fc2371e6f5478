"""`runsteer dashboard` never leaves its Streamlit child behind: not on SIGTERM, not when killed outright."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.polling import wait_until

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def children(pid: int) -> list[int]:
    """The direct children of `pid`, from /proc."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads child processes from Linux's /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_stopping_runsteer_dashboard_stops_its_streamlit_app(tmp_path: Path, signum: signal.Signals) -> None:
    """Once the dashboard serves, SIGTERM (or SIGKILL) to `runsteer dashboard` ends the Streamlit process too."""
    port = free_port()
    with open(tmp_path / "dashboard.log", "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "protocols.entry",
                "dashboard",
                "--server",
                "http://127.0.0.1:9",
                "--port",
                str(port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    streamlit: list[int] = []
    try:
        wait_until(lambda: healthy(port), 60.0, "the dashboard to serve")
        streamlit = children(process.pid)
        assert len(streamlit) == 1
        os.kill(process.pid, signum)
        process.wait(30)
        wait_until(lambda: not alive(streamlit[0]), 15.0, "the Streamlit child to end")
    finally:
        for pid in [process.pid, *streamlit]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        process.wait(30)
