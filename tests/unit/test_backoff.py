"""The one backoff schedule every retry and reconnect loop uses (``core/backoff.py``)."""

from __future__ import annotations

import pytest

from agentchat.core.backoff import Backoff


def test_waits_double_up_to_the_cap_with_full_jitter_and_reset_after_a_success() -> None:
    top = Backoff(0.1, 1.0, random=lambda: 1.0)
    assert [round(top.next_delay(), 3) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert top.attempts == 6
    top.reset()
    assert top.next_delay() == pytest.approx(0.1)
    bottom = Backoff(0.1, 1.0, random=lambda: 0.0)
    assert bottom.next_delay() == 0.0  # full jitter: anywhere from no wait to the ceiling


def test_a_long_outage_does_not_overflow() -> None:
    backoff = Backoff(0.05, 30.0, random=lambda: 0.5)
    for _ in range(5000):
        delay = backoff.next_delay()
    assert delay == 15.0


@pytest.mark.parametrize(("base", "cap"), [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0)])
def test_refuses_a_schedule_that_never_waits_or_shrinks(base: float, cap: float) -> None:
    with pytest.raises(ValueError):
        Backoff(base, cap)
