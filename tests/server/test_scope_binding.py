"""A token does what its scope says and no more: its source (kind and name) is its own, nobody approves their own
command, a trainer acts only on the runs it registered and answers only commands delivered to it, re-registering
cannot replace a policy, and alerts carry their sender's own source."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from control_server.auth import TokenEntry, TokenTable
from control_server.config import ServerConfig
from protocols import (
    AlertEvent,
    AlertReport,
    CommandResult,
    Heartbeat,
    MetricsBatch,
    MetricsSample,
    Pause,
    Policy,
    RateLimit,
    RunRegistration,
    RunState,
    RunsteerError,
    StatusReport,
    Unauthorized,
)
from protocols.client import Client
from tests.server.helpers import row_counts
from tests.serving import ServerThread

TOKENS = {
    "root": ("root-token-0123456789", {"admin"}, "user"),
    "trainer": ("trainer-token-0123456789", {"train", "read"}, "user"),
    "other-trainer": ("other-trainer-token-0123456789", {"train", "read"}, "user"),
    "alice": ("alice-token-0123456789", {"read", "command"}, "user"),
    "rules": ("rules-token-0123456789", {"read", "command"}, "agent"),
}


@pytest.fixture
def secured(tmp_path) -> Iterator[ServerThread]:  # type: ignore[no-untyped-def]
    """A server with a token per role."""
    table = TokenTable(
        TokenEntry(name=name, token=token, scopes=frozenset(scopes), kind=kind)  # type: ignore[arg-type]
        for name, (token, scopes, kind) in TOKENS.items()
    )
    running = ServerThread(ServerConfig(port=0, db=tmp_path / "runsteer.db"), table).start()
    yield running
    running.stop()


def as_(server: ServerThread, name: str) -> Client:
    return Client(server.url, token=TOKENS[name][0])


def refused(call) -> RunsteerError:  # type: ignore[no-untyped-def]
    with pytest.raises(RunsteerError) as caught:
        call()
    return caught.value


GUARDED = Policy(approval_required=["agent:*"], rate_limit=RateLimit(max_commands=50, per_seconds=60))


def test_nobody_approves_their_own_command_not_even_an_admin_acting_as_its_sender(secured: ServerThread) -> None:
    """A held `user:alice` command cannot be approved as `user:alice` (403 naming `source`); `user:bob` may; a
    sender may still withdraw (reject) its own."""
    with as_(secured, "trainer") as trainer:
        run_id = trainer.register_run(RunRegistration(name="own", policy=GUARDED)).run_id
    with as_(secured, "alice") as alice, as_(secured, "root") as root:
        held = alice.submit(run_id, Pause(), source="user:alice", hold=True)
        own = refused(lambda: alice.approve(run_id, held.id, source="user:alice"))
        as_admin = refused(lambda: root.approve(run_id, held.id, source="user:alice"))
        assert root.get_command(run_id, held.id).status == "pending_approval"
        assert root.approve(run_id, held.id, source="user:bob").status == "queued"
        withdrawn = alice.submit(run_id, Pause(), source="user:alice", hold=True)
        assert alice.reject(run_id, withdrawn.id, source="user:alice").status == "rejected"
    for error in (own, as_admin):
        assert error.status == 403 and [d.field for d in error.details] == ["source"]
        assert "nobody approves their own command" in str(error)


def test_an_agent_token_cannot_pass_as_a_person_or_approve_its_own_proposal(secured: ServerThread) -> None:
    """The `rules` token is `agent:rules`: submitting as `user:rules`, `script:rules` or `system:rules` is 403, so
    the policy's `agent:*` hold applies; it cannot approve its proposal under any source."""
    with as_(secured, "trainer") as trainer:
        run_id = trainer.register_run(RunRegistration(name="held", policy=GUARDED)).run_id
    with as_(secured, "rules") as agent:
        statuses = [
            refused(lambda source=source: agent.submit(run_id, Pause(), source=source)).status
            for source in ("user:rules", "script:rules", "system:rules", "agent:other")
        ]
        proposal = agent.submit(run_id, Pause(), source="agent:rules")
        approvals = [
            refused(lambda source=source: agent.approve(run_id, proposal.id, source=source)).status
            for source in ("user:rules", "agent:rules", "user:alice")
        ]
    assert statuses == [403] * 4 and approvals == [403] * 3
    assert proposal.status == "pending_approval"
    with as_(secured, "root") as root:
        assert [(c.source, c.status) for c in root.list_commands(run_id)] == [("agent:rules", "pending_approval")]


def test_re_registering_cannot_replace_the_runs_policy_without_an_admin_token(secured: ServerThread) -> None:
    """The trainer re-attaching with `policy: {}` is 403 naming `policy` and the admin's policy stands; re-attaching
    without a policy, or with the same one, works; an admin may replace it either way."""
    with as_(secured, "trainer") as trainer, as_(secured, "root") as root:
        run = trainer.register_run(RunRegistration(name="policed", policy=GUARDED))
        tightened = Policy(approval_required=["agent:*", "user:*"])
        root.set_policy(run.run_id, tightened)
        error = refused(
            lambda: trainer.register_run(RunRegistration(name="policed", run_id=run.run_id, policy=Policy()))
        )
        assert error.status == 403 and [d.field for d in error.details] == ["policy"]
        assert root.get_run(run.run_id).policy == tightened
        again = trainer.register_run(RunRegistration(name="policed", run_id=run.run_id))
        same = trainer.register_run(RunRegistration(name="policed", run_id=run.run_id, policy=tightened))
        assert again.policy == same.policy == tightened
        replaced = root.register_run(RunRegistration(name="policed", run_id=run.run_id, policy=Policy()))
        assert replaced.policy == Policy()


def test_a_trainer_answers_only_commands_delivered_to_it(secured: ServerThread) -> None:
    """A result for a `queued` command (never fetched) is 409 and it stays queued; once delivered it can be answered."""
    with as_(secured, "trainer") as trainer, as_(secured, "alice") as alice:
        run_id = trainer.register_run(RunRegistration(name="answers")).run_id
        queued = alice.submit(run_id, Pause(), source="user:alice")
        early = refused(lambda: trainer.report_result(run_id, queued.id, CommandResult(status="applied", step=1)))
        assert early.status == 409 and "never delivered" in str(early)
        assert alice.get_command(run_id, queued.id).status == "queued"
        assert [c.id for c in trainer.next_commands(run_id, after_seq=0, wait_s=0)] == [queued.id]
        answered = trainer.report_result(run_id, queued.id, CommandResult(status="applied", step=1))
    assert answered.status == "applied"


def test_a_train_token_touches_only_the_runs_it_registered(secured: ServerThread) -> None:
    """Another trainer's long-poll, result, metrics, reports (`finished`) and re-registration of the run are all
    403 and store nothing: the run keeps running and still takes commands. An admin may act as any run's trainer."""
    with as_(secured, "trainer") as trainer, as_(secured, "alice") as alice:
        run_id = trainer.register_run(RunRegistration(name="mine")).run_id
        delivered = alice.submit(run_id, Pause(), source="user:alice")
        trainer.next_commands(run_id, after_seq=0, wait_s=0)
    before = row_counts(secured.config.db)
    sample = MetricsSample(step=1, time=1.0, values={"loss": 1.0})
    with as_(secured, "other-trainer") as intruder:
        attacks = {
            "poll": lambda: intruder.next_commands(run_id, after_seq=0, wait_s=0),
            "result": lambda: intruder.report_result(run_id, delivered.id, CommandResult(status="applied", step=1)),
            "metrics": lambda: intruder.push_metrics(run_id, MetricsBatch(samples=[sample])),
            "finish": lambda: intruder.push_reports(run_id, [StatusReport(status="finished")]),
            "heartbeat": lambda: intruder.push_reports(run_id, [Heartbeat(state=RunState(step=5, paused=True))]),
            "re-register": lambda: intruder.register_run(RunRegistration(name="mine", run_id=run_id)),
        }
        statuses = {name: refused(attack).status for name, attack in attacks.items()}
    assert statuses == dict.fromkeys(attacks, 403)
    assert row_counts(secured.config.db) == before
    with as_(secured, "alice") as alice:
        assert alice.get_run(run_id).status == "running"
        assert alice.get_command(run_id, delivered.id).status == "delivered"
        assert alice.submit(run_id, Pause(), source="user:alice").status == "queued"
    with as_(secured, "root") as root:
        assert root.push_metrics(run_id, MetricsBatch(samples=[sample])).stored_values == 1


def test_alerts_carry_their_senders_own_source(secured: ServerThread) -> None:
    """`POST /alerts` as `system:server` or another name is 403; the agent's own source passes. A trainer's reported
    alert is `trainer`: one naming `system:server` is 403 and nothing of its batch is stored."""
    with as_(secured, "trainer") as trainer:
        run_id = trainer.register_run(RunRegistration(name="alerts")).run_id
    with as_(secured, "rules") as agent:
        spoofed = [
            refused(lambda source=source: agent.raise_alert(run_id, AlertReport(message="x", source=source))).status
            for source in ("system:server", "user:rules", "agent:other", "trainer")
        ]
        agent.raise_alert(run_id, AlertReport(message="loss spiking", source="agent:rules"))
    assert spoofed == [403] * 4
    with as_(secured, "trainer") as trainer:
        before = row_counts(secured.config.db)
        error = refused(
            lambda: trainer.push_reports(
                run_id,
                [StatusReport(status="paused"), AlertReport(message="from the server", source="system:server")],
            )
        )
        assert error.status == 403 and [d.field for d in error.details] == ["reports.1.source"]
        assert row_counts(secured.config.db) == before and trainer.get_run(run_id).status == "running"
        trainer.push_reports(run_id, [AlertReport(message="disk filling")])
        alerts = [(e.source, e.message) for e in trainer.list_events(run_id) if isinstance(e, AlertEvent)]
    assert alerts == [("agent:rules", "loss spiking"), ("trainer", "disk filling")]


def test_a_refused_alert_source_is_named_with_the_tokens_own(secured: ServerThread) -> None:
    """The refusal says which source the token acts as, so a misconfigured agent can be fixed."""
    with as_(secured, "trainer") as trainer:
        run_id = trainer.register_run(RunRegistration(name="named")).run_id
    with as_(secured, "alice") as alice, pytest.raises(Unauthorized) as caught:
        alice.raise_alert(run_id, AlertReport(message="x", source="agent:alice"))
    assert caught.value.status == 403
    assert [(d.field, d.allowed) for d in caught.value.details] == [("source", "user:alice")]
