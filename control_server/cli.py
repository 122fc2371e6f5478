"""`runsteer server`: run the control server until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from aiohttp import web
from pydantic import ValidationError

from control_server.app import create_app
from control_server.config import ServerConfig
from control_server.store import describe_store

log = logging.getLogger("runsteer.server")


def build_parser() -> argparse.ArgumentParser:
    """The `runsteer server` flags, one per `ServerConfig` field that a user sets."""
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(prog="runsteer server", description="Run the runsteer control server.")
    parser.add_argument("--host", default=defaults.host, help="interface to bind (default %(default)s)")
    parser.add_argument(
        "--port", type=int, default=defaults.port, help="TCP port, 0 for any free one (default %(default)s)"
    )
    parser.add_argument(
        "--db", default=str(defaults.db), help="SQLite file, or a postgresql:// URL (default %(default)s)"
    )
    parser.add_argument("--tokens-file", type=Path, default=None, help="JSON list of {name, token, scopes}")
    parser.add_argument("--port-file", type=Path, default=None, help="write the bound port here once listening")
    parser.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=defaults.heartbeat_timeout_s,
        help="seconds without a heartbeat before a run is marked lost (default %(default)s)",
    )
    parser.add_argument(
        "--finished-run-ttl",
        type=float,
        default=defaults.finished_run_ttl_s,
        help="seconds a finished run stays in /metrics (default %(default)s)",
    )
    parser.add_argument(
        "--cors-origin", action="append", default=[], help="allow browser calls from this origin (repeatable)"
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=defaults.max_body_bytes,
        help="refuse request bodies larger than this (default %(default)s)",
    )
    parser.add_argument(
        "--subscriber-queue",
        type=int,
        default=defaults.subscriber_queue,
        help="events buffered per websocket client before it is closed as too slow (default %(default)s)",
    )
    parser.add_argument(
        "--long-poll-max",
        type=float,
        default=defaults.long_poll_max_s,
        help="longest wait a long-poll may ask for, in seconds (default %(default)s)",
    )
    parser.add_argument(
        "--token-rate-limit",
        type=int,
        default=defaults.token_rate_limit,
        help="requests a minute each token may make, 0 for no limit (default %(default)s)",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The server configuration the parsed flags describe."""
    return ServerConfig(
        host=args.host,
        port=args.port,
        db=args.db,
        tokens_file=args.tokens_file,
        port_file=args.port_file,
        heartbeat_timeout_s=args.heartbeat_timeout,
        finished_run_ttl_s=args.finished_run_ttl,
        cors_origins=tuple(args.cors_origin),
        max_body_bytes=args.max_body_bytes,
        subscriber_queue=args.subscriber_queue,
        long_poll_max_s=args.long_poll_max,
        token_rate_limit=args.token_rate_limit,
    )


async def serve(app: web.Application, config: ServerConfig) -> None:
    """Listen until SIGINT or SIGTERM, then shut down cleanly (stores flushed, sockets closed)."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, reuse_address=True)
    await site.start()
    port = runner.addresses[0][1]
    if config.port_file is not None:
        temporary = config.port_file.with_suffix(".tmp")
        temporary.write_text(str(port))
        os.replace(temporary, config.port_file)
    log.info("runsteer server listening on http://%s:%d (store %s)", config.host, port, describe_store(config.db))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("runsteer server shutting down")
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Entry point of `runsteer server`."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        app = create_app(config)
    except (ValueError, OSError, ValidationError) as exc:
        print(f"runsteer server: {exc}", file=sys.stderr)
        return 2
    asyncio.run(serve(app, config))
    return 0
