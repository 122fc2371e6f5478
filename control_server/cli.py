"""`runsteer server`: run the control server until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable

from aiohttp import web
from pydantic import ValidationError

from control_server.app import create_app
from control_server.config import ServerConfig
from control_server.store import describe_store
from protocols.flags import add_config_flags, config_values

log = logging.getLogger("runsteer.server")


def build_parser() -> argparse.ArgumentParser:
    """The `runsteer server` flags: one per `ServerConfig` field, generated from it."""
    parser = argparse.ArgumentParser(prog="runsteer server", description="Run the runsteer control server.")
    add_config_flags(parser, ServerConfig)
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The server configuration the parsed flags describe."""
    return ServerConfig(**config_values(args, ServerConfig))


GC_YOUNG_THRESHOLD = 50_000
"""Allocations between two collections of the youngest generation (Python's default is 700).

Every request lives across a few hundred allocations, so at the default nearly each one was caught alive by a
young collection and promoted; the promotions set off a full collection every second or two at 1,000 fleet runs,
each walking the whole heap for 100-500 ms (it found no garbage: the server's garbage is freed by reference
counting). Collections of 50,000 young objects catch a request's objects once per hundred requests instead."""


def tune_gc() -> None:
    """Keep the cyclic garbage collector off the request path: the objects alive at start-up (modules, schemas,
    the store's runs) are frozen out of every later collection, and the young generation is collected less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


async def serve(app: web.Application, config: ServerConfig) -> None:
    """Listen until SIGINT or SIGTERM, then shut down cleanly (stores flushed, sockets closed)."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
    await runner.setup()
    tune_gc()
    site = web.TCPSite(runner, config.host, config.port, reuse_address=True)
    await site.start()
    port = runner.addresses[0][1]
    if config.port_file is not None:
        temporary = config.port_file.with_suffix(".tmp")
        temporary.write_text(str(port))
        os.replace(temporary, config.port_file)
    log.info(
        "runsteer server listening on http://%s:%d (store %s, %s event loop)",
        config.host,
        port,
        describe_store(config.db),
        type(asyncio.get_running_loop()).__module__.split(".")[0],
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("runsteer server shutting down")
        await runner.cleanup()


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop `--event-loop` names (None: asyncio's own); raises ValueError when uvloop is asked for and
    missing."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ValueError('--event-loop uvloop needs uvloop: pip install "runsteer[fast]"') from None
        return None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    """Entry point of `runsteer server`."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        app = create_app(config)
        factory = loop_factory(config.event_loop)
    except (ValueError, OSError, ValidationError) as exc:
        print(f"runsteer server: {exc}", file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(app, config))
    return 0
