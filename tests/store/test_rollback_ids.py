"""Writes undone by the database leave no trace in what the writer remembers: later batches still store."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from protocols import MetricsBatch, MetricsSample
from protocols.client import Client
from protocols.constants import API_PREFIX
from tests.server.helpers import raw_request, register
from tests.serving import ServerThread

FAILING_STEP = 7


def batch(step: int, values: dict[str, float]) -> MetricsBatch:
    return MetricsBatch(samples=[MetricsSample(step=step, time=time.time(), values=values)])


def test_a_batch_undone_after_creating_its_names_leaves_no_stale_ids(
    server: ServerThread, client: Client, store_db: Path
) -> None:
    run_id = register(client)
    client.push_metrics(run_id, batch(1, {"loss": 1.0}))
    with sqlite3.connect(store_db) as db:
        db.execute(
            f"CREATE TRIGGER refuse_step BEFORE INSERT ON metric_steps WHEN NEW.step = {FAILING_STEP} "
            "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
        )
    # New names on the refused step: the op creates their keyset and series keys, then the database undoes them.
    refused = raw_request(
        server.url,
        "POST",
        f"{API_PREFIX}/runs/{run_id}/metrics",
        batch(FAILING_STEP, {"loss": 2.0, "grad_norm": 3.0}).model_dump_json().encode(),
    )
    assert refused.status >= 500, refused.body
    with sqlite3.connect(store_db) as db:
        db.execute("DROP TRIGGER refuse_step")
        assert db.execute("SELECT COUNT(*) FROM metric_keysets").fetchone()[0] == 1
    # Another new keyset takes the id the undone one had; the names first seen on the refused step come after it.
    client.push_metrics(run_id, batch(8, {"lr": 0.5}))
    client.push_metrics(run_id, batch(9, {"loss": 4.0, "grad_norm": 5.0}))

    history = client.metrics_history(run_id)
    assert {name: dict(zip(series.steps, series.values, strict=True)) for name, series in history.series.items()} == {
        "loss": {1: 1.0, 9: 4.0},
        "grad_norm": {9: 5.0},
        "lr": {8: 0.5},
    }
