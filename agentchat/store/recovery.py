"""Recovery of the write-ahead objects a dead process left behind (``WriteAheadRecovery``).

A process that dies leaves write-ahead objects behind. Every process, at start and every
``RECOVERY_SECONDS`` (from the writer's compactor loop), lists ``wal/`` and for the objects of an
instance with no heartbeat writes what no segment holds yet, tells ``on_recovered`` (which records the
messages' client ids), then deletes them. A retry of a dead process's pending claim recovers that
process at once (``recover_instance``).

A complete index: see ``ensure_index`` and the module docstring of ``store/messages.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from agentchat.bus import keys as bus_keys
from agentchat.bus.base import Bus
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
        for instance, wal_keys in by_instance.items():
            if instance == self.instance or await self.is_alive(instance):
                continue
            await self.recover_instance(instance, wal_keys)

    async def _list_wal(self, prefix: str) -> dict[str, list[str]]:
        by_instance: dict[str, list[str]] = {}
        for key in await list_all(self.store, prefix):
            by_instance.setdefault(keys.parse_wal(key)[0], []).append(key)
        return by_instance

    async def recover_instance(self, instance: str, wal_keys: list[str] | None = None, *,
                               dead: bool = False) -> None:
        """Recover ``instance``'s write-ahead objects (``wal_keys``, or all of them, listed). When
        this returns, every message of theirs is in a segment and ``on_recovered`` has had it.
        ``dead``: the instance is known to be dead, so once recovered it has no objects: calls in the
        next ``RECOVERED_MEMO_SECONDS`` return at once (a burst of retries after a crash lists its
        objects once). One recovery per instance at a time."""
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
            if wal_keys:
                await self._recover_instance(instance, wal_keys)
            if dead:
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

    async def _recover_instance(self, instance: str, wal_keys: list[str]) -> None:
        by_channel: dict[str, dict[int, bytes]] = {}
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
        recovered = {channel: dict(found) for channel, found in by_channel.items()}
        written = 0
        for channel, found in by_channel.items():
            if self._forgotten(channel) or await self.store.get(keys.channel_tombstone(channel)) is not None:
                continue  # deleted since: its messages go with the batch
            for seq in await self._stored_among(channel, min(found), max(found)):
                found.pop(seq, None)
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
        try:
            await self.bus.index_remove(entries)
        except AgentChatError as exc:
            log.warning("could not remove the index entries of a dead process: %r", exc)
        await self.store.delete_many(wal_keys)
        self._on_objects_recovered(len(wal_keys))
        log.warning("recovered %d write-ahead objects of stopped process %s (%d messages not yet in "
                    "segments)", len(wal_keys), instance, written)

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
