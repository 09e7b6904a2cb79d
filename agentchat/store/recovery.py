"""Recovery of the write-ahead objects a dead process left behind (``WriteAheadRecovery``).

A process that dies leaves write-ahead objects behind. Every process, at start and every
``RECOVERY_SECONDS`` (from the writer's compactor loop), lists ``wal/`` and for the objects of an
instance with no heartbeat writes what no segment holds yet, tells ``on_recovered`` (which records the
messages' client ids), then deletes them. A retry of a dead process's pending claim recovers that
process at once (``recover_instance``).

Gaps: a number handed out and fanned out live whose process died before storing it. The bus records
every number in flight (``bus_keys.in_flight``, written in the step that hands it out, cleared once
stored). Recovering a dead process turns each of its in-flight numbers that neither its write-ahead
objects nor any segment hold into a ``gap`` frame, stored in a segment where the message would be (so
history and every resume show it), then tells live readers (channel event ``gap``; the hub sends them
the frames). Only an instance known to be dead (no heartbeat) has gaps declared. The in-flight records
are lost with a Redis restart without persistence, like the counters: gaps of a process that died
before such a restart are not declared (its numbers are skipped by the re-seed).

A complete index: see ``ensure_index`` and the module docstring of ``store/messages.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import orjson

from agentchat.bus import keys as bus_keys
from agentchat.bus.base import Bus
from agentchat.core.frames import gap_frame
from agentchat.errors import AgentChatError
from agentchat.store import keys
from agentchat.store.base import ObjectStore, list_all, pages
from agentchat.store.segments import decode_wal, frame_seq, parse_segment_frames, put_until_stored

log = logging.getLogger(__name__)

IsAlive = Callable[[str], Awaitable[bool]]
# Called with a dead process's stored frames by channel, before its write-ahead objects are deleted.
OnRecovered = Callable[[dict[str, list[bytes]]], Awaitable[None]]

RECOVERY_SECONDS = 30.0
RECOVERED_MEMO_SECONDS = 10.0
# How long ``ensure_index`` waits for live processes to re-index themselves (a heartbeat and a half).
REINDEX_WAIT_SECONDS = 1.5


class WriteAheadRecovery:
    """Puts a dead process's write-ahead messages into segments, and completes a lost bus index.

    ``reindex``: the writer's own ``reindex`` (this process's entries back in the index);
    ``forgotten(channel)``: the channel was deleted here (its messages are not recovered);
    ``on_objects_recovered(n)``: counts recovered objects (the writer's stats)."""

    def __init__(self, store: ObjectStore, bus: Bus, *, instance: str,
                 reindex: Callable[[], Coroutine[Any, Any, None]], forgotten: Callable[[str], bool],
                 on_objects_recovered: Callable[[int], None]) -> None:
        self.store = store
        self.bus = bus
        self.instance = instance
        self._reindex = reindex
        self._forgotten = forgotten
        self._on_objects_recovered = on_objects_recovered
        self.is_alive: IsAlive | None = None  # set by ``MessageWriter.start``
        self.on_recovered: OnRecovered | None = None
        self._ensuring: asyncio.Future[None] | None = None
        self._recovering: dict[str, asyncio.Future[None]] = {}
        self._recovered: dict[str, float] = {}  # dead instance -> when all its objects were recovered

    async def ensure_index(self) -> None:
        """Make the bus index complete if it is not (it was lost with a Redis restart): re-index this
        process's objects, recover those of every instance that has not re-indexed its own, then mark
        the index complete. One run at a time per process; concurrent callers wait for it."""
        if self._ensuring is not None:
            return await asyncio.shield(self._ensuring)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ensuring = future
        try:
            await self._ensure_index()
            future.set_result(None)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            self._ensuring = None

    async def _ensure_index(self) -> None:
        state = {member for member, _ in await self.bus.index_range(bus_keys.WAL_STATE_INDEX, 0)}
        if bus_keys.WAL_COMPLETE in state:
            return
        await self._reindex()
        by_instance = await self._list_wal(keys.WAL_PREFIX)
        # Live processes notice the loss within a heartbeat and re-index themselves (far cheaper than
        # recovering their objects): give them that long before treating the rest as dead.
        deadline = time.monotonic() + REINDEX_WAIT_SECONDS
        while True:
            state = {member for member, _ in await self.bus.index_range(bus_keys.WAL_STATE_INDEX, 0)}
            others = [instance for instance in by_instance
                      if instance != self.instance and bus_keys.wal_reindexed(instance) not in state]
            if not others or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.1)
        for instance in others:
            await self.recover_instance(instance, by_instance[instance])
        await self.bus.index_add([(bus_keys.WAL_STATE_INDEX, bus_keys.WAL_COMPLETE, 0)])
        log.warning("the bus had lost the write-ahead index: re-indexed, recovered %d instances' objects",
                    len(others))

    async def recover(self) -> None:
        """Store in segments what dead processes left in write-ahead objects only, then delete those."""
        if self.is_alive is None:
            return
        by_instance = await self._list_wal(keys.WAL_PREFIX)
        # A process that died before its first write-ahead object may still have numbers in flight.
        for instance, _ in await self.bus.index_range(bus_keys.IN_FLIGHT_PROCESSES, 0):
            by_instance.setdefault(instance, [])
        for instance, wal_keys in by_instance.items():
            if instance == self.instance or await self.is_alive(instance):
                continue
            await self.recover_instance(instance, wal_keys, dead=True)

    async def _list_wal(self, prefix: str) -> dict[str, list[str]]:
        by_instance: dict[str, list[str]] = {}
        for key in await list_all(self.store, prefix):
            by_instance.setdefault(keys.parse_wal(key)[0], []).append(key)
        return by_instance

    async def recover_instance(self, instance: str, wal_keys: list[str] | None = None, *,
                               dead: bool = False) -> None:
        """Recover ``instance``'s write-ahead objects (``wal_keys``, or all of them, listed). When
        this returns, every message of theirs is in a segment and ``on_recovered`` has had it.
        ``dead``: the instance is known to be dead: its in-flight numbers that no store holds become
        gaps, and once recovered it has no objects: calls in the next ``RECOVERED_MEMO_SECONDS``
        return at once (a burst of retries after a crash lists its objects once). One recovery per
        instance at a time."""
        if instance == self.instance:
            return
        recovered_at = self._recovered.get(instance)
        if recovered_at is not None and time.monotonic() - recovered_at < RECOVERED_MEMO_SECONDS:
            return
        running = self._recovering.get(instance)
        if running is not None:
            return await asyncio.shield(running)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._recovering[instance] = future
        try:
            if wal_keys is None:
                wal_keys = (await self._list_wal(keys.wal_prefix(instance))).get(instance, [])
            # Read before the objects: a number is declared a gap only if they do not hold it.
            in_flight, listed = await self._in_flight_of(instance) if dead else ({}, [])
            if wal_keys or in_flight:
                await self._recover_instance(instance, wal_keys, in_flight)
            if dead:
                await self._forget_in_flight(instance, in_flight, listed)
                now = time.monotonic()
                self._recovered = {other: at for other, at in self._recovered.items()
                                   if now - at < RECOVERED_MEMO_SECONDS}
                self._recovered[instance] = now
            future.set_result(None)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()
            raise
        finally:
            del self._recovering[instance]

    async def _in_flight_of(self, instance: str) -> tuple[dict[str, set[int]], list[str]]:
        """The numbers ``instance`` recorded in flight, by channel, and every channel it listed."""
        listed = [channel for channel, _ in await self.bus.index_range(bus_keys.in_flight_channels(instance), 0)]
        in_flight: dict[str, set[int]] = {}
        for channel in listed:
            numbers = {seq for _, seq in await self.bus.index_range(bus_keys.in_flight(channel, instance), 0)}
            if numbers:
                in_flight[channel] = numbers
        return in_flight, listed

    async def _forget_in_flight(self, instance: str, in_flight: dict[str, set[int]], listed: list[str]) -> None:
        """A dead instance's in-flight records are settled (stored, or declared gaps): remove them."""
        doomed = [(bus_keys.in_flight(channel, instance), str(seq)) for channel, seqs in in_flight.items()
                  for seq in seqs]
        doomed += [(bus_keys.in_flight_channels(instance), channel) for channel in listed]
        doomed.append((bus_keys.IN_FLIGHT_PROCESSES, instance))
        try:
            await self.bus.index_remove(doomed)
        except AgentChatError as exc:  # the next recovery settles them again: the same gaps, once
            log.warning("could not remove the in-flight records of a dead process: %r", exc)

    async def _recover_instance(self, instance: str, wal_keys: list[str], in_flight: dict[str, set[int]]) -> None:
        by_channel: dict[str, dict[int, bytes]] = {channel: {} for channel in in_flight}
        entries: list[tuple[str, str]] = []
        for key in wal_keys:
            obj = await self.store.get(key)
            if obj is None:
                continue
            for channel, frames in decode_wal(obj.data).items():
                found = by_channel.setdefault(channel, {})
                for frame in frames:
                    found[frame_seq(frame)] = frame
                entries.append((bus_keys.wal_index(channel), key))
        recovered = {channel: dict(found) for channel, found in by_channel.items() if found}
        written = 0
        gaps: dict[str, list[int]] = defaultdict(list)
        now_ms = int(time.time() * 1000)
        for channel, found in by_channel.items():
            if self._forgotten(channel) or await self.store.get(keys.channel_tombstone(channel)) is not None:
                continue  # deleted since: its messages go with the batch
            wanted = in_flight.get(channel, set())
            span = found.keys() | wanted
            stored = await self._stored_among(channel, min(span), max(span))
            for seq in stored:
                found.pop(seq, None)
            for seq in sorted(wanted - stored - found.keys()):
                found[seq] = gap_frame(channel, seq, now_ms)  # handed out, never stored: never will be
                gaps[channel].append(seq)
            if found:
                ordered = sorted(found)
                await put_until_stored(self.store, keys.segment(channel, ordered[0], ordered[-1]),
                                       b"\n".join(found[seq] for seq in ordered), lambda: None)
                written += len(found)
        if self.on_recovered is not None:
            # Before the objects go: a retry of one of these messages must find its number (the
            # claim says it) rather than get a second one. If this fails, the objects stay.
            await self.on_recovered({channel: [frame for _, frame in sorted(found.items())]
                                      for channel, found in recovered.items()})
        for channel, seqs in gaps.items():
            try:  # stored already: a reader that misses this finds the gaps in history and on resume
                await self.bus.publish(bus_keys.channel_events(channel), orjson.dumps({"event": "gap", "seqs": seqs}))
            except AgentChatError as exc:
                log.warning("could not tell live readers of %s about gaps %s: %r", channel, seqs, exc)
        try:
            await self.bus.index_remove(entries)
        except AgentChatError as exc:
            log.warning("could not remove the index entries of a dead process: %r", exc)
        if wal_keys:
            await self.store.delete_many(wal_keys)
        self._on_objects_recovered(len(wal_keys))
        log.warning("recovered %d write-ahead objects of stopped process %s (%d messages and gaps not yet in "
                    "segments; gaps: %s)", len(wal_keys), instance, written, dict(gaps))

    async def _stored_among(self, channel: str, first: int, last: int) -> set[int]:
        """Numbers between ``first`` and ``last`` that segments of ``channel`` already hold."""
        stored: set[int] = set()
        async for page in pages(self.store, keys.segment_prefix(channel), start_after=keys.segment_after(channel, first - 1)):
            for key in page:
                low, high = keys.parse_segment(key)
                if low <= last and high >= first:
                    obj = await self.store.get(key)
                    if obj is not None:
                        stored.update(frame_seq(frame) for frame in parse_segment_frames(obj.data))
        return stored
