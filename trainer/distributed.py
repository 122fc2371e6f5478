"""torchrun support: one run on the server, every command applied by every rank before the same step.

Rank 0 alone talks to the server. At each step boundary every rank hands its row (rank 0's command payload
length, a checksum and count of the metrics recorded since the last boundary, and the values to reduce) to every
other rank over a TCP mesh of the ranks' own (`Mesh`), sent without waiting (`Ranks.start`); the next boundary
reads the rows that arrived meanwhile (`Ranks.finish`). The mesh is driven by the training thread alone: a row
fits in the socket's buffer and has arrived by the time it is read, so handing it over costs two system calls
per peer and wakes no thread, where a collective of the process group hands each one to the backend's threads.
When a boundary announced commands, the next one exchanges rows once more, waited for at once (the values
recorded since), and broadcasts the commands on a CPU `gloo` side group created beside the user's process group
(NCCL or gloo alike, so steering adds no GPU sync); every rank applies them: a command applies one boundary after
rank 0 had it, on every rank alike. The outcomes are gathered back on that group: a command is `applied` only
when every rank applied it. While paused, rank 0 waits for commands in short slices and every rank meets it once
per slice, waited for at once, so no rank waits long and a pause may outlast any process group timeout. The side
channel's waits get their own, long timeout (`DistributedConfig.side_timeout_s`): rank 0 may be writing a
checkpoint file while the others wait for it. A rank that ends closes its connections, so the others' next
boundary fails naming it instead of waiting.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import queue
import signal
import socket
import struct
import sys
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import TypeAdapter
from torch import Tensor, nn

from protocols.commands import CommandRecord, CommandResult
from protocols.records import CheckpointInfo, RunInfo
from trainer.checkpoints import CheckpointStore, detached_copy
from trainer.io import SampleItem

Reduction = Literal["mean", "sum", "max", "norm", "ratio"]

REDUCTIONS: dict[str, Reduction] = {
    "loss": "mean",
    "tokens_per_s": "sum",
    "step_time_ms": "max",
    "grad_norm": "norm",
    "param_norm": "norm",
    "update_ratio": "ratio",
    "logit_max": "max",
    "logit_z": "mean",
    "nonfinite": "max",
    "nonfinite_grad": "max",
    "nonfinite_param": "max",
}
"""How a recorded value combines across ranks; every other value is rank 0's. `norm` values are the local
shard's norm under FSDP (combined as the root of the summed squares) and already global under DDP; a `ratio` is
a shard's norm over its `param_norm`, combined from the shards' numerators under FSDP."""
PREFIXED: dict[str, Reduction] = {"grad_norm/": "norm", "attn_logit_max/": "max"}
"""Reductions of whole families of names, by prefix: per-block gradient norms, per-layer attention logits."""

_records = TypeAdapter(list[CommandRecord])

Sample = tuple[int, dict[str, float]]
"""One `record` call: the step and its values."""


@dataclass(frozen=True)
class Layout:
    """Which of a sample's values are reduced, in the order every rank sends them, and how."""

    keys: tuple[str, ...]
    reductions: tuple[Reduction | None, ...]
    checksum: int
    """Of `keys`: the ranks compare it to find a rank that recorded other names."""
    scale: int | None
    """The index of `param_norm` in `keys`: the denominators of the ratios."""


@dataclass
class Meeting:
    """A boundary's row, sent to every rank by `Ranks.start` and matched with theirs by `Ranks.finish`."""

    header: tuple[float, float, float, float]
    """The boundary's number, rank 0's payload length, the checksum of the steps and names, the count of values."""
    samples: list[Sample]
    layouts: list[Layout]
    flat: list[float]
    """This rank's values to reduce, in the order of the layouts."""
    payload: bytes
    """Rank 0's commands as JSON (empty on other ranks)."""
    records: list[CommandRecord]
    """Rank 0's commands announced (empty on other ranks: they learn them from the payload)."""


@dataclass
class DistributedConfig:
    """Settings of the side channel between ranks."""

    side_timeout_s: float = 3600.0
    """How long the side channel waits for another rank: rank 0 may be saving a checkpoint file meanwhile."""
    pause_slice_s: float = 0.2
    """While paused, rank 0 waits this long for commands before every rank meets it again."""


class RankFailure(Exception):
    """This rank cannot go on: torchrun told it to end (it ends the survivors when a rank dies), or another rank
    left the side channel; the run ends as failed."""


def world_of_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside torchrun."""
    return (
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


def is_sharded(model: nn.Module) -> bool:
    """True when the model's parameters are DTensor shards (FSDP2's `fully_shard`), so norms are per shard."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(param, DTensor) for param in model.parameters())


class Ranks:
    """The side channel of one rank: command hand-over, outcome agreement, metric reduction, shared values."""

    def __init__(self, *, sharded: bool = False, config: DistributedConfig | None = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("torch.distributed is not initialised; call init_process_group first (torchrun does)")
        self.config = config or DistributedConfig()
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.sharded = sharded
        # Every rank must create every group, in the same order; this one carries only small CPU tensors.
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.config.side_timeout_s))
        self.mesh = Mesh(self.group, self.rank, self.world, self.config.side_timeout_s)
        self._capacity = 16
        """Values a boundary's row has room for; a row with more sends the rest behind it, and it grows for the
        next boundaries, on every rank alike."""
        self._layouts: dict[tuple[str, ...], Layout] = {}
        self._boundary = 0
        self._in_flight = False
        end_on_sigterm()

    @classmethod
    def detect(cls, model: nn.Module, config: DistributedConfig | None = None) -> Ranks | None:
        """The side channel when this process is a rank of an initialised group (one of one included), else None."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        return cls(sharded=is_sharded(model), config=config)

    @property
    def leader(self) -> bool:
        """Rank 0: the one that talks to the server."""
        return self.rank == 0

    def start(self, records: list[CommandRecord], samples: list[Sample]) -> Meeting:
        """Send a boundary's row to every other rank without waiting for it: the boundary's number, rank 0's
        command payload length, a checksum of the steps and names recorded since the last one, their count and the
        values to reduce (see `REDUCTIONS`). `finish` reads the other ranks' rows."""
        if self._in_flight:
            raise RuntimeError("a boundary's row is still in flight; finish it before starting the next")
        if self.mesh.closed:
            raise RuntimeError("the side channel is closed (closing the hook closes it)")
        payload = _records.dump_json(records) if self.leader and records else b""
        layouts = [self._layout(values) for _, values in samples]
        pairs = list(zip(samples, layouts, strict=True))
        flat = [values[key] for (_, values), layout in pairs for key in layout.keys]
        checksum = zlib.crc32(repr([(step, layout.checksum) for (step, _), layout in pairs]).encode())
        self._boundary += 1
        header = (float(self._boundary), float(len(payload)), float(checksum), float(len(flat)))
        if self.mesh.peers:
            padding = bytes(8 * max(self._capacity - len(flat), 0))
            self.mesh.send(struct.pack(f"<{4 + len(flat)}d", *header, *flat) + padding)
        self._in_flight = True
        return Meeting(header, samples, layouts, flat, payload, records if self.leader else [])

    def finish(self, meeting: Meeting) -> tuple[int, list[Sample]]:
        """Read the other ranks' rows of `meeting`'s boundary (there already, as a rule); returns rank 0's payload
        length (0: no commands) and, on rank 0, the samples it carried, reduced across ranks (the other ranks report
        nothing and get an empty list). When more values were recorded than a row holds, the room grows for the
        next boundaries, on every rank alike."""
        self._in_flight = False
        rows = [(meeting.header, meeting.flat)] * self.world
        for rank, peer in self.mesh.peers:
            rows[rank] = self._receive_row(rank, peer)
        first = rows[0][0]
        for rank, (header, _) in enumerate(rows):
            if header[0] != meeting.header[0]:
                raise RuntimeError(
                    f"rank {rank} is at side-channel boundary {header[0]:.0f}, rank {self.rank} at "
                    f"{meeting.header[0]:.0f}: call the hook at the same boundaries on every rank"
                )
            if header[2:] != first[2:]:
                raise RuntimeError(
                    "the ranks recorded different metrics since the last step boundary; record the same names at "
                    "the same steps on every rank"
                )
        count = int(first[3])
        if count > self._capacity:
            self._capacity = 1 << (count - 1).bit_length()
        if not self.leader:
            return int(first[1]), []  # rank 0 alone reports the run's values
        by_column = list(zip(*(values for _, values in rows), strict=True))
        reduced: list[Sample] = []
        column = 0
        for (step, values), layout in zip(meeting.samples, meeting.layouts, strict=True):
            columns = by_column[column : column + len(layout.keys)]
            column += len(layout.keys)
            scale = columns[layout.scale] if layout.scale is not None else None
            combined = dict(values)
            for key, how, values_of_ranks in zip(layout.keys, layout.reductions, columns, strict=True):
                combined[key] = combine_values(values_of_ranks, how, sharded=self.sharded, denominators=scale)
            reduced.append((step, combined))
        return int(first[1]), reduced

    def _receive_row(self, rank: int, peer: socket.socket) -> tuple[tuple[float, float, float, float], list[float]]:
        """Rank `rank`'s next row: its header and its values (those beyond the row's room follow it)."""
        row = self.mesh.receive(rank, peer, 8 * (4 + self._capacity))
        boundary, size, checksum, count, *values = struct.unpack(f"<{4 + self._capacity}d", row)
        if count > self._capacity:
            rest = self.mesh.receive(rank, peer, 8 * (int(count) - self._capacity))
            values.extend(struct.unpack(f"<{int(count) - self._capacity}d", rest))
        return (boundary, size, checksum, count), values[: int(count)]

    def commands(self, meeting: Meeting, size: int) -> list[CommandRecord]:
        """Rank 0's commands of `meeting` (whose payload is `size` bytes long) on every rank, in one broadcast."""
        buffer = (
            torch.frombuffer(bytearray(meeting.payload), dtype=torch.uint8)
            if self.leader
            else torch.empty(size, dtype=torch.uint8)
        )
        dist.broadcast(buffer, src=0, group=self.group)
        return meeting.records if self.leader else _records.validate_json(buffer.numpy().tobytes())

    def exchange(self, records: list[CommandRecord], samples: list[Sample]) -> tuple[list[CommandRecord], list[Sample]]:
        """A boundary's collective, waited for at once: rank 0's commands on every rank, and the samples reduced
        (see `start`); the commands follow in a broadcast only when there are some."""
        meeting = self.start(records, samples)
        size, reduced = self.finish(meeting)
        return (self.commands(meeting, size) if size else []), reduced

    def _layout(self, values: dict[str, float]) -> Layout:
        """The names of `values` that are reduced, in one order on every rank, with their reductions (cached by the
        names recorded: a loop records the same few sets of names step after step)."""
        names = tuple(values)
        layout = self._layouts.get(names)
        if layout is None:
            if len(self._layouts) >= 64:
                self._layouts.clear()
            keys = tuple(sorted(key for key in names if reduction_of(key) is not None))
            reductions = tuple(reduction_of(key) for key in keys)
            scale = keys.index("param_norm") if "param_norm" in keys else None
            layout = Layout(keys, reductions, zlib.crc32(repr(keys).encode()), scale)
            self._layouts[names] = layout
        return layout

    def agree(self, results: list[CommandResult]) -> list[CommandResult]:
        """Every rank's outcome of the same commands combined on rank 0 (others get their own back)."""
        gathered: list[list[CommandResult] | None] = [None] * self.world if self.leader else []
        dist.gather_object(results, gathered if self.leader else None, dst=0, group=self.group)
        if not self.leader:
            return results
        per_rank = [ranked for ranked in gathered if ranked is not None]
        return [combine([outcomes[index] for outcomes in per_rank]) for index in range(len(results))]

    def share(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (a run id, a checkpoint's info): for rare, small objects."""
        box = [value if self.leader else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def close(self) -> None:
        """Close the connections to the other ranks: a rank still waiting for this one hears that it left."""
        self.mesh.close()


class Mesh:
    """A TCP connection from this rank to every other, driven by the training thread alone (no thread of its own).

    A boundary's row goes to every peer in one non-blocking send each (at most two rows per peer are unread at any
    time, so it fits the socket's buffer) and is read at the next boundary, where it has arrived by then: the
    hand-over wakes no thread on either side. Waits (a peer behind, or one writing a checkpoint) last at most the
    timeout; a peer that ended shows as end of file or a reset and is named in `RankFailure`. Every rank listens
    on the loopback address when torchrun started every rank on this machine, else on the address of the interface
    that reaches the rendezvous host (`MASTER_ADDR`); the addresses are exchanged once on `group`.
    """

    def __init__(self, group: dist.ProcessGroup, rank: int, world: int, timeout_s: float) -> None:
        self.rank = rank
        self.timeout_s = timeout_s
        self.peers: list[tuple[int, socket.socket]] = []
        """(rank, connection) of every other rank, in rank order."""
        self.closed = False
        if world < 2:
            return
        host = listen_host(world)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.create_server((host, 0), family=family, backlog=world) as listener:
            addresses: list[tuple[str, int] | None] = [None] * world
            dist.all_gather_object(addresses, (host, listener.getsockname()[1]), group=group)
            # Each rank connects to the ranks below it (their listeners queue the connection) and then accepts the
            # ranks above it, which say who they are first: no rank waits on one that waits on it.
            peers: dict[int, socket.socket] = {}
            for other, address in enumerate(addresses[:rank]):
                assert address is not None
                peers[other] = socket.create_connection(address, timeout=timeout_s)
                peers[other].sendall(_HELLO.pack(rank))
            listener.settimeout(timeout_s)
            for _ in range(rank + 1, world):
                connection, _ = listener.accept()
                connection.settimeout(timeout_s)
                (other,) = _HELLO.unpack(self.receive(-1, connection, _HELLO.size))
                peers[other] = connection
        for other, connection in sorted(peers.items()):
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a row goes out at once, alone
            connection.setblocking(False)
            self.peers.append((other, connection))

    def send(self, data: bytes) -> None:
        """`data` to every peer, without waiting unless a peer's buffer is full."""
        for rank, peer in self.peers:
            sent = self._at_once(rank, peer.send, memoryview(data)) or 0
            if sent < len(data):
                with self._waiting(rank, peer):
                    peer.sendall(memoryview(data)[sent:])

    def receive(self, rank: int, peer: socket.socket, size: int) -> bytearray:
        """The next `size` bytes from peer `rank` (-1 while not known yet): at once as a rule, else waited for."""
        data = bytearray(size)
        view = memoryview(data)
        got = self._at_once(rank, peer.recv_into, view)
        if got == 0:
            raise self._lost(rank, "its connection closed")
        got = got or 0
        if got < size:
            with self._waiting(rank, peer):
                while got < size:
                    more = peer.recv_into(view[got:])
                    if more == 0:
                        raise self._lost(rank, "its connection closed")
                    got += more
        return data

    def _at_once(self, rank: int, move: Callable[[memoryview], int], buffer: memoryview) -> int | None:
        """The bytes `move` (a send from or a receive into `buffer` on peer `rank`'s socket) moved without waiting;
        None where it would have had to wait."""
        try:
            return move(buffer)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise self._lost(rank, exc) from exc

    @contextlib.contextmanager
    def _waiting(self, rank: int, peer: socket.socket) -> Iterator[None]:
        """Block on `peer` for at most the timeout, naming `rank` when it is late or gone; non-blocking after."""
        peer.settimeout(self.timeout_s)
        try:
            yield
        except TimeoutError as exc:
            raise self._late(rank) from exc
        except OSError as exc:
            raise self._lost(rank, exc) from exc
        finally:
            peer.setblocking(False)

    def close(self) -> None:
        """Close every connection."""
        for _, peer in self.peers:
            peer.close()
        self.closed = True

    def _lost(self, rank: int, why: object) -> RankFailure:
        return RankFailure(f"{_who(rank)} left the side channel of rank {self.rank} ({why}): it ended or died")

    def _late(self, rank: int) -> TimeoutError:
        return TimeoutError(
            f"{_who(rank)} did not meet rank {self.rank} on the side channel within {self.timeout_s:g} s "
            "(DistributedConfig.side_timeout_s)"
        )


def _who(rank: int) -> str:
    """A peer's name in an error: its rank, or "a rank" before it said which it is."""
    return f"rank {rank}" if rank >= 0 else "a rank"


_HELLO = struct.Struct("<q")
"""What a connecting rank sends first: its rank."""


def listen_host(world: int) -> str:
    """Where this rank's side-channel socket listens: loopback when torchrun started all `world` ranks on this
    machine (or no rendezvous host is named), else the local address of the route to `MASTER_ADDR`."""
    master = os.environ.get("MASTER_ADDR")
    if master is None or int(os.environ.get("LOCAL_WORLD_SIZE", "0")) == world:
        return "127.0.0.1"
    family, kind, _, _, address = socket.getaddrinfo(master, 1, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, kind) as probe:
        probe.connect(address)  # a datagram socket sends nothing on connect: this only picks the route
        return str(probe.getsockname()[0])


def reduction_of(key: str) -> Reduction | None:
    """How `key` combines across ranks (see `REDUCTIONS` and `PREFIXED`)."""
    for prefix, how in PREFIXED.items():
        if key.startswith(prefix):
            return how
    return REDUCTIONS.get(key)


def combine_values(
    column: Sequence[float], how: Reduction | None, *, sharded: bool, denominators: Sequence[float] | None = None
) -> float:
    """One value from every rank's: mean, sum, max, a norm over shards, or a ratio of norms over shards given each
    rank's denominator norm (the last two: rank 0's when not sharded). NaN and infinities carry through as in torch."""
    if how == "ratio" and sharded and denominators is not None:
        numerator = math.sqrt(sum((value * scale) ** 2 for value, scale in zip(column, denominators, strict=True)))
        denominator = math.sqrt(sum(scale * scale for scale in denominators))
        return numerator / denominator if denominator else (math.inf if numerator else math.nan)
    if how == "mean":
        return sum(column) / len(column)
    if how == "sum":
        return sum(column)
    if how == "max":
        return math.nan if any(value != value for value in column) else max(column)
    if how == "norm" and sharded:
        return math.sqrt(sum(value * value for value in column))
    return column[0]


def combine(outcomes: list[CommandResult]) -> CommandResult:
    """The run's answer from every rank's: rank 0's when all agree, else `failed` naming the ranks that differ."""
    first = outcomes[0]
    if all(outcome.status == first.status for outcome in outcomes) and first.status != "failed":
        return first
    parts = [
        f"rank {rank}: {outcome.status}" + (f": {outcome.message}" if outcome.message else "")
        for rank, outcome in enumerate(outcomes)
        if outcome.status != "applied"
    ]
    applied = [str(rank) for rank, outcome in enumerate(outcomes) if outcome.status == "applied"]
    if applied:
        parts.append(f"applied on rank {', '.join(applied)}")
    return CommandResult(status="failed", step=first.step, effective=first.effective, message="; ".join(parts)[:2000])


class FollowerIO:
    """The I/O side of a rank other than 0: it sends nothing (rank 0 reports for the run) and fetches nothing."""

    def __init__(self, run_info: RunInfo | None) -> None:
        self.run_info = run_info
        self.inbox: queue.Queue[CommandRecord] = queue.Queue()
        self.outbox = _Discard()
        self.samples: deque[SampleItem] = deque(maxlen=0)
        """Drops every sample: rank 0 reports the run's (reduced) values."""

    def stop(self, timeout_s: float) -> bool:
        """Nothing to send."""
        return True


class _Discard:
    """An outbox whose items go nowhere: reports of ranks other than 0 are made by rank 0."""

    def put(self, item: object) -> None:
        """Drop `item`."""


class RankSampler:
    """Rank `rank`'s share of every global batch of a mixture sampler, so N ranks see what one process would.

    The sampler draws the whole global batch (its batch size) at each index and this rank keeps its contiguous
    slice; mix, index and `skip` are the sampler's own, so `set_data_mix` and `skip_batches` act on every rank alike.
    """

    def __init__(self, sampler: Any, rank: int, world: int) -> None:
        if sampler.batch_size % world:
            raise ValueError(f"batch size {sampler.batch_size} does not split into {world} ranks evenly")
        self.sampler = sampler
        self.names: list[str] = sampler.names
        self.rows = slice(rank * sampler.batch_size // world, (rank + 1) * sampler.batch_size // world)

    @property
    def index(self) -> int:
        """The index of the next global batch."""
        return int(self.sampler.index)

    def next_batch(self) -> tuple[Tensor, Tensor, Tensor]:
        """This rank's slice of the next global batch."""
        inputs, targets, ids = self.sampler.next_batch()
        return inputs[self.rows], targets[self.rows], ids[self.rows]

    def set_weights(self, weights: dict[str, float]) -> dict[str, float]:
        """See `MixtureSampler.set_weights`."""
        mix: dict[str, float] = self.sampler.set_weights(weights)
        return mix

    def mix(self) -> dict[str, float]:
        """See `MixtureSampler.mix`."""
        mix: dict[str, float] = self.sampler.mix()
        return mix

    def skip(self, batches: int) -> None:
        """Skip the next `batches` global batches."""
        self.sampler.skip(batches)

    def eval_batches(self, domain: str, max_batches: int) -> list[tuple[Tensor, Tensor]]:
        """The held-out batches (the same on every rank)."""
        batches: list[tuple[Tensor, Tensor]] = self.sampler.eval_batches(domain, max_batches)
        return batches

    def state_dict(self) -> dict[str, Any]:
        """The global sampler's state (the same on every rank)."""
        state: dict[str, Any] = self.sampler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the global sampler's state."""
        self.sampler.load_state_dict(state)


class RankCheckpoints(CheckpointStore):
    """A checkpoint store kept in step on every rank: the same ids everywhere, each rank's ring its own state.

    Replicated models (DDP) write each file once, from rank 0, and the other ranks read that file back on a
    rollback from disk (the checkpoint directory must be one every rank can read: the node's disk, or a shared
    one). Sharded models (FSDP2) write one `torch.distributed.checkpoint` directory in which each rank writes
    its own shard.
    """

    def __init__(
        self,
        ranks: Ranks,
        directory: Path | None,
        *,
        ring_size: int,
        keep_files: int,
        live_state: Callable[[], dict[str, Any]],
    ) -> None:
        self.ranks = ranks
        # Only rank 0 keeps the index (and writes whole files); the others adopt its infos and, when sharded,
        # write their shards into the same DCP directory.
        super().__init__(directory if ranks.leader else None, ring_size=ring_size, keep_files=keep_files)
        self.shared_directory = directory
        self.live_state = live_state
        """The live state's references: a sharded file is read into its shards."""

    def save(self, state: dict[str, Any], **options: Any) -> tuple[CheckpointInfo, list[CheckpointInfo]]:
        """Save on every rank at the same boundary (see `CheckpointStore.save` for the options); rank 0's info
        (id, path, digest) becomes every rank's. A sharded model's file is one DCP directory, a shard per rank."""
        sharded_file = self.ranks.sharded and options.get("to_disk", True) and self.shared_directory is not None
        if sharded_file:
            options["to_disk"] = False
        info, evicted = super().save(state, **options)
        info = self._adopt(info, self.ranks.share(info))
        if sharded_file:
            info = self._write_sharded(state, info)
        return info, evicted

    def _adopt(self, local: CheckpointInfo, leader: CheckpointInfo) -> CheckpointInfo:
        """Re-key this rank's entry under rank 0's id and info, so a rollback by id means one checkpoint."""
        if local.checkpoint_id != leader.checkpoint_id:
            entry = self.entries.pop(local.checkpoint_id)
            entry.info = leader
            self.entries[leader.checkpoint_id] = entry
        return leader

    def _write_sharded(self, state: dict[str, Any], info: CheckpointInfo) -> CheckpointInfo:
        """Every rank writes its shard into one DCP directory; rank 0 records it in the index."""
        from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

        assert self.shared_directory is not None
        path = self.shared_directory / f"{info.checkpoint_id}.dcp"
        dcp_save(sharded_state(state, self.ranks.rank), checkpoint_id=path, process_group=self.ranks.group)
        size = sum(part.stat().st_size for part in path.iterdir())
        info = info.model_copy(update={"path": str(path), "size_bytes": size})
        self.entries[info.checkpoint_id].info = info
        if self.directory is not None:
            self._write_index()
        return info

    def load(self, checkpoint_id: str) -> dict[str, Any]:
        """From this rank's ring when the snapshot is there, else from the file (DCP: this rank's shard)."""
        entry = self.entries.get(checkpoint_id)
        if entry is None or entry.state is not None or not entry.info.path.endswith(".dcp"):
            return super().load(checkpoint_id)
        from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

        target = sharded_state(detached_copy(self.live_state()), self.ranks.rank)
        dcp_load(target, checkpoint_id=entry.info.path, process_group=self.ranks.group)
        return unshard_state(target, self.ranks.rank)


def sharded_state(state: dict[str, Any], rank: int) -> dict[str, Any]:
    """A captured state laid out for DCP: the per-rank RNG under a key of its own (DCP keeps one copy per key)."""
    laid_out = {key: value for key, value in state.items() if key != "rng"}
    laid_out[f"rng.rank{rank}"] = state["rng"]
    return laid_out


def unshard_state(state: dict[str, Any], rank: int) -> dict[str, Any]:
    """The inverse of `sharded_state`."""
    restored = {key: value for key, value in state.items() if not key.startswith("rng.rank")}
    restored["rng"] = state[f"rng.rank{rank}"]
    return restored


def end_on_sigterm() -> None:
    """Turn torchrun's SIGTERM (sent to the survivors when a rank dies) into `RankFailure` in the training thread,
    so the hook's `with` block reports the run `failed` before the process ends; a handler of the program's own
    is left in place."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise RankFailure("ended by SIGTERM (torchrun ends the other ranks when one fails)")

    main = threading.current_thread() is threading.main_thread()
    if main and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, handler)


def place(device: torch.device, timeout_s: float | None = None) -> tuple[int, int, torch.device]:
    """Under torchrun, join the process group (NCCL on CUDA, gloo on the CPU) and pick this rank's GPU;
    returns (rank, world size, device). Outside torchrun: (0, 1, `device`). One rank under torchrun joins a group of
    one too, so a single GPU runs the distributed path (NCCL for the model, the gloo side channel) as N would."""
    rank, world, local_rank = world_of_env()
    if world < 2 and "TORCHELASTIC_RUN_ID" not in os.environ:
        return rank, world, device
    where = torch.device("cuda", local_rank) if device.type == "cuda" else device
    if not dist.is_initialized():
        if where.type == "cuda":
            torch.cuda.set_device(where)
        timeout = timedelta(seconds=timeout_s) if timeout_s is not None else None
        dist.init_process_group(
            backend="nccl" if where.type == "cuda" else "gloo",
            device_id=where if where.type == "cuda" else None,
            timeout=timeout,
        )
        atexit.register(_leave)
    return rank, world, where


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def replicate(model: nn.Module, device: torch.device) -> nn.Module:
    """The model wrapped for data parallelism (DDP) when it trains in a process group, else the model itself."""
    if not (dist.is_available() and dist.is_initialized()):
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def without_option(argv: list[str], option: str) -> list[str]:
    """`argv` without `option` and its value (given as `option VALUE` or `option=VALUE`)."""
    kept: list[str] = []
    skip = False
    for argument in argv:
        if skip:
            skip = False
        elif argument == option:
            skip = True
        elif not argument.startswith(f"{option}="):
            kept.append(argument)
    return kept


def launch(nproc_per_node: int, argv: list[str]) -> int:
    """Replace this process with `torchrun --standalone --nproc-per-node N -m trainer ARGV` (one machine, N ranks)."""
    if nproc_per_node < 1:
        print(f"runsteer train: --nproc-per-node must be at least 1, not {nproc_per_node}", file=sys.stderr)
        return 2
    if "RANK" in os.environ:
        print(
            "runsteer train: --nproc-per-node starts torchrun, and this process already runs under it", file=sys.stderr
        )
        return 2
    runner = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_node}"]
    command = [*runner, "-m", "trainer", *argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)
