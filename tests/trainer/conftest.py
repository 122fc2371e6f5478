"""Trainer fixtures: a built-in run wired to the test server, and a way to hand it a command at a known step."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer.io import IOConfig
from trainer.run import BuiltinRun, RunConfig

FAST_IO = IOConfig(poll_wait_s=0.5, flush_interval_s=0.1, heartbeat_interval_s=0.5, retry_max_s=0.5)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread() -> None:
    """One intra-op thread: on a shared 2-core machine, spinning OpenMP workers slow small models many times over."""
    torch.set_num_threads(1)


@pytest.fixture
def make_run(server_url: str, tmp_path: Path) -> Iterator[Callable[..., BuiltinRun]]:
    """Build `cpu-tiny` built-in runs against the test server; each is closed at the end of the test."""
    runs: list[BuiltinRun] = []

    def make(**overrides: Any) -> BuiltinRun:
        settings: dict[str, Any] = {
            "server": server_url,
            "steps": 40,
            "checkpoint_dir": tmp_path / f"ck{len(runs)}",
            "run_name": f"test{len(runs)}",
            "io": FAST_IO,
        }
        settings.update(overrides)
        run = BuiltinRun(RunConfig(**settings))
        runs.append(run)
        return run

    yield make
    for run in runs:
        run.steer.close()
