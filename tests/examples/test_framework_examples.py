"""The Hugging Face and Lightning examples run as they are, as programs, against a real server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from protocols.client import Client

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "run_name"), [("hf_finetune.py", "hf-finetune"), ("lightning_run.py", "lightning-run")]
)
def test_framework_example_trains_a_steered_run_to_the_end(script: str, run_name: str, server_url: str) -> None:
    """The example registers its run, records a loss every step and leaves the run finished."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--server", server_url, "--steps", "3"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert ": 3 steps" in result.stdout
    with Client(server_url) as client:
        (run,) = [run for run in client.list_runs() if run.name == run_name]
        history = client.metrics_history(run.run_id, keys=["loss", "lr"])
    assert run.status == "finished"
    assert history.series["loss"].steps == [0, 1, 2] and history.series["lr"].steps[:3] == [0, 1, 2]
