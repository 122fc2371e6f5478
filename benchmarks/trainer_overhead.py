"""Step-time cost of the `Steer` hook and of the full metric set, on the built-in run (`cpu-tiny`, or `--preset`).

Three kinds of step train the same model, interleaved in blocks in one process so that machine load hits them
alike: a plain loop step with the loss only (`clip_grad_norm_`, `loss.item()`), the built-in step with every
metric of the README's table read back each step, and that step steered (`poll` before, `record` after, the I/O
threads running). Prints figures; asserts nothing. Run: `python -m benchmarks.trainer_overhead` (~2.5 min);
on a GPU: `--preset gpu-small --device cuda`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks._common import Server, add_run_arguments, device_name, load_average
from trainer.run import BuiltinRun, RunConfig


def loss_only_step(run: BuiltinRun) -> float:
    """What a plain loop does: forward, cross-entropy, backward, clip, step; reads the loss back, nothing else."""
    inputs, targets, _ = (t.to(run.device, non_blocking=True) for t in run.sampler.next_batch())
    with run.autocast():
        logits = run.model(inputs)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    torch.autograd.backward(loss)
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.steer.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss.item()


def thread_cpu_s(native_id: int | None) -> float:
    """CPU seconds (user + system) one thread of this process has used, from /proc."""
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300, help="steps of each kind (default %(default)s)")
    parser.add_argument("--block", type=int, default=10, help="steps per interleaved block (default %(default)s)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    add_run_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with Server() as server:
        run = BuiltinRun(
            RunConfig(server=server.url, steps=10**9, run_name="overhead", preset=args.preset, device=args.device)
        )
        steer = run.steer
        times: dict[str, list[float]] = {"loss only": [], "full metrics": [], "steered": []}
        cpu_times: dict[str, list[float]] = {kind: [] for kind in times}
        hook: list[float] = []
        iteration = 0
        for _ in range(3):  # warm-up: allocator, autograd graph, first checkpoint snapshots
            run.train_step(iteration)
            loss_only_step(run)
        io_threads = [steer.io._sender.native_id, steer.io._poller.native_id]
        io_cpu_before = sum(thread_cpu_s(tid) for tid in io_threads)
        started_all = time.perf_counter()
        for block in range(args.steps // args.block):
            kinds = list(times)
            kinds = kinds[block % 3 :] + kinds[: block % 3]  # rotate the order so no kind always follows another
            for kind in kinds:
                for _ in range(args.block):
                    started, cpu_started = time.perf_counter(), time.thread_time()
                    if kind == "loss only":
                        loss_only_step(run)
                    elif kind == "full metrics":
                        run.train_step(iteration)
                    else:
                        hook_started = time.perf_counter()
                        step = steer.poll(iteration)
                        hook_time = time.perf_counter() - hook_started
                        values = run.train_step(step)
                        hook_started = time.perf_counter()
                        steer.record(step, **values)
                        hook.append(hook_time + time.perf_counter() - hook_started)
                    times[kind].append(time.perf_counter() - started)
                    cpu_times[kind].append(time.thread_time() - cpu_started)
                    iteration += 1
        wall = time.perf_counter() - started_all
        io_cpu = sum(thread_cpu_s(tid) for tid in io_threads) - io_cpu_before
        steer.close()
    median = {kind: statistics.median(samples) * 1e3 for kind, samples in times.items()}
    cpu_median = {kind: statistics.median(samples) * 1e3 for kind, samples in cpu_times.items()}
    steered_steps = len(times["steered"])
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.preset} on {device_name(run.device)}, "
        f"{steered_steps} steps of each kind in blocks of {args.block}, load average {load_average()}"
    )
    for kind, value in median.items():
        print(f"  {kind:<13} median {value:7.2f} ms/step wall, {cpu_median[kind]:7.2f} ms/step training-thread CPU")
    full_cost = 100 * (median["full metrics"] / median["loss only"] - 1)
    full_cpu_cost = 100 * (cpu_median["full metrics"] / cpu_median["loss only"] - 1)
    print(
        f"full metric set vs loss only: {full_cost:+.2f}% of step time (wall), {full_cpu_cost:+.2f}% (thread CPU time,"
        " which other processes on a shared machine disturb less)"
    )
    print(
        f"steered vs full metrics, unsteered: {100 * (median['steered'] / median['full metrics'] - 1):+.2f}% "
        "of step time (the hook, I/O threads included, as the loop sees it)"
    )
    hook_ms, hook_p99 = statistics.median(hook) * 1e3, sorted(hook)[int(0.99 * len(hook))] * 1e3
    print(
        f"poll + record on the training thread: median {hook_ms * 1e3:.1f} us "
        f"({100 * hook_ms / median['full metrics']:.3f}% of a step), p99 {hook_p99 * 1e3:.1f} us, "
        f"mean {statistics.fmean(hook) * 1e6:.1f} us (in-memory snapshots every 25 steps included)"
    )
    print(
        f"I/O threads' CPU time: {io_cpu / steered_steps * 1e3:.3f} ms per steered step "
        f"({100 * io_cpu / steered_steps * 1e3 / median['full metrics']:.2f}% of a step; "
        f"{io_cpu:.2f} s over the {wall:.0f} s run, 10 ms clock ticks)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
