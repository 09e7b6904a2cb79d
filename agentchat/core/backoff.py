"""Exponential backoff with full jitter, for every loop that retries or reconnects.

The n-th wait after a failure is uniform(0, min(cap, base * 2**n)) (AWS's "full jitter": clients that
failed together spread out instead of retrying in step). Pure: the caller sleeps, and passes its own
``random`` in tests.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable


class Backoff:
    __slots__ = ("base", "cap", "attempts", "_random")

    def __init__(self, base: float, cap: float, *, random: Callable[[], float] = _random.random) -> None:
        if base <= 0 or cap < base:
            raise ValueError(f"backoff needs 0 < base <= cap, got base={base} cap={cap}")
        self.base = base
        self.cap = cap
        self.attempts = 0  # failures since the last success
        self._random = random

    def next_delay(self) -> float:
        """How long to wait before the next attempt; counts one more failure."""
        ceiling = min(self.cap, self.base * 2 ** min(self.attempts, 62))
        self.attempts += 1
        return ceiling * self._random()

    def reset(self) -> None:
        """After a success: the next failure waits the shortest again."""
        self.attempts = 0
