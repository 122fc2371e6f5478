"""Per-step cost of the Hugging Face and Lightning callbacks, and steps from a command's arrival to its effect.

For each framework, four kinds of run train the same tiny model on the same data, interleaved in rounds so that
machine load hits them alike: without the callback, with the callback's hook machinery only (`health=False`: the
loss and learning rate recorded, commands taken at every boundary, snapshots every 25 steps), with the full
metric set (trainer/health.py, as configured by default: the output-logit statistics every 10 steps) and with the
full set taking the logit statistics at every step (`logits1`). Prints the median step time of each, the callback's
own time per step (its hooks timed directly, which a loaded machine blurs far less than a difference of step times;
its median, and its mean, which counts the due steps of the statistics taken every N steps) and, from a steered run
that is sent `set_hparams` commands at random moments, how many step boundaries each took from the moment the
server accepted it to the boundary it was applied at (1: the next one). Asserts nothing.

Run: `python -m benchmarks.hf_lightning_overhead [--framework hf|lightning|both] [--steps 60] [--rounds 3]`;
`--device cuda` trains on the GPU.

`--peer` adds, for HF, the same run under the peer "Interactive Training" (github.com/yuntian-group/
interactive-training: `make_interactive(Trainer)`, its copy of HF's training loop and its four callbacks, timed at
their hooks like ours). It is not part of runsteer: install it apart, in an environment with transformers 4.x
(its loop fails on 5.x), e.g. a venv with transformers 4.57, `fastapi<0.115`, uvicorn and `datasets<4`, its
package directory on `PYTHONPATH`.
"""

from __future__ import annotations

import argparse
import bisect
import os
import random
import socket
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging as hf_logging

from benchmarks._common import UNLIMITED, Server, load_average
from protocols.client import Client
from protocols.errors import RequestRejected
from trainer.data import arithmetic_domain, code_domain, prose_domain
from trainer.hf import SteerCallback as HFSteer
from trainer.lightning import SteerCallback as LightningSteer
from trainer.mixture import DomainMixture
from trainer.steer import SteerConfig

BLOCK = 64
BATCH = 8
WARMUP_STEPS = 5
"""Steps left out of every figure: the first steps build caches and allocators."""
HOOKS = {
    "hf": ("on_train_begin", "on_step_begin", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end", "on_log"),
    "lightning": ("on_train_start", "on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end"),
}


def domains() -> dict[str, list[torch.Tensor]]:
    """Byte blocks of three domains that ship with Python."""
    return {d.name: d.blocks(BLOCK) for d in (prose_domain(100_000), code_domain(100_000), arithmetic_domain(50_000))}


class Clock:
    """Timestamps at every step end, and the callback's own seconds in each step (its hook methods, wrapped)."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.wall_ends: list[float] = []
        """The same ends in wall-clock time, to compare with the server's command timestamps."""
        self.hook_s: list[float] = []
        self._current = 0.0

    def tick(self) -> None:
        self.ends.append(time.perf_counter())
        self.wall_ends.append(time.time())
        self.hook_s.append(self._current)
        self._current = 0.0

    def wrap(self, callback: Any, names: tuple[str, ...]) -> None:
        """Time these hook methods of `callback` (frameworks look hooks up by name on the instance)."""
        for name in names:
            method = getattr(callback, name)

            def timed(*args: Any, _method: Callable[..., Any] = method, **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    return _method(*args, **kwargs)
                finally:
                    self._current += time.perf_counter() - started

            setattr(callback, name, timed)

    def step_times(self) -> list[float]:
        return [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)][WARMUP_STEPS:]

    def hook_times(self) -> list[float]:
        return self.hook_s[WARMUP_STEPS + 1 :]


class HFClock(TrainerCallback):
    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.clock.tick()


class LightningClock(L.Callback):
    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_train_batch_end(self, *args: Any) -> None:
        self.clock.tick()


class ByteLM(L.LightningModule):
    """A small next-byte model: embedding, one GRU layer, projection (returns the logits for the logit metrics)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, 64)
        self.rnn = nn.GRU(64, 64, batch_first=True)
        self.head = nn.Linear(64, 256)

    def training_step(self, ids: torch.Tensor, batch_idx: int) -> dict[str, torch.Tensor]:
        hidden, _ = self.rnn(self.embed(ids[:, :-1]))
        logits = self.head(hidden)
        return {"loss": F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()), "logits": logits.detach()}

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=3e-3)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=1000)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}


def train(
    framework: str,
    kind: str,
    steps: int,
    server: str,
    clock: Clock,
    workdir: Path,
    started: Callable[[Any], None] | None = None,
    device: str = "cpu",
) -> Any:
    """One run of `steps` steps on `device` (`cpu` or `cuda`); `kind` is `without`, `machinery`, `full` or
    `logits1`. Returns the steering callback, which `started` is also handed before training starts."""
    torch.manual_seed(0)
    blocks = domains()
    examples: DomainMixture[Any] = (
        DomainMixture({k: [{"input_ids": b, "labels": b} for b in v] for k, v in blocks.items()}, batch_size=BATCH)
        if framework == "hf"
        else DomainMixture(blocks, batch_size=BATCH)
    )
    callbacks: list[Any] = [HFClock(clock) if framework == "hf" else LightningClock(clock)]
    callback = None
    if kind in ("machinery", "full", "logits1"):
        config = SteerConfig(run_name=f"bench-{framework}-{kind}", snapshot_every=25, checkpoint_dir=workdir / "ck")
        factory = HFSteer if framework == "hf" else LightningSteer
        callback = factory(
            server=server,
            sampler=examples,
            config=config,
            health=kind != "machinery",
            logit_every=1 if kind == "logits1" else 10,
        )
        if framework == "hf":
            time_logits(callback, clock)
        clock.wrap(callback, HOOKS[framework])
        # After the clock: a step's end is stamped before the callback's boundary takes the commands queued by then,
        # so a command that reaches the trainer after that boundary is not counted as arriving before it.
        callbacks.append(callback)
        if started is not None:
            started(callback)
    if kind == "peer":
        return train_peer(steps, clock, workdir, examples, callbacks, device)
    if framework == "hf":
        model, args = hf_run(workdir / "hf", steps, device)
        Trainer(model=model, args=args, train_dataset=examples, callbacks=callbacks).train()
    else:
        trainer = L.Trainer(
            max_steps=steps,
            accelerator="gpu" if device == "cuda" else "cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            gradient_clip_val=1.0,
            callbacks=callbacks,
        )
        trainer.fit(ByteLM(), DataLoader(examples, batch_size=BATCH))
    return callback


def hf_run(output_dir: Path, steps: int, device: str) -> tuple[GPT2LMHeadModel, TrainingArguments]:
    """The tiny GPT-2 and its training arguments, the same for runsteer's runs and the peer's."""
    config = GPT2Config(
        vocab_size=256, n_positions=BLOCK, n_embd=64, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        learning_rate=1e-3,
        warmup_steps=10,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=device == "cpu",
        disable_tqdm=True,
    )
    return GPT2LMHeadModel(config), args


def train_peer(steps: int, clock: Clock, workdir: Path, examples: Any, callbacks: list[Any], device: str) -> None:
    """The same HF run under the peer "Interactive Training" (`make_interactive(Trainer)`, its own copy of HF's
    training loop and its four callbacks, which are timed like ours). It is installed outside the project."""
    from interactive_training import callbacks as peer_callbacks  # the peer, installed apart
    from interactive_training import make_interactive

    model, args = hf_run(workdir / "peer", steps, device)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    trainer = make_interactive(Trainer)(port=port, model=model, args=args, train_dataset=examples, callbacks=callbacks)
    # Its callbacks are made inside `train()`, so their classes' hooks are timed (and put back afterwards).
    classes = [
        cls
        for cls in vars(peer_callbacks).values()
        if isinstance(cls, type) and issubclass(cls, TrainerCallback) and cls.__module__ == peer_callbacks.__name__
    ]
    originals = {(cls, name): vars(cls)[name] for cls in classes for name in vars(cls) if name.startswith("on_")}
    for cls in classes:
        clock.wrap(cls, tuple(name for c, name in originals if c is cls))
    try:
        trainer.train()
    finally:
        for (cls, name), method in originals.items():
            setattr(cls, name, method)


def time_logits(callback: Any, clock: Clock) -> None:
    """Time the HF callback's logit statistics too: they run in a forward hook of the model, not in a callback hook
    (wrapped once the callback built its health metrics at train start)."""
    start = callback.run.start

    def started(*args: Any) -> Any:
        steer = start(*args)
        if callback.run.health is not None:
            clock.wrap(callback.run.health, ("observe_logits",))
        return steer

    callback.run.start = started


class StampedInbox:
    """The trainer's command inbox, noting when the poller thread queued each command: its arrival in the trainer."""

    def __init__(self, inbox: Any) -> None:
        self.inbox = inbox
        self.queued: dict[int, float] = {}

    def put(self, record: Any) -> None:
        self.queued[record.seq] = time.time()
        self.inbox.put(record)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inbox, name)


@dataclass
class Latency:
    """Where the commands of the latency run landed, and what delayed the late ones."""

    boundaries: dict[str, list[int]]
    """For each moment (`created_at`, `delivered_at`, `queued`): boundaries from it to the one that applied it."""
    delays: list[float]
    """Seconds from the server's acceptance to the trainer's queuing, per command."""
    handed: list[float]
    """Seconds from the server's handing the command out to the trainer's queuing, per command."""
    inside: list[float]
    """Seconds from the server's acceptance to its handing the command out (the submission stored, the waiting long
    poll woken, the delivery stored), per command."""
    late: list[tuple[float, float, float]]
    """For each command applied later than the boundary after its acceptance: (seconds from its acceptance to the
    end of that step, seconds it took to reach the trainer, seconds of those inside the server)."""


def command_latency(framework: str, steps: int, server: str, workdir: Path, device: str) -> Latency:
    """For `set_hparams` commands sent at random moments of a steered run: boundaries from the server's acceptance
    (`created_at`, stamped before the command is stored), from the submitter's having the answer (`answered`: it is
    stored), from the server's handing it out to the trainer's poller (`delivered_at`) and from the poller's queuing
    it in the trainer (`queued`, its arrival there) to the boundary that applied it."""
    clock = Clock()
    started = threading.Event()
    holder: list[Any] = []
    inboxes: list[StampedInbox] = []
    answered: dict[int, float] = {}
    """When the submitter had the server's answer, by command seq."""

    def send() -> None:
        started.wait(60)
        steer = None
        while steer is None or steer.run_id is None:
            time.sleep(0.01)
            steer = holder[0].steer
        inboxes.append(StampedInbox(steer.io.inbox))
        steer.io.inbox = inboxes[0]
        with Client(server) as client:
            client.set_policy(steer.run_id, UNLIMITED)
            rng = random.Random(0)
            while len(clock.ends) < steps - 10:
                time.sleep(rng.uniform(0.01, 0.15))
                try:
                    record = client.submit(steer.run_id, {"type": "set_hparams", "lr": rng.choice([1e-3, 2e-3])})
                    answered[record.seq] = time.time()
                except RequestRejected:
                    return  # the run finished between the check and the submit

    def hand_over(callback: Any) -> None:
        holder.append(callback)
        started.set()

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    callback = train(framework, "full", steps, server, clock, workdir, started=hand_over, device=device)
    sender.join(30)
    with Client(server) as client:
        records = [r for r in client.list_commands(callback.steer.run_id) if r.status == "applied"]
    queued = inboxes[0].queued if inboxes else {}
    moments: dict[str, Callable[[Any], float | None]] = {
        "created_at": lambda r: r.created_at,
        "answered": lambda r: answered.get(r.seq),
        "delivered_at": lambda r: r.delivered_at,
        "queued": lambda r: queued.get(r.seq),
    }
    # A command that arrived while step n ran (n steps done) is due at boundary n + 1, the end of that step.
    boundaries = {
        moment: [
            r.applied_step - bisect.bisect_right(clock.wall_ends, at(r))
            for r in records
            if r.applied_step is not None and at(r) is not None
        ]
        for moment, at in moments.items()
    }
    arrived = [(r, queued[r.seq]) for r in records if r.seq in queued and r.applied_step is not None]
    late = []
    for record, at in arrived:
        done = bisect.bisect_right(clock.wall_ends, record.created_at)
        if record.applied_step - done > 1 and done < len(clock.wall_ends):
            inside = (record.delivered_at or record.created_at) - record.created_at
            late.append((clock.wall_ends[done] - record.created_at, at - record.created_at, inside))
    delays = [at - record.created_at for record, at in arrived]
    handed = [at - record.delivered_at for record, at in arrived if record.delivered_at is not None]
    inside = [record.delivered_at - record.created_at for record, _ in arrived if record.delivered_at is not None]
    return Latency(boundaries, delays, handed, inside, late)


def spread(seconds: list[float]) -> str:
    """Median, p90 and largest of durations, in ms."""
    return (
        f"median {statistics.median(seconds) * 1e3:.2f} ms, p90 {percentile(seconds, 0.9) * 1e3:.2f} ms, "
        f"max {max(seconds) * 1e3:.2f} ms"
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", choices=("hf", "lightning", "both"), default="both")
    parser.add_argument("--steps", type=int, default=60, help="steps per run (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the four kinds (default %(default)s)")
    parser.add_argument("--latency-steps", type=int, default=150, help="steps of the command run (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default %(default)s)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where they train (%(default)s)")
    parser.add_argument(
        "--peer",
        action="store_true",
        help="also time the HF run under the peer Interactive Training (installed apart; it needs transformers 4.x)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    frameworks = ("hf", "lightning") if args.framework == "both" else (args.framework,)
    with Server() as server, TemporaryDirectory(prefix="runsteer-frameworks-") as tmp:
        for framework in frameworks:
            steps: dict[str, list[float]] = {"without": [], "machinery": [], "full": [], "logits1": []}
            hooks: dict[str, list[float]] = {"machinery": [], "full": [], "logits1": []}
            if args.peer and framework == "hf":
                steps["peer"], hooks["peer"] = [], []
            for round_index in range(args.rounds):
                for kind in steps:
                    clock = Clock()
                    workdir = Path(tmp) / f"{framework}{round_index}{kind}"
                    train(framework, kind, args.steps, server.url, clock, workdir, device=args.device)
                    steps[kind] += clock.step_times()
                    if kind in hooks:
                        hooks[kind] += clock.hook_times()
            workdir = Path(tmp) / f"{framework}-latency"
            latency = command_latency(framework, args.latency_steps, server.url, workdir, args.device)
            base = statistics.median(steps["without"])
            print(
                f"\n{framework}: torch {torch.__version__}, {torch.get_num_threads()} thread(s), on {args.device}, "
                f"load average {load_average()}, {args.rounds} rounds x {args.steps} steps per kind"
            )
            print(f"  median step without the callback        {base * 1e3:8.2f} ms")
            for kind in hooks:
                median = statistics.median(steps[kind])
                own, mean = statistics.median(hooks[kind]), statistics.fmean(hooks[kind])
                print(
                    f"  {kind:9s} median step {median * 1e3:8.2f} ms ({(median / base - 1) * 100:+.1f} %); "
                    f"callback's own time median {own * 1e6:7.0f} us ({own / base * 100:.2f} % of a step), "
                    f"mean {mean * 1e6:7.0f} us ({mean / base * 100:.2f} %), "
                    f"p99 {percentile(hooks[kind], 0.99) * 1e6:7.0f} us"
                )
            for moment, label in (
                ("created_at", "accepted by the server"),
                ("answered", "answered to the submitter (stored)"),
                ("delivered_at", "handed out by the server"),
                ("queued", "queued in the trainer by its poller"),
            ):
                boundaries = latency.boundaries[moment]
                if boundaries:
                    share = sum(1 for d in boundaries if d <= 1) / len(boundaries)
                    print(
                        f"  {len(boundaries)} set_hparams {label} during a step: applied at the boundary right "
                        f"after it {share * 100:.1f} %, at most {max(boundaries)} boundaries later"
                    )
            if latency.delays:
                print(
                    "  from the server's acceptance to the trainer's queue: "
                    f"{spread(latency.delays)}; from the server's handing it out: {spread(latency.handed)}; inside the "
                    f"server (stored, the long poll woken, the delivery stored): {spread(latency.inside)}"
                )
            for lead, delay, inside in latency.late:
                print(
                    f"  late from acceptance: accepted {lead * 1e3:.2f} ms before its step's end, "
                    f"{delay * 1e3:.2f} ms on its way to the trainer ({inside * 1e3:.2f} ms inside the server)"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
