"""The server's one configuration object: a field per `runsteer server` flag."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from protocols.constants import HEARTBEAT_LOST_AFTER_S


class ServerConfig(BaseModel):
    """How a control server runs; every field has a `runsteer server` flag of the same name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    """Interface to bind; anything but loopback requires tokens."""
    port: int = Field(default=8765, ge=0, le=65535)
    """TCP port; 0 picks a free one (see `port_file`)."""
    db: Path | str = Path("runsteer-data/runsteer.db")
    """Where runs, commands, events, metrics and the checkpoint index live: a SQLite file, or a
    `postgresql://` URL that several servers may share, all of them serving the same runs."""
    tokens_file: Path | None = None
    """JSON list of {"name", "token", "scopes"}; also read from RUNSTEER_TOKENS. No tokens: no auth (loopback only)."""
    port_file: Path | None = None
    """Write the bound port here once listening (useful with port 0)."""
    max_body_bytes: int = Field(default=8 * 2**20, ge=1024)
    """Requests with larger bodies are refused with 413."""
    heartbeat_timeout_s: float = Field(default=HEARTBEAT_LOST_AFTER_S, gt=0)
    """A run with no heartbeat for this long is marked lost."""
    subscriber_queue: int = Field(default=2048, ge=1)
    """Events buffered per websocket client before it is closed as too slow."""
    long_poll_max_s: float = Field(default=60.0, gt=0)
    """Upper bound on `wait` for long-polls."""
    finished_run_ttl_s: float = Field(default=3600.0, ge=0)
    """How long a finished run's series stay in the Prometheus exposition."""
    cors_origins: tuple[str, ...] = ()
    """Origins allowed to call the API from a browser; none by default."""
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    """The event loop: uvloop (`pip install "runsteer[fast]"`) spends a little less CPU per request than asyncio's
    own (about 5% at 2,000 requests a second, `benchmarks/fleet.py`); `auto` takes it when it is installed."""
    token_rate_limit: int = Field(default=0, ge=0)
    """Requests a minute each token may make (bursts up to this many); past it, 429 with Retry-After. 0: no limit."""
