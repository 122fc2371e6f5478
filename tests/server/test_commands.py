"""The command lifecycle with a client playing the trainer: delivery, approval, results, waiting, idempotency."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from protocols import CommandEvent, CommandResult, Pause, Policy, RequestRejected, RunRegistration, SetHparams
from protocols.client import AsyncClient, Client
from protocols.client.core import Requests
from tests.server.helpers import raw_request, register, row_counts
from tests.serving import ServerThread

pytestmark = pytest.mark.both_stores

APPROVAL = Policy(approval_required=["agent:*"])


def test_command_passes_queued_delivered_applied_and_each_change_is_a_stored_event(client: Client) -> None:
    """Every status change is stamped on the record and stored as a command event, in order."""
    run_id = register(client)
    queued = client.submit(run_id, SetHparams(lr=0.002), source="user:alice", reason="warmer")
    (delivered,) = client.next_commands(run_id, after_seq=0, wait_s=1)
    applied = client.report_result(run_id, queued.id, CommandResult(status="applied", step=5, effective={"lr": 0.002}))

    assert (queued.status, delivered.status, applied.status) == ("queued", "delivered", "applied")
    assert queued.delivered_at is None and delivered.delivered_at is not None
    assert applied.finished_at is not None and applied.finished_at >= delivered.delivered_at
    assert applied.applied_step == 5 and applied.effective == {"lr": 0.002}
    events = [event for event in client.list_events(run_id, kinds=["command"]) if isinstance(event, CommandEvent)]
    assert [(event.record.id, event.record.status) for event in events] == [
        (queued.id, "queued"),
        (queued.id, "delivered"),
        (queued.id, "applied"),
    ]
    assert [event.event_id for event in events] == sorted(event.event_id for event in events)


def test_unanswered_commands_are_redelivered_in_seq_order_until_answered(client: Client) -> None:
    """A long-poll from `after_seq=0` returns every delivered-but-unanswered command again, in `seq` order."""
    run_id = register(client)
    ids = [client.submit(run_id, {"type": "evaluate", "max_batches": n}).id for n in (1, 2, 3)]
    first = client.next_commands(run_id, after_seq=0, wait_s=1)
    assert [c.id for c in first] == ids and [c.seq for c in first] == [1, 2, 3]
    client.report_result(run_id, ids[1], CommandResult(status="applied", step=3))
    again = client.next_commands(run_id, after_seq=0, wait_s=0)
    assert [c.id for c in again] == [ids[0], ids[2]]
    assert all(c.status == "delivered" for c in again)
    assert client.next_commands(run_id, after_seq=3, wait_s=0) == []


def test_agent_command_waits_for_approval_then_joins_the_queue_with_a_new_seq(client: Client) -> None:
    """Under `approval_required=["agent:*"]` an agent's command is held, skipped, and queued last once approved."""
    run_id = register(client, policy=APPROVAL)
    before = client.submit(run_id, Pause(), source="user:alice")
    held = client.submit(run_id, SetHparams(lr=0.01), source="agent:rules", reason="loss spiking")
    after = client.submit(run_id, {"type": "resume"}, source="user:alice")
    assert (before.status, held.status, after.status) == ("queued", "pending_approval", "queued")
    assert [c.id for c in client.next_commands(run_id, after_seq=0, wait_s=0)] == [before.id, after.id]

    approved = client.approve(run_id, held.id, source="user:bob", reason="looks right")
    assert approved.status == "queued"
    assert approved.seq > after.seq
    assert approved.message == "approved by user:bob: looks right"
    delivered = client.next_commands(run_id, after_seq=after.seq, wait_s=1)
    assert [(c.id, c.seq, c.status) for c in delivered] == [(held.id, approved.seq, "delivered")]
    assert [c.id for c in client.list_commands(run_id)] == [before.id, after.id, held.id]


def test_rejected_approval_finishes_the_command_and_it_is_never_delivered(client: Client) -> None:
    """A rejected held command is final: not delivered, not approvable, not answerable."""
    run_id = register(client, policy=APPROVAL)
    held = client.submit(run_id, Pause(), source="agent:rules")
    rejected = client.reject(run_id, held.id, source="user:bob", reason="not now")
    assert rejected.status == "rejected" and rejected.finished_at is not None
    assert rejected.message == "rejected by user:bob: not now"
    assert client.next_commands(run_id, after_seq=0, wait_s=0) == []
    with pytest.raises(RequestRejected) as approve_again:
        client.approve(run_id, held.id)
    assert approve_again.value.status == 409
    assert client.get_command(run_id, held.id) == rejected


def test_a_held_command_cannot_be_answered_by_the_trainer(client: Client) -> None:
    """A result for a command still pending approval is a 409 and leaves it pending."""
    run_id = register(client, policy=APPROVAL)
    held = client.submit(run_id, Pause(), source="agent:rules")
    with pytest.raises(RequestRejected) as answered:
        client.report_result(run_id, held.id, CommandResult(status="applied", step=1))
    assert answered.value.status == 409
    assert client.get_command(run_id, held.id).status == "pending_approval"


def test_the_same_result_twice_is_accepted_and_a_conflicting_one_is_409(client: Client) -> None:
    """Result posts are idempotent (a retry after a lost answer is harmless); a different outcome is refused."""
    run_id = register(client)
    record = client.submit(run_id, SetHparams(weight_decay=0.1))
    client.next_commands(run_id, after_seq=0, wait_s=1)
    result = CommandResult(status="applied", step=9, effective={"weight_decay": 0.1})
    first = client.report_result(run_id, record.id, result)
    assert client.report_result(run_id, record.id, result) == first
    with pytest.raises(RequestRejected) as conflicting:
        client.report_result(run_id, record.id, CommandResult(status="failed", message="oops"))
    assert conflicting.value.status == 409
    assert conflicting.value.body is not None and conflicting.value.body.extra["status"] == "applied"
    assert client.get_command(run_id, record.id) == first
    assert len([e for e in client.list_events(run_id, kinds=["command"])]) == 3


def test_get_with_wait_answers_as_soon_as_the_command_finishes(client: Client, server_url: str) -> None:
    """`GET .../commands/{id}?wait=S` holds the answer until the result arrives, not until S passes."""
    run_id = register(client)
    record = client.submit(run_id, Pause())

    def trainer() -> None:
        with Client(server_url) as t:
            t.next_commands(run_id, after_seq=0, wait_s=5)
            time.sleep(0.2)
            t.report_result(run_id, record.id, CommandResult(status="applied", step=2))

    thread = threading.Thread(target=trainer)
    started = time.monotonic()
    thread.start()
    final = client.send(Requests.get_command(run_id, record.id, wait_s=20))
    elapsed = time.monotonic() - started
    thread.join(10)
    assert final.status == "applied" and final.applied_step == 2
    assert 0.2 <= elapsed < 5


def test_get_with_wait_returns_the_open_record_when_the_wait_runs_out(client: Client) -> None:
    """With nobody answering, the wait ends after about `wait` seconds with the still-open record."""
    run_id = register(client)
    record = client.submit(run_id, Pause())
    started = time.monotonic()
    answer = client.send(Requests.get_command(run_id, record.id, wait_s=0.3))
    elapsed = time.monotonic() - started
    assert answer == record
    assert 0.3 <= elapsed < 3


def test_resubmitting_the_same_id_and_command_returns_the_first_record_and_stores_it_once(
    client: Client, server: ServerThread
) -> None:
    """Same `id`, same command: 200 with the first record; one row, one queued event."""
    run_id = register(client)
    first = client.submit(run_id, SetHparams(lr=0.001), command_id="retry-1", source="user:alice")
    counts = row_counts(server.config.db)
    envelope = {"command": {"type": "set_hparams", "lr": 0.001}, "id": "retry-1", "source": "user:alice"}
    again = raw_request(server.url, "POST", f"/api/v1/runs/{run_id}/commands", _json(envelope))
    assert again.status == 200
    assert again.json() == first.model_dump(mode="json")
    assert client.submit(run_id, SetHparams(lr=0.001), command_id="retry-1", source="user:alice") == first
    assert row_counts(server.config.db) == counts
    assert [c.id for c in client.list_commands(run_id)] == ["retry-1"]


def test_resubmitting_an_answered_command_returns_its_final_record(client: Client) -> None:
    """A retry that arrives after the trainer answered gets the finished record, not a second command."""
    run_id = register(client)
    record = client.submit(run_id, Pause(), command_id="pause-1")
    client.next_commands(run_id, after_seq=0, wait_s=1)
    applied = client.report_result(run_id, record.id, CommandResult(status="applied", step=4))
    assert client.submit(run_id, Pause(), command_id="pause-1") == applied
    assert client.next_commands(run_id, after_seq=0, wait_s=0) == []


@pytest.mark.parametrize(
    ("command", "source"),
    [
        pytest.param(SetHparams(lr=0.002), "user:alice", id="different-command"),
        pytest.param(SetHparams(lr=0.001), "user:mallory", id="different-source"),
    ],
)
def test_reusing_an_id_for_a_different_command_is_409_and_stores_nothing(
    client: Client, server: ServerThread, command: SetHparams, source: str
) -> None:
    """Same `id` with another command or source is a conflict naming `id`; the first record stays as it was."""
    run_id = register(client)
    first = client.submit(run_id, SetHparams(lr=0.001), command_id="dup", source="user:alice")
    counts = row_counts(server.config.db)
    with pytest.raises(RequestRejected) as conflict:
        client.submit(run_id, command, command_id="dup", source=source)
    assert conflict.value.status == 409
    assert conflict.value.body is not None and conflict.value.body.extra == {"field": "id"}
    assert "dup" in str(conflict.value)
    assert row_counts(server.config.db) == counts
    assert client.list_commands(run_id) == [first]


def test_command_ids_are_per_run(client: Client) -> None:
    """The same client-chosen id on two runs makes two independent commands."""
    one, two = register(client, "one"), register(client, "two")
    a = client.submit(one, Pause(), command_id="same")
    b = client.submit(two, {"type": "stop"}, command_id="same")
    assert (a.run_id, b.run_id) == (one, two)
    assert a.command != b.command


async def test_concurrent_resubmissions_of_one_id_store_one_command(server: ServerThread) -> None:
    """Twenty simultaneous submissions with one id all get that one record, and one row is stored."""
    async with AsyncClient(server.url) as client:
        run_id = (await client.register_run(RunRegistration(name="burst"))).run_id
        records = await asyncio.gather(*(client.submit(run_id, Pause(), command_id="burst") for _ in range(20)))
        assert all(record == records[0] for record in records)
        assert [c.id for c in await client.list_commands(run_id)] == ["burst"]


def _json(value: object) -> bytes:
    return json.dumps(value).encode()
