"""The one backoff every retrying caller uses: doubling waits up to a cap, reset by a success, Retry-After believed."""

from __future__ import annotations

import pytest

from protocols.client.core import Backoff, retry_after_s


def test_waits_double_up_to_the_cap_and_a_success_starts_them_over() -> None:
    """0.2, 0.4, 0.8, ... never past `max_s`; after `reset()` the next wait is the first again."""
    backoff = Backoff(0.2, 1.0)
    assert [backoff.next_delay() for _ in range(5)] == [0.2, 0.4, 0.8, 1.0, 1.0]
    assert backoff.failures == 5
    backoff.reset()
    assert backoff.next_delay() == 0.2


def test_a_servers_retry_after_is_believed_within_the_cap() -> None:
    """A Retry-After in seconds replaces the computed wait, but never exceeds `max_s` nor goes below zero."""
    backoff = Backoff(0.5, 30.0)
    assert backoff.next_delay(retry_after_s("2")) == 2.0
    assert backoff.next_delay(retry_after_s("3600")) == 30.0
    assert backoff.next_delay(retry_after_s("-5")) == 0.0
    assert backoff.next_delay(retry_after_s("Wed, 21 Oct 2026 07:28:00 GMT")) == 0.5 * 2**3


def test_a_backoff_that_cannot_wait_is_refused() -> None:
    """A first wait of zero or above the cap is a configuration error, named."""
    with pytest.raises(ValueError, match="first_s"):
        Backoff(0.0, 1.0)
    with pytest.raises(ValueError, match="first_s"):
        Backoff(2.0, 1.0)
