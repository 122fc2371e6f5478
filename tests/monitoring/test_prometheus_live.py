"""A real Prometheus scrapes a real runsteer server during a run, finds its loss and fires the shipped alerts."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from control_server.auth import TokenEntry, TokenTable
from control_server.config import ServerConfig
from protocols.client import Client
from tests.polling import wait_until
from tests.serving import ServerThread

DOCKER = Path(__file__).resolve().parents[2] / "docker"
TRAINER_TOKEN = "trainer-token-0123456789"
PROMETHEUS_TOKEN = "prometheus-token-0123456789"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def secured_server(tmp_path: Path) -> Iterator[ServerThread]:
    """A server that demands tokens, so Prometheus must send its bearer token."""
    tokens = TokenTable(
        [
            TokenEntry(name="trainer", token=TRAINER_TOKEN, scopes=frozenset({"train", "read", "command"})),
            TokenEntry(name="prometheus", token=PROMETHEUS_TOKEN, scopes=frozenset({"read"})),
        ]
    )
    running = ServerThread(ServerConfig(port=0, db=tmp_path / "runsteer.db"), tokens).start()
    yield running
    running.stop()


@pytest.fixture
def prometheus(tmp_path: Path, secured_server: ServerThread) -> Iterator[str]:
    """Debian's Prometheus with the shipped alert rules, scraping the server every second."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus not found: `python3 dev.py test` installs Debian's prometheus package (as root)"
    (tmp_path / "token").write_text(PROMETHEUS_TOKEN)
    shutil.copy(DOCKER / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [
            {
                "job_name": "runsteer",
                "authorization": {"type": "Bearer", "credentials_file": str(tmp_path / "token")},
                "static_configs": [{"targets": [f"127.0.0.1:{secured_server.port}"]}],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(json.dumps(config))
    port = free_port()
    with open(tmp_path / "prometheus.log", "wb") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: _ready(url),
            60,
            f"Prometheus did not become ready: {(tmp_path / 'prometheus.log').read_text()[-2000:]}",
        )
        yield url
    finally:
        process.terminate()
        process.wait(30)


def _ready(url: str) -> bool:
    try:
        return urllib.request.urlopen(f"{url}/-/ready", timeout=2).status == 200
    except OSError:
        return False


def query(prometheus: str, expression: str) -> list[dict[str, Any]]:
    target = f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': expression})}"
    answer = json.loads(urllib.request.urlopen(target, timeout=5).read())
    assert answer["status"] == "success"
    return list(answer["data"]["result"])


def firing_alerts(prometheus: str) -> set[str]:
    answer = json.loads(urllib.request.urlopen(f"{prometheus}/api/v1/alerts", timeout=5).read())
    return {alert["labels"]["alertname"] for alert in answer["data"]["alerts"] if alert["state"] == "firing"}


@pytest.mark.slow
def test_prometheus_scrapes_a_training_runs_loss_and_fires_the_non_finite_alert(
    secured_server: ServerThread, prometheus: str, tmp_path: Path
) -> None:
    """During a real training run Prometheus, authenticating with its token, stores the run's loss series;
    a poisoned batch that drives the run non-finite fires the shipped alert."""
    command = [
        sys.executable,
        "-m",
        "protocols.entry",
        "train",
        "--server",
        secured_server.url,
        "--token",
        TRAINER_TOKEN,
        "--run-name",
        "scraped",
        "--steps",
        "80",
        "--inject-spike",
        "30",
        "--spike-factor",
        "1e6",
        "--quiet",
        "--checkpoint-dir",
        str(tmp_path / "checkpoints"),
    ]
    with open(tmp_path / "trainer.log", "wb") as log:
        trainer = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        series = wait_until(lambda: query(prometheus, 'runsteer_train_loss{run_name="scraped"}'), 90, "no loss series")
        assert series[0]["metric"]["branch"] == "main"
        assert series[0]["metric"]["run_id"].startswith("scraped")
        wait_until(lambda: "RunsteerNonFiniteLoss" in firing_alerts(prometheus), 90, "the non-finite alert never fired")
    finally:
        trainer.terminate()
        trainer.wait(30)
    with Client(secured_server.url, token=TRAINER_TOKEN) as client:
        run = next(run for run in client.list_runs() if run.name == "scraped")
        history = client.metrics_history(run.run_id, keys=["loss"])
    assert history.series["loss"].steps[0] == 0
