"""Checks a command against its run: policy bounds, known domains and groups, and the rate limit."""

from __future__ import annotations

import time

from control_server.errors import PolicyViolation, RateLimited
from control_server.store import Db
from protocols.commands import Command, SetDataMix, SetHparams
from protocols.errors import ErrorDetail
from protocols.policy import RateLimit
from protocols.records import RunInfo


def name_violations(run: RunInfo, command: Command) -> list[ErrorDetail]:
    """Domains or parameter groups the run does not have."""
    if isinstance(command, SetDataMix) and run.domains:
        unknown = sorted(set(command.weights) - set(run.domains))
        if unknown:
            return [
                ErrorDetail(
                    field=f"command.weights.{name}", message="unknown data domain", allowed=", ".join(run.domains)
                )
                for name in unknown
            ]
    if isinstance(command, SetHparams) and command.param_groups and run.state and run.state.param_groups:
        known = run.state.param_groups
        return [
            ErrorDetail(
                field="command.param_groups", message=f"unknown parameter group {name!r}", allowed=", ".join(known)
            )
            for name in command.param_groups
            if name not in known
        ]
    return []


def check_command(run: RunInfo, command: Command) -> None:
    """Raise `PolicyViolation` naming every field the run's policy or shape refuses."""
    details = run.policy.violations(command) + name_violations(run, command)
    if details:
        raise PolicyViolation(f"{command.type} refused by run {run.run_id}", details=details)


def check_rate(db: Db, run_id: str, limit: RateLimit, now: float) -> None:
    """Raise `RateLimited` when the run accepted `max_commands` commands in the last `per_seconds`.

    Counted in the table, in the transaction that inserts the command while it holds the run's lock (see
    `store`): concurrent submitters, on this server or another one sharing the database, are counted one by one,
    never all let through, and a rolled-back insert counts nothing.
    """
    count, oldest = db.execute(
        "SELECT COUNT(*), MIN(created_at) FROM commands WHERE run_id = ? AND created_at > ?",
        (run_id, now - limit.per_seconds),
    ).fetchone()
    if count >= limit.max_commands:
        raise RateLimited(
            f"run {run_id} accepts at most {limit.max_commands} commands per {limit.per_seconds:g} s",
            details=[
                ErrorDetail(
                    field="",
                    message="rate limit reached",
                    allowed=f"{limit.max_commands} per {limit.per_seconds:g} s",
                )
            ],
            retry_after_s=round(max(0.0, limit.per_seconds - (now - oldest)), 3),
        )


class TokenBudget:
    """A token bucket per token name: `per_minute` requests a minute, in bursts of at most `per_minute`."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._buckets: dict[str, tuple[float, float]] = {}

    def spend(self, name: str) -> None:
        """Take one request from `name`'s budget; raise `RateLimited` (with the wait) when it is empty."""
        now = time.monotonic()
        rate = self.per_minute / 60.0
        level, then = self._buckets.get(name, (float(self.per_minute), now))
        level = min(float(self.per_minute), level + (now - then) * rate)
        if level < 1.0:
            self._buckets[name] = (level, now)
            raise RateLimited(
                f"token {name!r} may make at most {self.per_minute} requests a minute",
                details=[
                    ErrorDetail(field="", message="token rate limit reached", allowed=f"{self.per_minute} per minute")
                ],
                retry_after_s=round((1.0 - level) / rate, 3),
            )
        self._buckets[name] = (level - 1.0, now)
