"""Interventions drawn as markers on the health charts, against a real server and a scripted trainer."""

from __future__ import annotations

import json

from streamlit.testing.v1 import AppTest

from dashboard.charts import chart, intervention_rows
from dashboard.series import CHARTS, RunSeries
from protocols.client import Client
from tests.dashboard.conftest import open_app
from tests.polling import wait_until
from tests.scripted_trainer import ScriptedTrainer


def chart_texts(app: AppTest) -> list[str]:
    """Each drawn chart's Vega-Lite spec and data, as text."""
    return [str(element.proto) for element in app.get("vega_lite_chart")]


def test_an_agents_command_is_marked_on_every_health_chart_with_its_source(
    trainer: ScriptedTrainer, server_url: str, client: Client
) -> None:
    """An applied set_hparams from agent:rules shows on each health chart as a rule and a symbol at its step,
    whose tooltip carries the source, the command and the reason."""
    wait_until(lambda: trainer.step > 10)
    record = client.submit(
        trainer.run_id, {"type": "set_hparams", "lr": 5e-4}, source="agent:rules", reason="probe keeps x0.5", wait=True
    )
    assert record.status == "applied" and record.applied_step is not None
    wait_until(lambda: trainer.step > record.applied_step + 5)
    app = open_app(server_url)
    assert not app.exception
    drawn = chart_texts(app)
    assert len(drawn) == 9
    for text in drawn:
        assert "agent:rules" in text and "set_hparams lr=0.0005" in text and "probe keeps x0.5" in text
        assert '\\"rule\\"' in text or '"rule"' in text


def test_a_run_without_commands_draws_plain_charts(trainer: ScriptedTrainer, server_url: str) -> None:
    """With no command applied, the charts carry no intervention layer."""
    wait_until(lambda: trainer.step > 10)
    app = open_app(server_url)
    drawn = chart_texts(app)
    assert drawn and not any("intervention" in text for text in drawn)


def test_a_rollback_is_marked_where_the_run_left_its_branch(trainer: ScriptedTrainer, client: Client) -> None:
    """A rollback's marker sits at the step the run left (where the old branch's curve ends; the step it was
    applied at when the trainer does not say), with its source; rejected commands get none."""
    wait_until(lambda: trainer.step > 10)
    client.submit(trainer.run_id, {"type": "save_checkpoint"}, source="script:case", reason="keep", wait=True)
    checkpoint = trainer.latest_checkpoint
    wait_until(lambda: trainer.step > checkpoint.step + 10)
    rollback = client.submit(
        trainer.run_id,
        {"type": "rollback", "checkpoint_id": checkpoint.checkpoint_id},
        source="user:ann",
        reason="back",
        wait=True,
    )
    rejected = client.submit(trainer.run_id, {"type": "set_hparams", "lr": 0.9}, source="user:ann", wait=True)
    assert rollback.status == "applied" and rejected.status == "rejected"
    rows = intervention_rows(client.list_commands(trainer.run_id))
    left = (rollback.effective or {}).get("from_step", rollback.applied_step)
    assert [(step, source) for step, source, _, _ in rows] == [
        (checkpoint.step, "script:case"),
        (left, "user:ann"),
    ]
    series = RunSeries()
    series.refresh(client, trainer.run_id, client.get_run(trainer.run_id).branches)
    drawn = chart(series, CHARTS[0], rows)
    assert drawn is not None
    spec = json.dumps(drawn.to_dict())
    assert "user:ann" in spec and "rollback checkpoint_id=" in spec
