"""`runsteer train` end to end against a real server."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocols.client import Client
from trainer.cli import main


@pytest.mark.slow
def test_runsteer_train_trains_reports_metrics_and_finishes(server_url: str, client: Client, tmp_path: Path) -> None:
    """A 30-step run registers, stores every step's loss with the health metrics, checkpoints, and ends finished."""
    code = main(
        [
            "--server",
            server_url,
            "--steps",
            "30",
            "--run-name",
            "cli",
            "--quiet",
            "--checkpoint-dir",
            str(tmp_path / "ck"),
        ]
    )
    assert code == 0
    (run,) = [r for r in client.list_runs() if r.name == "cli"]
    assert run.status == "finished"
    history = client.metrics_history(run.run_id, keys=["loss", "grad_norm", "update_ratio", "attn_logit_max/0"])
    assert history.series["loss"].steps == list(range(30))
    assert history.series["loss"].values[-1] < history.series["loss"].values[0]
    assert history.series["attn_logit_max/0"].steps == [0, 10, 20]
    assert history.series["update_ratio"].steps == [0, 10, 20]
    assert all(v > 0 for v in history.series["update_ratio"].values)
    assert any(c.tag == "end" for c in client.list_checkpoints(run.run_id))


def test_runsteer_train_refuses_an_unknown_device_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """A bad --device value exits with status 2, naming the flag, instead of training somewhere unexpected."""
    assert main(["--device", "tpu"]) == 2
    assert "--device must be auto, cpu or cuda" in capsys.readouterr().err
