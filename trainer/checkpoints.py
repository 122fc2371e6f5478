"""Checkpoints: an in-memory ring of recent snapshots for fast rollback, and atomic, checksummed files.

A file is written to a temporary name in the same directory, hashed, fsynced and renamed, so a crash leaves
either the old state or the new one; its sha256 is kept in `index.json` and checked before every load.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import uuid4

import torch
from torch import Tensor

from protocols.records import CheckpointInfo

INDEX_FILE = "index.json"


class CheckpointError(Exception):
    """A checkpoint could not be found, read or verified."""


def detached_copy(state: Any) -> Any:
    """A deep copy whose tensors live on the CPU and share nothing with the training state."""
    if isinstance(state, Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {key: detached_copy(value) for key, value in state.items()}
    if isinstance(state, list):
        return [detached_copy(value) for value in state]
    if isinstance(state, tuple):
        return tuple(detached_copy(value) for value in state)
    return copy.deepcopy(state)


def remove_file(path: Path) -> None:
    """Delete a checkpoint file, or the directory of a sharded (`torch.distributed.checkpoint`) one."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@dataclass
class Entry:
    """A checkpoint the store knows: its info and, while it is in the ring, its state in memory."""

    info: CheckpointInfo
    state: dict[str, Any] | None = None


class CheckpointStore:
    """Keeps the newest `ring_size` snapshots in memory and up to `keep_files` files (tagged ones always)."""

    def __init__(self, directory: Path | None, *, ring_size: int = 4, keep_files: int = 5) -> None:
        self.directory = directory
        self.ring_size = ring_size
        self.keep_files = keep_files
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            for info in self._read_index():
                self.entries[info.checkpoint_id] = Entry(info)

    def save(
        self,
        state: dict[str, Any],
        *,
        branch: str,
        step: int,
        tag: str | None = None,
        to_disk: bool = True,
        healthy: bool = True,
        metrics: dict[str, float] | None = None,
    ) -> tuple[CheckpointInfo, list[CheckpointInfo]]:
        """Snapshot `state`; returns the new checkpoint's info and the infos of checkpoints it evicted."""
        checkpoint_id = f"{branch[:40]}.s{step}.{uuid4().hex[:8]}"
        snapshot = detached_copy(state)
        info = CheckpointInfo(
            checkpoint_id=checkpoint_id,
            branch=branch,
            step=step,
            time=time.time(),
            tag=tag,
            healthy=healthy,
            metrics=metrics or {},
        )
        if to_disk and self.directory is not None:
            path, size, digest = self._write(checkpoint_id, snapshot)
            info = info.model_copy(update={"path": str(path), "size_bytes": size, "sha256": digest})
        self.entries[checkpoint_id] = Entry(info, snapshot)
        evicted = self._enforce_retention()
        if self.directory is not None:
            self._write_index()
        return info, evicted

    def find(
        self,
        *,
        checkpoint_id: str | None = None,
        step: int | None = None,
        branch: str | None = None,
        latest_healthy: bool = False,
    ) -> CheckpointInfo:
        """The checkpoint asked for by id, by step (latest at or before it on `branch`), or the newest healthy one."""
        if checkpoint_id is not None:
            if checkpoint_id not in self.entries:
                raise CheckpointError(f"no checkpoint {checkpoint_id!r}; known: {', '.join(self.entries) or 'none'}")
            return self.entries[checkpoint_id].info
        infos = [entry.info for entry in self.entries.values()]
        if step is not None:
            candidates = [info for info in infos if info.branch == branch and info.step <= step]
            if not candidates:
                raise CheckpointError(f"no checkpoint at or before step {step} on branch {branch!r}")
            return max(candidates, key=lambda info: (info.step, info.time))
        if latest_healthy:
            healthy = [info for info in infos if info.healthy]
            if not healthy:
                raise CheckpointError("no healthy checkpoint to roll back to")
            return max(healthy, key=lambda info: info.time)
        raise CheckpointError("say which checkpoint: an id, a step, or latest_healthy")

    def load(self, checkpoint_id: str) -> dict[str, Any]:
        """The checkpoint's state, as a fresh copy: from memory when it is in the ring, else from its verified file."""
        entry = self.entries.get(checkpoint_id)
        if entry is None:
            raise CheckpointError(f"no checkpoint {checkpoint_id!r}")
        if entry.state is not None:
            state: dict[str, Any] = detached_copy(entry.state)
            return state
        return self.load_file(entry.info)

    def load_file(self, info: CheckpointInfo) -> dict[str, Any]:
        """Read a checkpoint file after checking its sha256 against the one recorded when it was written."""
        path = Path(info.path)
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing")
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != info.sha256:
            raise CheckpointError(f"checkpoint file {path} is corrupt: sha256 {digest} != recorded {info.sha256}")
        with open(path, "rb") as handle:
            state: dict[str, Any] = torch.load(handle, map_location="cpu", weights_only=True)
        return state

    def _write(self, checkpoint_id: str, state: dict[str, Any]) -> tuple[Path, int, str]:
        assert self.directory is not None
        final = self.directory / f"{checkpoint_id}.pt"
        temporary = self.directory / f".{checkpoint_id}.pt.tmp"
        with open(temporary, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        digest = hashlib.sha256(temporary.read_bytes()).hexdigest()
        os.replace(temporary, final)
        return final, final.stat().st_size, digest

    def _enforce_retention(self) -> list[CheckpointInfo]:
        """Drop ring copies past `ring_size` and files past `keep_files` (tagged files are kept)."""
        evicted: list[CheckpointInfo] = []
        in_memory = [key for key, entry in self.entries.items() if entry.state is not None]
        for key in in_memory[: max(0, len(in_memory) - self.ring_size)]:
            entry = self.entries[key]
            entry.state = None
            if not entry.info.path:
                del self.entries[key]
                evicted.append(entry.info)
        on_disk = [key for key, entry in self.entries.items() if entry.info.path and entry.info.tag is None]
        for key in on_disk[: max(0, len(on_disk) - self.keep_files)]:
            entry = self.entries.pop(key)
            remove_file(Path(entry.info.path))
            evicted.append(entry.info)
        return evicted

    def _read_index(self) -> list[CheckpointInfo]:
        assert self.directory is not None
        path = self.directory / INDEX_FILE
        if not path.is_file():
            return []
        return [CheckpointInfo.model_validate(item, strict=False) for item in json.loads(path.read_text())]

    def _write_index(self) -> None:
        assert self.directory is not None
        infos = [entry.info.model_dump(mode="json") for entry in self.entries.values() if entry.info.path]
        temporary = self.directory / f".{INDEX_FILE}.tmp"
        temporary.write_text(json.dumps(infos, indent=1))
        os.replace(temporary, self.directory / INDEX_FILE)
