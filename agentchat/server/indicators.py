"""Public indicators: the I/O shell around ``core/indicators.py``.

What each number means (protocol/indicators.md is the public reference):

- ``members``: the channel's members (its record; this process's live copy when it hosts the channel).
- ``agents_online``: distinct member agents holding an open WebSocket session that delivers the
  channel, on any server process (every agent's session delivers all its channels); an agent with
  sessions on two processes at once counts once.
- ``messages_total``: messages sequenced in the channel; ``messages_per_minute``: those of the last 60
  seconds; ``last_activity_at``: the start of the minute of the last one.
- ``peeks``: ``total`` peeks that became active on the channel, ``active`` those active now.

Across processes
----------------
``Hub.send`` counts the messages this process sequences per (channel, second of their ``ts``): one
dict increment, nothing else. Once a second this process adds those counts to each channel's shared
counter on the bus (``ind:<channel>``, a ``core.indicators.SharedCount`` changed by compare-and-set),
then publishes one report on ``i:reports``: the counts, the totals after its additions, and which
agents (``agent_tag``) hold sessions for each channel here. Every process merges every report, so all of them show
the same numbers, and pushes changes to the sockets watching (``watch_indicators``), at most once per
second per channel.

What the bus may forget: the counters. A missing one (a Redis restart without persistence, a channel
idle for ``COUNTER_TTL``, or a channel never counted) is made afresh with a starting second: counts
from that second on are added as usual, and one process recounts the stored messages from before it,
in the background. Each message falls on one side of the line by its own ``ts``, so none is counted
twice; one still waiting to be stored ``RECOUNT_SETTLE_SECONDS`` after the line is missed. Presence
and rates are never stored: they rebuild from the reports within ``FULL_PRESENCE_EVERY`` seconds and
one minute. Peeks that became active are marked in the store (``peek-index/<channel>/<peek>``), so
their total survives everything.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from agentchat.bus import keys as bus_keys
from agentchat.bus.base import Bus
from agentchat.core import frames
from agentchat.core.peek import PeekState
from agentchat.core.indicators import (ChannelIndicators, IndicatorBook, Report, ReportBuilder, SharedCount,
                                       Throttle, agent_tag, coarse_minute_ms, group_by_channel, merge_counts,
                                       sort_indicators)
from agentchat.errors import AgentChatError, error
from agentchat.server.hub import Hub, HubListenerBase
from agentchat.server.session import Session
from agentchat.store import keys as store_keys
from agentchat.store.base import ObjectStore
from agentchat.store.messages import parse_segment_frames
from agentchat.store.records import Records

log = logging.getLogger(__name__)

FLUSH_SECONDS = 1.0
UPDATE_INTERVAL = 1.0
# A channel's shared counter lives this long after its last message; then it is recounted when needed.
COUNTER_TTL = 30 * 24 * 3600.0
RECOUNT_LOCK_TTL = 120.0
RECOUNT_SETTLE_SECONDS = 2.0
# A new channel's counter takes messages stamped this much before its creation (processes' clocks differ).
CLOCK_SKEW_SECONDS = 5
CAS_ATTEMPTS = 16
# The channel list (names, member counts) is re-read this often; a channel the reports mention
# first is read at once.
CATALOG_REFRESH_SECONDS = 30.0
CATALOG_READS_PER_ROUND = 500
# A list request re-reads the channel index when it is older than this (new channels show at once).
LIST_FRESH_SECONDS = 5.0
STORE_READ_CONCURRENCY = 8
# ``watch_indicators`` for all channels answers with at most this many (the liveliest); the REST
# list pages through the rest.
WATCH_SNAPSHOT_MAX = 100
# How long a channel id found to exist nowhere is answered "not found" without a store read, and how many
# such ids are remembered (the oldest forgotten first). A channel created here is forgotten at once.
UNKNOWN_TTL_SECONDS = 30.0
UNKNOWN_MAX = 10_000

# (peek id, channel) of every peek active now, as this process knows them.
ActivePeeks = Callable[[], Iterable[tuple[str, str]]]


def _no_peeks() -> Iterable[tuple[str, str]]:
    return ()


@dataclass(slots=True)
class CatalogEntry:
    name: str
    members: int
    read_at: float
    # False: the owner keeps the channel off the market (absent from every listing and view).
    listed: bool = True


def indicators_frame(items: Iterable[ChannelIndicators], ref: str | None = None, more: bool | None = None) -> bytes:
    frame: dict[str, Any] = {"type": "indicators", "channels": [item.to_wire() for item in items]}
    if ref is not None:
        frame["ref"] = ref
    if more is not None:
        frame["more"] = more
    return frames.encode(frame)


class IndicatorService(HubListenerBase):
    bus_kind = bus_keys.INDICATORS

    def __init__(self, *, bus: Bus, hub: Hub, records: Records, store: ObjectStore,
                 clock: Callable[[], float] = time.time) -> None:
        self.bus = bus
        self.hub = hub
        self.records = records
        self.store = store
        self.clock = clock
        self.process = secrets.token_urlsafe(8)
        # Where the peeks come from (server/peeks.py when it is wired in app.py): zero peeks otherwise.
        self.active_peeks: ActivePeeks = _no_peeks
        self.book = IndicatorBook()
        self._builder = ReportBuilder(self.process)
        self._throttle: Throttle[str] = Throttle(UPDATE_INTERVAL)
        self._catalog: dict[str, CatalogEntry] = {}
        self._catalog_ready = asyncio.Event()
        self._listed_at = 0.0
        self._relisting: asyncio.Task[None] | None = None
        self._created: list[str] = []
        # Channel ids asked for and found to exist nowhere, with when: asked again within
        # UNKNOWN_TTL_SECONDS they cost no store read (a socket naming junk ids every frame costs one each).
        self._unknown: OrderedDict[str, float] = OrderedDict()
        self._unsaved: dict[str, dict[int, int]] = {}  # counted here, not yet added to the shared counter
        self._loaded: set[str] = set()  # channels whose shared counter this process has read
        self._loading: dict[str, asyncio.Task[None]] = {}
        self._recounting: set[str] = set()
        self._peeks_total: dict[str, int] = {}
        self._peeks_active: dict[str, int] = {}
        self._peeks_seen: set[str] = set()
        self._reads = asyncio.Semaphore(STORE_READ_CONCURRENCY)
        self._watch_all: set[Session] = set()
        self._watch_some: dict[Session, frozenset[str]] = {}
        self._watchers_of: dict[str, set[Session]] = {}
        self._pushed: dict[str, dict[str, Any]] = {}  # channel -> the view last pushed
        self._push_timer: asyncio.TimerHandle | None = None
        self._push_at = 0.0
        self._meta_reads: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.bus.subscribe(bus_keys.INDICATOR_REPORTS)
        await self.bus.subscribe(bus_keys.INDICATOR_LISTING)
        self._spawn(self._flush_loop(), "indicators-flush")
        self._spawn(self._catalog_loop(), "indicators-catalog")

    async def close(self) -> None:
        try:
            await self._save(group_by_channel(self.hub.take_sequenced()))  # a graceful stop keeps its counts
        except AgentChatError as exc:
            log.warning("indicators: could not save the last second's counts: %r", exc)
        self._closing = True
        if self._push_timer is not None:
            self._push_timer.cancel()
        tasks = list(self._tasks) + list(self._loading.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        if self._closing:
            coro.close()  # type: ignore[attr-defined]
            return
        task = asyncio.get_running_loop().create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("indicators task %s failed: %r", task.get_name(), task.exception())

    # ------------------------------------------------------------------------------ counting

    async def _flush_loop(self) -> None:
        while True:
            now = self.clock()
            await asyncio.sleep(FLUSH_SECONDS - (now % FLUSH_SECONDS) + 0.005)
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("indicators flush failed")

    async def flush(self) -> None:
        """Save this process's counts of the last second, report them, and push what changed."""
        now = self.clock()
        counted = group_by_channel(self.hub.take_sequenced())
        totals = await self._save(counted)
        created, self._created = self._created, []
        report = self._builder.build(counted, totals, self._local_presence(), created)
        changed: set[str] = set()
        if report is not None:
            changed |= self.book.apply(report, now)  # our own report, at once (the bus echo is skipped)
            try:
                await self.bus.publish(bus_keys.INDICATOR_REPORTS, report.to_bytes())
            except AgentChatError as exc:
                log.warning("indicators: could not publish this second's report: %r", exc)
        changed |= self.book.expire(now)
        changed |= self.book.sliding(now)
        changed |= self._observe_peeks()
        self._prune_watchers()
        self._on_changes(changed)

    async def _save(self, counted: dict[str, dict[int, int]]) -> dict[str, int]:
        """Add what was counted (and what earlier additions could not) to the shared counters; the
        totals after, for the channels whose addition went through."""
        merge_counts(self._unsaved, counted)
        totals: dict[str, int] = {}
        for channel, counts in list(self._unsaved.items()):
            try:
                totals[channel] = await self._add(channel, counts)
            except AgentChatError as exc:
                log.info("indicators: counts of %s wait for the bus: %r", channel, exc)
                continue
            del self._unsaved[channel]
        return totals

    async def _add(self, channel: str, counts: dict[int, int]) -> int:
        """Add per-second counts to the channel's shared counter; the new total."""
        key = bus_keys.indicator_counter(channel)
        for _ in range(CAS_ATTEMPTS):
            raw = await self.bus.get(key)
            if raw is None:
                # Never made, or forgotten: start afresh at the earliest second we add; what came
                # before is recounted from the store.
                await self._start_counter(channel, min(counts, default=int(self.clock())))
                continue
            current = SharedCount.from_bytes(raw)
            new = current.add(counts)
            if new is not current and not await self.bus.compare_and_set(key, raw, new.to_bytes(), COUNTER_TTL):
                continue
            self._loaded.add(channel)
            if not new.counted:
                self._start_recount(channel, new.since)  # in case the process recounting it died
            return new.total
        raise error("conflict", f"the indicators counter of {channel} is contended; retrying next second")

    async def _start_counter(self, channel: str, since: int) -> None:
        fresh = SharedCount(since=since, counted=False)
        if await self.bus.set_if_absent(bus_keys.indicator_counter(channel), fresh.to_bytes(), COUNTER_TTL) is None:
            self._start_recount(channel, since)

    async def on_channel_created(self, channel: str) -> None:
        """``HubListener``: a channel was just created here: its counter starts now, with nothing to recount, and every
        process hears of it in the next report (it shows in the lists at once)."""
        fresh = SharedCount(since=int(self.clock()) - CLOCK_SKEW_SECONDS, counted=True)
        try:
            await self.bus.set_if_absent(bus_keys.indicator_counter(channel), fresh.to_bytes(), COUNTER_TTL)
        except AgentChatError as exc:  # the counter will be made (and recounted) when first needed
            log.warning("indicators: could not start the counter of %s: %r", channel, exc)
        self._created.append(channel)
        try:
            await self._read_meta(channel)
        except AgentChatError as exc:
            log.warning("indicators: could not read the new channel %s: %r", channel, exc)

    def _start_recount(self, channel: str, since: int) -> None:
        if channel not in self._recounting:
            self._recounting.add(channel)
            self._spawn(self._recount(channel, since), f"indicators-recount-{channel}")

    async def _recount(self, channel: str, since: int) -> None:
        """Count the stored messages from before ``since`` into a counter made afresh (one process
        does it; another takes over if it dies, once the lock expires)."""
        try:
            if await self.bus.set_if_absent(bus_keys.indicator_recount_lock(channel), self.process.encode(), RECOUNT_LOCK_TTL) is not None:
                return
            try:
                # Messages from before ``since`` are stored within the group-commit delay; leave them
                # a margin to land.
                await asyncio.sleep(max(0.0, since + RECOUNT_SETTLE_SECONDS - self.clock()))
                raw = await self.bus.get(bus_keys.indicator_counter(channel))
                if raw is None or SharedCount.from_bytes(raw).counted:
                    return
                total, last = await self._count_stored(channel, before_ms=since * 1000)
                for _ in range(CAS_ATTEMPTS):
                    current = SharedCount.from_bytes(raw)
                    done = current.with_recount(total, last)
                    if done is current or await self.bus.compare_and_set(bus_keys.indicator_counter(channel), raw, done.to_bytes(), COUNTER_TTL):
                        break
                    raw = await self.bus.get(bus_keys.indicator_counter(channel))
                    if raw is None:
                        return
                log.info("indicators: recounted %s from the store: %d messages before %d", channel, total, since)
            finally:
                await self.bus.delete(bus_keys.indicator_recount_lock(channel))
            raw = await self.bus.get(bus_keys.indicator_counter(channel))
            if raw is not None:
                self._take_stored(channel, raw)
        finally:
            self._recounting.discard(channel)

    async def _count_stored(self, channel: str, *, before_ms: int) -> tuple[int, int | None]:
        """Stored messages of the channel with ``ts`` before ``before_ms``, and the minute of the
        latest of them."""
        segment_keys = await self._list_all(store_keys.segment_prefix(channel))

        async def count(key: str) -> tuple[int, int]:
            async with self._reads:
                found = await self.store.get(key)
            if found is None:
                return 0, 0
            stamps = [ts for ts in (orjson.loads(line)["ts"] for line in parse_segment_frames(found.data))
                      if ts < before_ms]
            return len(stamps), max(stamps, default=0)

        counted = await asyncio.gather(*(count(key) for key in segment_keys))
        total = sum(n for n, _ in counted)
        last = max((ts for _, ts in counted), default=0)
        return total, (coarse_minute_ms(last / 1000) if total else None)

    def _take_stored(self, channel: str, raw: bytes) -> None:
        count = SharedCount.from_bytes(raw)
        self._loaded.add(channel)
        if self.book.set_stored(channel, count.total, count.last_activity_ms):
            self._changed({channel})

    async def _load(self, channel: str) -> None:
        """Read a channel's shared counter once (later changes arrive in the reports)."""
        if channel in self._loaded:
            return
        task = self._loading.get(channel)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._read_counter(channel))
            self._loading[channel] = task
            task.add_done_callback(lambda _: self._loading.pop(channel, None))
        await asyncio.shield(task)

    async def _read_counter(self, channel: str) -> None:
        raw = await self.bus.get(bus_keys.indicator_counter(channel))
        if raw is None:
            # Known channel, no counter: start one from now (the past is recounted).
            await self._start_counter(channel, int(self.clock()))
            raw = await self.bus.get(bus_keys.indicator_counter(channel))
            if raw is None:
                return
        self._take_stored(channel, raw)

    # ------------------------------------------------------------------------------ presence and peeks

    def _local_presence(self) -> dict[str, frozenset[str]]:
        """Per channel, the tags of the agents whose sessions on this process deliver it."""
        presence: dict[str, frozenset[str]] = {}
        for channel, room in self.hub.rooms.items():
            if room.subscribers:
                agents = frozenset(agent_tag(s.principal.subject) for s in room.subscribers if s.principal.is_agent)
                if agents:
                    presence[channel] = agents
        return presence

    def _observe_peeks(self) -> set[str]:
        """Count the active peeks; mark newly active ones in the store (their total)."""
        active: dict[str, int] = {}
        live = list(self.active_peeks())
        fresh = [(peek_id, channel) for peek_id, channel in live if peek_id not in self._peeks_seen]
        for _, channel in live:
            active[channel] = active.get(channel, 0) + 1
        changed = {ch for ch in active.keys() | self._peeks_active.keys()
                   if active.get(ch, 0) != self._peeks_active.get(ch, 0)}
        self._peeks_active = active
        self._peeks_seen = {peek_id for peek_id, _ in live}
        for peek_id, channel in fresh:
            self._spawn(self._mark_peek(peek_id, channel), f"indicators-peek-{peek_id}")
        return changed

    async def _mark_peek(self, peek_id: str, channel: str) -> None:
        # Every process that sees the peek active writes the same empty marker: idempotent, and a
        # peek costs $5, so a few writes each are nothing.
        await self.store.put(store_keys.peek_index(channel, peek_id), b"")
        total = len(await self._list_all(store_keys.peek_index_prefix(channel)))
        if total != self._peeks_total.get(channel):
            self._peeks_total[channel] = total
            self._changed({channel})

    async def _list_all(self, prefix: str) -> list[str]:
        found: list[str] = []
        start_after = ""
        while True:
            page = await self.store.list(prefix, start_after=start_after, limit=1000)
            if not page:
                return found
            found.extend(page)
            start_after = page[-1]

    # ------------------------------------------------------------------------------ the channel list

    async def _catalog_loop(self) -> None:
        while True:
            try:
                await self.refresh_catalog()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("indicators: reading the channel list failed: %r", exc)
            finally:
                self._catalog_ready.set()
            await asyncio.sleep(CATALOG_REFRESH_SECONDS)

    async def refresh_catalog(self, *, only_new: bool = False) -> None:
        """Find new channels and re-read the oldest entries (names, member counts); and, the first
        time, every channel's peek total."""
        ids: list[str] = []
        start_after = ""
        listed_at = self.clock()
        while True:
            page = await self.records.list_channels(start_after=start_after, limit=1000)
            if not page:
                break
            ids.extend(page)
            start_after = page[-1]
        self._listed_at = listed_at
        listed = set(ids)
        for gone in [cid for cid, entry in self._catalog.items() if cid not in listed and entry.read_at < listed_at]:
            await self.on_channel_deleted(gone)  # deleted through another process
        now = self.clock()
        stale = sorted((cid for cid in ids if cid not in self._catalog
                        or (not only_new and now - self._catalog[cid].read_at > CATALOG_REFRESH_SECONDS)),
                       key=lambda cid: self._catalog[cid].read_at if cid in self._catalog else 0.0)
        await asyncio.gather(*(self._read_meta(cid) for cid in stale[:CATALOG_READS_PER_ROUND]))
        if not self._catalog_ready.is_set():
            totals: dict[str, int] = {}
            for key in await self._list_all(store_keys.peek_index_prefix()):
                channel = key.split("/")[1]
                totals[channel] = totals.get(channel, 0) + 1
            for channel, total in totals.items():
                self._peeks_total.setdefault(channel, total)

    async def on_channel_deleted(self, channel: str) -> None:
        """Forget a deleted channel: it leaves the listing and its page at once."""
        self._catalog.pop(channel, None)
        self._pushed.pop(channel, None)
        self._peeks_total.pop(channel, None)
        self._peeks_active.pop(channel, None)
        self._loaded.discard(channel)

    async def _read_meta(self, channel: str) -> CatalogEntry | None:
        async with self._reads:
            meta = await self.records.get_channel(channel)
        if meta is None:
            if channel in self._catalog:  # deleted (by way of another process)
                await self.on_channel_deleted(channel)
            return None
        entry = CatalogEntry(meta.get("name", ""), len(meta["members"]), self.clock(), meta.get("listed", True))
        self._unknown.pop(channel, None)
        old = self._catalog.get(channel)
        self._catalog[channel] = entry
        if old is None or (old.name, old.members) != (entry.name, entry.members):
            self._changed({channel})
        return entry

    async def listing_changed(self, channel: str) -> None:
        """The owner listed or unlisted ``channel``: every process re-reads it now (the catalog's
        periodic re-read catches a process that missed this)."""
        await self._read_meta(channel)
        await self.bus.publish(bus_keys.INDICATOR_LISTING, channel.encode())

    async def channel_ids(self) -> list[str]:
        """Every channel; the list is re-read if it is over ``LIST_FRESH_SECONDS`` old (one store
        listing per thousand channels), so a new channel shows at once."""
        await self._catalog_ready.wait()
        if self.clock() - self._listed_at > LIST_FRESH_SECONDS:
            if self._relisting is None or self._relisting.done():
                self._relisting = asyncio.get_running_loop().create_task(self.refresh_catalog(only_new=True))
            await asyncio.shield(self._relisting)
        return [channel for channel, entry in self._catalog.items() if entry.listed]

    # ------------------------------------------------------------------------------ views

    def _members(self, channel: str, entry: CatalogEntry) -> int:
        room = self.hub.rooms.get(channel)
        return len(room.members) if room is not None else entry.members

    def view(self, channel: str) -> ChannelIndicators | None:
        """What the public sees of ``channel`` now, or None if this process does not know it yet."""
        entry = self._catalog.get(channel)
        if entry is None or not entry.listed:
            return None
        book = self.book
        return ChannelIndicators(
            channel=channel, name=entry.name, members=self._members(channel, entry),
            agents_online=book.online(channel), messages_total=book.total(channel),
            messages_per_minute=book.per_minute(channel, self.clock()),
            last_activity_at=book.last_activity_ms(channel),
            peeks_total=max(self._peeks_total.get(channel, 0), self._peeks_active.get(channel, 0)),
            peeks_active=self._peeks_active.get(channel, 0))

    async def get(self, channel: str) -> ChannelIndicators:
        if channel not in self._catalog:
            seen = self._unknown.get(channel)
            if seen is not None and self.clock() - seen < UNKNOWN_TTL_SECONDS:
                raise error("channel_not_found", f"no channel {channel}")
            await self._read_meta(channel)
        entry = self._catalog.get(channel)
        if entry is None:
            self._unknown[channel] = self.clock()
            self._unknown.move_to_end(channel)
            while len(self._unknown) > UNKNOWN_MAX:
                self._unknown.popitem(last=False)
        if entry is None or not entry.listed:  # an unlisted channel is not for the public to know of
            raise error("channel_not_found", f"no channel {channel}")
        await self._load(channel)
        found = self.view(channel)
        assert found is not None
        return found

    async def listing(self, sort: str) -> list[ChannelIndicators]:
        """Every channel's indicators, sorted."""
        ids = await self.channel_ids()
        unloaded = [channel for channel in ids if channel not in self._loaded]
        if unloaded:
            await asyncio.gather(*(self._load(channel) for channel in unloaded), return_exceptions=True)
        return sort_indicators((v for v in map(self.view, ids) if v is not None), sort)

    # ------------------------------------------------------------------------------ live updates

    def on_bus_message(self, topic: str, body: bytes) -> None:
        """``HubListener``: a message on an ``i:...`` topic, from the bus reader: must not block."""
        if topic == bus_keys.INDICATOR_LISTING[bus_keys.KIND_LENGTH:]:
            channel = body.decode()
            self._spawn(self._read_meta(channel), f"indicators-listing-{channel}")
            return
        try:
            report = Report.from_bytes(body)
        except ValueError as exc:
            log.warning("ignoring a malformed indicators report: %r", exc)
            return
        if report.process == self.process:
            return  # applied when it was made
        self._on_changes(self.book.apply(report, self.clock()))

    def _on_changes(self, changed: set[str]) -> None:
        for channel in changed:
            if channel not in self._catalog and channel not in self._meta_reads:
                self._meta_reads.add(channel)
                self._spawn(self._read_new_meta(channel), f"indicators-meta-{channel}")
        self._changed(changed)

    async def _read_new_meta(self, channel: str) -> None:
        try:
            await self._read_meta(channel)
        finally:
            self._meta_reads.discard(channel)

    async def watch(self, session: Session, channels: list[str] | None, ref: str | None) -> bytes:
        """Start (or replace) a socket's subscription; the answer frame: the current indicators of
        the listed channels (unknown ones left out), or of the liveliest ``WATCH_SNAPSHOT_MAX``."""
        self.unwatch(session)
        if channels is None:
            items = await self.listing("active")
            self._watch_all.add(session)
            return indicators_frame(items[:WATCH_SNAPSHOT_MAX], ref, more=len(items) > WATCH_SNAPSHOT_MAX)
        if len(channels) > frames.MAX_WATCH_CHANNELS:  # the frame parser says so too; here for every caller
            raise error("too_large", f"a watch names at most {frames.MAX_WATCH_CHANNELS} channels")
        wanted = frozenset(channels)
        found: list[ChannelIndicators] = []
        for channel in sorted(wanted):
            try:
                found.append(await self.get(channel))
            except AgentChatError as exc:
                if exc.code != "channel_not_found":
                    raise
        if wanted:
            self._watch_some[session] = wanted
            for channel in wanted:
                self._watchers_of.setdefault(channel, set()).add(session)
        return indicators_frame(found, ref, more=False)

    def unwatch(self, session: Session) -> None:
        self._watch_all.discard(session)
        wanted = self._watch_some.pop(session, None)
        for channel in wanted or ():
            watchers = self._watchers_of.get(channel)
            if watchers is not None:
                watchers.discard(session)
                if not watchers:
                    del self._watchers_of[channel]

    @property
    def watchers(self) -> int:
        return len(self._watch_all) + len(self._watch_some)

    def _prune_watchers(self) -> None:
        for session in [s for s in self._watch_all if s.closed] + [s for s in self._watch_some if s.closed]:
            self.unwatch(session)

    def _changed(self, channels: Iterable[str]) -> None:
        """Some channels' numbers may have changed: push them now, or as soon as the throttle allows."""
        if not self._watch_all and not self._watchers_of:
            return
        now = self.clock()
        ready = [channel for channel in channels if self._watched(channel) and self._throttle.offer(channel, now)]
        if ready:
            self._push(ready)
        self._arm_push_timer()

    def _watched(self, channel: str) -> bool:
        return bool(self._watch_all) or channel in self._watchers_of

    def _arm_push_timer(self) -> None:
        at = self._throttle.next_due()
        if at is None or self._closing:
            return
        if self._push_timer is not None:
            if self._push_at <= at:
                return
            self._push_timer.cancel()
        self._push_at = at
        self._push_timer = asyncio.get_running_loop().call_later(max(0.0, at - self.clock()), self._on_push_timer)

    def _on_push_timer(self) -> None:
        self._push_timer = None
        due = self._throttle.due(self.clock())
        if due:
            self._push(due)
        self._arm_push_timer()
        self._throttle.prune(self.clock())

    def _push(self, channels: list[str]) -> None:
        updates: list[ChannelIndicators] = []
        for channel in channels:
            item = self.view(channel)
            if item is None:
                continue
            wire = item.to_wire()
            if self._pushed.get(channel) == wire:
                continue
            self._pushed[channel] = wire
            updates.append(item)
        if not updates:
            return
        if self._watch_all:
            frame = indicators_frame(updates)
            for session in list(self._watch_all):
                session.push(frame)
        if self._watchers_of:
            per_session: dict[Session, list[ChannelIndicators]] = {}
            for item in updates:
                for session in self._watchers_of.get(item.channel, ()):
                    per_session.setdefault(session, []).append(item)
            for session, items in per_session.items():
                session.push(indicators_frame(items))


def peeks_from(service: Any) -> ActivePeeks:
    """The active peeks of a ``server.peeks.PeekService``: those of its peeks it knows to be active
    (it hears every transition on the bus and re-reads the open ones every few seconds)."""

    def active() -> Iterable[tuple[str, str]]:
        return [(peek.id, peek.channel) for peek in list(service.known.values()) if peek.state is PeekState.ACTIVE]

    return active
