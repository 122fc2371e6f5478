"""Real runsteer servers for tests: in a background thread, or as a separate process."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from aiohttp import web

from control_server.app import create_app
from control_server.auth import TokenTable
from control_server.config import ServerConfig


class ServerThread:
    """A real server on 127.0.0.1 (a free port) running its own event loop in a thread."""

    def __init__(self, config: ServerConfig, tokens: TokenTable | None = None) -> None:
        self.config = config
        self.app = create_app(config, tokens)
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._ready = threading.Event()
        self._stopped = asyncio.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="runsteer-test-server", daemon=True)

    @property
    def url(self) -> str:
        """The server's base URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        """Start serving; returns once the port is bound."""
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise RuntimeError(f"test server did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        """Shut down cleanly and join the thread."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(30)

    def call(self, coroutine_function, *args):  # type: ignore[no-untyped-def]
        """Run a coroutine on the server's loop and return its result (for inspecting server state)."""
        return asyncio.run_coroutine_threadsafe(coroutine_function(*args), self.loop).result(30)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        finally:
            self.loop.close()

    async def _serve(self) -> None:
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
        try:
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = runner.addresses[0][1]
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            raise
        self._ready.set()
        try:
            await self._stopped.wait()
        finally:
            await runner.cleanup()


class ServerProcess:
    """`python -m control_server` in its own process, for restart and kill tests."""

    def __init__(self, db: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.db = db
        self.port_file = db.with_suffix(".port")
        self.extra = extra
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """The server's base URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, port: int = 0, timeout_s: float = 30.0) -> ServerProcess:
        """Start the process and wait until it listens (on `port`, or a free one)."""
        self.port_file.unlink(missing_ok=True)
        command = [
            sys.executable,
            "-m",
            "control_server",
            "--port",
            str(port),
            "--db",
            str(self.db),
            "--port-file",
            str(self.port_file),
            *self.extra,
        ]
        with open(self.db.with_suffix(".log"), "ab") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(self.env or {})}
            )
        deadline = time.monotonic() + timeout_s
        while not self.port_file.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start within {timeout_s} s: {self.log()}")
            time.sleep(0.05)
        self.port = int(self.port_file.read_text())
        return self

    def log(self) -> str:
        """What the server printed so far."""
        path = self.db.with_suffix(".log")
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self, *, kill: bool = False) -> int:
        """SIGTERM (clean) or SIGKILL the process and wait for it."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        return self.process.wait(30)
