"""The command lifecycle end to end, with a client playing the trainer."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from control_server.keys import COMMANDS, STORE
from control_server.metrics import RECENT_BATCH_IDS
from protocols import CommandResult, MetricsBatch, MetricsSample, RunRegistration, SetHparams
from protocols.client import Client
from protocols.commands import CommandRecord
from protocols.events import CommandEvent
from tests.polling import wait_until
from tests.server.helpers import row_counts
from tests.serving import ServerThread

pytestmark = pytest.mark.both_stores


def register(client: Client, name: str = "lifecycle", **fields: object) -> str:
    return client.register_run(RunRegistration(name=name, **fields)).run_id  # type: ignore[arg-type]


def test_command_goes_from_queued_to_applied_with_the_trainers_step(client: Client, server_url: str) -> None:
    """A submitted command is delivered to the long-poll, answered, and its record shows the result."""
    run_id = register(client)
    record = client.submit(run_id, SetHparams(lr=0.001), source="user:alice", reason="too slow")
    assert record.status == "queued" and record.seq == 1
    with Client(server_url) as trainer:
        delivered = trainer.next_commands(run_id, after_seq=0, wait_s=1)
        assert [c.id for c in delivered] == [record.id]
        assert delivered[0].status == "delivered"
        trainer.report_result(run_id, record.id, CommandResult(status="applied", step=17, effective={"lr": 0.001}))
    final = client.get_command(run_id, record.id)
    assert final.status == "applied"
    assert final.applied_step == 17
    assert final.effective == {"lr": 0.001}
    assert final.reason == "too slow" and final.source == "user:alice"


def test_a_command_submitted_while_the_trainer_long_polls_reaches_it_with_one_commit(
    server: ServerThread, client: Client
) -> None:
    """Submitted while a long-poll waits, a command is stored delivered by the write that accepts it: the poll hands
    it out with no write of its own, the submitter is answered `queued`, and watchers see it queued, then delivered."""
    run_id = register(client)
    handed: list[CommandRecord] = []
    with Client(server.url) as trainer:
        poll = threading.Thread(target=lambda: handed.extend(trainer.next_commands(run_id, after_seq=0, wait_s=10)))
        poll.start()
        wait_until(lambda: run_id in server.app[COMMANDS]._polls, what="the long-poll waiting")
        commits = server.app[STORE].commits
        record = client.submit(run_id, SetHparams(lr=0.001), source="user:alice")
        poll.join(10)
        assert server.app[STORE].commits == commits + 1
        assert record.status == "queued"
        assert [(c.id, c.status) for c in handed] == [(record.id, "delivered")]
        assert handed[0].delivered_at is not None
        trainer.report_result(run_id, record.id, CommandResult(status="applied", step=3))
    events = [e for e in client.list_events(run_id) if isinstance(e, CommandEvent)]
    assert [e.record.status for e in events] == ["queued", "delivered", "applied"]
    assert events[1].event_id == events[0].event_id + 1


def test_long_poll_wakes_as_soon_as_a_command_arrives(client: Client, server_url: str) -> None:
    """A waiting long-poll returns the command submitted while it waits."""
    run_id = register(client)
    got: list[str] = []

    def poll() -> None:
        with Client(server_url) as trainer:
            got.extend(c.id for c in trainer.next_commands(run_id, after_seq=0, wait_s=10))

    poller = threading.Thread(target=poll)
    poller.start()
    record = client.submit(run_id, {"type": "pause"})
    poller.join(10)
    assert got == [record.id]


def test_submit_with_wait_returns_the_final_record(client: Client, server_url: str) -> None:
    """`submit(wait=True)` blocks until the trainer answers."""
    run_id = register(client)

    def trainer() -> None:
        with Client(server_url) as t:
            for command in t.next_commands(run_id, after_seq=0, wait_s=10):
                t.report_result(run_id, command.id, CommandResult(status="rejected", message="no such group"))

    thread = threading.Thread(target=trainer)
    thread.start()
    record = client.submit(run_id, {"type": "evaluate"}, wait=True, timeout_s=10)
    thread.join(10)
    assert record.status == "rejected"
    assert record.message == "no such group"


def test_a_batch_resent_among_the_runs_recent_ids_is_stored_once(client: Client, store_db: Path | str) -> None:
    """A resend of any of the run's last RECENT_BATCH_IDS batches is a duplicate; one older than those stores nothing
    either (the first value of a step wins); the run keeps one row of ids however many batches it sent."""
    run_id = register(client, "resends")

    def batch(index: int, loss: float) -> MetricsBatch:
        sample = MetricsSample(step=index, time=1.0, values={"loss": loss})
        return MetricsBatch(samples=[sample], batch_id=f"b-{index}")

    for index in range(RECENT_BATCH_IDS):
        assert client.push_metrics(run_id, batch(index, index)).stored_values == 1
    assert all(client.push_metrics(run_id, batch(index, -1.0)).duplicate for index in (0, RECENT_BATCH_IDS - 1))
    client.push_metrics(run_id, batch(RECENT_BATCH_IDS, 0.0))
    late = client.push_metrics(run_id, batch(0, -1.0))
    assert not late.duplicate and late.stored_values == 0
    assert client.metrics_history(run_id, keys=["loss"]).series["loss"].values[:2] == [0.0, 1.0]
    assert row_counts(store_db, ("metric_recent_batches",)) == {"metric_recent_batches": 1}


def test_metrics_round_trip_and_downsample(client: Client) -> None:
    """Metrics posted are returned by history, and downsampling keeps min and max."""
    run_id = register(client)
    samples = [MetricsSample(step=s, time=1000.0 + s, values={"loss": 10.0 - s / 100, "lr": 0.1}) for s in range(1000)]
    samples[500] = MetricsSample(step=500, time=1500.0, values={"loss": 99.0, "lr": 0.1})
    ack = client.push_metrics(run_id, MetricsBatch(samples=samples, batch_id="b1"))
    assert ack.stored_values == 2000
    again = client.push_metrics(run_id, MetricsBatch(samples=samples, batch_id="b1"))
    assert again.duplicate and again.stored_values == 0
    full = client.metrics_history(run_id, keys=["loss"])
    assert full.series["loss"].steps == list(range(1000))
    small = client.metrics_history(run_id, keys=["loss", "lr"], max_points=50)
    assert len(small.series["loss"].steps) <= 50
    assert max(small.series["loss"].max or []) == 99.0
    assert small.bucket_steps > 1
