"""`runsteer dashboard`: run the Streamlit app against a control server."""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
from pathlib import Path

APP = Path(__file__).resolve().parent / "app.py"


def streamlit_command(server: str, port: int, address: str) -> list[str]:
    """The `streamlit run` command line for the app, passing the server URL through to it."""
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.port",
        str(port),
        "--server.address",
        address,
        "--server.headless",
        "true",
        "--server.fileWatcherType",
        "none",
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "viewer",
        "--",
        "--server",
        server,
    ]


def main(argv: list[str] | None = None) -> int:
    """Entry point of `runsteer dashboard`."""
    parser = argparse.ArgumentParser(prog="runsteer dashboard", description="Run the Streamlit dashboard.")
    parser.add_argument(
        "--server",
        default=os.environ.get("RUNSTEER_SERVER", "http://127.0.0.1:8765"),
        help="control server URL (default %(default)s, or RUNSTEER_SERVER)",
    )
    parser.add_argument("--port", type=int, default=8501, help="dashboard port (default %(default)s)")
    parser.add_argument(
        "--address",
        default="127.0.0.1",
        help="interface to serve on (default %(default)s; the dashboard acts with your token)",
    )
    args = parser.parse_args(argv)
    return run_until_signalled(streamlit_command(args.server, args.port, args.address))


FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""Signals passed on to Streamlit, so that stopping `runsteer dashboard` stops the app it runs."""


PR_SET_PDEATHSIG = 1
"""Linux prctl option: the signal a process gets when its parent dies."""


def die_with_parent() -> None:
    """In the child, before exec: on Linux, ask for SIGTERM when this process's parent dies, even by SIGKILL."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def run_until_signalled(command: list[str]) -> int:
    """Run `command` as a child that never outlives this process: a signal here is passed on and the child waited
    for, and on Linux the child also gets SIGTERM if this process is killed outright."""
    child = subprocess.Popen(command, preexec_fn=die_with_parent if sys.platform == "linux" else None)
    previous = {signum: signal.signal(signum, lambda signum, frame: child.send_signal(signum)) for signum in FORWARDED}
    try:
        return child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
