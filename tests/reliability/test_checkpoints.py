"""Checkpoints under faults: a trainer killed mid-write, a corrupted file, names that try to leave the directory."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from protocols import Rollback, RunRegistration, SaveCheckpoint, SetHparams
from protocols.client import Client
from tests.reliability.trainers import TrainerProcess
from tests.server.helpers import raw_request, row_counts
from tests.serving import ServerThread
from trainer.checkpoints import CheckpointError, CheckpointStore
from trainer.io import IOConfig
from trainer.steer import Steer, SteerConfig

FAST_IO = IOConfig(poll_wait_s=0.5, flush_interval_s=0.1, heartbeat_interval_s=0.5, retry_max_s=0.5)


def kill_while_writing(server: str, directory: Path, spill: Path) -> set[Path]:
    """Start a trainer that checkpoints 16 MB every step, SIGKILL it as soon as a new temporary file appears, and
    return the temporary files that kill left behind."""
    stale = set(directory.glob(".*.pt.tmp"))
    arguments = ["--steps", "10000", "--ballast-mb", "16", "--checkpoint-dir", str(directory)]
    trainer = TrainerProcess(server, spill, arguments)
    try:
        trainer.wait_step(2)
        deadline = time.monotonic() + 30
        while not set(directory.glob(".*.pt.tmp")) - stale and time.monotonic() < deadline:
            time.sleep(0.001)
    finally:
        trainer.kill()
    return set(directory.glob(".*.pt.tmp")) - stale


@pytest.mark.slow
def test_a_trainer_sigkilled_mid_checkpoint_never_lists_or_loads_a_partial_one(
    server: ServerThread, tmp_path: Path
) -> None:
    """After each kill the index, a reopened store and the server list only whole files whose sha256 matches."""
    directory = tmp_path / "checkpoints"
    killed_mid_write = 0
    for attempt in range(3):
        killed_mid_write += bool(kill_while_writing(server.url, directory, tmp_path / f"spill{attempt}.jsonl"))
        partial = {path.name for path in directory.glob(".*.pt.tmp")}
        reopened = CheckpointStore(directory, keep_files=10_000)
        assert reopened.entries, "earlier checkpoints are still there"
        for checkpoint_id, entry in reopened.entries.items():
            assert f".{checkpoint_id}.pt.tmp" not in partial and not entry.info.path.endswith(".tmp")
            assert set(reopened.load(checkpoint_id)) >= {"model", "optimizer", "step"}, "every listed file loads"
    assert killed_mid_write, "at least one kill landed while a checkpoint was being written"
    with Client(server.url) as client:
        listed = [info for run in client.list_runs() for info in client.list_checkpoints(run.run_id)]
    assert listed and all(not info.path.endswith(".tmp") for info in listed)
    for info in (info for info in listed if info.path):  # in-memory snapshots are listed with no path
        reopened.load_file(info)


@pytest.fixture
def steer(server: ServerThread, tmp_path: Path) -> Iterator[Steer]:
    """A Steer on a small model that keeps one snapshot in memory, so older checkpoints load from disk."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    config = SteerConfig(server=server.url, checkpoint_dir=tmp_path / "ck", ring_size=1, io=FAST_IO)
    hook = Steer(model, torch.optim.SGD(model.parameters(), lr=0.1), config=config)
    yield hook
    hook.close()


def train(steer: Steer, steps: range) -> None:
    inputs = torch.randn(16, 4)
    for iteration in steps:
        step = steer.poll(iteration)
        loss = steer.model(inputs).pow(2).mean()
        steer.optimizer.zero_grad()
        loss.backward()
        steer.optimizer.step()
        steer.record(step, loss=loss.item())


def deliver_and_apply(client: Client, steer: Steer, command: Rollback | SetHparams, step: int) -> str:
    """Submit, wait until the trainer's poller holds it, and apply it at the boundary before `step`."""
    assert steer.run_id is not None
    record = client.submit(steer.run_id, command)
    deadline = time.monotonic() + 10
    while steer.io.inbox.qsize() == 0:
        assert time.monotonic() < deadline, "command never reached the trainer"
        time.sleep(0.005)
    steer.poll(step)
    assert steer.flush(10)
    return record.id


@pytest.mark.slow
def test_a_corrupted_checkpoint_is_caught_by_its_checksum_and_rollback_to_it_is_rejected_leaving_the_run_as_it_was(
    steer: Steer, tmp_path: Path
) -> None:
    """One flipped byte: the rollback is rejected naming the corrupt file and its sha256; weights, step, branch stay."""
    train(steer, range(5))
    target = steer.save_checkpoint()
    train(steer, range(5, 8))
    steer.save_checkpoint()
    assert steer.checkpoints.entries[target.checkpoint_id].state is None, "the target now lives only on disk"
    path = Path(target.path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    before = {name: value.clone() for name, value in steer.model.state_dict().items()}
    with Client(steer.config.server) as client:
        command_id = deliver_and_apply(client, steer, Rollback(checkpoint_id=target.checkpoint_id), 8)
        record = client.get_command(steer.run_id or "", command_id)
        run = client.get_run(steer.run_id or "")
    assert record.status == "rejected"
    assert "corrupt" in record.message and "sha256" in record.message and target.checkpoint_id in record.message
    assert all(torch.equal(before[name], value) for name, value in steer.model.state_dict().items())
    assert (steer.step, steer.branch, steer.branches) == (8, "main", {"main"})
    assert (run.branch, run.branches) == ("main", ["main"])
    with pytest.raises(CheckpointError, match="corrupt"):
        CheckpointStore(path.parent).load(target.checkpoint_id)


ESCAPES = ["../x", "..", "../../etc/passwd", "/etc/passwd", "a/b", "./x", ".hidden", "x\\..\\y", "x\n", "", "%2e%2e"]
"""Checkpoint, branch and tag names that would leave the checkpoint directory if joined to it."""


@pytest.mark.parametrize("name", ESCAPES)
def test_checkpoint_and_branch_names_that_could_leave_the_directory_are_refused_and_nothing_is_stored(
    server: ServerThread, name: str, tmp_path: Path
) -> None:
    """The protocol refuses them as checkpoint ids, branches and tags; the server stores nothing; the trainer's
    store never turns an id into a path."""
    for build in (
        lambda: Rollback(checkpoint_id=name),
        lambda: Rollback(step=1, branch=name),
        lambda: SaveCheckpoint(tag=name),
    ):
        with pytest.raises(ValidationError):
            build()
    with Client(server.url) as client:
        run_id = client.register_run(RunRegistration(name="escape")).run_id
    before = row_counts(server.config.db)
    for command in (
        {"type": "rollback", "checkpoint_id": name},
        {"type": "rollback", "step": 1, "branch": name},
        {"type": "save_checkpoint", "tag": name},
    ):
        body = json.dumps({"command": command}).encode()
        answer = raw_request(server.url, "POST", f"/api/v1/runs/{run_id}/commands", body)
        assert answer.status == 422 and answer.error.details
    assert row_counts(server.config.db) == before
    store = CheckpointStore(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        store.find(checkpoint_id=name)
