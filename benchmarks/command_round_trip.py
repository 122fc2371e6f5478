"""Command round trip: submit → delivered to a long-polling trainer → result reported → result seen by the submitter.

The server runs in its own process. A trainer-like thread with its own `Client` long-polls
`next_commands(wait)` and reports `applied` for each command at once; the submitter sends one
command at a time and waits for its result with `get_command(wait)` (`Client.wait_for`).
Prints p50/p90/p99/max of the whole round trip and of each leg.
"""

from __future__ import annotations

import threading
import time

from benchmarks._common import Server, base_parser, format_ms, load_average, percentiles_ms, register, write_summary
from protocols.client.sync import Client
from protocols.commands import CommandResult, SetHparams
from protocols.errors import ServerUnavailable


class Trainer(threading.Thread):
    """Long-polls commands and answers each one immediately, noting when it arrived."""

    def __init__(self, url: str, run_id: str) -> None:
        super().__init__(name="bench-trainer", daemon=True)
        self.client = Client(url)
        self.run_id = run_id
        self.delivered_at: dict[str, float] = {}
        self.reported_at: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        after = 0
        while not self.stop.is_set():
            try:
                records = self.client.next_commands(self.run_id, after_seq=after, wait_s=1.0)
            except ServerUnavailable:
                if self.stop.is_set():
                    return
                raise
            now = time.perf_counter()
            for record in records:
                self.delivered_at.setdefault(record.id, now)
                after = max(after, record.seq)
                self.client.report_result(
                    self.run_id, record.id, CommandResult(status="applied", step=record.seq, effective={"lr": 1e-4})
                )
                self.reported_at[record.id] = time.perf_counter()


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=1000, help="measured commands (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=50)
    args = parser.parse_args()

    with Server() as server:
        submitter = Client(server.url)
        run = register(submitter, "bench-round-trip")
        trainer = Trainer(server.url, run.run_id)
        trainer.start()
        time.sleep(0.2)  # let the first long-poll park on the server

        total, submit_leg, deliver_leg, result_leg, visible_leg = [], [], [], [], []
        cpu_before = server.cpu_s()
        started = time.perf_counter()
        for index in range(args.warmup + args.commands):
            lr = 1e-4 * (1 + index % 7)
            t0 = time.perf_counter()
            record = submitter.submit(run.run_id, SetHparams(lr=lr), source="script:bench", reason="round trip")
            t1 = time.perf_counter()
            final = submitter.wait_for(run.run_id, record.id, timeout_s=10.0)
            t2 = time.perf_counter()
            if final.status != "applied":
                raise RuntimeError(f"command {record.id} ended {final.status}: {final.message}")
            if index == args.warmup - 1:
                cpu_before = server.cpu_s()
                started = time.perf_counter()
            if index < args.warmup:
                continue
            # The submitter may see the result before the trainer thread has noted its own answer.
            while record.id not in trainer.reported_at:
                time.sleep(0.0005)
            delivered, reported = trainer.delivered_at[record.id], trainer.reported_at[record.id]
            total.append(t2 - t0)
            submit_leg.append(t1 - t0)
            deliver_leg.append(delivered - t0)
            result_leg.append(reported - delivered)
            visible_leg.append(t2 - reported)
        elapsed = time.perf_counter() - started
        server_cpu = server.cpu_s() - cpu_before
        trainer.stop.set()
        trainer.join(5)

    print(
        f"command round trip, {args.commands} commands one at a time (+{args.warmup} warm-up), "
        f"load avg {load_average()}"
    )
    print(f"  round trip (submit → applied result seen): {format_ms(percentiles_ms(total))}")
    print(f"  legs: submit answered (202)              : {format_ms(percentiles_ms(submit_leg))}")
    print(f"        submit start → trainer has it      : {format_ms(percentiles_ms(deliver_leg))}")
    print(f"        trainer has it → result answered   : {format_ms(percentiles_ms(result_leg))}")
    print(f"        result answered → submitter sees it (may be < 0): {format_ms(percentiles_ms(visible_leg))}")
    print(
        f"  throughput {args.commands / elapsed:.0f} round trips/s; "
        f"server CPU {server_cpu / elapsed * 100:.0f}% of one core"
    )
    stats = percentiles_ms(total)
    write_summary(
        args.summary_json,
        {
            "benchmark": "command round trip",
            "figure": f"p50 {stats['p50']:.1f} / p99 {stats['p99']:.1f} ms",
            "target": "p99 < 20 ms",
            "met": stats["p99"] < 20.0,
            "stats": stats,
        },
    )


if __name__ == "__main__":
    main()
