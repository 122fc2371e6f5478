"""`runsteer demo`, the README's first command, brings up every part and trains a real run to the end."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.slow
def test_demo_starts_server_trainer_agent_and_dashboard_and_finishes_the_run(tmp_path: Path) -> None:
    """The demo starts all four parts, the run trains to its last step, and everything stops cleanly."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "protocols.entry",
            "demo",
            "--data-dir",
            str(tmp_path),
            "--port",
            "0",
            "--dashboard-port",
            str(free_port()),
            "--steps",
            "40",
            "--exit-when-done",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for line in ("control server at", "training run", "started the agent", "started the dashboard"):
        assert line in result.stdout
    logs = tmp_path / "logs"
    assert "done: 40 steps trained" in (logs / "trainer.log").read_text()
    assert "watching run" in (logs / "agent.log").read_text()
    assert "You can now view your Streamlit app" in (logs / "dashboard.log").read_text()
    assert (tmp_path / "runsteer.db").exists()
