"""Rank 1 of a two-process gloo group built without torchrun, for the side-channel test of `test_parts`.

`python side_rank.py STORE OUT`: joins the group through the file store, meets rank 0 at two boundaries (the first
announces a command and carries more values than a row has room for), writes what it saw to OUT as JSON, then
goes silent for a while and dies by SIGKILL, as a crashed rank does: nothing of its own says goodbye.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch.distributed as dist

from trainer.distributed import DistributedConfig, Ranks


def values_of(rank: int) -> dict[str, float]:
    """What rank `rank` records at a step: a mean, a sum and twenty maxima (more than a row's room of 16)."""
    values = {"loss": float(rank), "tokens_per_s": 10.0 + rank, "lr": 0.1}
    values.update({f"attn_logit_max/{layer}": float(layer + rank) for layer in range(20)})
    return values


def main() -> None:
    store, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=1, world_size=2)
    ranks = Ranks(config=DistributedConfig(side_timeout_s=30.0))
    meeting = ranks.start([], [(0, values_of(1))])
    size, _ = ranks.finish(meeting)
    commands = ranks.commands(meeting, size)
    capacity = ranks._capacity
    second = ranks.finish(ranks.start([], [(1, {"loss": 1.0})]))
    out.write_text(json.dumps({"commands": [record.id for record in commands], "capacity": capacity, "second": second}))
    time.sleep(float(os.environ.get("SILENT_S", "1.0")))
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main()
