"""Channel membership that every process enforces, whatever failed while it changed.

The channel record in the store is the authority. Its ``version`` goes up by one with every change of
who is in the channel (members, invitations, owner); a record written before versions existed has none
and counts as version 0. A change is made in three steps:

1. the bus counter ``mv:<channel>`` is raised to the new version (the *intent*), so every process knows
   to look, before anything is stored. If the bus cannot take it the change is refused
   (``bus_unavailable``) with nothing stored, and the caller retries;
2. the record is written by compare-and-set (a lost race starts again from step 1);
3. the channel event is published: the fast path, not one anything depends on.

Every process compares, every ``CHECK_SECONDS``, the counters of the channels it holds (its rooms: every
live delivery, history read, send and resume goes through one) with the versions it holds, in one bus
call, and re-reads from the store each room whose counter differs. After the bus reconnects it re-reads
every room, because events published meanwhile are lost and a restarted Redis has forgotten the counters
(which are then seeded again from the store). So a stored change reaches every process within about one
check period of the bus being reachable, even when the process that wrote it died before publishing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from agentchat.bus import keys as bus_keys
from agentchat.errors import AgentChatError
from agentchat.store.records import Record

if TYPE_CHECKING:
    from agentchat.server.hub import Hub

log = logging.getLogger(__name__)

CHECK_SECONDS = 0.5
# A counter above the stored version is a change being written, or one whose writer died between the
# intent and the write. After this long it is taken for the latter, and no longer re-read each period.
INTENT_GRACE_SECONDS = 30.0
# Records re-read at once when many rooms are stale (after a reconnect).
RELOAD_CONCURRENCY = 32
# A removal is remembered in its channel's record (``removed``: DID -> epoch at removal) so that a
# retried removal is answered like the first and its event published again; the oldest go first.
REMOVED_REMEMBERED = 64


membership_counter = bus_keys.membership_version


def version_of(record: Record) -> int:
    return int(record.get("version", 0))


def bump(record: Record) -> Record:
    """``record`` as the next version of its membership (called by every change of who is in it)."""
    return {**record, "version": version_of(record) + 1, "updated_at": int(time.time() * 1000)}


def remember_removed(record: Record, did: str) -> dict[str, int]:
    """The record's ``removed`` map with ``did`` added (at the channel's current epoch), bounded."""
    removed = {k: v for k, v in record.get("removed", {}).items() if k != did}
    removed[did] = record["epoch"]
    while len(removed) > REMOVED_REMEMBERED:
        del removed[next(iter(removed))]
    return removed


class MembershipSync:
    """Keeps this process's rooms at the stored membership (see the module docstring)."""

    def __init__(self, hub: Hub, period: float = CHECK_SECONDS) -> None:
        self.hub = hub
        self.period = period
        # channel -> (counter value, monotonic time first seen above the stored version)
        self._intents: dict[str, tuple[int, float]] = {}
        self._reload_all = False

    async def write(self, channel: str, change: Callable[[Record], Record | None]) -> Record:
        """Apply ``change`` (a function of the record that returns the new record, or None for no
        change) as a new membership version: intent on the bus, then the store."""
        bus = self.hub.bus

        def versioned(current: Record) -> Record | None:
            updated = change(current)
            return None if updated is None else bump(updated)

        async def intent(updated: Record) -> None:
            await bus.seed_sequence(membership_counter(channel), version_of(updated))

        updated = await self.hub.records.update_channel(channel, versioned, before_write=intent)
        self.hub.apply_channel(updated)  # this process at once; the others by the event or the check
        return updated

    def reconnected(self) -> None:
        """The bus came back: every room is re-read at the next check."""
        self._reload_all = True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            try:
                await self.check()
            except AgentChatError as exc:
                log.debug("membership check failed: %r", exc)

    async def check(self) -> None:
        """One comparison of every room's version with the bus, and the re-reads it calls for."""
        hub = self.hub
        rooms = list(hub.rooms.values())
        if not rooms:
            self._reload_all = False
            return
        reload_all, self._reload_all = self._reload_all, False
        try:
            counters = await hub.bus.read_counters([membership_counter(room.id) for room in rooms])
        except AgentChatError:
            self._reload_all = self._reload_all or reload_all
            raise
        now = time.monotonic()
        stale: list[tuple[str, int | None]] = []
        for room, counter in zip(rooms, counters):
            if reload_all or counter is None or counter < room.version:
                stale.append((room.id, counter))
            elif counter > room.version:
                seen = self._intents.get(room.id)
                if seen is None or seen[0] != counter:
                    self._intents[room.id] = (counter, now)
                    stale.append((room.id, counter))
                elif now - seen[1] < INTENT_GRACE_SECONDS:
                    stale.append((room.id, counter))
            else:
                self._intents.pop(room.id, None)
        if len(self._intents) > len(rooms):  # rooms closed since
            self._intents = {k: v for k, v in self._intents.items() if k in hub.rooms}
        for start in range(0, len(stale), RELOAD_CONCURRENCY):
            await asyncio.gather(*(self._reload(channel, counter)
                                   for channel, counter in stale[start:start + RELOAD_CONCURRENCY]))

    async def _reload(self, channel: str, counter: int | None) -> None:
        hub = self.hub
        try:
            meta = await hub.records.get_channel(channel)
        except AgentChatError as exc:
            log.warning("could not re-read channel %s: %r", channel, exc)
            self._reload_all = True  # try every room again next time
            return
        if meta is None:
            return
        hub.apply_channel(meta)
        stored = version_of(meta)
        if counter is None or counter < stored:
            # The bus forgot (a restart) or never heard (a write that failed after the store): seed it.
            await hub.bus.seed_sequence(membership_counter(channel), stored)
