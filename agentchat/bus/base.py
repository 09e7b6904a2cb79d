"""The bus: live fan-out between server processes and the small shared state they must agree on.

Implementations: ``memory`` (one process, the default) and ``redis`` (many processes). Both pass the
same contract suite (``tests/contract/test_bus_contract.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Protocol

# Called for every message on a subscribed topic, from the bus's own reader; it must not block.
# ``seq`` is the sequence number given by ``publish_sequenced`` (0 for ``publish``).
BusHandler = Callable[[str, int, bytes], None]


class PlacedFuture(asyncio.Future):  # type: ignore[type-arg]
    """What ``claim_and_publish`` waits on once its send has its place in the channel's order (queued
    for the bus, behind every earlier send of this process): a socket may go on with its next message
    while this one waits (``server/connections.py``), and the order of the numbers stays the order
    of the sends."""


# Scores of sorted indexes are integers of at most this size: Redis keeps them as doubles.
MAX_INDEX_SCORE = 2**53


def check_index_score(score: int) -> int:
    """``score`` as an ``int``; ``ValueError`` if it is out of the range every bus keeps exactly."""
    value = int(score)
    if not -MAX_INDEX_SCORE <= value <= MAX_INDEX_SCORE:
        raise ValueError(f"index score must be within ±2**53, got {score!r}")
    return value


class Bus(Protocol):
    """Guarantees every implementation keeps:

    - Delivery is at most once. A process subscribed to a topic receives each message published on it
      after the subscription took effect, once; a message published while the process was cut off from
      the bus is not replayed (the caller fills gaps from the store, see ``on_reconnect``).
    - ``publish_sequenced`` gives the next number of ``counter`` and publishes ``(seq, body)`` as one
      atomic step, so every subscriber sees a counter's messages in strictly increasing ``seq`` order,
      whichever process published them. A number is never handed out twice while the bus remembers the
      counter. If the bus has forgotten the counter (new bus, or a Redis restart without persistence)
      the call returns ``None`` and publishes nothing: the caller re-seeds it from the store with
      ``seed_sequence`` and tries again. A sequenced publish's topic, counter and claim name one
      channel (``bus/keys.py``: ``channel_messages``, ``sequence_counter``, ``send_claim``): a Redis
      Cluster keeps a channel's names in one slot and refuses a call that mixes channels.
    - Key/value operations are atomic across all processes sharing the bus; values expire after their
      ``ttl`` (seconds). ``take`` and ``compare_and_set`` are the primitives for single-use challenges
      and for state machines that several processes drive (peeks).
    - Sorted indexes (``index_add`` / ``index_range`` / ``index_remove``) are sets of ``str`` members,
      each with an integer score (up to 2**53), shared by all processes and never expiring. Their names
      are apart from the key/value keys: an index and a value may have the same name. The message
      writer records in ``"wal:<channel>"`` which write-ahead objects hold a channel's not yet compacted
      messages (member: the object's key; score: the channel's last sequence number in that object),
      so any process can find them. Like the counters, they are lost with a Redis restart without
      persistence.
    """

    async def start(self, handler: BusHandler, on_reconnect: Callable[[], None] | None = None) -> None:
        """Connect and start delivering messages of subscribed topics to ``handler``.

        ``on_reconnect`` is called after the bus lost and regained its connection (subscriptions have
        been restored by then); messages published meanwhile were not delivered.
        """

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise ``Unavailable('bus_unavailable')`` if the bus cannot be reached now."""

    async def subscribe(self, topic: str) -> None: ...

    async def unsubscribe(self, topic: str) -> None: ...

    async def publish(self, topic: str, body: bytes) -> None: ...

    async def publish_sequenced(self, topic: str, counter: str, body: bytes) -> int | None: ...

    async def claim_and_publish(
        self, claim: str, mark: bytes, ttl: float, topic: str, counter: str, body: bytes, *, in_flight: str
    ) -> int | bytes | None:
        """``set_if_absent(claim, mark, ttl)`` and, if that stored it, ``publish_sequenced(topic,
        counter, body)`` and ``index_add([(in_flight, str(seq), seq)])``, as one atomic step (one round
        trip): a message's idempotency claim, its number and the record that the number is handed out
        but not stored yet cost one call, and no number reaches a reader without that record. Returns
        the number if published; the claim's existing value (bytes) if it was already there (nothing
        published or recorded); ``None`` if the counter is unknown (nothing claimed, published or
        recorded: re-seed it and call again). ``in_flight`` names the same channel as the rest
        (``bus_keys.in_flight``)."""

    async def seed_sequence(self, counter: str, floor: int) -> None:
        """Make the counter at least ``floor``, so the next number handed out is above it."""

    async def read_counters(self, counters: Sequence[str]) -> list[int | None]:
        """The current value of each counter (``None``: the bus does not know it), in one step (one
        round trip where the bus has round trips). Channel membership versions are counters raised
        with ``seed_sequence`` and compared with this (server/membership.py)."""

    async def set_if_absent(self, key: str, value: bytes, ttl: float) -> bytes | None:
        """Store ``value`` unless ``key`` exists. Returns ``None`` if stored, else the existing value."""

    async def set(self, key: str, value: bytes, ttl: float) -> None: ...

    async def set_many(self, items: Sequence[tuple[str, bytes]], ttl: float) -> None:
        """``set`` for several keys in one step (one round trip where the bus has round trips)."""

    async def get(self, key: str) -> bytes | None: ...

    async def take(self, key: str) -> bytes | None:
        """Get and delete in one step: of several concurrent callers, exactly one gets the value."""

    async def delete(self, key: str) -> None: ...

    async def compare_and_set(self, key: str, expected: bytes | None, new: bytes, ttl: float) -> bool:
        """Set ``key`` to ``new`` only if its value is ``expected`` (``None``: absent). True if set."""

    async def incr(self, key: str, ttl: float, amount: int = 1) -> int:
        """Add ``amount`` (one by default) to an integer counter, creating it (expiring after ``ttl``)
        if absent; the new value."""

    async def index_add(self, items: Sequence[tuple[str, str, int]]) -> None:
        """For each ``(index, member, score)``, put ``member`` in ``index`` with ``score`` (replacing
        the score of a member already there). One step, one round trip; no items: nothing to do."""

    async def index_range(self, index: str, min_score: int) -> list[tuple[str, int]]:
        """The ``(member, score)`` pairs of ``index`` with a score of at least ``min_score``, by score
        then member (ascending). A missing index is empty: ``[]``."""

    async def index_remove(self, items: Sequence[tuple[str, str]]) -> None:
        """Remove each ``(index, member)`` in one step; a missing one is no error. An index left empty
        no longer exists."""
