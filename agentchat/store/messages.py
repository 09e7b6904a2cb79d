"""Channel history: one write-ahead object per flush, compacted later into per-channel segments.

Why two layers: a message must be durable before it is acked, and each storage write costs money (R2
and S3 bill per request) and time. Writing one object per channel per flush costs a write for every
channel that spoke in the last few milliseconds; writing everything of a flush, every channel together,
as one object costs one write per flush whatever the number of channels. Per-channel segments, which
make history cheap to read, are then written rarely and large.

Write path (``MessageWriter``):

1. ``add`` queues a ``message`` frame. The writer stores everything queued as ONE write-ahead object
   ``wal/<instance>/<n>`` (``keys.wal``). How long the oldest queued message waits for company grows
   with the arrival rate: ``max_wait`` at ``FULL_WAIT_RATE`` messages/s or more, proportionally less
   below, so a lone message is written at once and a busy process writes a few large objects a second.
2. It records in the bus index ``wal:<channel>`` which objects hold which channel's numbers (member:
   the object key, score: the channel's last number in it), keeps each channel's frames in memory (its
   *tail*), and only then calls every frame's ``on_durable(seq, note)`` (the ack).
3. The compactor writes a channel's tail as one segment ``messages/<channel>/<last>-<first>.seg`` once
   it holds ``segment_messages`` frames or is ``segment_age`` old (and everything at shutdown), then
   removes its index entries and deletes the write-ahead objects no channel needs any more, many in one
   request (``delete_many``).

Read path (``MessageLog``): the index says which write-ahead objects hold numbers above ``after``; their
frames come from this process's memory (its own objects) or the store (other processes', cached); then
the segments. A message briefly present in both is taken once. The index is read first and segments
last, so a compaction in between is harmless: it writes the segment before it touches the index or
deletes an object.

Recovery (``store/recovery.py``, ``MessageWriter.recovery``): a process that dies leaves write-ahead
objects behind. Every process, at start and every ``RECOVERY_SECONDS``, lists ``wal/`` and for the
objects of an instance with no heartbeat writes what no segment holds yet, tells ``on_recovered``
(which records the messages' client ids), then deletes them. A retry of a dead process's pending claim
recovers that process at once (``recover_instance``).

A complete index: the bus index ``wal-state`` holds the member ``complete`` while ``wal:<channel>``
names every write-ahead object not yet compacted. A Redis restart without persistence loses both.
Readers that find ``complete`` missing first run ``ensure_index`` (once per process at a time): add
this process's own entries again (``reindex``, which also adds ``idx:<instance>``), recover every other
instance's objects unless that instance has re-indexed itself since, then add ``complete``. Recovering
the objects of a live process that had not re-indexed yet is harmless: its messages go to segments (a
reader keeps one of each number), and the entries it adds later for deleted objects are dropped by
readers. So a read never misses an acknowledged message, not even right after the bus lost its index
while a process was dead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from agentchat.bus import keys as bus_keys
from agentchat.bus.base import Bus
from agentchat.core.backoff import Backoff
from agentchat.errors import AgentChatError
from agentchat.store import keys
from agentchat.store.base import LIST_PAGE, ObjectStore, pages
from agentchat.store.recovery import RECOVERY_SECONDS, IsAlive, OnRecovered, WriteAheadRecovery
from agentchat.store.segments import decode_wal, encode_wal, frame_seq, parse_segment_frames, put_until_stored

log = logging.getLogger(__name__)

__all__ = ["MessageLog", "MessageWriter", "decode_wal", "encode_wal", "frame_seq", "parse_segment_frames",
           "put_until_stored"]


class Retention(Protocol):
    """Expires old messages from the compactor's loop (``server/retention.py``): ``run`` is called
    every ``every`` seconds and calls ``MessageWriter.expire`` for the channels whose time is up."""

    every: float

    async def run(self, writer: MessageWriter) -> None: ...


# Called with a stored message's number and the ``note`` given to ``add`` with it.
OnDurable = Callable[[int, Any], None]

# Write-ahead objects of other processes kept decoded for readers (they never change once written).
WAL_CACHE_OBJECTS = 32
COMPACT_CHECK_SECONDS = 1.0
# The background compactor writes one channel's segment at a time, and after each one pauses for as
# long as writing its bytes at this rate would take. Under an even load every channel's tail fills up
# at the same moment; writing them all at once (hashing, writing and syncing megabytes on the server's
# core) stalls deliveries for hundreds of milliseconds (figures: bench/README.md, "Measurements behind
# constants"). No pause while the tails are over their limit (memory first), nor at shutdown.
COMPACT_PACE_BYTES_PER_SECOND = 16 * 1024 * 1024
# Arrival rate (messages/s, whole process) from which a batch waits the full ``max_wait``. A sender
# that waits for each ack before the next send sees about sqrt(max_wait / FULL_WAIT_RATE) per message
# (7 ms with the default 100 ms).
FULL_WAIT_RATE = 2000.0
RATE_SAMPLE_SECONDS = 0.25


class MessageLog:
    """Reads a channel's stored history: segments plus the write-ahead tail."""

    def __init__(self, store: ObjectStore, bus: Bus, writer: MessageWriter | None = None) -> None:
        self.store = store
        self.bus = bus
        self.writer = writer  # this process's writer: its tails are read from memory
        self._wal_cache: OrderedDict[str, dict[str, list[bytes]]] = OrderedDict()

    async def read(self, channel: str, after: int, limit: int, *, other_processes: bool = True) -> list[bytes]:
        """Stored ``message`` frames with ``seq > after``, in order, at most ``limit``.
        ``other_processes=False`` leaves out other processes' write-ahead objects (no store reads
        for them; used where each process contributes its own part, see ``Sequencer.reseed``).

        Segments of one channel written by different processes can interleave in number (process A
        stores 101 and 103, B stores 102), so a frame is returned only once no unread segment could
        hold a smaller number.
        """
        if other_processes:
            await self.ensure_complete()
        collected = await self._wal_frames(channel, after, other_processes)
        listing = await self._list(channel, after, max_keys=LIST_PAGE)
        if len(listing) == LIST_PAGE:
            # Segments beyond this page may hold numbers below the write-ahead ones: leave those out.
            ceiling = keys.parse_segment(listing[-1])[1]
            collected = {seq: frame for seq, frame in collected.items() if seq <= ceiling}
        spans = [keys.parse_segment(key) for key in listing]
        # lowest first-seq among the segments after position i
        floor_after = [0] * len(spans)
        lowest = 1 << 63
        for i in range(len(spans) - 1, -1, -1):
            floor_after[i] = lowest
            lowest = min(lowest, spans[i][0])
        for i, key in enumerate(listing):
            obj = await self.store.get(key)
            if obj is None:  # expired or its channel deleted since the listing: the rest still counts
                continue
            for frame in parse_segment_frames(obj.data):
                seq = frame_seq(frame)
                if seq > after:
                    collected[seq] = frame
            safe_below = floor_after[i]
            if sum(1 for seq in collected if seq < safe_below) >= limit:
                break
        return [collected[seq] for seq in sorted(collected)[:limit]]

    async def ensure_complete(self) -> None:
        """Make sure the bus index names every stored, not yet compacted message before it is read
        (after a Redis restart it may not: see ``WriteAheadRecovery.ensure_index``)."""
        state = await self.bus.index_range(bus_keys.WAL_STATE_INDEX, 0)
        if any(member == bus_keys.WAL_COMPLETE for member, _ in state):
            return
        if self.writer is None:
            log.warning("the write-ahead index is incomplete and this reader cannot complete it")
            return
        await self.writer.recovery.ensure_index()

    async def _wal_frames(self, channel: str, after: int, other_processes: bool = True) -> dict[int, bytes]:
        """Frames above ``after`` that are durable but not yet in a segment (any process's)."""
        entries = await self.bus.index_range(bus_keys.wal_index(channel), after + 1) if other_processes else []
        found: dict[int, bytes] = {}
        own_prefix = self.writer.wal_prefix if self.writer is not None else None
        gone: list[tuple[str, str]] = []
        for key, _ in entries:
            if own_prefix is not None and key.startswith(own_prefix):
                continue  # read from memory below
            frames = await self._wal_section(key, channel)
            if frames is None:
                gone.append((bus_keys.wal_index(channel), key))
                continue
            for frame in frames:
                seq = frame_seq(frame)
                if seq > after:
                    found[seq] = frame
        if self.writer is not None:
            for seq, frame in self.writer.tail(channel):
                if seq > after:
                    found[seq] = frame
        if gone:
            # Compacted and deleted (its segment is listed next) by a process that could not update
            # the index: drop the stale entries.
            try:
                await self.bus.index_remove(gone)
            except AgentChatError:
                pass
        return found

    async def _wal_section(self, key: str, channel: str) -> list[bytes] | None:
        sections = self._wal_cache.get(key)
        if sections is None:
            obj = await self.store.get(key)
            if obj is None:
                return None
            sections = decode_wal(obj.data)
            self._wal_cache[key] = sections
            if len(self._wal_cache) > WAL_CACHE_OBJECTS:
                self._wal_cache.popitem(last=False)
        else:
            self._wal_cache.move_to_end(key)
        return sections.get(channel, [])

    async def _list(self, channel: str, after: int, max_keys: int) -> list[str]:
        return await self.store.list(
            keys.segment_prefix(channel), start_after=keys.segment_after(channel, after), limit=max_keys
        )

    async def last_seq(self, channel: str) -> int:
        """Highest stored sequence number of a channel (0 if none)."""
        highest = max((score for _, score in await self.bus.index_range(bus_keys.wal_index(channel), 0)), default=0)
        if self.writer is not None:
            highest = max(highest, max((seq for seq, _ in self.writer.tail(channel)), default=0))
        async for page in pages(self.store, keys.segment_prefix(channel)):
            highest = max(highest, *(keys.parse_segment(key)[1] for key in page))
        return highest

    async def tail(self, channel: str, count: int, *, other_processes: bool = True) -> list[bytes]:
        """The last ``count`` or so stored frames (used to rebuild idempotency after a bus restart)."""
        last = await self.last_seq(channel)
        return await self.read(channel, max(0, last - count), count, other_processes=other_processes)


@dataclass(slots=True)
class _Pending:
    """A channel's messages waiting for the next write-ahead object.

    Parallel lists rather than an object (and a callback closure) per message: a message waits up to
    ``max_wait`` here, long enough to outlive a young garbage collection, and every object it brings
    along is one more for each collection to visit while the event loop waits. With the callbacks
    shared (a bound method made once) and the notes small tuples, a message adds one tracked object."""
    seqs: list[int] = field(default_factory=list)
    frames: list[bytes] = field(default_factory=list)
    callbacks: list[OnDurable | None] = field(default_factory=list)
    notes: list[Any] = field(default_factory=list)

    def in_order(self) -> _Pending:
        """The same messages by number (they arrive in order but for races between publishes)."""
        seqs = self.seqs
        if all(a < b for a, b in zip(seqs, seqs[1:])):
            return self
        order = sorted(range(len(seqs)), key=seqs.__getitem__)
        return _Pending([seqs[i] for i in order], [self.frames[i] for i in order],
                        [self.callbacks[i] for i in order], [self.notes[i] for i in order])


@dataclass(slots=True)
class _Tail:
    """A channel's durable frames not yet in a segment, and the write-ahead objects holding them."""
    # Two flat lists rather than an object per message: the garbage collector need not visit them.
    seqs: list[int] = field(default_factory=list)
    frames: list[bytes] = field(default_factory=list)
    objects: list[tuple[str, int]] = field(default_factory=list)  # (key, this channel's last seq in it)
    since: float = field(default_factory=time.monotonic)


@dataclass
class WriterStats:
    wal_objects_written: int = 0
    segments_written: int = 0
    messages_written: int = 0
    write_failures: int = 0
    objects_recovered: int = 0
    last_flush_seconds: float = 0.0


class MessageWriter:
    def __init__(
        self, store: ObjectStore, bus: Bus, *, instance: str, max_wait: float, max_messages: int,
        pending_max: int, segment_messages: int = 4000, segment_age: float = 60.0,
        tails_max: int = 200_000, on_flush: Callable[[int, float], None] | None = None,
    ) -> None:
        """``max_wait``: the longest a message waits for others before its batch is written (under
        load; see ``FULL_WAIT_RATE``). ``max_messages``: write sooner once this many are queued.
        ``pending_max``: queued messages beyond which ``has_room`` turns sends away. A channel's tail
        becomes a segment at ``segment_messages`` frames or ``segment_age`` seconds; all tails together
        stay under about ``tails_max`` frames (the largest are compacted first).
        ``on_flush(messages, seconds)`` is called after each batch is stored (for metrics)."""
        self.store = store
        self.bus = bus
        self.instance = instance
        self.wal_prefix = keys.wal_prefix(instance)
        self.max_wait = max_wait
        self.max_messages = max_messages
        self.pending_max = pending_max
        self.segment_messages = segment_messages
        self.segment_age = segment_age
        self.tails_max = tails_max
        self.on_flush = on_flush
        self._queue: dict[str, _Pending] = {}
        self._writing: dict[str, _Pending] = {}  # the batch being written
        self._queued = 0
        self._in_flight = 0
        self._oldest = 0.0
        self._arrivals = 0
        self._rate = 0.0  # messages/s over the last RATE_SAMPLE_SECONDS or more
        self._rate_sample = (time.monotonic(), 0)
        self._next_number = 1
        self._tails: dict[str, _Tail] = {}
        self._tail_frames = 0
        self._object_refs: dict[str, int] = {}  # write-ahead object -> channels not yet compacted
        self._deletable: list[str] = []
        self._forgotten: set[str] = set()  # deleted channels: never compacted into a segment
        self.retention: Retention | None = None  # set by the server: expiry runs in the compactor's loop
        self._oldest_kept: dict[str, tuple[str, int]] = {}  # channel -> (its oldest segment, last ts)
        self._compacting = asyncio.Lock()
        self._wake = asyncio.Event()
        self._compact_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False
        self.stats = WriterStats()
        self.recovery = WriteAheadRecovery(store, bus, instance=instance, reindex=self.reindex,
                                           forgotten=self._forgotten.__contains__,
                                           on_objects_recovered=self._count_recovered)
        self.healthy = True

    # ------------------------------------------------------------------------------ queue

    @property
    def pending(self) -> int:
        return self._queued + self._in_flight

    def has_room(self, n: int = 1) -> bool:
        return not self._closing and self.pending + n <= self.pending_max

    def add(self, channel: str, seq: int, frame: bytes, on_durable: OnDurable | None = None,
            note: Any = None) -> None:
        """Queue one message; once it is stored, ``on_durable(seq, note)`` is called."""
        self._arrivals += 1
        if self._queued == 0:
            self._oldest = time.monotonic()
        pending = self._queue.get(channel)
        if pending is None:
            pending = self._queue[channel] = _Pending()
        pending.seqs.append(seq)
        pending.frames.append(frame)
        pending.callbacks.append(on_durable)
        pending.notes.append(note)
        self._queued += 1
        if self._queued >= self.max_messages or self._queued == 1:
            self._wake.set()

    def waiting_notes(self) -> list[Any]:
        """The notes of every message queued or being written (not yet durable)."""
        notes = [note for pending in self._queue.values() for note in pending.notes]
        for pending in self._writing.values():
            notes.extend(pending.notes)
        return notes

    def waiting_numbers(self) -> dict[str, list[int]]:
        """The numbers of every message queued or being written (not yet durable), by channel."""
        numbers: dict[str, list[int]] = {}
        for batch in (self._writing, self._queue):
            for channel, pending in batch.items():
                numbers.setdefault(channel, []).extend(pending.seqs)
        return numbers

    def tails(self) -> dict[str, list[bytes]]:
        """This process's durable, not yet compacted frames, by channel."""
        return {channel: list(tail.frames) for channel, tail in self._tails.items()}

    def holds(self, channel: str) -> bool:
        """Whether this process has messages of ``channel`` not yet compacted (queued or durable)."""
        return channel in self._tails or channel in self._queue

    def tail(self, channel: str) -> list[tuple[int, bytes]]:
        """This process's durable, not yet compacted frames of ``channel`` as (seq, frame)."""
        found = self._tails.get(channel)
        return list(zip(found.seqs, found.frames)) if found is not None else []

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self, is_alive: IsAlive, on_recovered: OnRecovered | None = None) -> None:
        """Recover what dead processes left (before anything is served), then start writing.
        ``is_alive(instance)`` tells whether another process is still running; ``on_recovered`` is
        given every message recovered from a dead process before its objects are deleted."""
        self.recovery.is_alive = is_alive
        self.recovery.on_recovered = on_recovered
        await self.recovery.ensure_index()
        await self.recovery.recover()
        self._flusher = asyncio.create_task(self._flush_loop(), name="message-writer")
        self._tasks.append(asyncio.create_task(self._compact_loop(), name="message-compactor"))

    async def close(self, timeout: float = 10.0) -> None:
        """Write what is queued and compact every tail (for up to ``timeout`` seconds), then stop."""
        self._closing = True
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            async with asyncio.timeout(timeout):
                if self._flusher is not None:
                    await asyncio.gather(self._flusher, return_exceptions=True)
                await self.compact(list(self._tails))
        except TimeoutError:
            log.error("shutdown: %d messages could not be stored in time", self.pending)

    # ------------------------------------------------------------------------------ write-ahead

    async def _flush_loop(self) -> None:
        while True:
            if self._queued == 0:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            wait = self._oldest + self._linger() - time.monotonic()
            if wait > 0 and self._queued < self.max_messages and not self._closing:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                except TimeoutError:
                    pass
                continue
            batch = {channel: pending.in_order() for channel, pending in self._queue.items()}
            self._queue = {}
            count, self._queued = self._queued, 0
            self._in_flight = count
            self._writing = batch
            await self._write_batch(batch, count)
            self._in_flight = 0
            self._writing = {}
            for pending in batch.values():
                for seq, on_durable, note in zip(pending.seqs, pending.callbacks, pending.notes):
                    if on_durable is not None:
                        try:
                            on_durable(seq, note)
                        except Exception:  # one broken callback must not stop the writer
                            log.exception("on_durable callback failed")

    def _linger(self) -> float:
        """How long the oldest queued message may wait for others, from the recent arrival rate."""
        now = time.monotonic()
        since, arrivals = self._rate_sample
        if now - since >= RATE_SAMPLE_SECONDS:
            self._rate = (self._arrivals - arrivals) / (now - since)
            self._rate_sample = (now, self._arrivals)
        return self.max_wait * min(1.0, self._rate / FULL_WAIT_RATE)

    async def _write_batch(self, batch: dict[str, _Pending], count: int) -> None:
        started = time.monotonic()
        key = keys.wal(self.instance, self._next_number)
        self._next_number += 1
        sections = {channel: pending.frames for channel, pending in batch.items()}

        def failed() -> None:
            self.stats.write_failures += 1
            self.healthy = False

        await put_until_stored(self.store, key, encode_wal(sections), failed)
        self.healthy = True
        # Indexed before the acks: a reader on another process, asked right after the ack, finds it.
        # Until the bus takes the entries the acks wait (acknowledged means readable everywhere).
        entries = [(bus_keys.wal_index(channel), key, pending.seqs[-1]) for channel, pending in batch.items()]
        backoff = Backoff(0.05, 2.0)
        while True:
            try:
                await self.bus.index_add(entries)
                break
            except AgentChatError as exc:
                log.warning("could not index %s on the bus: %r; retrying", key, exc)
                await asyncio.sleep(backoff.next_delay())
        for channel, pending in batch.items():
            tail = self._tails.get(channel)
            if tail is None:
                tail = self._tails[channel] = _Tail()
            tail.seqs.extend(pending.seqs)
            tail.frames.extend(pending.frames)
            tail.objects.append((key, pending.seqs[-1]))
            if len(tail.frames) >= self.segment_messages:
                self._compact_wake.set()
        self._object_refs[key] = len(batch)
        self._tail_frames += count
        if self._tail_frames > self.tails_max:
            self._compact_wake.set()
        self.stats.wal_objects_written += 1
        self.stats.messages_written += count
        self.stats.last_flush_seconds = time.monotonic() - started
        if self.on_flush is not None:
            self.on_flush(count, self.stats.last_flush_seconds)

    async def reindex(self) -> None:
        """Add this process's index entries again (after the bus may have lost them), and say so in
        ``bus_keys.WAL_STATE_INDEX`` in the same step."""
        entries = [(bus_keys.wal_index(channel), key, last)
                   for channel, tail in self._tails.items() for key, last in tail.objects]
        await self.bus.index_add([*entries, (bus_keys.WAL_STATE_INDEX, bus_keys.wal_reindexed(self.instance), 0)])
        if entries:
            log.info("re-indexed %d write-ahead entries", len(entries))

    async def indexed(self) -> bool:
        """Whether the bus still knows that this process's entries are in the index (False after
        a Redis restart without persistence)."""
        state = await self.bus.index_range(bus_keys.WAL_STATE_INDEX, 0)
        return any(member == bus_keys.wal_reindexed(self.instance) for member, _ in state)

    def _count_recovered(self, objects: int) -> None:
        self.stats.objects_recovered += objects

    # ------------------------------------------------------------------------------ compaction

    async def _compact_loop(self) -> None:
        last_recovery = last_expiry = time.monotonic()
        while True:
            try:
                await asyncio.wait_for(self._compact_wake.wait(), COMPACT_CHECK_SECONDS)
            except TimeoutError:
                pass
            self._compact_wake.clear()
            try:
                await self.compact(self._due(), pace_bytes_per_second=COMPACT_PACE_BYTES_PER_SECOND)
                if time.monotonic() - last_recovery >= RECOVERY_SECONDS:
                    last_recovery = time.monotonic()
                    await self.recovery.recover()
                if self.retention is not None and time.monotonic() - last_expiry >= self.retention.every:
                    last_expiry = time.monotonic()
                    await self.retention.run(self)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("compaction failed; retrying")

    def _due(self) -> list[str]:
        now = time.monotonic()
        due = [channel for channel, tail in self._tails.items()
               if len(tail.frames) >= self.segment_messages or now - tail.since >= self.segment_age]
        if self._tail_frames > self.tails_max:
            chosen = set(due)
            remaining = self._tail_frames - sum(len(self._tails[c].frames) for c in due)
            for channel in sorted(self._tails, key=lambda c: len(self._tails[c].frames), reverse=True):
                if remaining <= self.tails_max // 2:
                    break
                if channel not in chosen:
                    due.append(channel)
                    remaining -= len(self._tails[channel].frames)
        return due

    async def forget(self, channel: str) -> None:
        """A deleted channel: what this process holds of it is dropped instead of compacted (messages
        still queued are dropped at the next compaction), and the write-ahead objects holding it are
        deleted once no other channel needs them. Returns after any compaction under way, so no
        segment of the channel is written by this process from then on."""
        self._forgotten.add(channel)
        async with self._compacting:
            self._drop_forgotten()
            await self._delete_unneeded()

    def _drop_forgotten(self) -> None:
        for channel in self._forgotten & self._tails.keys():
            tail = self._tails.pop(channel)
            self._tail_frames -= len(tail.frames)
            for key, _ in tail.objects:
                self._object_refs[key] -= 1
                if self._object_refs[key] == 0:
                    del self._object_refs[key]
                    self._deletable.append(key)

    async def compact(self, channels: list[str], pace_bytes_per_second: float = 0.0) -> None:
        """Write each channel's tail as one segment, then forget it and delete the write-ahead objects
        nothing needs any more. Segments are written one after the other; with a pace, each is
        followed by a pause as long as writing it at that rate would take."""
        async with self._compacting:
            self._drop_forgotten()
            # What is in the tails now; frames added while the segments are written stay for next time.
            cut = {channel: (len(tail.frames), len(tail.objects))
                   for channel in channels if (tail := self._tails.get(channel)) is not None and tail.frames}
            if not cut:
                await self._delete_unneeded()
                return

            def failed() -> None:
                self.stats.write_failures += 1

            async def write(channel: str, seqs: list[int], frames: list[bytes]) -> int:
                if any(a > b for a, b in zip(seqs, seqs[1:])):  # batches of one channel can overlap
                    order = sorted(range(len(seqs)), key=seqs.__getitem__)
                    seqs, frames = [seqs[i] for i in order], [frames[i] for i in order]
                key = keys.segment(channel, seqs[0], seqs[-1])
                data = b"\n".join(frames)
                await put_until_stored(self.store, key, data, failed)
                return len(data)

            for channel, (n, _) in cut.items():
                tail = self._tails[channel]  # only appended to meanwhile: the first n stay the same
                written = await write(channel, tail.seqs[:n], tail.frames[:n])
                if pace_bytes_per_second and self._tail_frames <= self.tails_max:
                    await asyncio.sleep(written / pace_bytes_per_second)
            self.stats.segments_written += len(cut)
            removed: list[tuple[str, str]] = []
            for channel, (n, m) in cut.items():
                tail = self._tails[channel]
                for key, _ in tail.objects[:m]:
                    removed.append((bus_keys.wal_index(channel), key))
                    self._object_refs[key] -= 1
                    if self._object_refs[key] == 0:
                        del self._object_refs[key]
                        self._deletable.append(key)
                del tail.seqs[:n]
                del tail.frames[:n]
                del tail.objects[:m]
                self._tail_frames -= n
                if tail.frames:
                    tail.since = time.monotonic()
                else:
                    del self._tails[channel]
            try:
                await self.bus.index_remove(removed)
            except AgentChatError as exc:
                # Readers drop entries whose object is gone (MessageLog._wal_frames).
                log.warning("could not remove %d write-ahead index entries: %r", len(removed), exc)
            await self._delete_unneeded()

    async def _delete_unneeded(self) -> None:
        if not self._deletable:
            return
        doomed, self._deletable = self._deletable, []
        try:
            await self.store.delete_many(doomed)
        except Exception as exc:  # left for the next pass; nothing depends on their removal
            log.warning("could not delete %d write-ahead objects: %r", len(doomed), exc)
            self._deletable.extend(doomed)

    # ------------------------------------------------------------------------------ retention

    async def expire(self, channel: str, before_ms: int) -> int | None:
        """Delete the channel's oldest segments whose messages are all older than ``before_ms``
        (a thousand per request). Returns the lowest number still kept after them, or None if none
        expired. A segment goes when its last message is old enough, so a message may outlive its
        retention by the span of its segment (at most ``segment_age`` of messages). The last
        message time of the oldest segment kept is remembered: a pass that expires nothing costs
        one listing per channel."""
        doomed: list[str] = []
        first_kept: int | None = None
        async for page in pages(self.store, keys.segment_prefix(channel)):
            for key in page:
                last_ts = await self._last_ts(channel, key)
                if last_ts is None:
                    continue
                if last_ts >= before_ms:
                    first_kept = keys.parse_segment(key)[0]
                    break
                doomed.append(key)
            if first_kept is not None:
                break
        if not doomed:
            return None
        await self.store.delete_many(doomed)
        expired_to = keys.parse_segment(doomed[-1])[1]
        log.info("retention: %d segments of %s expired (messages up to %d)", len(doomed), channel, expired_to)
        return max(expired_to + 1, first_kept or 0)

    async def _last_ts(self, channel: str, key: str) -> int | None:
        cached = self._oldest_kept.get(channel)
        if cached is not None and cached[0] == key:
            return cached[1]
        obj = await self.store.get(key)
        if obj is None:
            return None
        frames = parse_segment_frames(obj.data)
        last_ts = int(orjson.loads(frames[-1])["ts"]) if frames else 0
        self._oldest_kept[channel] = (key, last_ts)
        return last_ts
