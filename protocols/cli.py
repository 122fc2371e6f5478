"""Client-side commands: `runsteer send`, `status`, `watch` and `schema`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime

from pydantic import ValidationError

from protocols.errors import RunsteerError
from protocols.events import (
    AlertEvent,
    CheckpointEvent,
    CommandEvent,
    Event,
    LogEvent,
    MetricsEvent,
    RunEvent,
    RunStateEvent,
)
from protocols.records import RunInfo
from protocols.schema import protocol_schema

DEFAULT_SERVER = os.environ.get("RUNSTEER_SERVER", "http://127.0.0.1:8765")
SHOWN_METRICS = ("loss", "eval_loss", "lr", "grad_norm", "tokens_per_s")


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"runsteer {prog}", description=description)
    parser.add_argument("--server", default=DEFAULT_SERVER, help="server URL (default %(default)s, or RUNSTEER_SERVER)")
    parser.add_argument("--token", default=os.environ.get("RUNSTEER_TOKEN"), help="bearer token (or RUNSTEER_TOKEN)")
    return parser


def schema(argv: list[str]) -> int:
    """Print the protocol's JSON Schema."""
    parser = argparse.ArgumentParser(prog="runsteer schema", description="Print the wire protocol's JSON Schema.")
    parser.parse_args(argv)
    print(json.dumps(protocol_schema(), indent=2))
    return 0


def send(argv: list[str]) -> int:
    """Send a command and print its record (its result, with --wait)."""
    from protocols.client import Client

    parser = _parser("send", "Send a command to a run and print its record.")
    parser.add_argument("run_id")
    parser.add_argument("command", help='the command as JSON, e.g. \'{"type": "set_hparams", "lr": 0.0003}\'')
    parser.add_argument("--source", default=f"user:{_user()}", help="who sends it (default %(default)s)")
    parser.add_argument("--reason", default="", help="why, for the record")
    parser.add_argument("--id", default=None, help="an idempotency id: resending it does not send twice")
    parser.add_argument("--wait", action="store_true", help="wait until the command is applied or refused")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait with --wait")
    args = parser.parse_args(argv)
    try:
        command = json.loads(args.command)
    except json.JSONDecodeError as exc:
        print(f"runsteer send: the command is not valid JSON: {exc}", file=sys.stderr)
        return 2
    try:
        with Client(args.server, token=args.token) as client:
            record = client.submit(
                args.run_id,
                command,
                source=args.source,
                reason=args.reason,
                command_id=args.id,
                wait=args.wait,
                timeout_s=args.timeout,
            )
    except ValidationError as exc:
        print(f"runsteer send: invalid command:\n{exc}", file=sys.stderr)
        return 2
    except RunsteerError as exc:
        print(f"runsteer send: {exc}", file=sys.stderr)
        return 1
    print(record.model_dump_json(indent=2))
    return 0 if record.status not in ("rejected", "failed") else 1


def status(argv: list[str]) -> int:
    """Show every run as a table, or one run in detail."""
    from protocols.client import Client

    parser = _parser("status", "Show runs, or one run in detail.")
    parser.add_argument("run_id", nargs="?")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        with Client(args.server, token=args.token) as client:
            if args.run_id:
                run = client.get_run(args.run_id)
                commands = client.list_commands(args.run_id)[-10:]
                if args.json:
                    print(
                        json.dumps(
                            {
                                "run": run.model_dump(mode="json"),
                                "commands": [c.model_dump(mode="json") for c in commands],
                            },
                            indent=2,
                        )
                    )
                    return 0
                print(_describe_run(run))
                for record in commands:
                    step = f"@{record.applied_step}" if record.applied_step is not None else ""
                    print(
                        f"  #{record.seq:<4} {record.command.type:<16} {record.status}{step:<8} {record.source}  "
                        f"{record.message or record.reason}"
                    )
                return 0
            runs = client.list_runs()
    except RunsteerError as exc:
        print(f"runsteer status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([run.model_dump(mode="json") for run in runs], indent=2))
        return 0
    print(f"{'RUN':<32} {'NAME':<20} {'STATUS':<9} {'BRANCH':<16} {'STEP':>8}  LAST HEARTBEAT")
    for run in runs:
        print(
            f"{run.run_id:<32} {run.name:<20} {run.status:<9} {run.branch:<16} {run.step:>8}  "
            f"{_when(run.last_heartbeat)}"
        )
    return 0


def watch(argv: list[str]) -> int:
    """Print a run's events as they happen until interrupted."""
    from protocols.client import Client

    parser = _parser("watch", "Follow a run's live event stream.")
    parser.add_argument("run_id")
    parser.add_argument("--json", action="store_true", help="print each event as one JSON line")
    args = parser.parse_args(argv)
    try:
        with Client(args.server, token=args.token) as client, client.stream(args.run_id) as stream:
            for event in stream:
                print(event.model_dump_json() if args.json else format_event(event), flush=True)
    except KeyboardInterrupt:
        return 0
    except RunsteerError as exc:
        print(f"runsteer watch: {exc}", file=sys.stderr)
        return 1
    return 0


def format_event(event: Event) -> str:
    """One readable line per event."""
    when = datetime.fromtimestamp(event.time).strftime("%H:%M:%S")
    if isinstance(event, MetricsEvent):
        last = event.samples[-1]
        shown = "  ".join(f"{key}={last.values[key]:.4g}" for key in SHOWN_METRICS if key in last.values)
        flag = f"  NON-FINITE: {', '.join(last.nonfinite)}" if last.nonfinite else ""
        return f"{when} metrics  {last.branch}@{last.step}  {shown}{flag}"
    if isinstance(event, CommandEvent):
        record = event.record
        step = f" at step {record.applied_step}" if record.applied_step is not None else ""
        detail = f" ({record.message})" if record.message else ""
        return f"{when} command  #{record.seq} {record.command.type} {record.status}{step} by {record.source}{detail}"
    if isinstance(event, RunEvent):
        return f"{when} run      {event.run.status} {event.run.branch}@{event.run.step}"
    if isinstance(event, RunStateEvent):
        return f"{when} run      {event.status} {event.branch}@{event.step}"
    if isinstance(event, CheckpointEvent):
        verb = "deleted" if event.deleted else "saved"
        checkpoint = event.checkpoint
        return f"{when} ckpt     {verb} {checkpoint.checkpoint_id} ({checkpoint.branch}@{checkpoint.step})"
    if isinstance(event, AlertEvent):
        return f"{when} ALERT    [{event.severity}] {event.message} (from {event.source})"
    if isinstance(event, LogEvent):
        return f"{when} log      [{event.level}] {event.message}"
    raise AssertionError(f"unhandled event kind {event.kind}")


def _describe_run(run: RunInfo) -> str:
    lines = [
        f"run {run.run_id} ({run.name}): {run.status}, step {run.step} on branch {run.branch}",
        f"  branches: {', '.join(run.branches)}; last heartbeat {_when(run.last_heartbeat)}",
    ]
    if run.state is not None:
        state = run.state
        lines.append(
            f"  optimizer {state.optimizer}, lr {state.lr}, weight decay {state.weight_decay}, "
            f"grad clip {state.grad_clip}"
        )
        if state.data_mix:
            lines.append("  data mix " + ", ".join(f"{name}={weight:.2f}" for name, weight in state.data_mix.items()))
    return "\n".join(lines)


def _when(timestamp: float | None) -> str:
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S") if timestamp else "never"


def _user() -> str:
    name = os.environ.get("USER") or "cli"
    return "".join(ch for ch in name if ch.isalnum() or ch in "_.@-") or "cli"
