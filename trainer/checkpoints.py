"""Checkpoints: an in-memory ring of recent snapshots for fast rollback, and atomic, checksummed files.

A file is written to a temporary name in the same directory, hashed, fsynced and renamed, so a crash leaves
either the old state or the new one; its sha256 is kept in `index.json` and checked before every load.

An in-memory snapshot does not copy on the training thread the tensors that only the optimizer writes: the
model's parameters (given as `nn.Parameter`s, as `state_dict(keep_vars=True)` gives them) and the optimizer's
state. A background thread copies them while the next step's forward and backward run (which only read them),
and a global optimizer step pre-hook makes the next `optimizer.step()` of any optimizer wait until the copy has
finished, so the snapshot holds exactly the values of the moment it was taken. On CUDA the copy goes to pinned
host memory on a side stream that first waits for the training stream; the pre-hook then makes the training
stream wait for the copy's event, so the host never blocks on the device. Every other tensor (buffers, which a
forward may write, the RNG state) and every non-tensor value is copied at once. Anything else that writes the
parameters must call `wait()` first; `load` does, so a rollback restores exactly what was saved.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import queue
import random
import shutil
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from protocols.base import MAX_STEP
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


class Parameters(dict[str, Any]):
    """A model's state that holds parameters only (`nn.Parameter`s, which only the optimizer writes): a snapshot
    defers copying it as a whole, without walking it on the training thread."""


Deferred = list[tuple[dict[Any, Any], Any, Any]]
"""(container, key, source): the background copy sets `container[key]` to a copy of the source (a parameter, a model's
`Parameters`, or the optimizer's whole per-parameter state)."""


_IMMUTABLE_TYPES = frozenset({int, float, str, bool, bytes, type(None)})


def split_copy(state: Any, deferred: Deferred) -> Any:
    """Like `detached_copy`, except that parameters and the optimizer's per-parameter `state` are left out and
    listed in `deferred`, for a `BackgroundCopy` to fill in. Kept lean: it runs on the training thread (exact types
    are tested first, as `isinstance(x, nn.Parameter)` goes through a slow metaclass check)."""
    if isinstance(state, Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        copied: dict[Any, Any] = {}
        for key, value in state.items():
            kind = type(value)
            if kind is nn.Parameter or kind is Parameters or (key == "state" and "param_groups" in state):
                deferred.append((copied, key, value))
                copied[key] = None
            elif kind in _IMMUTABLE_TYPES:
                copied[key] = value
            elif isinstance(value, Tensor):
                if isinstance(value, nn.Parameter):
                    deferred.append((copied, key, value))
                    copied[key] = None
                else:
                    copied[key] = value.detach().to("cpu", copy=True)
            else:
                copied[key] = split_copy(value, deferred)
        return copied
    if isinstance(state, (list, tuple)):
        items = [value if type(value) in _IMMUTABLE_TYPES else split_copy(value, deferred) for value in state]
        return items if isinstance(state, list) else tuple(items)
    return copy.deepcopy(state)


_INFO_FIELDS = [(name, field.default) for name, field in CheckpointInfo.model_fields.items()]


def _validated_before(fields: dict[str, Any]) -> CheckpointInfo:
    """The `CheckpointInfo` of fields that validation accepted before, as pydantic's `model_construct` makes it but
    without its walk over every field, which costs as much as validating on a thread whose caches a step just
    filled (tens of microseconds)."""
    info = CheckpointInfo.__new__(CheckpointInfo)
    values = {name: fields.get(name, default) for name, default in _INFO_FIELDS}  # in the model's field order
    object.__setattr__(info, "__dict__", values)
    object.__setattr__(info, "__pydantic_fields_set__", set(fields))
    object.__setattr__(info, "__pydantic_extra__", None)
    object.__setattr__(info, "__pydantic_private__", None)
    return info


class SnapshotWorker:
    """One thread that runs the snapshots' copy jobs in order (leaner to wake than an executor: a queue put)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, args=(self._jobs,), name="runsteer-snapshot", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None] | None) -> None:
        """Run `job` on the worker thread after the jobs submitted before it (None: end the thread there)."""
        self._jobs.put(job)

    def shutdown(self) -> None:
        """Run the jobs already submitted, then end the thread."""
        self._jobs.put(None)
        self._thread.join()

    @staticmethod
    def _run(jobs: queue.SimpleQueue[Callable[[], None] | None]) -> None:
        while (job := jobs.get()) is not None:
            job()


class BackgroundCopy:
    """The copies of one snapshot's deferred parts, made on a worker thread (and a CUDA side stream)."""

    def __init__(self, deferred: Deferred, worker: SnapshotWorker, dropped: list[Any]) -> None:
        self.streams: dict[torch.device, torch.cuda.Stream] = {}
        if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            devices = {source.device for _, _, source in deferred if isinstance(source, Tensor)}
            devices.add(torch.device("cuda", torch.cuda.current_device()))
            for device in devices:
                if device.type == "cuda":
                    stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
                    # The side stream starts where the training stream is now: the values of this moment.
                    stream.wait_stream(torch.cuda.current_stream(device))
                    self.streams[device] = stream
        self.events: dict[torch.device, torch.cuda.Event] = {}
        self.error: BaseException | None = None
        # Two locks held until the job releases them: `copied` once the copies are made (CPU) or issued (CUDA),
        # `done` once the job has also freed `dropped` (evicted snapshots) and ended.
        self.copied = threading.Lock()
        self.copied.acquire()
        self.done = threading.Lock()
        self.done.acquire()
        self._device_waited = False
        self._deferred, self._dropped = deferred, dropped
        worker.submit(self._job)

    def _job(self) -> None:
        try:
            for container, key, source in self._deferred:
                container[key] = self._copy_tree(source)
            for device, stream in self.streams.items():
                self.events[device] = stream.record_event()
        except BaseException as error:  # handed to the training thread, which raises it at its next wait
            self.error = error
        finally:
            self.copied.release()
            # Freeing an evicted snapshot's memory costs milliseconds (munmap): done here, in the same wake-up.
            self._dropped.clear()
            self._deferred = []
            self.done.release()

    def _copy_tree(self, source: Any) -> Any:
        if isinstance(source, Tensor):
            tensor = source.detach()
            stream = self.streams.get(tensor.device)
            if stream is None:
                return tensor.to("cpu", copy=True)
            with torch.cuda.stream(stream):
                host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                host.copy_(tensor, non_blocking=True)
                # The allocator must not hand the source's memory to the training stream while this reads it.
                tensor.record_stream(stream)
            return host
        if isinstance(source, dict):
            return {key: self._copy_tree(value) for key, value in source.items()}
        if isinstance(source, (list, tuple)):
            items = [self._copy_tree(value) for value in source]
            return items if isinstance(source, list) else tuple(items)
        return source if type(source) in _IMMUTABLE_TYPES else copy.deepcopy(source)

    def before_write(self) -> None:
        """Block the host until the copies are made (CPU) or issued, and make the device wait for them (CUDA)."""
        with self.copied:
            pass
        if self.error is not None:
            raise self.error
        if not self._device_waited:
            for device, event in self.events.items():
                torch.cuda.current_stream(device).wait_event(event)
            self._device_waited = True

    def finish(self) -> None:
        """Block until the copies are in host memory."""
        with self.done:
            pass
        if self.error is not None:
            raise self.error
        for event in self.events.values():
            event.synchronize()


@dataclass
class Entry:
    """A checkpoint the store knows: its info and, while it is in the ring, its state in memory."""

    info: CheckpointInfo
    state: dict[str, Any] | None = None


class CheckpointStore:
    """Keeps the newest `ring_size` snapshots in memory and up to `keep_files` files (tagged ones always)."""

    def __init__(
        self, directory: Path | None, *, ring_size: int = 4, keep_files: int = 5, overlap: bool = True
    ) -> None:
        self.directory = directory
        self.ring_size = ring_size
        self.keep_files = keep_files
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.overlap = overlap
        """Copy parameters and optimizer state of in-memory snapshots off the training thread; turn it off for a
        loop that writes parameters between a snapshot and its next `optimizer.step()` other than by a load."""
        self._executor: SnapshotWorker | None = None
        self._pending: list[BackgroundCopy] = []
        """Copies not yet known to be in host memory."""
        self._unwritten: list[BackgroundCopy] = []
        """Copies the next optimizer step must wait for."""
        self._hook: RemovableHandle | None = None
        self._lock = threading.Lock()
        self._validated: tuple[str, frozenset[str]] | None = None
        """The branch and metric names of the last info validated (see `_new_info`)."""
        self._ids = random.Random()
        """Checkpoint id suffixes: seeded once from the OS (a `uuid4` per id reads `os.urandom`, which costs hundreds
        of microseconds on some hosts), and apart from the `random` module's state, which the run may depend on."""
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
        info = self._new_info(branch, step, tag, healthy, metrics or {})
        self.wait()
        deferred: Deferred = []
        if (to_disk and self.directory is not None) or not self.overlap:
            snapshot = detached_copy(state)
        else:
            snapshot = split_copy(state, deferred)
        if to_disk and self.directory is not None:
            path, size, digest = self._write(info.checkpoint_id, snapshot)
            info = info.model_copy(update={"path": str(path), "size_bytes": size, "sha256": digest})
        self.entries[info.checkpoint_id] = Entry(info, snapshot)
        evicted, dropped = self._enforce_retention()
        if deferred:
            self._copy_in_background(deferred, dropped)
        elif dropped and self.overlap:
            # Freeing a snapshot's memory costs milliseconds (munmap); the worker thread does it.
            self._worker().submit(dropped.clear)
        if self.directory is not None:
            self._write_index()
        return info, evicted

    def _new_info(
        self, branch: str, step: int, tag: str | None, healthy: bool, metrics: dict[str, float]
    ) -> CheckpointInfo:
        """The new checkpoint's info; a bad name or step is refused (`ValidationError`) before anything is copied.

        Validating it is a large part of a periodic snapshot's cost on the training thread, so an info with no tag,
        the branch and metric names of the last one validated and a step in range (every periodic snapshot after the
        first) is built without validating again: what validation checks holds for it already. Metric values are
        finite floats by the caller's contract."""
        fields: dict[str, Any] = {
            "checkpoint_id": f"{branch[:40]}.s{step}.{self._ids.getrandbits(32):08x}",
            "branch": branch,
            "step": step,
            "time": time.time(),
            "tag": tag,
            "healthy": healthy,
            "metrics": metrics,
        }
        valid = self._validated
        if (
            tag is None
            and valid is not None
            and branch == valid[0]
            and type(step) is int
            and 0 <= step <= MAX_STEP
            and metrics.keys() == valid[1]
        ):
            return _validated_before(fields)
        info = CheckpointInfo.model_validate(fields)
        self._validated = (branch, frozenset(metrics))
        return info

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
        self.wait()
        if entry.state is not None:
            state: dict[str, Any] = detached_copy(entry.state)
            return state
        return self.load_file(entry.info)

    def wait(self) -> None:
        """Block until every background copy is in host memory; call it before writing parameters other than
        through `optimizer.step()` (which waits by itself)."""
        if not self._pending:
            return
        with self._lock:
            pending, self._pending, self._unwritten = self._pending, [], []
        for background in pending:
            background.finish()

    def _copy_in_background(self, deferred: Deferred, dropped: list[Any]) -> None:
        """Fill in a snapshot's deferred tensors on the worker thread, which then frees `dropped`."""
        background = BackgroundCopy(deferred, self._worker(), dropped)
        with self._lock:
            self._pending.append(background)
            self._unwritten.append(background)
        if self._hook is None:
            # Registered once and left in place until `close`: a hook may not remove itself while torch iterates.
            # It holds the ring weakly, so a ring nobody closed can still be freed (its hook then does nothing).
            method = weakref.WeakMethod(self._before_optimizer_step)

            def pre_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
                bound = method()
                if bound is not None:
                    bound(optimizer, args, kwargs)

            self._hook = register_optimizer_step_pre_hook(pre_hook)

    def _worker(self) -> SnapshotWorker:
        if self._executor is None:
            self._executor = SnapshotWorker()
            # A ring nobody closed ends its thread when it is freed (after the jobs already submitted).
            weakref.finalize(self, self._executor.submit, None)
        return self._executor

    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Any optimizer's step waits until the copies taken before it are made (CPU) or ordered before it (CUDA)."""
        if not self._unwritten:
            return
        with self._lock:
            unwritten, self._unwritten = self._unwritten, []
        for background in unwritten:
            background.before_write()

    def close(self) -> None:
        """Finish the background copies, remove the optimizer hook and stop the worker thread."""
        self.wait()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None

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

    def _enforce_retention(self) -> tuple[list[CheckpointInfo], list[dict[str, Any]]]:
        """Drop ring copies past `ring_size` and files past `keep_files`, keeping every tagged file and the newest
        healthy checkpoint in memory and on disk whatever came after it, so `latest_healthy` always has a target.
        Returns the evicted infos and the dropped in-memory states, for the worker thread to free."""
        healthy = [key for key, entry in self.entries.items() if entry.info.healthy]
        healthy_in_memory = [key for key in healthy if self.entries[key].state is not None]
        healthy_on_disk = [key for key in healthy if self.entries[key].info.path]
        kept = {keys[-1] for keys in (healthy_in_memory, healthy_on_disk) if keys}
        evicted: list[CheckpointInfo] = []
        dropped: list[dict[str, Any]] = []
        in_memory = [key for key, entry in self.entries.items() if entry.state is not None and key not in kept]
        for key in in_memory[: max(0, len(in_memory) - max(0, self.ring_size - len(kept & set(healthy_in_memory))))]:
            entry = self.entries[key]
            if entry.state is not None:
                dropped.append(entry.state)
            entry.state = None
            if not entry.info.path:
                del self.entries[key]
                evicted.append(entry.info)
        on_disk = [key for key, e in self.entries.items() if e.info.path and e.info.tag is None and key not in kept]
        for key in on_disk[: max(0, len(on_disk) - max(0, self.keep_files - len(kept & set(healthy_on_disk))))]:
            entry = self.entries.pop(key)
            remove_file(Path(entry.info.path))
            evicted.append(entry.info)
        return evicted, dropped

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
