"""Faults with real processes: the server SIGKILLed and restarted, the network cut, the spill disk full."""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocols import AlertEvent
from protocols.client import Client
from tests.reliability.proxy import Proxy
from tests.reliability.trainers import TrainerProcess, assert_each_metric_and_command_exactly_once, submit_lrs
from tests.serving import ServerProcess


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server process on a fresh store; killed at the end whatever happened."""
    process = ServerProcess(tmp_path / "runsteer.db", "--heartbeat-timeout", "60").start()
    yield process
    process.stop(kill=True)


@pytest.fixture
def trainers() -> Iterator[list[TrainerProcess]]:
    """Trainer processes started by a test; any still running at the end are killed."""
    started: list[TrainerProcess] = []
    yield started
    for trainer in started:
        trainer.kill()


@pytest.mark.slow
def test_a_server_sigkilled_mid_run_and_restarted_loses_nothing_and_applies_each_command_once(
    server: ServerProcess, trainers: list[TrainerProcess], tmp_path: Path
) -> None:
    """Training never pauses; every step arrives once with its loss; commands accepted before the kill apply once."""
    trainer = TrainerProcess(server.url, tmp_path / "spill.jsonl", ["--steps", "250"])
    trainers.append(trainer)
    trainer.wait_step(40)
    assert trainer.run_id is not None
    commands = submit_lrs(server.url, trainer.run_id, 4, 0.001)
    server.stop(kill=True)
    down_at = trainer.last_step
    time.sleep(1.5)
    assert trainer.last_step > down_at + 20, "the trainer kept training while the server was gone"
    server.start(port=server.port)
    assert_each_metric_and_command_exactly_once(trainer, server.url, commands)
    assert trainer.longest_pause_s() < 1.5


@pytest.mark.slow
def test_a_network_that_drops_loses_answers_and_stalls_loses_nothing_and_applies_each_command_once(
    server: ServerProcess, trainers: list[TrainerProcess], tmp_path: Path
) -> None:
    """Through a proxy that resets connections, throws answers away, then holds traffic: same guarantees."""
    proxy = Proxy(server.port)
    trainer = TrainerProcess(proxy.url, tmp_path / "spill.jsonl", ["--steps", "400"])
    trainers.append(trainer)
    try:
        trainer.wait_step(30)
        assert trainer.run_id is not None
        commands: list[str] = []
        for mode in ("drop", "lose_answers", "stall"):
            commands += submit_lrs(server.url, trainer.run_id, 2, 0.001 * (len(commands) + 1))
            proxy.set(mode)
            before = trainer.last_step
            time.sleep(1.5)
            assert trainer.last_step > before + 20, f"the trainer kept training while the network was in {mode}"
            proxy.set("open")
            time.sleep(0.5)
        assert_each_metric_and_command_exactly_once(trainer, server.url, commands)
        assert trainer.longest_pause_s() < 1.5
    finally:
        proxy.close()


SPILL_LIMIT_BYTES = 8 * 1024
"""The largest file the trainer process may write (RLIMIT_FSIZE): its spill file fills up after ~70 samples."""


def small_files() -> None:
    """In the child: cap file size, so writing past it fails with EFBIG as a full disk fails with ENOSPC."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (SPILL_LIMIT_BYTES, SPILL_LIMIT_BYTES))


@pytest.mark.slow
def test_a_full_spill_disk_keeps_training_and_counts_and_reports_every_lost_sample(
    server: ServerProcess, trainers: list[TrainerProcess], tmp_path: Path
) -> None:
    """With the server gone and the spill file unable to grow, training goes on; lost samples are alerted, counted."""
    trainer = TrainerProcess(
        server.url, tmp_path / "spill.jsonl", ["--steps", "300", "--memory-max", "10"], preexec=small_files
    )
    trainers.append(trainer)
    trainer.wait_step(20)
    assert trainer.run_id is not None
    server.stop(kill=True)
    time.sleep(3.0)
    server.start(port=server.port)
    done = trainer.finish()
    assert [line.step for line in trainer.steps] == list(range(300)), "training went on through the full disk"
    recorded = {line.step: line.loss for line in trainer.steps}
    with Client(server.url) as client:
        series = client.metrics_history(trainer.run_id, keys=["loss"]).series["loss"]
        alerts = client.list_events(trainer.run_id, kinds=["alert"])
    assert done["lost"] > 0 and done["sent_all"]
    assert len(series.steps) + done["lost"] == 300, "every sample is either stored or counted as lost"
    assert all(recorded[step] == value for step, value in zip(series.steps, series.values, strict=True))
    assert alerts and all(isinstance(event, AlertEvent) and event.severity == "critical" for event in alerts)
    messages = [event.message for event in alerts if isinstance(event, AlertEvent)]
    assert all("metric samples lost" in message for message in messages)
    assert sum(int(message.split()[0]) for message in messages) == done["lost"]
