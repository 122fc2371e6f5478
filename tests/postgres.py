"""A real, throwaway PostgreSQL cluster for tests and benchmarks: initdb in a temp dir, started on a free port.

PostgreSQL refuses to run as root, so as root the cluster belongs to the unprivileged `nobody` user
(its directory is made under /tmp, which that user can reach, and chowned to it). `python3 dev.py test`
installs Debian's `postgresql` package when no server binaries are found.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

CLUSTER_USER = "nobody"
"""The unprivileged system user that owns the cluster when the tests run as root."""
SEARCH = ("/usr/lib/postgresql/*/bin", "/usr/local/pgsql/bin", "/opt/homebrew/bin", "/usr/local/bin", "/usr/bin")


def find_bindir() -> Path | None:
    """The directory holding initdb and postgres (the newest Debian version first), or None."""
    for pattern in SEARCH:
        for candidate in sorted(Path("/").glob(pattern.lstrip("/")), reverse=True):
            if (candidate / "initdb").exists() and (candidate / "postgres").exists():
                return candidate
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class LocalPostgres:
    """One cluster: `start()`, `url` of its `runsteer` database, `create_database()`, `stop()` (removes it)."""

    def __init__(self, *, fast: bool = False) -> None:
        bindir = find_bindir()
        if bindir is None:
            raise RuntimeError("no PostgreSQL server binaries (initdb, postgres); `python3 dev.py test` installs them")
        self.bindir = bindir
        self.fast = fast
        """Skip fsync (tests): the server still commits before answering, the disk just is not flushed."""
        self.root = Path(tempfile.mkdtemp(prefix="runsteer-pg-", dir="/tmp"))
        self.data = self.root / "data"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._as: dict[str, Any] = {}
        if os.geteuid() == 0:
            account = pwd.getpwnam(CLUSTER_USER)
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self._as = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}

    @property
    def url(self) -> str:
        return self.url_of("runsteer")

    def url_of(self, database: str) -> str:
        return f"postgresql://runsteer@127.0.0.1:{self.port}/{database}"

    def start(self, timeout_s: float = 60.0) -> LocalPostgres:
        """initdb, start the server, create the `runsteer` database; returns once it accepts connections."""
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "runsteer",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--locale=C",
        )
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.root),
            "max_connections": "200",
            "shared_buffers": "128MB",
            "fsync": "off" if self.fast else "on",
            "synchronous_commit": "off" if self.fast else "on",
            "full_page_writes": "off" if self.fast else "on",
            "max_wal_size": "256MB",
        }
        command = [str(self.bindir / "postgres"), "-D", str(self.data)]
        for name, value in settings.items():
            command += ["-c", f"{name}={value}"]
        with open(self.root / "postgres.log", "ab") as log:  # the server keeps its own copy of the descriptor
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, **self._as)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with psycopg.connect(self.url_of("postgres"), autocommit=True, connect_timeout=2) as connection:
                    connection.execute("CREATE DATABASE runsteer")
                return self
            except psycopg.OperationalError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"PostgreSQL did not start: {self.log()}") from None
                time.sleep(0.1)

    def create_database(self, name: str) -> str:
        """A fresh empty database in the cluster; returns its URL."""
        with psycopg.connect(self.url_of("postgres"), autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url_of(name)

    def disk_bytes(self, database: str = "runsteer") -> dict[str, int]:
        """The database's size and the cluster's WAL directory size."""
        with psycopg.connect(self.url_of("postgres"), autocommit=True) as connection:
            size = connection.execute("SELECT pg_database_size(%s)", (database,)).fetchone()
        wal = sum(path.stat().st_size for path in (self.data / "pg_wal").glob("*") if path.is_file())
        return {"db": int(size[0]) if size else 0, "wal": wal}

    def log(self) -> str:
        path = self.root / "postgres.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        """Fast shutdown (SIGINT: disconnect clients, stop) and remove the cluster."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(2)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.root)

    def _run(self, *command: str) -> None:
        result = subprocess.run(command, capture_output=True, text=True, **self._as)
        if result.returncode != 0:
            raise RuntimeError(f"{command[0]} failed: {result.stdout[-2000:]}{result.stderr[-2000:]}")
