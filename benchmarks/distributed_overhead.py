"""Step-time cost of the `Steer` hook under torchrun: the built-in `cpu-tiny` run on 2 DDP ranks (gloo, CPU), or
`--preset gpu-small --device cuda` on a rank per GPU (NCCL; one rank on a one-GPU machine).

Started plainly, it starts a server and `torchrun --standalone --nproc-per-node N` on itself. On every rank the same
model trains in interleaved blocks of two kinds of step: the built-in step alone, and that step steered (`record`
after it buffers the values; `poll` before the next reads the other ranks' rows that the poll before sent over the
side channel's sockets, and sends the next, carrying rank 0's pending-command count and the values to reduce; the
in-memory snapshot every 25 steps, whose boundary reduces its values at once). It then times that hand-over
alone, waited for at once and sent at one boundary and read at the next. It also reads each thread's CPU
(training, I/O, gloo) per kind of block from /proc. Prints figures; asserts nothing.
Run: `python -m benchmarks.distributed_overhead` (~1 min on 2 cores); on one GPU:
`python -m benchmarks.distributed_overhead --preset gpu-small --device cuda --nproc-per-node 1`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks._common import REPO, Server, add_run_arguments, device_name, load_average


def percentile(samples: list[float], fraction: float) -> float:
    """The `fraction` quantile of `samples` (nearest rank)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


SERVER = "server process"
"""The benchmark's server in rank 0's CPU figures: it shares the machine's cores with the ranks."""


def thread_cpu(server_pid: int | None = None) -> dict[str, float]:
    """CPU seconds each thread of this process has used, by thread name (threads of one name summed; the training
    thread, the main one, under its own name: Python's other threads all have the process's name), and with
    `server_pid` the server's, all its threads together (`SERVER`)."""
    usage: dict[str, float] = {}
    tasks: list[tuple[Path, str | None]] = [(task, None) for task in Path("/proc/self/task").iterdir()]
    if server_pid is not None:
        tasks += [(task, SERVER) for task in Path(f"/proc/{server_pid}/task").iterdir()]
    for task, named in tasks:
        try:
            name = named or ("training" if task.name == str(os.getpid()) else (task / "comm").read_text().strip())
            running_ns = int((task / "schedstat").read_text().split()[0])  # to the nanosecond, unlike `stat`'s ticks
        except OSError:
            continue  # the thread ended meanwhile
        usage[name] = usage.get(name, 0.0) + running_ns / 1e9
    return usage


def rank_main(args: argparse.Namespace) -> int:
    """One rank: train interleaved blocks of plain and steered steps, then time the side channel alone."""
    from trainer.distributed import Ranks
    from trainer.run import BuiltinRun, RunConfig

    torch.set_num_threads(1)
    run = BuiltinRun(
        RunConfig(
            server=args.server, steps=10**9, run_name="distributed-overhead", preset=args.preset, device=args.device
        )
    )
    steer, ranks = run.steer, run.steer.ranks
    assert ranks is not None, "run me without torchrun: I start it"
    times: dict[str, list[float]] = {"plain": [], "steered": []}
    process_cpu: dict[str, float] = {"plain": 0.0, "steered": 0.0}
    """CPU of every thread of this rank (training, I/O, gloo) by kind of block."""
    hook: list[float] = []
    hook_cpu: list[float] = []
    iteration = 0
    for _ in range(3):  # warm-up: allocator, autograd graph, DDP buckets
        run.train_step(iteration)
    threads: dict[str, dict[str, float]] = {"plain": {}, "steered": {}}
    """CPU of each thread of this rank by kind of block (on rank 0, the server's too)."""
    server_pid = args.server_pid if ranks.leader else None
    for block in range(2 * args.steps // args.block):
        kind = ("plain", "steered")[block % 2]
        threads_before = thread_cpu(server_pid)
        block_cpu = time.process_time()
        for _ in range(args.block):
            started = time.perf_counter()
            if kind == "plain":
                run.train_step(iteration)
            else:
                cpu_started = time.thread_time()
                step = steer.poll(iteration)
                polled, polled_cpu = time.perf_counter(), time.thread_time()
                values = run.train_step(step)
                recording, recording_cpu = time.perf_counter(), time.thread_time()
                steer.record(step, **values)
                hook.append(polled - started + time.perf_counter() - recording)
                hook_cpu.append(polled_cpu - cpu_started + time.thread_time() - recording_cpu)
            times[kind].append(time.perf_counter() - started)
            iteration += 1
        process_cpu[kind] += time.process_time() - block_cpu
        for name, used in thread_cpu(server_pid).items():
            threads[kind][name] = threads[kind].get(name, 0.0) + used - threads_before.get(name, 0.0)
    steer.close()
    ranks = Ranks()  # closing the hook closed its side channel; time a fresh one alone
    empty: list[float] = []
    reduce: list[float] = []
    overlapped: list[float] = []
    for _ in range(args.collectives):
        started = time.perf_counter()
        ranks.exchange([], [])
        empty.append(time.perf_counter() - started)
        started = time.perf_counter()
        ranks.exchange([], [(iteration, values)])
        reduce.append(time.perf_counter() - started)
        started = time.thread_time()
        meeting = ranks.start([], [(iteration, dict(values))])
        issued = time.thread_time()
        time.sleep(0.002)  # the step, during which the collective completes
        finishing = time.thread_time()
        ranks.finish(meeting)
        overlapped.append(issued - started + time.thread_time() - finishing)
    mine = {
        "plain": statistics.median(times["plain"]),
        "steered": statistics.median(times["steered"]),
        "hook": statistics.median(hook),
        "hook_p99": percentile(hook, 0.99),
        "hook_cpu": statistics.median(hook_cpu),
        "empty": statistics.median(empty),
        "reduce": statistics.median(reduce),
        "overlapped": statistics.median(overlapped),
        "process_plain": process_cpu["plain"] / len(times["plain"]),
        "process_steered": process_cpu["steered"] / len(times["steered"]),
        **{
            f"thread {kind} {name}": used / len(times[kind]) for kind in threads for name, used in threads[kind].items()
        },
    }
    everyone: list[dict[str, float]] = [{} for _ in range(ranks.world)]
    dist.all_gather_object(everyone, mine)
    if ranks.leader:
        print(
            f"torch {torch.__version__}, {args.preset} on {ranks.world} rank(s) (DDP on {dist.get_backend()}, "
            f"{device_name(run.device)}, 1 thread each; side channel on sockets), {len(times['steered'])} steps "
            f"of each kind in blocks of {args.block}, load average {load_average()}"
        )
        for rank, figures in enumerate(everyone):
            step_ms, steered_ms, hook_us = figures["plain"] * 1e3, figures["steered"] * 1e3, figures["hook"] * 1e6
            print(
                f"  rank {rank}: plain {step_ms:.2f} ms/step, steered {steered_ms:.2f} ms/step "
                f"({100 * (steered_ms / step_ms - 1):+.2f}%); in poll + record median {hook_us:.0f} us, "
                f"p99 {figures['hook_p99'] * 1e6:.0f} us; training-thread CPU in them median "
                f"{figures['hook_cpu'] * 1e6:.0f} us ({figures['hook_cpu'] * 1e5 / step_ms:.3f}% of a step); CPU of "
                f"all its threads per step {figures['process_plain'] * 1e3:.2f} ms plain, "
                f"{figures['process_steered'] * 1e3:.2f} ms steered"
            )
            names = sorted({key.split(" ", 2)[2] for key in figures if key.startswith("thread ")})
            print(
                "    CPU per step by thread (rank 0: and the server's), plain -> steered: "
                + ", ".join(
                    f"{name} {figures.get(f'thread plain {name}', 0.0) * 1e3:.2f} -> "
                    f"{figures.get(f'thread steered {name}', 0.0) * 1e3:.2f} ms"
                    for name in names
                )
            )
        print(
            "  (wall time in poll + record includes waiting there for the slower rank, which DDP's all-reduce "
            "would otherwise wait for in backward; their CPU time leaves waits out)"
        )
        per_step = everyone[0]["reduce"] * 1e3
        print(
            f"  the boundary's hand-over, timed alone (median of {args.collectives}): waited for at once (a "
            f"boundary that applies commands or saves a checkpoint) {everyone[0]['empty'] * 1e6:.0f} us with nothing "
            f"to carry, {per_step * 1e3:.0f} us with a step's values to reduce = "
            f"{100 * per_step / (everyone[0]['plain'] * 1e3):.2f}% of a plain step; sent at one boundary and "
            f"read at the next, training-thread CPU "
            + ", ".join(f"{figures['overlapped'] * 1e6:.0f} us on rank {rank}" for rank, figures in enumerate(everyone))
        )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60, help="steps of each kind (default %(default)s)")
    parser.add_argument("--block", type=int, default=10, help="steps per interleaved block (default %(default)s)")
    parser.add_argument("--nproc-per-node", type=int, default=2, help="ranks (default %(default)s)")
    parser.add_argument("--collectives", type=int, default=500, help="side-channel calls timed alone")
    parser.add_argument("--server", help=argparse.SUPPRESS)
    parser.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    add_run_arguments(parser)
    args = parser.parse_args()
    if "RANK" in os.environ:
        return rank_main(args)
    with Server() as server:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc_per_node}",
            "-m", "benchmarks.distributed_overhead", "--server", server.url, "--server-pid", str(server.pid),
            "--steps", str(args.steps), "--block", str(args.block), "--collectives", str(args.collectives),
            "--preset", args.preset, "--device", args.device,
        ]  # fmt: skip
        return subprocess.run(command, cwd=REPO, check=False).returncode


if __name__ == "__main__":
    raise SystemExit(main())
