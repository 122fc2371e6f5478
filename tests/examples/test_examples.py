"""The websocket example scripts work as a third party would run them: as programs, against a real server."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from protocols.client import Client
from tests.scripted_trainer import ScriptedTrainer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def ws(url: str) -> str:
    return url.replace("http://", "ws://")


def run_example(name: str, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=timeout_s
    )


def test_follow_metrics_prints_the_runs_samples(server_url: str) -> None:
    """follow_metrics.py prints one line per metrics sample with loss and lr."""
    with ScriptedTrainer(server_url, step_s=0.02) as trainer:
        result = run_example("follow_metrics.py", trainer.run_id, "--server", ws(server_url), "--count", "5")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 5
    assert all(line.startswith("main@") and "loss=" in line and "lr=" in line for line in lines)


def test_send_command_waits_for_the_trainer_to_apply_it(server_url: str) -> None:
    """send_command.py submits over the websocket and exits 0 once the trainer applied the command."""
    with ScriptedTrainer(server_url, lr=0.01, step_s=0.02) as trainer:
        result = run_example(
            "send_command.py",
            trainer.run_id,
            '{"type": "set_hparams", "lr": 0.002}',
            "--reason",
            "test",
            "--server",
            ws(server_url),
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert '"status": "applied"' in result.stdout
        assert trainer.lr == 0.002


def test_send_command_reports_a_refused_command(server_url: str) -> None:
    """An out-of-range command is refused with the field named, and the script exits non-zero."""
    with ScriptedTrainer(server_url, step_s=0.02) as trainer:
        result = run_example(
            "send_command.py", trainer.run_id, '{"type": "set_hparams", "lr": -1}', "--server", ws(server_url)
        )
    assert result.returncode == 1
    assert "refused" in result.stdout and "command.lr" in result.stdout


def test_grad_spike_agent_halves_the_lr_when_the_grad_norm_spikes(server_url: str) -> None:
    """The 40-line agent sees a 50x grad-norm spike and the trainer ends up with half the learning rate."""
    with ScriptedTrainer(server_url, lr=0.01, step_s=0.02, grad_norm_spikes={60: 50.0}) as trainer:
        agent = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "grad_spike_agent.py"), trainer.run_id, ws(server_url)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 60
            while trainer.lr == 0.01 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            agent.terminate()
            output, _ = agent.communicate(timeout=10)
    assert trainer.lr == 0.005
    assert "grad_norm 50" in output
    with Client(server_url) as client:
        commands = client.list_commands(trainer.run_id)
    assert [(c.source, c.status) for c in commands] == [("agent:grad_spike", "applied")]
