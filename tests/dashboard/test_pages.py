"""The dashboard's pages under Streamlit's AppTest, against a real server and a scripted trainer."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from control_server.auth import TokenEntry, TokenTable
from control_server.config import ServerConfig
from protocols.client import Client
from protocols.commands import CommandRecord
from protocols.policy import Policy
from protocols.records import RunRegistration
from tests.dashboard.conftest import open_app
from tests.polling import wait_until
from tests.scripted_trainer import ScriptedTrainer
from tests.serving import ServerProcess, ServerThread

CONTROL = "views/control.py"
ACTIVITY = "views/activity.py"
RUNS = "views/runs.py"

pytestmark = pytest.mark.slow
"""Each test drives the app through Streamlit's AppTest against a live server and trainer: left out of the fast loop."""


def texts(app: AppTest) -> str:
    """Every message, caption and Markdown text on the page, joined."""
    kinds = ("markdown", "caption", "error", "warning", "info", "success", "subheader", "header")
    return "\n".join(str(element.value) for kind in kinds for element in app.get(kind))


def click(app: AppTest, label: str) -> AppTest:
    """Click the (form or plain) button with this label and rerun."""
    [button] = [button for button in app.button if button.label == label]
    return button.click().run()


def finished(client: Client, run_id: str, command_type: str) -> CommandRecord:
    """The newest record of `command_type` once it is finished."""

    def latest() -> CommandRecord | None:
        records = [r for r in client.list_commands(run_id) if r.command.type == command_type and r.finished]
        return records[-1] if records else None

    wait_until(latest)
    record = latest()
    assert record is not None
    return record


def test_health_page_draws_every_chart_for_the_running_run(trainer: ScriptedTrainer, server_url: str) -> None:
    """With a run streaming metrics, the health page names the run and draws its nine health charts."""
    wait_until(lambda: trainer.step > 20)
    app = open_app(server_url)
    assert not app.exception
    assert "scripted" in texts(app) and "running" in texts(app)
    assert len(app.get("vega_lite_chart")) == 9


def test_changing_the_lr_in_the_form_is_applied_by_the_trainer(
    trainer: ScriptedTrainer, server_url: str, client: Client
) -> None:
    """Submitting the hyperparameter form sends set_hparams; the page then shows it applied with its step."""
    app = open_app(server_url, CONTROL)
    app.number_input(key="hp_lr").set_value(0.002)
    click(app, "Apply hyperparameters")
    record = finished(client, trainer.run_id, "set_hparams")
    assert record.status == "applied" and record.effective and record.effective["lr"] == 0.002
    assert trainer.lr == 0.002 and record.source.startswith("user:")
    app.run()
    assert f"applied at step {record.applied_step}" in texts(app)


def test_a_command_the_trainer_rejects_shows_its_reason(trainer: ScriptedTrainer, server_url: str) -> None:
    """A command the trainer refuses is shown as rejected, with the trainer's reason."""
    app = open_app(server_url, CONTROL)
    app.number_input(key="hp_lr").set_value(0.9)
    click(app, "Apply hyperparameters")
    wait_until(lambda: trainer.client.list_commands(trainer.run_id)[-1].finished)
    app.run()
    assert "rejected: lr above 0.5 diverges this model" in texts(app)


def test_invalid_input_is_refused_in_the_page_and_nothing_is_sent(
    trainer: ScriptedTrainer, server_url: str, client: Client
) -> None:
    """A learning rate of zero is refused with the field named, and no command reaches the server."""
    app = open_app(server_url, CONTROL)
    app.number_input(key="hp_lr").set_value(0.0)
    click(app, "Apply hyperparameters")
    assert "Not sent: lr: Input should be greater than 0" in texts(app)
    assert client.list_commands(trainer.run_id) == []
    assert not app.exception


def test_stop_asks_for_confirmation_before_it_is_sent(
    trainer: ScriptedTrainer, server_url: str, client: Client
) -> None:
    """Stop first asks; only the confirmation sends the command, which the trainer applies."""
    app = open_app(server_url, CONTROL)
    click(app, "Stop…")
    assert "Stop run scripted?" in texts(app)
    assert client.list_commands(trainer.run_id) == []
    click(app, "Yes, stop the run")
    assert finished(client, trainer.run_id, "stop").status == "applied"


def test_data_mix_sliders_show_the_normalised_mix_and_apply_it(
    trainer: ScriptedTrainer, server_url: str, client: Client
) -> None:
    """Moving a slider updates the normalised mix shown; applying it changes the trainer's mix."""
    app = open_app(server_url, CONTROL)
    app.slider(key=f"mix_{trainer.run_id}_prose").set_value(1.0).run()
    app.slider(key=f"mix_{trainer.run_id}_code").set_value(0.5).run()
    app.slider(key=f"mix_{trainer.run_id}_arithmetic").set_value(0.5).run()
    assert "Normalised mix: prose 50% · code 25% · arithmetic 25%" in texts(app)
    click(app, "Apply data mix")
    assert finished(client, trainer.run_id, "set_data_mix").status == "applied"
    assert trainer.mix == {"prose": 0.5, "code": 0.25, "arithmetic": 0.25}


def saved_from_the_page(server_url: str, client: Client, run_id: str) -> tuple[AppTest, str]:
    """The control page after its Save checkpoint button was clicked and the checkpoint listed, and its id."""
    app = open_app(server_url, CONTROL)
    click(app, "Save checkpoint")
    saved = finished(client, run_id, "save_checkpoint")
    wait_until(lambda: client.list_checkpoints(run_id))
    app.run()
    return app, str(saved.effective["checkpoint_id"]) if saved.effective else ""


def test_a_checkpoint_saved_from_the_page_can_be_rolled_back_to_a_named_branch(
    trainer: ScriptedTrainer, server_url: str, client: Client
) -> None:
    """Save checkpoint, then the row's rollback button with a branch name and skip count restores it."""
    app, checkpoint_id = saved_from_the_page(server_url, client, trainer.run_id)
    app.text_input(key=f"rb_branch_{checkpoint_id}").input("retry")
    app.number_input(key=f"rb_skip_{checkpoint_id}").set_value(3)
    app.button(key=f"rb_go_{checkpoint_id}").click().run()
    record = finished(client, trainer.run_id, "rollback")
    assert record.status == "applied" and trainer.branch == "retry"
    assert record.command.type == "rollback" and record.command.skip_batches == 3


def test_the_rollback_form_names_the_branch_the_trainer_opens_when_left_blank(
    trainer: ScriptedTrainer, server_url: str, client: Client
) -> None:
    """With no name given, the form says the new branch will be `{branch}.r{step}`, and that is the branch the
    trainer opens (both from `protocols.commands.rollback_branch`, as the real trainer names it)."""
    app, checkpoint_id = saved_from_the_page(server_url, client, trainer.run_id)
    step = trainer.checkpoints[checkpoint_id].step
    assert app.text_input(key=f"rb_branch_{checkpoint_id}").placeholder == f"main.r{step} when blank"
    app.button(key=f"rb_go_{checkpoint_id}").click().run()
    record = finished(client, trainer.run_id, "rollback")
    assert record.status == "applied" and record.effective is not None
    assert trainer.branch == record.effective["branch"] == f"main.r{step}"


def test_branches_are_overlaid_on_the_charts_after_a_rollback(trainer: ScriptedTrainer, client: Client) -> None:
    """After a rollback the run's series hold both branches, drawn over the same steps."""
    from dashboard.series import CHARTS, RunSeries

    wait_until(lambda: trainer.step > 10)
    client.submit(trainer.run_id, {"type": "save_checkpoint"}, wait=True)
    checkpoint = trainer.latest_checkpoint
    wait_until(lambda: trainer.step > checkpoint.step + 10)
    client.submit(
        trainer.run_id, {"type": "rollback", "checkpoint_id": checkpoint.checkpoint_id, "branch": "b2"}, wait=True
    )
    wait_until(lambda: client.get_run(trainer.run_id).branches == ["main", "b2"] and trainer.step > checkpoint.step + 8)
    time.sleep(0.5)
    series = RunSeries()
    series.refresh(client, trainer.run_id, client.get_run(trainer.run_id).branches)
    rows = series.rows(CHARTS[0])
    main_steps = {step for step, _, key, branch in rows if branch == "main" and key == "loss"}
    retry_steps = {step for step, _, key, branch in rows if branch == "b2" and key == "loss"}
    assert main_steps & retry_steps and min(retry_steps) > checkpoint.step - 1


def test_live_refresh_fetches_only_steps_after_the_cursor(trainer: ScriptedTrainer, client: Client) -> None:
    """Each refresh asks for steps after the last one held, so points are neither refetched nor duplicated."""
    from dashboard.series import RunSeries

    wait_until(lambda: trainer.step > 20)
    series = RunSeries()
    series.refresh(client, trainer.run_id, ["main"])
    first_cursor = series.branches["main"].cursor
    assert first_cursor is not None
    wait_until(lambda: trainer.step > first_cursor + 20)
    time.sleep(0.3)
    added = series.refresh(client, trainer.run_id, ["main"])
    steps, _ = series.branches["main"].points["loss"]
    assert steps == sorted(set(steps)) and steps[-1] > first_cursor
    assert added == sum(1 for step in steps if step > first_cursor) * len(series.branches["main"].points)


def test_a_long_history_loads_downsampled_by_the_server(client: Client) -> None:
    """Hours of history arrive as at most MAX_POINTS buckets per metric, not every step."""
    from dashboard.series import MAX_POINTS, RunSeries
    from protocols.records import MetricsBatch, MetricsSample, RunRegistration

    run_id = client.register_run(RunRegistration(name="long")).run_id
    for start in range(0, 20_000, 5_000):
        steps = range(start, start + 5_000)
        samples = [MetricsSample(step=step, time=1.0, values={"loss": 1.0, "lr": 0.1}) for step in steps]
        client.push_metrics(run_id, MetricsBatch(samples=samples))
    series = RunSeries()
    series.refresh(client, run_id, ["main"])
    held = series.branches["main"]
    assert held.bucket_steps > 1 and len(held.points["loss"][0]) <= MAX_POINTS + 1


def test_an_agent_proposal_is_approved_from_the_page_and_applied(
    make_trainer: Callable[..., ScriptedTrainer], server_url: str, client: Client
) -> None:
    """A command from agent:rules waits for approval; Approve on the page releases it and the trainer applies it."""
    trainer = make_trainer(policy=Policy(approval_required=["agent:*"]))
    held = client.submit(
        trainer.run_id,
        {"type": "set_hparams", "lr": 5e-4},
        source="agent:rules",
        reason="loss plateaued; halving the lr",
    )
    assert held.status == "pending_approval"
    app = open_app(server_url, ACTIVITY)
    assert "loss plateaued; halving the lr" in texts(app) and "agent:rules" in texts(app)
    app.button(key=f"approve_{held.id}").click().run()
    record = client.wait_for(trainer.run_id, held.id, timeout_s=10)
    assert record.status == "applied" and trainer.lr == 5e-4


def test_an_agent_proposal_rejected_from_the_page_never_reaches_the_trainer(
    make_trainer: Callable[..., ScriptedTrainer], server_url: str, client: Client
) -> None:
    """Reject on the page refuses the held command; the trainer's lr stays as it was."""
    trainer = make_trainer(policy=Policy(approval_required=["agent:*"]))
    held = client.submit(trainer.run_id, {"type": "set_hparams", "lr": 5e-4}, source="agent:rules", reason="r")
    app = open_app(server_url, ACTIVITY)
    app.button(key=f"reject_{held.id}").click().run()
    assert client.get_command(trainer.run_id, held.id).status == "rejected"
    assert trainer.lr == 1e-3 and not app.exception


def test_history_lists_source_reason_status_and_applied_step(
    trainer: ScriptedTrainer, server_url: str, client: Client
) -> None:
    """The command history table has a row per command with who sent it, why, its status and its step."""
    record = client.submit(
        trainer.run_id, {"type": "evaluate"}, source="script:nightly", reason="hourly eval", wait=True
    )
    app = open_app(server_url, ACTIVITY)
    [table] = [frame.value for frame in app.dataframe if "seq" in frame.value.columns]
    row = table.iloc[0]
    assert (row["source"], row["reason"], row["status"], row["applied step"]) == (
        "script:nightly",
        "hourly eval",
        "applied",
        record.applied_step,
    )


def test_alerts_and_non_finite_metrics_raise_banners(
    make_trainer: Callable[..., ScriptedTrainer], server_url: str
) -> None:
    """A non-finite loss and a fresh alert each put a banner atop the health page; the alert feed lists it."""
    trainer = make_trainer(nonfinite_at=15)
    wait_until(lambda: trainer.step > 25)
    trainer.alert("grad_norm spiked 8x over its median", severity="critical")
    time.sleep(0.3)
    app = open_app(server_url)
    errors = "\n".join(str(element.value) for element in app.error)
    assert "Non-finite metrics on branch main" in errors
    assert "grad_norm spiked 8x over its median" in errors
    app.switch_page(ACTIVITY).run()
    [alerts] = [frame.value for frame in app.dataframe if "severity" in frame.value.columns]
    assert alerts.iloc[0]["severity"] == "critical"


def test_runs_page_lists_status_step_throughput_branch_and_elapsed(trainer: ScriptedTrainer, server_url: str) -> None:
    """The runs table has a row per run with its status, step, tokens/s, branch and elapsed time."""
    wait_until(lambda: trainer.step > 10)
    app = open_app(server_url, RUNS)
    [table] = [frame.value for frame in app.dataframe]
    row = table.iloc[0]
    assert list(table.columns) == ["run", "status", "step", "tokens/s", "branch", "elapsed", "run id"]
    assert (row["run"], row["status"], row["branch"]) == ("scripted", "running", "main")
    assert row["step"] > 0 and row["tokens/s"] > 10_000 and row["elapsed"].endswith("s")


def test_a_server_that_goes_down_gives_a_clear_message_and_the_page_recovers(tmp_path: Path) -> None:
    """With the server gone the page says so (no traceback); once it is back the page works again."""
    server = ServerProcess(tmp_path / "down.db").start()
    try:
        with Client(server.url) as client:
            client.register_run(RunRegistration(name="down"))
        app = open_app(server.url)
        assert "down" in app.sidebar.selectbox(key="run_picker").options[0]
        port = server.port
        server.stop()
        app.run()
        assert not app.exception
        assert "is not answering" in "\n".join(str(element.value) for element in app.error)
        server.start(port=port)
        app.run()
        assert not app.exception and not app.error
        assert "down" in texts(app)
    finally:
        server.stop()


def test_a_lost_run_is_named_lost_with_a_clear_message(tmp_path: Path) -> None:
    """When the trainer stops heartbeating the run is shown as lost, with what that means."""
    server = ServerThread(ServerConfig(port=0, db=tmp_path / "lost.db", heartbeat_timeout_s=0.5)).start()
    try:
        trainer = ScriptedTrainer(server.url, name="quiet")
        trainer.start()
        wait_until(lambda: trainer.step > 3)
        trainer.close()
        with Client(server.url) as client:
            wait_until(lambda: client.get_run(trainer.run_id).status == "lost", timeout_s=10)
        app = open_app(server.url)
        assert "Run quiet is lost" in "\n".join(str(element.value) for element in app.warning)
        assert not app.exception
    finally:
        server.stop()


def test_a_server_with_tokens_asks_for_one_and_then_works(tmp_path: Path) -> None:
    """Without a token the page asks for one; entered once, it lists runs and sends commands under its name."""
    token = "alice-token-0123456789"
    tokens = TokenTable([TokenEntry(name="alice", token=token, scopes=frozenset({"read", "command", "train"}))])
    server = ServerThread(ServerConfig(port=0, db=tmp_path / "auth.db"), tokens).start()
    try:
        with Client(server.url, token=token) as client:
            client.register_run(RunRegistration(name="guarded"))
            app = open_app(server.url)
            assert "Enter a token" in "\n".join(str(element.value) for element in app.warning)
            app.sidebar.text_input(key="token").input(token).run()
            app.sidebar.text_input(key="user").input("alice").run()
            assert not app.warning and "guarded" in app.sidebar.selectbox(key="run_picker").options[0]
            app.switch_page(CONTROL).run()
            click(app, "Evaluate now")
            [record] = client.list_commands(client.list_runs()[0].run_id)
            assert record.source == "user:alice" and not app.exception
    finally:
        server.stop()


def test_the_cli_runs_streamlit_on_the_app_with_the_server_url_passed_through() -> None:
    """`runsteer dashboard --server URL --port P` runs `streamlit run app.py` and the app reads URL back."""
    from dashboard.cli import APP, streamlit_command
    from dashboard.session import configured_server

    command = streamlit_command("http://10.0.0.5:9000", 8600, "127.0.0.1")
    assert command[1:5] == ["-m", "streamlit", "run", str(APP)] and "8600" in command
    script_args = command[command.index("--") + 1 :]
    assert configured_server(script_args) == "http://10.0.0.5:9000"


def test_the_schedule_form_sends_the_schedule_and_a_missing_horizon_is_refused(
    trainer: ScriptedTrainer, server_url: str, client: Client
) -> None:
    """A cosine schedule without a horizon is refused on the page; with one, the trainer applies it."""
    app = open_app(server_url, CONTROL)
    app.selectbox(key="sched_kind").set_value("cosine")
    click(app, "Set schedule")
    assert "horizon_steps is required" in texts(app)
    assert client.list_commands(trainer.run_id) == []
    app.number_input(key="sched_horizon").set_value(500)
    app.number_input(key="sched_warmup").set_value(20)
    click(app, "Set schedule")
    record = finished(client, trainer.run_id, "set_schedule")
    assert record.status == "applied"
    assert trainer.schedule is not None and trainer.schedule.kind == "cosine"
    assert (trainer.schedule.horizon_steps, trainer.schedule.warmup_steps) == (500, 20)


def test_the_optimizer_form_swaps_the_optimizer(trainer: ScriptedTrainer, server_url: str, client: Client) -> None:
    """Choosing SGD and swapping sends set_optimizer; the trainer switches and the page shows it applied."""
    app = open_app(server_url, CONTROL)
    app.selectbox(key="opt_name").set_value("sgd")
    click(app, "Swap optimizer")
    record = finished(client, trainer.run_id, "set_optimizer")
    assert record.status == "applied" and trainer.optimizer == "sgd"
    assert record.command.type == "set_optimizer" and record.command.carry_state
    app.run()
    assert f"applied at step {record.applied_step}" in texts(app)


def test_pause_and_resume_buttons_pause_and_resume_the_trainer(
    trainer: ScriptedTrainer, server_url: str, client: Client
) -> None:
    """Pause holds the trainer; Resume lets it go on."""
    app = open_app(server_url, CONTROL)
    click(app, "Pause")
    assert finished(client, trainer.run_id, "pause").status == "applied"
    assert trainer.paused
    click(app, "Resume")
    assert finished(client, trainer.run_id, "resume").status == "applied"
    assert not trainer.paused
