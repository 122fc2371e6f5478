"""A run the server refuses after being unreachable at start-up: said loudly, and memory stays within its bound."""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path

import pytest
import torch

from protocols.client import Client
from protocols.errors import Unauthorized
from protocols.records import RunRegistration
from tests.polling import wait_until
from tests.serving import ServerProcess
from trainer.io import IOConfig, IOWorker, SampleItem
from trainer.steer import Steer, SteerConfig

MEMORY_MAX = 50


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_registration_refused_after_start_up_is_logged_and_record_keeps_memory_bounded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The server is down when training starts, then comes up and refuses the trainer's token: the refusal is
    logged as an error and kept on the worker, and samples recorded after it still leave the outbox, at most
    `memory_max_samples` of them in memory and the rest in the spill file."""
    port = free_port()
    config = IOConfig(
        memory_max_samples=MEMORY_MAX, spill_path=tmp_path / "spill.jsonl", retry_min_s=0.05, retry_max_s=0.2
    )
    worker = IOWorker(
        lambda: Client(f"http://127.0.0.1:{port}", token="not-a-known-token-0123"),
        RunRegistration(name="refused"),
        config,
    )
    tokens = [{"name": "trainer", "token": "the-trainers-token-0123", "scopes": ["train"]}]
    server = ServerProcess(tmp_path / "runsteer.db", env={"RUNSTEER_TOKENS": json.dumps(tokens)})
    caplog.set_level(logging.ERROR, logger="runsteer.trainer")
    worker.start()
    try:
        for step in range(20):
            worker.outbox.put(SampleItem("main", step, time.time(), {"loss": 1.0}))
        time.sleep(0.3)
        assert worker.registration_error is None, "unreachable is not a refusal"
        server.start(port=port)
        wait_until(lambda: worker.registration_error is not None, 20.0, "the refusal")
        for step in range(20, 1020):
            worker.outbox.put(SampleItem("main", step, time.time(), {"loss": 1.0}))
        wait_until(worker.outbox.empty, 10.0, "the outbox drained after the refusal")
        time.sleep(0.2)
        assert isinstance(worker.registration_error, Unauthorized)
        assert len(worker.buffer.memory) <= MEMORY_MAX and len(worker.buffer) == 1020
        assert any("refused to register this run" in record.getMessage() for record in caplog.records)
    finally:
        worker.stop(1.0)
        server.stop()


def test_a_steer_whose_run_is_refused_after_start_up_says_so_in_its_state(tmp_path: Path) -> None:
    """`Steer.registration_error` holds the refusal once the server comes up and refuses the token, and the loop
    keeps training meanwhile (poll and record do not raise)."""
    port = free_port()
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = SteerConfig(
        server=f"http://127.0.0.1:{port}",
        token="not-a-known-token-0123",
        register_timeout_s=0.2,
        io=IOConfig(spill_path=tmp_path / "spill.jsonl", retry_min_s=0.05, retry_max_s=0.2),
    )
    tokens = [{"name": "trainer", "token": "the-trainers-token-0123", "scopes": ["train"]}]
    server = ServerProcess(tmp_path / "runsteer.db", env={"RUNSTEER_TOKENS": json.dumps(tokens)})
    steer = Steer(model, optimizer, config=config)
    try:
        assert steer.registration_error is None, "unreachable is not a refusal"
        server.start(port=port)
        step = 0
        while steer.registration_error is None and step < 2000:
            step = steer.poll(step) + 1
            steer.record(step, loss=1.0)
            time.sleep(0.01)
        assert isinstance(steer.registration_error, Unauthorized)
    finally:
        steer.close()
        server.stop()
