"""The distributed pieces tested without torchrun: outcome agreement, reductions, data shards, SIGTERM, CLI, and the
side channel between two processes."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from protocols.client import Client
from protocols.commands import CommandRecord, CommandResult, SetHparams
from tests.distributed.conftest import ROOT
from tests.distributed.side_rank import values_of
from tests.distributed.worker import FAST_IO
from tests.polling import wait_until
from tests.serving import ServerThread
from trainer.cli import main as train_main
from trainer.data import MixtureSampler, builtin_domains
from trainer.distributed import (
    DistributedConfig,
    RankFailure,
    Ranks,
    RankSampler,
    combine,
    combine_values,
    end_on_sigterm,
    is_sharded,
    listen_host,
    without_option,
)
from trainer.health import Health
from trainer.steer import Steer, SteerConfig

RECORD = CommandRecord(
    id="c1", run_id="r1", seq=1, command=SetHparams(lr=0.01), source="user:test", reason="", status="delivered",
    created_at=1.0, updated_at=1.0,
)  # fmt: skip
"""A command as rank 0 hands it to the others."""


def test_a_command_is_applied_only_when_every_rank_applied_it() -> None:
    """All applied: rank 0's answer. One rank failed: `failed`, naming that rank and its error and who applied."""
    applied = CommandResult(status="applied", step=4, effective={"lr": 0.1})
    failed = CommandResult(status="failed", step=4, message="OSError: disk full")
    assert combine([applied, applied]) == applied
    mixed = combine([applied, failed, applied])
    assert mixed.status == "failed" and mixed.step == 4
    assert mixed.message == "rank 1: failed: OSError: disk full; applied on rank 0, 2"


def test_a_rejection_every_rank_agrees_on_stays_a_rejection() -> None:
    """Appliers check before they change anything, so every rank rejects alike; that is `rejected`, not `failed`."""
    rejected = CommandResult(status="rejected", step=2, message="the run is not paused")
    assert combine([rejected, rejected]) == rejected
    applied = CommandResult(status="applied", step=2)
    assert combine([applied, rejected]).message == "rank 1: rejected: the run is not paused; applied on rank 0"


def test_values_combine_by_their_meaning() -> None:
    """Mean loss, summed throughput, slowest step; shard norms and ratios of shard norms combine, replicated ones
    are taken as they are."""
    column = [3.0, 4.0]
    assert combine_values(column, "mean", sharded=False) == 3.5
    assert combine_values(column, "sum", sharded=False) == 7.0
    assert combine_values(column, "max", sharded=False) == 4.0
    assert combine_values(column, "norm", sharded=True) == 5.0
    assert combine_values(column, "norm", sharded=False) == 3.0
    assert combine_values(column, None, sharded=True) == 3.0
    # Update ratios of shards whose parameter norms are 1 and 2: updates of norm 3 and 8 over parameters of norm √5.
    shard_norms = [1.0, 2.0]
    assert combine_values(column, "ratio", sharded=True, denominators=shard_norms) == pytest.approx((73 / 5) ** 0.5)
    assert combine_values(column, "ratio", sharded=False, denominators=shard_norms) == 3.0
    # A NaN or an infinity on one rank carries through, whichever rank it is on.
    for how in ("mean", "sum", "max"):
        assert math.isnan(combine_values([1.0, math.nan], how, sharded=False))
        assert math.isnan(combine_values([math.nan, 1.0], how, sharded=False))
    assert combine_values([1.0, math.inf], "norm", sharded=True) == math.inf


def test_the_ranks_slices_make_up_the_global_batch_through_mix_changes_and_skips() -> None:
    """Two ranks' slices side by side are the batch one process draws, after `set_data_mix` and `skip` too."""
    domains = builtin_domains(20_000)
    single = MixtureSampler(domains, batch_size=8, block_size=16, seed=3)
    ranks = [RankSampler(MixtureSampler(domains, batch_size=8, block_size=16, seed=3), r, 2) for r in range(2)]
    for change in (lambda s: None, lambda s: s.set_weights({"code": 5.0}), lambda s: s.skip(3)):
        change(single)
        for rank in ranks:
            change(rank)
        whole, halves = single.next_batch(), [rank.next_batch() for rank in ranks]
        for part, expected in enumerate(whole):
            assert torch.equal(torch.cat([half[part] for half in halves]), expected)
    with pytest.raises(ValueError, match="batch size 8 does not split into 3 ranks"):
        RankSampler(single, 0, 3)


@pytest.mark.slow
def test_sigterm_ends_a_steered_loop_as_failed_on_the_server(server: ServerThread, client: Client) -> None:
    """torchrun ends the surviving ranks with SIGTERM: the hook turns it into `RankFailure` and reports `failed`."""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        end_on_sigterm()
        model = torch.nn.Linear(4, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        config = SteerConfig(run_name="sigterm", io=FAST_IO)
        with pytest.raises(RankFailure), Steer(model, optimizer, server=server.url, config=config) as steer:
            for iteration in range(1000):
                step = steer.poll(iteration)
                loss = model(torch.ones(2, 4)).square().mean()
                loss.backward()
                optimizer.step()
                steer.record(step, loss=loss.item())
                if iteration == 3:
                    os.kill(os.getpid(), signal.SIGTERM)
        assert steer.run_id is not None
        run_id = steer.run_id
        assert wait_until(lambda: client.get_run(run_id).status == "failed", 5, "status failed")
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_nproc_per_node_below_one_is_refused_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """`runsteer train --nproc-per-node 0` starts nothing and says what is allowed."""
    assert train_main(["--nproc-per-node", "0", "--steps", "5"]) == 2
    assert "--nproc-per-node must be at least 1, not 0" in capsys.readouterr().err


def test_nproc_per_node_under_torchrun_is_refused(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    """A rank does not start a torchrun of its own."""
    monkeypatch.setenv("RANK", "1")
    assert train_main(["--nproc-per-node", "2"]) == 2
    assert "already runs under it" in capsys.readouterr().err


def test_the_launcher_passes_every_other_flag_on() -> None:
    """The ranks get the flags without `--nproc-per-node`, in either spelling."""
    argv = ["--nproc-per-node", "2", "--steps", "5", "--nproc-per-node=4", "--quiet"]
    assert without_option(argv, "--nproc-per-node") == ["--steps", "5", "--quiet"]


def test_the_side_channel_listens_on_loopback_when_every_rank_is_local_else_toward_the_rendezvous_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """All ranks on this machine (or no rendezvous host named): loopback. Ranks elsewhere: the local address of the
    route to `MASTER_ADDR`, by name or by address (here the rendezvous host is this one, so that is loopback)."""
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert listen_host(4) == "127.0.0.1"
    monkeypatch.setenv("MASTER_ADDR", "192.0.2.1")  # a documentation address: nothing is sent to it
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert listen_host(4) == "127.0.0.1"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    assert listen_host(4) in ("127.0.0.1", "::1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert listen_host(4) == "127.0.0.1"


def test_a_boundary_with_more_values_than_its_vector_holds_grows_it(tmp_path: Path) -> None:
    """A boundary's row has room for 16 values; a boundary with more sends the rest behind it and the room grows for
    the next ones, values and commands intact (a group of one rank: the broadcast is real)."""
    previous = signal.getsignal(signal.SIGTERM)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ranks = Ranks()
        samples = [(step, {"loss": float(step), "grad_norm": 2.0 * step, "lr": 0.1}) for step in range(10)]
        commands, reduced = ranks.exchange([RECORD], samples)
        assert commands == [RECORD] and reduced == samples
        assert ranks._capacity == 32
        assert ranks.exchange([], samples[:3]) == ([], samples[:3])
    finally:
        dist.destroy_process_group()
        signal.signal(signal.SIGTERM, previous)


def test_a_boundary_collective_issued_at_one_boundary_is_finished_at_the_next(tmp_path: Path) -> None:
    """`start` sends the boundary's row and returns at once; `finish` hands back the announced commands' size and
    the values reduced, and a second `start` before `finish` is refused (rows must pair up boundary by boundary)."""
    previous = signal.getsignal(signal.SIGTERM)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ranks = Ranks()
        samples = [(3, {"loss": 2.5, "lr": 0.1, "attn_logit_max/0": 4.0}), (4, {"loss": float("nan"), "lr": 0.1})]
        meeting = ranks.start([RECORD], samples)
        with pytest.raises(RuntimeError, match="still in flight"):
            ranks.start([], [])
        size, reduced = ranks.finish(meeting)
        assert size > 0 and ranks.commands(meeting, size) == [RECORD]
        assert [step for step, _ in reduced] == [3, 4] and reduced[0][1] == samples[0][1]
        assert math.isnan(reduced[1][1]["loss"]) and reduced[1][1]["lr"] == 0.1
        assert ranks.finish(ranks.start([], [])) == (0, [])
    finally:
        dist.destroy_process_group()
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.slow
def test_a_rank_that_goes_silent_or_dies_is_named_by_the_side_channel(tmp_path: Path) -> None:
    """Two processes meet on the side channel's sockets: values reduce across them, a row with more values than its
    room grows it on both, commands reach rank 1; while waiting for a silent rank, torchrun's SIGTERM still ends the
    wait as `RankFailure`; a rank gone silent is named once the side timeout has passed, and a killed one is named
    at the next boundary, which waits for nothing."""
    previous = signal.getsignal(signal.SIGTERM)
    script = [sys.executable, str(Path(__file__).with_name("side_rank.py")), str(tmp_path / "store")]
    seen = tmp_path / "seen.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "SILENT_S": "2.5"}
    rank1 = subprocess.Popen([*script, str(seen)], env=env)
    ranks: Ranks | None = None
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=2)
        ranks = Ranks(config=DistributedConfig(side_timeout_s=30.0))
        meeting = ranks.start([RECORD], [(0, values_of(0))])
        size, [(step, values)] = ranks.finish(meeting)
        assert ranks.commands(meeting, size) == [RECORD] and step == 0
        assert (values["loss"], values["tokens_per_s"], values["lr"]) == (0.5, 21.0, 0.1)
        assert [values[f"attn_logit_max/{layer}"] for layer in range(20)] == [layer + 1.0 for layer in range(20)]
        assert ranks.finish(ranks.start([], [(1, {"loss": 3.0})])) == (0, [(1, {"loss": 2.0})])
        assert json.loads(wait_until(lambda: seen.exists() and seen.read_text(), 10, "rank 1's report")) == {
            "commands": ["c1"], "capacity": 32, "second": [0, []],
        }  # fmt: skip
        meeting = ranks.start([], [])  # rank 1 stays silent for 2.5 s, then dies
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
        with pytest.raises(RankFailure, match="ended by SIGTERM"):
            ranks.finish(meeting)
        ranks.mesh.timeout_s = 0.5
        with pytest.raises(TimeoutError, match=r"rank 1 did not meet rank 0 on the side channel within 0\.5 s"):
            ranks.finish(meeting)
        assert rank1.wait(30) == -signal.SIGKILL
        started = time.monotonic()
        with pytest.raises(RankFailure, match="rank 1 left the side channel of rank 0"):
            ranks.finish(meeting)
        assert time.monotonic() - started < 0.5
    finally:
        rank1.kill()
        rank1.wait()
        if ranks is not None:
            ranks.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        signal.signal(signal.SIGTERM, previous)


def test_health_on_fully_shard_parameters_measures_and_clips_as_on_plain_ones(tmp_path: Path) -> None:
    """`Health` on an FSDP2 model reads each parameter's DTensor shard (one rank here: the shard is all of it) and
    clips by the norm of all shards: its values and clipped gradients equal those of a plain copy of the model."""
    previous = signal.getsignal(signal.SIGTERM)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
        sharded = copy.deepcopy(plain)
        for layer in (sharded[0], sharded[2], sharded):
            fully_shard(layer)
        assert is_sharded(sharded) and not is_sharded(plain)
        inputs = torch.randn(5, 8)
        values = []
        for model in (plain, sharded):
            health = Health(model, update_every=1)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            model(inputs).square().mean().backward()
            health.begin_step(1)
            health.before_optimizer_step(max_norm=0.05)
            grads = [p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for p in model.parameters()]
            assert float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) == pytest.approx(
                0.05, rel=1e-4
            )
            optimizer.step()
            health.after_optimizer_step()
            values.append(health.end_step())
        assert values[0].keys() == values[1].keys() and {"grad_norm", "param_norm", "update_ratio"} <= values[0].keys()
        assert values[1] == pytest.approx(values[0], rel=1e-6)
    finally:
        dist.destroy_process_group()
        signal.signal(signal.SIGTERM, previous)
