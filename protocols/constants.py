"""Names shared by every part of runsteer: the protocol version, statuses, scopes and codes."""

from __future__ import annotations

from typing import Final, Literal, get_args

PROTOCOL_VERSION: Final = "1.1"
"""Sent by clients and servers: the major part changes with an incompatible change of the wire models (a server
refuses another major), the minor part with an addition (1.1: `RunInfo.registered_by`, the `run_state` event,
tokens bound to a source kind)."""

API_PREFIX: Final = "/api/v1"

CommandStatus = Literal["queued", "pending_approval", "delivered", "applied", "rejected", "failed"]
COMMAND_STATUSES: Final[tuple[CommandStatus, ...]] = get_args(CommandStatus)
OPEN_COMMAND_STATUSES: Final[frozenset[CommandStatus]] = frozenset({"queued", "pending_approval", "delivered"})
FINAL_COMMAND_STATUSES: Final[frozenset[CommandStatus]] = frozenset({"applied", "rejected", "failed"})

RunStatus = Literal["running", "paused", "lost", "finished", "failed"]
RUN_STATUSES: Final[tuple[RunStatus, ...]] = get_args(RunStatus)

Scope = Literal["read", "command", "train", "admin"]
SCOPES: Final[tuple[Scope, ...]] = get_args(Scope)

# Websocket close codes (RFC 6455 leaves 4000-4999 to applications).
CLOSE_SLOW_CONSUMER: Final = 4008
"""The client did not read its events fast enough; its bounded queue filled up."""
CLOSE_UNAUTHORIZED: Final = 4401
"""The token was missing, unknown, or lacked the `read` scope."""
CLOSE_NOT_FOUND: Final = 4404
"""The run asked for does not exist."""
CLOSE_SERVER_SHUTDOWN: Final = 1001
"""The server is going away (standard code)."""

HEARTBEAT_LOST_AFTER_S: Final = 30.0
"""A run with no heartbeat for this long is marked `lost` by default."""
