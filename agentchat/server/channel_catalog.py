"""The indicators' channel list: every channel's name, member count and whether it is listed, re-read
from the records in rounds, and at once for a channel the reports mention first."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from agentchat.server.indicator_counts import Changed, Spawn
from agentchat.store.records import Records

log = logging.getLogger(__name__)

# The channel list (names, member counts) is re-read this often; a channel the reports mention
# first is read at once.
CATALOG_REFRESH_SECONDS = 30.0
CATALOG_READS_PER_ROUND = 500
# A list request re-reads the channel index when it is older than this (new channels show at once).
LIST_FRESH_SECONDS = 5.0
# How long a channel id found to exist nowhere is answered "not found" without a store read, and how many
# such ids are remembered (the oldest forgotten first). A channel created here is forgotten at once.
UNKNOWN_TTL_SECONDS = 30.0
UNKNOWN_MAX = 10_000


@dataclass(slots=True)
class CatalogEntry:
    name: str
    members: int
    read_at: float
    # False: the owner keeps the channel off the market (absent from every listing and view).
    listed: bool = True


class ChannelCatalog:
    """What this process knows of every channel's record, for the public views."""

    def __init__(self, *, records: Records, clock: Callable[[], float], reads: asyncio.Semaphore,
                 spawn: Spawn, changed: Changed, deleted: Callable[[str], Awaitable[None]],
                 first_round: Callable[[], Awaitable[None]]) -> None:
        self.records = records
        self.clock = clock
        self._reads = reads
        self._spawn = spawn
        self._changed = changed
        # Forgets the channel everywhere (the catalog's own entry included).
        self._deleted = deleted
        # Runs once with the first round, before the catalog is ready (the peek totals).
        self._first_round = first_round
        self.entries: dict[str, CatalogEntry] = {}
        self.ready = asyncio.Event()
        self._listed_at = 0.0
        self._relisting: asyncio.Task[None] | None = None
        # Channel ids asked for and found to exist nowhere, with when: asked again within
        # UNKNOWN_TTL_SECONDS they cost no store read (a socket naming junk ids every frame costs one each).
        self._unknown: OrderedDict[str, float] = OrderedDict()
        self._meta_reads: set[str] = set()

    async def loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("indicators: reading the channel list failed: %r", exc)
            finally:
                self.ready.set()
            await asyncio.sleep(CATALOG_REFRESH_SECONDS)

    async def refresh(self, *, only_new: bool = False) -> None:
        """Find new channels and re-read the oldest entries (names, member counts); and, the first
        time, every channel's peek total."""
        listed_at = self.clock()
        ids = await self.records.list_channels(limit=None)
        self._listed_at = listed_at
        listed = set(ids)
        for gone in [cid for cid, entry in self.entries.items() if cid not in listed and entry.read_at < listed_at]:
            await self._deleted(gone)  # deleted through another process
        now = self.clock()
        stale = sorted((cid for cid in ids if cid not in self.entries
                        or (not only_new and now - self.entries[cid].read_at > CATALOG_REFRESH_SECONDS)),
                       key=lambda cid: self.entries[cid].read_at if cid in self.entries else 0.0)
        await asyncio.gather(*(self.read(cid) for cid in stale[:CATALOG_READS_PER_ROUND]))
        if not self.ready.is_set():
            await self._first_round()

    def forget(self, channel: str) -> None:
        self.entries.pop(channel, None)

    async def read(self, channel: str) -> CatalogEntry | None:
        """Read one channel's record now."""
        async with self._reads:
            meta = await self.records.get_channel(channel)
        if meta is None:
            if channel in self.entries:  # deleted (by way of another process)
                await self._deleted(channel)
            return None
        entry = CatalogEntry(meta.get("name", ""), len(meta["members"]), self.clock(), meta.get("listed", True))
        self._unknown.pop(channel, None)
        old = self.entries.get(channel)
        self.entries[channel] = entry
        if old is None or (old.name, old.members) != (entry.name, entry.members):
            self._changed({channel})
        return entry

    def read_unknown(self, channels: set[str]) -> None:
        """Channels the reports mention: read those not in the catalog, in the background."""
        for channel in channels:
            if channel not in self.entries and channel not in self._meta_reads:
                self._meta_reads.add(channel)
                self._spawn(self._read_new(channel), f"indicators-meta-{channel}")

    async def _read_new(self, channel: str) -> None:
        try:
            await self.read(channel)
        finally:
            self._meta_reads.discard(channel)

    async def find(self, channel: str) -> CatalogEntry | None:
        """The channel's entry, read now if it is not known; None for a channel that exists nowhere
        (remembered a while, so asking again costs no read)."""
        if channel not in self.entries:
            seen = self._unknown.get(channel)
            if seen is not None and self.clock() - seen < UNKNOWN_TTL_SECONDS:
                return None
            await self.read(channel)
        entry = self.entries.get(channel)
        if entry is None:
            self._unknown[channel] = self.clock()
            self._unknown.move_to_end(channel)
            while len(self._unknown) > UNKNOWN_MAX:
                self._unknown.popitem(last=False)
        return entry

    async def channel_ids(self) -> list[str]:
        """Every listed channel; the list is re-read if it is over ``LIST_FRESH_SECONDS`` old (one store
        listing per thousand channels), so a new channel shows at once."""
        await self.ready.wait()
        if self.clock() - self._listed_at > LIST_FRESH_SECONDS:
            if self._relisting is None or self._relisting.done():
                self._relisting = asyncio.get_running_loop().create_task(self.refresh(only_new=True))
            await asyncio.shield(self._relisting)
        return [channel for channel, entry in self.entries.items() if entry.listed]
