"""Checks a command against its run: policy bounds, known domains and groups, and the rate limit."""

from __future__ import annotations

import threading
import time
from collections import deque

from control_server.errors import PolicyViolation, RateLimited
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


class RateLimiter:
    """A sliding window of accepted commands per run, checked and counted in one step under a lock.

    `take` runs inside the store transaction that inserts the command, so concurrent submitters cannot all pass
    the check before any of them is counted; a store shared by several servers counts in that transaction instead.
    """

    def __init__(self) -> None:
        self._accepted: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def take(self, run_id: str, limit: RateLimit) -> float:
        """Count one command for `run_id` and return its stamp; raise `RateLimited` (counting nothing) when full."""
        with self._lock:
            window = self._accepted.setdefault(run_id, deque())
            now = time.monotonic()
            while window and now - window[0] > limit.per_seconds:
                window.popleft()
            if len(window) >= limit.max_commands:
                retry_after = limit.per_seconds - (now - window[0])
                raise RateLimited(
                    f"run {run_id} accepts at most {limit.max_commands} commands per {limit.per_seconds:g} s",
                    details=[
                        ErrorDetail(
                            field="",
                            message="rate limit reached",
                            allowed=f"{limit.max_commands} per {limit.per_seconds:g} s",
                        )
                    ],
                    retry_after_s=round(retry_after, 3),
                )
            window.append(now)
            return now

    def give_back(self, run_id: str, stamp: float) -> None:
        """Uncount a command whose insert did not commit."""
        with self._lock:
            window = self._accepted.get(run_id)
            if window is not None and stamp in window:
                window.remove(stamp)


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
