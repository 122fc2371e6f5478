"""Two servers on one PostgreSQL database: SIGKILL the serving one mid-run and the trainer goes on with the other."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from protocols.client import Client
from tests.postgres import LocalPostgres
from tests.serving import ServerProcess
from trainer.steer import Steer, SteerConfig

STEPS = 80
KILL_AT = 30
COMMAND_AT = {10: 0.05, 25: 0.04, 40: 0.03, 60: 0.02}
"""Steps at which a set_hparams (lr) is submitted, through the servers list, before and after the kill."""


@pytest.mark.slow
def test_a_killed_server_loses_nothing_and_nothing_is_applied_twice(
    postgres_cluster: LocalPostgres, tmp_path: Path
) -> None:
    """Every step's metrics and every command arrive exactly once although the trainer's server was SIGKILLed."""
    url = postgres_cluster.create_database("failover")
    first = ServerProcess(tmp_path / "first.db", "--db", url).start()
    second = ServerProcess(tmp_path / "second.db", "--db", url).start()
    servers = f"{first.url},{second.url}"
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steer: Steer | None = None
    try:
        steer = Steer(model, optimizer, server=servers, config=SteerConfig(run_name="failover"))
        with Client(servers) as client:
            run_id = steer.run_id
            assert run_id is not None
            submitted = []
            for step in range(STEPS):
                steer.poll(step)
                loss = model(torch.randn(8, 4)).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                steer.record(step, loss=loss.item())
                if step in COMMAND_AT:
                    submitted.append(client.submit(run_id, {"type": "set_hparams", "lr": COMMAND_AT[step]}))
                if step == KILL_AT:
                    first.stop(kill=True)
                time.sleep(0.05)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                step += 1
                steer.poll(step)
                records = [client.get_command(run_id, record.id) for record in submitted]
                if all(record.status == "applied" for record in records):
                    break
                time.sleep(0.1)
            assert [record.status for record in records] == ["applied"] * len(COMMAND_AT)
            applied_ids = [record.id for record, _ in steer.results]
            assert sorted(applied_ids) == sorted(record.id for record in submitted), "each command applied once"
            assert optimizer.param_groups[0]["lr"] == COMMAND_AT[max(COMMAND_AT)]
            assert steer.close()
            steer = None
            history = client.metrics_history(run_id, keys=["loss"])
            assert history.series["loss"].steps == list(range(STEPS)), "no step lost or stored twice"
    finally:
        if steer is not None:
            steer.close()
        first.stop(kill=True)
        second.stop()
