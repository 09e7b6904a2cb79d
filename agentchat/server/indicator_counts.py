"""The indicators' counts that outlive a process: messages in the shared counters on the bus, peeks
in the store's index (``server/indicators.py`` says what each number means and how processes share them).

``SharedCounters`` adds this process's per-second message counts to each channel's counter
(``ind:<channel>``, a ``core.indicators.SharedCount`` changed by compare-and-set), makes a forgotten
counter afresh and recounts the stored messages from before it. ``PeekCounts`` counts the active peeks
and marks each newly active one in the store, so the total survives everything.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import orjson

from agentchat.bus import keys as bus_keys
from agentchat.bus.base import Bus
from agentchat.core import frames
from agentchat.core.indicators import IndicatorBook, SharedCount, coarse_minute_ms, merge_counts
from agentchat.errors import AgentChatError, error
from agentchat.store import keys as store_keys
from agentchat.store.base import ObjectStore, list_all
from agentchat.store.messages import parse_segment_frames

log = logging.getLogger(__name__)

# A channel's shared counter lives this long after its last message; then it is recounted when needed.
COUNTER_TTL = 30 * 24 * 3600.0
RECOUNT_LOCK_TTL = 120.0
RECOUNT_SETTLE_SECONDS = 2.0
# How long the first read of a forgotten counter waits for its recount beyond the settling time.
FIRST_RECOUNT_WAIT_SECONDS = 3.0
# A new channel's counter takes messages stamped this much before its creation (processes' clocks differ).
CLOCK_SKEW_SECONDS = 5
CAS_ATTEMPTS = 16

# Runs a coroutine in the background, owned (and cancelled at close) by the indicator service; its
# task (None once the service is closing).
Spawn = Callable[[Awaitable[Any], str], "asyncio.Task[Any] | None"]
# Some channels' numbers may have changed (the watchers push them).
Changed = Callable[[Iterable[str]], None]
# (peek id, channel) of every peek active now, as this process knows them.
ActivePeeks = Callable[[], Iterable[tuple[str, str]]]


def _no_peeks() -> Iterable[tuple[str, str]]:
    return ()


class SharedCounters:
    """Every channel's message total, kept in one counter on the bus that every process adds to."""

    def __init__(self, *, bus: Bus, store: ObjectStore, book: IndicatorBook, process: str,
                 clock: Callable[[], float], reads: asyncio.Semaphore, spawn: Spawn, changed: Changed) -> None:
        self.bus = bus
        self.store = store
        self.book = book
        self.process = process
        self.clock = clock
        self._reads = reads
        self._spawn = spawn
        self._changed = changed
        self._unsaved: dict[str, dict[int, int]] = {}  # counted here, not yet added to the shared counter
        self._save_lock = asyncio.Lock()
        self.loaded: set[str] = set()  # channels whose shared counter this process has read
        self._loading: dict[str, asyncio.Task[None]] = {}
        self._recounting: dict[str, asyncio.Task[Any] | None] = {}  # channel -> its recount, if started here

    def loading_tasks(self) -> list[asyncio.Task[None]]:
        """The counter reads under way (not spawned: a caller awaits each; cancelled at close)."""
        return list(self._loading.values())

    def forget(self, channel: str) -> None:
        self.loaded.discard(channel)

    async def save(self, counted: dict[str, dict[int, int]]) -> dict[str, int]:
        """Add what was counted (and what earlier additions could not) to the shared counters; the
        totals after, for the channels whose addition went through."""
        totals: dict[str, int] = {}
        # One addition at a time: the stop's last save may come while the flush loop's is under way,
        # and two of them walking the same unsaved counts would add them twice.
        async with self._save_lock:
            merge_counts(self._unsaved, counted)
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
            self.loaded.add(channel)
            if not new.counted:
                self._start_recount(channel, new.since)  # in case the process recounting it died
            return new.total
        raise error("conflict", f"the indicators counter of {channel} is contended; retrying next second")

    async def _start_counter(self, channel: str, since: int) -> None:
        fresh = SharedCount(since=since, counted=False)
        if await self.bus.set_if_absent(bus_keys.indicator_counter(channel), fresh.to_bytes(), COUNTER_TTL) is None:
            self._start_recount(channel, since)

    async def start_new(self, channel: str) -> None:
        """A channel was just created here: its counter starts now, with nothing to recount."""
        fresh = SharedCount(since=int(self.clock()) - CLOCK_SKEW_SECONDS, counted=True)
        try:
            await self.bus.set_if_absent(bus_keys.indicator_counter(channel), fresh.to_bytes(), COUNTER_TTL)
        except AgentChatError as exc:  # the counter will be made (and recounted) when first needed
            log.warning("indicators: could not start the counter of %s: %r", channel, exc)

    def _start_recount(self, channel: str, since: int) -> None:
        if channel not in self._recounting:
            task = self._spawn(self._recount(channel, since), f"indicators-recount-{channel}")
            if task is not None:
                self._recounting[channel] = task

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
                log.info("indicators: %s recounted from the store: %d messages", channel, total)
            finally:
                await self.bus.delete(bus_keys.indicator_recount_lock(channel))
            raw = await self.bus.get(bus_keys.indicator_counter(channel))
            if raw is not None:
                self._take_stored(channel, raw)
        finally:
            self._recounting.pop(channel, None)

    async def _count_stored(self, channel: str, *, before_ms: int) -> tuple[int, int | None]:
        """Stored messages of the channel with ``ts`` before ``before_ms``, and the minute of the
        latest of them."""
        segment_keys = await list_all(self.store, store_keys.segment_prefix(channel))

        async def count(key: str) -> tuple[int, int]:
            async with self._reads:
                found = await self.store.get(key)
            if found is None:
                return 0, 0
            stamps = [ts for ts in (orjson.loads(line)["ts"] for line in parse_segment_frames(found.data)
                                    if not frames.is_gap(line))  # a gap is no message
                      if ts < before_ms]
            return len(stamps), max(stamps, default=0)

        counted = await asyncio.gather(*(count(key) for key in segment_keys))
        total = sum(n for n, _ in counted)
        last = max((ts for _, ts in counted), default=0)
        return total, (coarse_minute_ms(last / 1000) if total else None)

    def _take_stored(self, channel: str, raw: bytes) -> None:
        count = SharedCount.from_bytes(raw)
        self.loaded.add(channel)
        if self.book.set_stored(channel, count.total, count.last_activity_ms):
            self._changed({channel})

    async def load(self, channel: str) -> None:
        """Read a channel's shared counter once (later changes arrive in the reports)."""
        if channel in self.loaded:
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
            # Known channel, no counter: start one from now (the past is recounted). The first answer
            # after a restart waits for that recount (a few seconds at most), so nobody is shown 0
            # messages for a channel that has some.
            # It starts with the next second: this second's messages may have been counted only in
            # the counter that was lost (a restart within the second of the last message), so they
            # are left to the recount, which reads them from the store.
            await self._start_counter(channel, int(self.clock()) + 1)
            recount = self._recounting.get(channel)
            if recount is not None:
                await asyncio.wait({recount}, timeout=RECOUNT_SETTLE_SECONDS + FIRST_RECOUNT_WAIT_SECONDS)
            raw = await self.bus.get(bus_keys.indicator_counter(channel))
            if raw is None:
                return
        self._take_stored(channel, raw)


class PeekCounts:
    """Per channel, the peeks active now and the peeks that ever became active (marked in the store)."""

    def __init__(self, *, store: ObjectStore, spawn: Spawn, changed: Changed) -> None:
        self.store = store
        self._spawn = spawn
        self._changed = changed
        # Where the peeks come from (server/peeks.py when it is wired in app.py): zero peeks otherwise.
        self.active_peeks: ActivePeeks = _no_peeks
        self._total: dict[str, int] = {}
        self._active: dict[str, int] = {}
        self._seen: set[str] = set()

    def active(self, channel: str) -> int:
        return self._active.get(channel, 0)

    def total(self, channel: str) -> int:
        # A peek active here may not be marked yet: it counts already.
        return max(self._total.get(channel, 0), self._active.get(channel, 0))

    def forget(self, channel: str) -> None:
        self._total.pop(channel, None)
        self._active.pop(channel, None)

    async def load_totals(self) -> None:
        """Every channel's total from the store's index (once, at start; later marks are counted here)."""
        totals: dict[str, int] = {}
        for key in await list_all(self.store, store_keys.peek_index_prefix()):
            channel = key.split("/")[1]
            totals[channel] = totals.get(channel, 0) + 1
        for channel, total in totals.items():
            self._total.setdefault(channel, total)

    def observe(self) -> set[str]:
        """Count the active peeks; mark newly active ones in the store (their total). The channels
        whose active count changed."""
        active: dict[str, int] = {}
        live = list(self.active_peeks())
        fresh = [(peek_id, channel) for peek_id, channel in live if peek_id not in self._seen]
        for _, channel in live:
            active[channel] = active.get(channel, 0) + 1
        changed = {ch for ch in active.keys() | self._active.keys()
                   if active.get(ch, 0) != self._active.get(ch, 0)}
        self._active = active
        self._seen = {peek_id for peek_id, _ in live}
        for peek_id, channel in fresh:
            self._spawn(self._mark(peek_id, channel), f"indicators-peek-{peek_id}")
        return changed

    async def _mark(self, peek_id: str, channel: str) -> None:
        # Every process that sees the peek active writes the same empty marker: idempotent, and a
        # peek costs $5, so a few writes each are nothing.
        await self.store.put(store_keys.peek_index(channel, peek_id), b"")
        total = len(await list_all(self.store, store_keys.peek_index_prefix(channel)))
        if total != self._total.get(channel):
            self._total[channel] = total
            self._changed({channel})
