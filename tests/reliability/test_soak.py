"""One minute of the soak benchmark (benchmarks/soak.py): 20 runs pushing every 50 ms, 100 websocket watchers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from benchmarks.soak import soak
from tests.serving import ServerProcess

RSS_GROWTH_BOUND_MIB = 64.0
"""Generous: a leak of one object per event (~100k events delivered) would still pass only if each were tiny."""


@pytest.mark.slow
def test_a_minute_of_twenty_runs_and_a_hundred_watchers_has_no_error_no_loss_and_flat_memory(tmp_path: Path) -> None:
    """No failed push or stream, every watcher gets every sample of its run, server RSS grows by less than the bound."""
    server = ServerProcess(tmp_path / "runsteer.db").start()
    try:
        assert server.process is not None
        result = asyncio.run(soak(server.url, server.process.pid, minutes=1.0))
    finally:
        server.stop()
    assert result.errors == []
    assert result.closed_watchers == 0 and result.lost == 0
    assert result.pushed >= 20 * 60 * 10, "at least half the planned pushes happened"
    assert result.delivered == result.pushed * 5, "each run has five watchers and each saw every sample"
    assert result.rss_end_mib - result.rss_start_mib < RSS_GROWTH_BOUND_MIB, result.summary()
