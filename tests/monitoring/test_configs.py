"""The compose stack's configuration agrees with the code: flags exist, files exist, metric names are real."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from control_server.prometheus import TRAINING_GAUGES
from protocols import MetricsBatch, MetricsSample
from protocols.client import Client
from protocols.client.core import ServerList
from protocols.entry import SUBCOMMANDS
from tests.scripted_trainer import ScriptedTrainer

DOCKER = Path(__file__).resolve().parents[2] / "docker"
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())
ALERTS = yaml.safe_load((DOCKER / "prometheus" / "alerts.yml").read_text())
DASHBOARD = __import__("json").loads((DOCKER / "grafana" / "dashboards" / "runsteer.json").read_text())


def exposed_sample_names(server_url: str) -> set[str]:
    """Every sample name the server exposes once a run has reported every training metric."""
    with ScriptedTrainer(server_url) as trainer, Client(server_url) as client:
        values = {key: 1.0 for key in TRAINING_GAUGES if key != "nonfinite"} | {"step_time_ms": 20.0}
        client.push_metrics(
            trainer.run_id, MetricsBatch(samples=[MetricsSample(step=10**6, time=time.time(), values=values)])
        )
        client.submit(trainer.run_id, {"type": "pause"}, wait=True, timeout_s=10)
        text = urllib.request.urlopen(f"{server_url}/metrics").read().decode()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def referenced_names(expressions: list[str]) -> set[str]:
    return {name for expression in expressions for name in re.findall(r"\brunsteer_[a-z_]+\b", expression)}


def test_compose_brings_up_every_part_of_the_stack() -> None:
    """Two servers on PostgreSQL, dashboard, trainer, rule agent, Prometheus and Grafana are all services."""
    assert set(COMPOSE["services"]) == {
        "postgres",
        "server",
        "server-b",
        "dashboard",
        "trainer",
        "agent",
        "prometheus",
        "grafana",
    }


def test_compose_servers_share_postgres_and_every_client_knows_both() -> None:
    """Both servers store in the compose PostgreSQL; dashboard, trainer, agent and Prometheus name both servers."""
    from control_server.cli import build_parser, config_from_args
    from control_server.store import is_postgres_url

    services = COMPOSE["services"]
    databases = set()
    for name in ("server", "server-b"):
        config = config_from_args(build_parser().parse_args(services[name]["command"][2:]))
        assert is_postgres_url(config.db), name
        assert "@postgres:5432/" in str(config.db) and services[name]["depends_on"]["postgres"]
        databases.add(config.db)
    assert len(databases) == 1, "one database, shared"
    for name in ("dashboard", "trainer", "agent"):
        command = services[name]["command"]
        urls = ServerList(command[command.index("--server") + 1]).urls
        assert urls == ["http://server:8765", "http://server-b:8765"], name
    scrape = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == ["server:8765", "server-b:8765"]


def test_compose_runsteer_commands_are_real_subcommands() -> None:
    """Every `runsteer X` a service runs is a subcommand of the CLI, and the server flags parse."""
    from control_server.cli import build_parser

    for name, service in COMPOSE["services"].items():
        command = service.get("command", [])
        if command[:1] == ["runsteer"]:
            assert command[1] in SUBCOMMANDS, name
            if command[1] == "server":
                build_parser().parse_args(command[2:])


def test_compose_mounts_files_that_exist() -> None:
    """Prometheus and Grafana mount configuration that is in the repository."""
    for service in ("prometheus", "grafana"):
        for volume in COMPOSE["services"][service]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists() or source.endswith("prometheus.token"), volume
    for path in ("server.Dockerfile", "train-cpu.Dockerfile", "train-cuda.Dockerfile", "make-secrets.sh"):
        assert (DOCKER / path).exists()


def test_alert_rules_and_dashboard_use_only_metrics_the_server_exposes(server_url: str) -> None:
    """Every runsteer_* name in the alert rules and the Grafana dashboard is in a real exposition."""
    exposed = exposed_sample_names(server_url)
    rule_exprs = [rule["expr"] for group in ALERTS["groups"] for rule in group["rules"]]
    panel_exprs = [target["expr"] for panel in DASHBOARD["panels"] for target in panel["targets"]]
    template_exprs = [variable["definition"] for variable in DASHBOARD["templating"]["list"]]
    referenced = referenced_names(rule_exprs + panel_exprs + template_exprs)
    assert referenced, "no runsteer metric referenced at all"
    assert referenced - exposed == set()


def test_shipped_alerts_cover_the_promised_conditions() -> None:
    """Non-finite loss, gradient-norm spike, run lost and training stalled all have an alert."""
    names = {rule["alert"] for group in ALERTS["groups"] for rule in group["rules"]}
    assert names == {"RunsteerNonFiniteLoss", "RunsteerGradNormSpike", "RunsteerRunLost", "RunsteerTrainingStalled"}


def test_dashboard_panels_point_at_the_provisioned_datasource() -> None:
    """Every panel queries the data source the provisioning file creates."""
    datasource = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    uid = datasource["datasources"][0]["uid"]
    assert {panel["datasource"]["uid"] for panel in DASHBOARD["panels"]} == {uid}


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool not found: `python3 dev.py test` installs Debian's prometheus package (as root)"
    return found


def test_promtool_accepts_the_alert_rules() -> None:
    """promtool checks the rules file."""
    result = subprocess.run(
        [promtool(), "check", "rules", str(DOCKER / "prometheus/alerts.yml")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_prometheus_config(tmp_path: Path) -> None:
    """promtool checks the scrape config (with the token file it names put in place)."""
    config = (DOCKER / "prometheus/prometheus.yml").read_text()
    token = tmp_path / "token"
    token.write_text("x")
    (tmp_path / "prometheus.yml").write_text(config.replace("/etc/prometheus/secrets/token", str(token)))
    shutil.copy(DOCKER / "prometheus/alerts.yml", tmp_path / "alerts.yml")
    result = subprocess.run(
        [promtool(), "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", ["server.Dockerfile", "train-cpu.Dockerfile", "train-cuda.Dockerfile"])
def test_dockerfiles_copy_every_package(dockerfile: str) -> None:
    """Each image installs runsteer from all five packages, so `pip install .` finds them."""
    text = (DOCKER / dockerfile).read_text()
    for package in ("protocols", "control_server", "trainer", "agents", "dashboard"):
        assert f"COPY {package} {package}" in text
