"""Where the peek service finds its work without reading every peek: the due index (``peeks-due/`` in
the store: what is due when) and the caps on peeks awaiting payment (bus indexes per address and in all).
Both only keep markers; the peek service decides what a due peek needs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import orjson

from agentchat.bus import keys as bus_keys
from agentchat.bus.base import Bus
from agentchat.config import Settings
from agentchat.core.peek import Peek, PeekState
from agentchat.errors import AgentChatError, error
from agentchat.store import keys as store_keys
from agentchat.store.base import ObjectStore

log = logging.getLogger(__name__)

# A peek found in ``capturing`` for this long gets its capture re-issued (by any process).
CAPTURE_RETRY_SECONDS = 5.0
# An expired peek (never paid for) is deleted this long after it expired: long enough for its page to
# read the outcome, short enough that abandoned peeks do not pile up in the store.
EXPIRED_RETENTION_SECONDS = 600.0


class DueIndex:
    """``peeks-due/<ms>/<id>``: an empty marker per peek at the time the scan must next look at it."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    @staticmethod
    def due_at(peek: Peek) -> float | None:
        """When the scan must next look at ``peek``: its timer, a capture to retry, or an expired
        peek to delete; None if never (a terminal peek whose work is done)."""
        if peek.state is PeekState.CAPTURING:
            return peek.updated_at + CAPTURE_RETRY_SECONDS
        if peek.state is PeekState.EXPIRED:
            return peek.updated_at + EXPIRED_RETENTION_SECONDS
        return peek.wake_at

    async def move(self, old: Peek | None, new: Peek) -> None:
        """Keep ``peeks-due/`` in step with a transition: the new due marker first, then the old one
        goes (a crash between leaves an extra marker, which the scan finds stale and deletes)."""
        old_key = new_key = None
        if old is not None and (at := self.due_at(old)) is not None:
            old_key = store_keys.peek_due(int(at * 1000), old.id)
        if (at := self.due_at(new)) is not None:
            new_key = store_keys.peek_due(int(at * 1000), new.id)
            if new_key != old_key:
                await self.store.put(new_key, b"")
        if old_key is not None and old_key != new_key:
            await self.store.delete(old_key)

    async def purge(self, peek: Peek) -> None:
        """An expired peek, never paid for, is deleted with its payment record: nothing else refers
        to it (no ledger entry, no grant)."""
        log.info("peek %s: expired at %.0f, deleted", peek.id, peek.updated_at)
        await self.store.delete(store_keys.peek_payment(peek.id))
        await self.store.delete(store_keys.peek_open(peek.id))
        await self.store.delete(store_keys.peek(peek.id))



class UnpaidCaps:
    def __init__(self, *, settings: Settings, bus: Bus, store: ObjectStore, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.bus = bus
        self.store = store
        self.clock = clock

    async def claim(self, peek: Peek, tag: str) -> None:
        """Bound the anonymous work: at most ``peek_unpaid_per_address`` peeks awaiting payment per
        client address and ``peek_unpaid_total`` in all (bus indexes scored by when each payment
        expires; expired ones are dropped here). Approximate under races, and a bus that forgets
        resets them: they bound work, they guard no money."""
        now_ms = int(self.clock() * 1000)
        settings = self.settings
        stale: list[tuple[str, str]] = []
        counts = []
        for index in (bus_keys.unpaid_peeks(tag), bus_keys.unpaid_peeks()):
            found = await self.bus.index_range(index, 0)
            stale += [(index, member) for member, score in found if score < now_ms]
            counts.append(sum(1 for _, score in found if score >= now_ms))
        if stale:
            await self.bus.index_remove(stale)
        if counts[0] >= settings.peek_unpaid_per_address:
            raise error("too_many_unpaid_peeks", f"This address has {counts[0]} peeks waiting for payment; pay for "
                                                 "or cancel one first, or wait for them to expire.")
        if counts[1] >= settings.peek_unpaid_total:
            raise error("peeks_busy", "Too many peeks are waiting for payment on this server; retry in a few minutes.")
        expires_ms = int(peek.payment_expires_at * 1000)
        await self.bus.index_add([(bus_keys.unpaid_peeks(tag), peek.id, expires_ms),
                                  (bus_keys.unpaid_peeks(), peek.id, expires_ms)])

    async def release(self, peek: Peek) -> None:
        """The peek left ``awaiting_payment``: it no longer counts toward the caps (best effort; an
        entry left behind expires with the payment)."""
        found = await self.store.get(store_keys.peek_payment(peek.id))
        record = None if found is None else orjson.loads(found.data)
        items = [(bus_keys.unpaid_peeks(), peek.id)]
        if record is not None and record.get("opened_by"):
            items.append((bus_keys.unpaid_peeks(record["opened_by"]), peek.id))
        try:
            await self.bus.index_remove(items)
        except AgentChatError as exc:
            log.info("peek %s: could not drop it from the unpaid index: %r", peek.id, exc)
