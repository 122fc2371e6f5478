"""The trainer keeps going while the server is away, and nothing recorded meanwhile is lost or stored twice."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from protocols.client import Client
from tests.serving import ServerProcess
from tests.trainer.conftest import FAST_IO
from tests.trainer.helpers import train
from trainer.run import BuiltinRun, RunConfig


@pytest.mark.slow
def test_a_server_stopped_mid_run_and_restarted_loses_no_metric(tmp_path: Path) -> None:
    """Steps trained while the server is down are spilled to disk, replayed in order, and each stored once."""
    server = ServerProcess(tmp_path / "runsteer.db").start()
    spill = tmp_path / "spill.jsonl"
    io = dataclasses.replace(FAST_IO, memory_max_samples=4, spill_path=spill)
    run = BuiltinRun(RunConfig(server=server.url, steps=100, run_name="resilient", io=io))
    try:
        losses = train(run, range(5))
        assert run.steer.flush(10)
        server.stop()
        losses += train(run, range(5, 20))
        run.steer.flush(0.5)
        assert spill.exists() and run.steer.io.buffer.spilled > 0
        server.start(port=server.port)
        assert run.steer.flush(20)
        assert not spill.exists()
        with Client(server.url) as client:
            series = client.metrics_history(run.steer.run_id, keys=["loss"]).series["loss"]
        assert series.steps == list(range(20))
        assert series.values == losses
    finally:
        run.steer.close()
        server.stop()
