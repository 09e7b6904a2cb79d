"""Public indicators: the I/O shell around ``core/indicators.py``.

``IndicatorService`` runs the second's flush (count, save, report, push) and answers the public
views; its parts each do one job: ``indicator_counts.py`` (the shared counters and the peek totals),
``channel_catalog.py`` (the channel list) and ``indicator_watch.py`` (the watchers and the pushes).

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
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from agentchat.bus import keys as bus_keys
from agentchat.bus.base import Bus
from agentchat.core import frames
from agentchat.core.peek import PeekState
from agentchat.core.indicators import (ChannelIndicators, IndicatorBook, Report, ReportBuilder, agent_tag,
                                       group_by_channel, sort_indicators)
from agentchat.errors import AgentChatError, error
from agentchat.server.channel_catalog import CatalogEntry, ChannelCatalog
from agentchat.server.hub import Hub, HubListenerBase
from agentchat.server.indicator_counts import ActivePeeks, PeekCounts, SharedCounters
from agentchat.server.indicator_watch import UPDATE_INTERVAL, IndicatorWatchers, indicators_frame
from agentchat.server.session import Session
from agentchat.store.base import ObjectStore
from agentchat.store.records import Records

__all__ = ["FLUSH_SECONDS", "UPDATE_INTERVAL", "WATCH_SNAPSHOT_MAX", "IndicatorService", "indicators_frame",
           "peeks_from"]

log = logging.getLogger(__name__)

FLUSH_SECONDS = 1.0
STORE_READ_CONCURRENCY = 8
# ``watch_indicators`` for all channels answers with at most this many (the liveliest); the REST
# list pages through the rest.
WATCH_SNAPSHOT_MAX = 100


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
        self.book = IndicatorBook()
        self._builder = ReportBuilder(self.process)
        self._created: list[str] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        reads = asyncio.Semaphore(STORE_READ_CONCURRENCY)
        self.watchers = IndicatorWatchers(view=self.view, clock=clock)
        changed = self.watchers.changed
        self.counters = SharedCounters(bus=bus, store=store, book=self.book, process=self.process, clock=clock,
                                       reads=reads, spawn=self._spawn, changed=changed)
        self.peeks = PeekCounts(store=store, spawn=self._spawn, changed=changed)
        self.catalog = ChannelCatalog(records=records, clock=clock, reads=reads, spawn=self._spawn,
                                      changed=changed, deleted=self.on_channel_deleted,
                                      first_round=self.peeks.load_totals)

    @property
    def active_peeks(self) -> ActivePeeks:
        """Where the peeks come from (server/peeks.py when it is wired in app.py): zero peeks otherwise."""
        return self.peeks.active_peeks

    @active_peeks.setter
    def active_peeks(self, source: ActivePeeks) -> None:
        self.peeks.active_peeks = source

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.bus.subscribe(bus_keys.INDICATOR_REPORTS)
        await self.bus.subscribe(bus_keys.INDICATOR_LISTING)
        self._spawn(self._flush_loop(), "indicators-flush")
        self._spawn(self.catalog.loop(), "indicators-catalog")

    async def close(self) -> None:
        try:
            await self.counters.save(group_by_channel(self.hub.take_sequenced()))  # a graceful stop keeps its counts
        except AgentChatError as exc:
            log.warning("indicators: could not save the last second's counts: %r", exc)
        self._closing = True
        self.watchers.close()
        tasks = list(self._tasks) + self.counters.loading_tasks()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any] | None:
        if self._closing:
            coro.close()  # type: ignore[attr-defined]
            return None
        task = asyncio.get_running_loop().create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("indicators task %s failed: %r", task.get_name(), task.exception())

    # ------------------------------------------------------------------------------ each second

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
        totals = await self.counters.save(counted)
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
        changed |= self.peeks.observe()
        self.watchers.prune()
        self._on_changes(changed)

    def _local_presence(self) -> dict[str, frozenset[str]]:
        """Per channel, the tags of the agents whose sessions on this process deliver it."""
        presence: dict[str, frozenset[str]] = {}
        for channel, room in self.hub.rooms.items():
            if room.subscribers:
                agents = frozenset(agent_tag(s.principal.subject) for s in room.subscribers if s.principal.is_agent)
                if agents:
                    presence[channel] = agents
        return presence

    # ------------------------------------------------------------------------------ the hub and the bus

    async def on_channel_created(self, channel: str) -> None:
        """``HubListener``: a channel was just created here: its counter starts now, with nothing to recount, and every
        process hears of it in the next report (it shows in the lists at once)."""
        await self.counters.start_new(channel)
        self._created.append(channel)
        try:
            await self.catalog.read(channel)
        except AgentChatError as exc:
            log.warning("indicators: could not read the new channel %s: %r", channel, exc)

    async def on_channel_deleted(self, channel: str) -> None:
        """Forget a deleted channel: it leaves the listing and its page at once."""
        self.catalog.forget(channel)
        self.watchers.forget(channel)
        self.peeks.forget(channel)
        self.counters.forget(channel)

    async def listing_changed(self, channel: str) -> None:
        """The owner listed or unlisted ``channel``: every process re-reads it now (the catalog's
        periodic re-read catches a process that missed this)."""
        await self.catalog.read(channel)
        await self.bus.publish(bus_keys.INDICATOR_LISTING, channel.encode())

    def on_bus_message(self, topic: str, body: bytes) -> None:
        """``HubListener``: a message on an ``i:...`` topic, from the bus reader: must not block."""
        if topic == bus_keys.INDICATOR_LISTING[bus_keys.KIND_LENGTH:]:
            channel = body.decode()
            self._spawn(self.catalog.read(channel), f"indicators-listing-{channel}")
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
        self.catalog.read_unknown(changed)
        self.watchers.changed(changed)

    # ------------------------------------------------------------------------------ views

    def _members(self, channel: str, entry: CatalogEntry) -> int:
        room = self.hub.rooms.get(channel)
        return len(room.members) if room is not None else entry.members

    def view(self, channel: str) -> ChannelIndicators | None:
        """What the public sees of ``channel`` now, or None if this process does not know it yet."""
        entry = self.catalog.entries.get(channel)
        if entry is None or not entry.listed:
            return None
        book = self.book
        return ChannelIndicators(
            channel=channel, name=entry.name, members=self._members(channel, entry),
            agents_online=book.online(channel), messages_total=book.total(channel),
            messages_per_minute=book.per_minute(channel, self.clock()),
            last_activity_at=book.last_activity_ms(channel),
            peeks_total=self.peeks.total(channel), peeks_active=self.peeks.active(channel))

    async def get(self, channel: str) -> ChannelIndicators:
        entry = await self.catalog.find(channel)
        if entry is None or not entry.listed:  # an unlisted channel is not for the public to know of
            raise error("channel_not_found", f"no channel {channel}")
        await self.counters.load(channel)
        found = self.view(channel)
        assert found is not None
        return found

    async def listing(self, sort: str) -> list[ChannelIndicators]:
        """Every channel's indicators, sorted."""
        ids = await self.catalog.channel_ids()
        unloaded = [channel for channel in ids if channel not in self.counters.loaded]
        if unloaded:
            await asyncio.gather(*(self.counters.load(channel) for channel in unloaded), return_exceptions=True)
        return sort_indicators((v for v in map(self.view, ids) if v is not None), sort)

    # ------------------------------------------------------------------------------ watching

    async def watch(self, session: Session, channels: list[str] | None, ref: str | None) -> bytes:
        """Start (or replace) a socket's subscription; the answer frame: the current indicators of
        the listed channels (unknown ones left out), or of the liveliest ``WATCH_SNAPSHOT_MAX``."""
        self.unwatch(session)
        if channels is None:
            items = await self.listing("active")
            self.watchers.watch_all(session)
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
        self.watchers.watch_some(session, wanted)
        return indicators_frame(found, ref, more=False)

    def unwatch(self, session: Session) -> None:
        self.watchers.unwatch(session)


def peeks_from(service: Any) -> ActivePeeks:
    """The active peeks of a ``server.peeks.PeekService``: those of its peeks it knows to be active
    (it hears every transition on the bus and re-reads the open ones every few seconds)."""

    def active() -> Iterable[tuple[str, str]]:
        return [(peek.id, peek.channel) for peek in list(service.known.values()) if peek.state is PeekState.ACTIVE]

    return active
