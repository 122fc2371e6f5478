"""`runsteer dashboard`: run the Streamlit app against a control server."""

from __future__ import annotations

import argparse
import os
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
    try:
        return subprocess.call(streamlit_command(args.server, args.port, args.address))
    except KeyboardInterrupt:
        return 0
