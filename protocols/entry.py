"""The `runsteer` command: a table of subcommands, each imported only when used (so `schema` loads no torch)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "server": ("control_server.cli:main", "run the control server"),
    "demo": ("control_server.demo:main", "run the demo: server, a training run, an agent and the dashboard"),
    "train": ("trainer.cli:main", "run the built-in training run"),
    "agent": ("agents.cli:main", "run a rule or LLM agent on a run"),
    "dashboard": ("dashboard.cli:main", "run the Streamlit dashboard"),
    "send": ("protocols.cli:send", "send a command to a run and print its record"),
    "status": ("protocols.cli:status", "show runs, or one run in detail"),
    "watch": ("protocols.cli:watch", "follow a run's live event stream"),
    "schema": ("protocols.cli:schema", "print the JSON Schema of the wire protocol"),
}


def _load(target: str) -> Callable[[list[str]], int]:
    module_name, _, function = target.partition(":")
    entry: Callable[[list[str]], int] = getattr(importlib.import_module(module_name), function)
    return entry


def _usage() -> str:
    lines = ["usage: runsteer <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch `runsteer <command> ...`."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = args[0], args[1:]
    if command not in SUBCOMMANDS:
        print(f"runsteer: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    target, _ = SUBCOMMANDS[command]
    try:
        entry = _load(target)
    except ModuleNotFoundError as exc:
        print(f"runsteer {command}: not available in this installation ({exc})", file=sys.stderr)
        return 2
    return entry(rest)


if __name__ == "__main__":
    raise SystemExit(main())
