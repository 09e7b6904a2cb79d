"""The in-process bus's expiring values: bounded memory without a whole-table sweep (no event loop)."""

from __future__ import annotations

import time

from agentchat.bus.memory import MemoryBroker


def test_expired_values_are_dropped_by_later_writes() -> None:
    broker = MemoryBroker()
    past = time.monotonic() - 1
    for i in range(1000):
        broker.store(f"old{i}", b"x", past)  # already expired
    future = time.monotonic() + 3600
    for i in range(1000):
        broker.store(f"new{i}", b"y", future)
    # each write removes a few due entries: the expired ones are gone, the live ones all kept
    assert not any(key.startswith("old") for key in broker._values)
    assert sum(1 for key in broker._values if key.startswith("new")) == 1000
    assert len(broker._deadlines) == 1000


def test_a_key_written_again_keeps_its_new_deadline() -> None:
    broker = MemoryBroker()
    now = time.monotonic()
    broker.store("k", b"short", now - 1)
    broker.store("k", b"long", now + 3600)  # the first write's heap item is now stale
    for i in range(10):
        broker.store(f"other{i}", b"z", now + 3600)
    assert broker.live("k", time.monotonic()) == (b"long", now + 3600)
