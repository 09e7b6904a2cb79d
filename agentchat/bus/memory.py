"""The in-process bus: the default when one server process is enough.

A ``MemoryBroker`` holds what Redis would hold (topic subscriptions, sequence counters, expiring
values, sorted indexes); each ``MemoryBus`` is one "process" attached to it. Several buses on one
broker behave like several server processes on one Redis, which is how the contract suite and
multi-node tests in one process use it.

Delivery is synchronous: ``publish`` calls the handler of every subscribed bus before it returns, with
no task or callback scheduled per message. A handler that publishes from inside a delivery does not
jump the queue: the broker finishes the delivery in progress first, so every subscriber sees messages
in publish order.
"""

from __future__ import annotations

import heapq
import logging
import time
import weakref
from collections import deque
from collections.abc import Sequence, Callable

from agentchat.bus.base import BusHandler, check_index_score

log = logging.getLogger(__name__)

# Expired values are dropped when read, and by each write, which removes up to this many of the
# entries whose deadline has passed (oldest deadline first, from a heap): memory stays bounded and no
# write ever pays for a sweep of the whole table (at a million remembered client ids, a full sweep
# stalled the event loop for a few hundred milliseconds).
_EXPIRE_PER_WRITE = 4

_Entry = tuple[bytes | int, float]  # (value, monotonic deadline); ``incr`` counters are ints


def _check_ttl(ttl: float) -> None:
    if not ttl > 0:
        raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")


def _as_bytes(value: bytes | int) -> bytes:
    return str(value).encode() if isinstance(value, int) else value


class MemoryBroker:
    """The shared state of every ``MemoryBus`` attached to it (one event loop, one thread)."""

    __slots__ = (
        "topics", "counters", "indexes", "_values", "_deadlines", "_queue", "_dispatching", "__weakref__"
    )

    def __init__(self) -> None:
        # topic -> subscribed buses. Replaced, never mutated, so a delivery in progress iterates the
        # subscribers as they were when the message was published.
        self.topics: dict[str, tuple[MemoryBus, ...]] = {}
        self.counters: dict[str, int] = {}
        self.indexes: dict[str, dict[str, int]] = {}  # index -> member -> score; never empty
        self._values: dict[str, _Entry] = {}
        # (deadline, key) of every write; an item whose key was written again since is skipped.
        self._deadlines: list[tuple[float, str]] = []
        self._queue: deque[tuple[tuple[MemoryBus, ...], str, int, bytes]] = deque()
        self._dispatching = False

    # -- fan-out -------------------------------------------------------------------------------

    def deliver(self, subscribers: tuple[MemoryBus, ...], topic: str, seq: int, body: bytes) -> None:
        if self._dispatching:  # published from inside a handler: after the delivery in progress
            self._queue.append((subscribers, topic, seq, body))
            return
        self._dispatching = True
        try:
            for bus in subscribers:
                bus._deliver(topic, seq, body)
            queue = self._queue
            while queue:
                subscribers, topic, seq, body = queue.popleft()
                for bus in subscribers:
                    bus._deliver(topic, seq, body)
        finally:
            self._dispatching = False

    def subscribe(self, topic: str, bus: MemoryBus) -> None:
        current = self.topics.get(topic, ())
        if bus not in current:
            self.topics[topic] = (*current, bus)

    def unsubscribe(self, topic: str, bus: MemoryBus) -> None:
        current = self.topics.get(topic, ())
        remaining = tuple(b for b in current if b is not bus)
        if remaining:
            self.topics[topic] = remaining
        else:
            self.topics.pop(topic, None)

    # -- expiring values -----------------------------------------------------------------------

    def live(self, key: str, now: float) -> _Entry | None:
        entry = self._values.get(key)
        if entry is not None and entry[1] <= now:
            del self._values[key]
            return None
        return entry

    def store(self, key: str, value: bytes | int, deadline: float) -> None:
        values, deadlines = self._values, self._deadlines
        values[key] = (value, deadline)
        heapq.heappush(deadlines, (deadline, key))
        now = time.monotonic()
        for _ in range(_EXPIRE_PER_WRITE):
            if not deadlines or deadlines[0][0] > now:
                break
            _, due_key = heapq.heappop(deadlines)
            entry = values.get(due_key)
            if entry is not None and entry[1] <= now:
                del values[due_key]

    def pop(self, key: str) -> _Entry | None:
        return self._values.pop(key, None)


# ``memory://NAME`` attaches to a broker shared by every bus of this process given the same name, so
# tests can run several server "processes" in one interpreter. The broker lives while a bus uses it.
_named: weakref.WeakValueDictionary[str, MemoryBroker] = weakref.WeakValueDictionary()


def named_broker(name: str) -> MemoryBroker:
    broker = _named.get(name)
    if broker is None:
        broker = _named[name] = MemoryBroker()
    return broker


class MemoryBus:
    """A ``Bus`` inside one process. ``MemoryBus()`` has a broker of its own."""

    def __init__(self, broker: MemoryBroker | None = None) -> None:
        self._broker = broker if broker is not None else MemoryBroker()
        self._handler: BusHandler | None = None
        self._topics: set[str] = set()

    @classmethod
    def from_url(cls, url: str) -> MemoryBus:
        """``memory://`` (a broker of its own) or ``memory://NAME`` (shared within the process)."""
        rest = url.removeprefix("memory://")
        if rest == url or "/" in rest.rstrip("/") or "?" in rest:
            raise ValueError(f"bus {url!r}: use memory:// or memory://NAME")
        name = rest.rstrip("/")
        return cls(named_broker(name) if name else None)

    def _deliver(self, topic: str, seq: int, body: bytes) -> None:
        handler = self._handler
        if handler is None:
            return
        try:
            handler(topic, seq, body)
        except Exception:  # one broken handler must not stop the fan-out to the others
            log.exception("bus handler failed on topic %s", topic)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self, handler: BusHandler, on_reconnect: Callable[[], None] | None = None) -> None:
        # ``on_reconnect`` is never called: an in-process bus cannot lose its connection.
        self._handler = handler

    async def close(self) -> None:
        for topic in self._topics:
            self._broker.unsubscribe(topic, self)
        self._topics.clear()
        self._handler = None

    async def ping(self) -> None:
        return None

    # -- pub/sub -------------------------------------------------------------------------------

    async def subscribe(self, topic: str) -> None:
        if self._handler is None:
            raise RuntimeError("call start() before subscribe()")
        if topic not in self._topics:
            self._topics.add(topic)
            self._broker.subscribe(topic, self)

    async def unsubscribe(self, topic: str) -> None:
        if topic in self._topics:
            self._topics.discard(topic)
            self._broker.unsubscribe(topic, self)

    async def publish(self, topic: str, body: bytes) -> None:
        broker = self._broker
        subscribers = broker.topics.get(topic)
        if subscribers:
            broker.deliver(subscribers, topic, 0, body)

    async def publish_sequenced(self, topic: str, counter: str, body: bytes) -> int | None:
        broker = self._broker
        counters = broker.counters
        seq = counters.get(counter)
        if seq is None:
            return None
        seq += 1
        counters[counter] = seq
        subscribers = broker.topics.get(topic)
        if subscribers:
            broker.deliver(subscribers, topic, seq, body)
        return seq

    async def claim_and_publish(
        self, claim: str, mark: bytes, ttl: float, topic: str, counter: str, body: bytes, *, in_flight: str
    ) -> int | bytes | None:
        _check_ttl(ttl)
        broker = self._broker
        now = time.monotonic()
        entry = broker.live(claim, now)
        if entry is not None:
            return _as_bytes(entry[0])
        seq = broker.counters.get(counter)
        if seq is None:
            return None
        broker.store(claim, mark, now + ttl)
        seq += 1
        broker.counters[counter] = seq
        broker.indexes.setdefault(in_flight, {})[str(seq)] = seq
        subscribers = broker.topics.get(topic)
        if subscribers:
            broker.deliver(subscribers, topic, seq, body)
        return seq

    async def seed_sequence(self, counter: str, floor: int) -> None:
        counters = self._broker.counters
        current = counters.get(counter)
        if current is None or current < floor:
            counters[counter] = floor

    async def read_counters(self, counters: Sequence[str]) -> list[int | None]:
        known = self._broker.counters
        return [known.get(counter) for counter in counters]

    # -- values --------------------------------------------------------------------------------

    async def set_if_absent(self, key: str, value: bytes, ttl: float) -> bytes | None:
        _check_ttl(ttl)
        now = time.monotonic()
        entry = self._broker.live(key, now)
        if entry is not None:
            return _as_bytes(entry[0])
        self._broker.store(key, value, now + ttl)
        return None

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        _check_ttl(ttl)
        self._broker.store(key, value, time.monotonic() + ttl)

    async def set_many(self, items: Sequence[tuple[str, bytes]], ttl: float) -> None:
        _check_ttl(ttl)
        expires = time.monotonic() + ttl
        for key, value in items:
            self._broker.store(key, value, expires)

    async def get(self, key: str) -> bytes | None:
        entry = self._broker.live(key, time.monotonic())
        return None if entry is None else _as_bytes(entry[0])

    async def take(self, key: str) -> bytes | None:
        entry = self._broker.pop(key)
        if entry is None or entry[1] <= time.monotonic():
            return None
        return _as_bytes(entry[0])

    async def delete(self, key: str) -> None:
        self._broker.pop(key)

    async def compare_and_set(self, key: str, expected: bytes | None, new: bytes, ttl: float) -> bool:
        _check_ttl(ttl)
        now = time.monotonic()
        entry = self._broker.live(key, now)
        current = None if entry is None else _as_bytes(entry[0])
        if current != expected:
            return False
        self._broker.store(key, new, now + ttl)
        return True

    async def incr(self, key: str, ttl: float, amount: int = 1) -> int:
        _check_ttl(ttl)
        now = time.monotonic()
        entry = self._broker.live(key, now)
        if entry is None:
            self._broker.store(key, amount, now + ttl)
            return amount
        value = int(entry[0]) + amount  # like Redis INCR, a non-integer value is an error
        self._broker.store(key, value, entry[1])
        return value

    # -- sorted indexes ------------------------------------------------------------------------

    async def index_add(self, items: Sequence[tuple[str, str, int]]) -> None:
        checked = [(index, member, check_index_score(score)) for index, member, score in items]
        indexes = self._broker.indexes
        for index, member, score in checked:  # all or nothing, like the one Redis script
            indexes.setdefault(index, {})[member] = score

    async def index_range(self, index: str, min_score: int) -> list[tuple[str, int]]:
        min_score = check_index_score(min_score)
        members = self._broker.indexes.get(index)
        if not members:
            return []
        found = sorted((score, member) for member, score in members.items() if score >= min_score)
        return [(member, score) for score, member in found]

    async def index_remove(self, items: Sequence[tuple[str, str]]) -> None:
        indexes = self._broker.indexes
        for index, member in items:
            members = indexes.get(index)
            if members is not None and members.pop(member, None) is not None and not members:
                del indexes[index]
