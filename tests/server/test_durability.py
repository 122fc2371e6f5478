"""Restart durability: a new server process on the same store shows all history and redelivers open commands."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from protocols import (
    CheckpointInfo,
    CheckpointSaved,
    CommandResult,
    Heartbeat,
    LogReport,
    MetricsBatch,
    MetricsSample,
    Pause,
    Policy,
    RunState,
    SetHparams,
)
from protocols.client import Client
from tests.server.helpers import register
from tests.serving import ServerProcess


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    """Server processes started by the test; any still running at the end are killed."""
    started: list[ServerProcess] = []
    yield started
    for process in started:
        process.stop(kill=True)


def start(processes: list[ServerProcess], db: Path | str, workdir: Path) -> ServerProcess:
    process = ServerProcess(workdir / "runsteer.db", "--db", str(db), "--heartbeat-timeout", "60").start()
    processes.append(process)
    return process


def history(client: Client, run_id: str) -> dict[str, object]:
    """Everything the API holds about a run."""
    return {
        "runs": client.list_runs(),
        "commands": client.list_commands(run_id),
        "metrics": client.metrics_history(run_id),
        "metrics_rollback": client.metrics_history(run_id, branch="rollback-1"),
        "downsampled": client.metrics_history(run_id, max_points=10),
        "checkpoints": client.list_checkpoints(run_id),
        "events": client.list_events(run_id),
    }


@pytest.mark.slow
@pytest.mark.both_stores
@pytest.mark.parametrize("kill", [False, True], ids=["SIGTERM", "SIGKILL"])
def test_a_restarted_server_shows_all_history_and_redelivers_unanswered_commands(
    processes: list[ServerProcess], tmp_path: Path, kill: bool, store_db: Path | str
) -> None:
    """Runs, commands with their statuses, metrics, checkpoints and events survive; open commands come back."""
    db = store_db
    first = start(processes, db, tmp_path)
    with Client(first.url) as client:
        run_id = register(client, "durable", domains=["web", "code"], policy=Policy(approval_required=["agent:*"]))
        other_run = register(client, "other")
        applied = client.submit(run_id, SetHparams(lr=0.001), command_id="applied")
        rejected = client.submit(run_id, {"type": "set_data_mix", "weights": {"web": 1.0}}, command_id="rejected")
        delivered = client.submit(run_id, Pause(), command_id="delivered")
        client.next_commands(run_id, after_seq=0, wait_s=1)
        client.report_result(run_id, applied.id, CommandResult(status="applied", step=3, effective={"lr": 0.001}))
        client.report_result(run_id, rejected.id, CommandResult(status="rejected", message="no sampler"))
        queued = client.submit(run_id, {"type": "resume"}, command_id="queued")
        held = client.submit(run_id, {"type": "evaluate"}, command_id="held", source="agent:rules")
        client.submit(other_run, {"type": "stop"}, command_id="elsewhere")
        for start_step in range(0, 300, 100):
            samples = [
                MetricsSample(step=s, time=1000.0 + s, values={"loss": 5.0 - s / 100, "grad_norm": 1.0 + s % 7})
                for s in range(start_step, start_step + 100)
            ]
            client.push_metrics(run_id, MetricsBatch(samples=samples, batch_id=f"batch-{start_step}"))
        client.push_metrics(
            run_id,
            MetricsBatch(samples=[MetricsSample(branch="rollback-1", step=150, time=2000.0, values={"loss": 3.3})]),
        )
        checkpoints = [
            CheckpointInfo(
                checkpoint_id=f"ck-{step}",
                branch="main",
                step=step,
                time=1000.0 + step,
                tag="auto",
                path=f"/ckpt/{step}.pt",
                size_bytes=1234,
                sha256="ab" * 32,
                metrics={"loss": 4.0},
            )
            for step in (100, 200)
        ]
        client.push_reports(
            run_id,
            [
                Heartbeat(state=RunState(step=299, lr=0.001, optimizer="adamw", data_mix={"web": 0.5, "code": 0.5})),
                *(CheckpointSaved(checkpoint=checkpoint) for checkpoint in checkpoints),
                LogReport(message="about to stop", step=299),
            ],
        )
        before = history(client, run_id)
        other_before = client.list_commands(other_run)

    assert first.stop(kill=kill) == (-9 if kill else 0)
    second = start(processes, db, tmp_path)
    with Client(second.url) as client:
        after = history(client, run_id)
        for key in before:
            assert after[key] == before[key], key
        assert client.list_commands(other_run) == other_before
        statuses = {c.id: c.status for c in client.list_commands(run_id)}
        assert statuses == {
            "applied": "applied",
            "rejected": "rejected",
            "delivered": "delivered",
            "queued": "queued",
            "held": "pending_approval",
        }
        assert client.get_run(run_id).state == RunState(
            step=299, lr=0.001, optimizer="adamw", data_mix={"web": 0.5, "code": 0.5}
        )
        assert [c.checkpoint_id for c in client.list_checkpoints(run_id)] == ["ck-100", "ck-200"]
        assert len(client.metrics_history(run_id).series["loss"].steps) == 300

        redelivered = client.next_commands(run_id, after_seq=0, wait_s=1)
        assert [(c.id, c.seq) for c in redelivered] == [(delivered.id, delivered.seq), (queued.id, queued.seq)]
        assert all(c.status == "delivered" for c in redelivered)

        approved = client.approve(run_id, held.id)
        assert approved.seq > queued.seq, "sequence numbers continue after a restart"
        fresh = client.submit(run_id, Pause())
        assert fresh.seq > approved.seq
        again = client.push_metrics(
            run_id, MetricsBatch(samples=[MetricsSample(step=0, time=1.0, values={"loss": 9.0})], batch_id="batch-0")
        )
        assert again.duplicate, "batch ids stored before the restart still de-duplicate"
        new_events = client.list_events(run_id, after=before_last_event(before))
        assert new_events and min(e.event_id for e in new_events) > before_last_event(before)
    assert second.stop() == 0


def before_last_event(snapshot: dict[str, object]) -> int:
    events = snapshot["events"]
    assert isinstance(events, list) and events
    return max(event.event_id for event in events)
