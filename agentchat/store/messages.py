"""Channel history as segment objects, and the group-commit writer that makes them.

A segment holds many messages of one channel: the exact ``message`` frames sent on the wire, one per
line, in sequence order, so serving history or a resume needs no re-encoding. Its key names its last
and first sequence numbers (``keys.segment``).

Group commit: ``SegmentWriter.add`` queues a frame; a background loop writes every queued frame as one
segment per channel when the queue holds ``max_messages`` or its oldest entry is ``max_delay`` old,
then calls each frame's ``on_durable``. A failed write is retried (backoff, no limit) with the same
keys, so a message that was queued is either stored or lost with the process, never dropped; what
bounds memory is admission: ``has_room()`` turns away new sends while ``pending_max`` frames wait.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from agentchat.store import keys
from agentchat.store.base import ObjectStore, PreconditionFailed

log = logging.getLogger(__name__)

OnDurable = Callable[[int], None]


def parse_segment_frames(data: bytes) -> list[bytes]:
    return [line for line in data.split(b"\n") if line]


def frame_seq(frame: bytes) -> int:
    # Frames start with b'{"type":"message","seq":<n>,' (frames.message_frame).
    start = 24
    return int(frame[start:frame.index(b",", start)])


class MessageLog:
    """Reads a channel's stored history."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    async def read(self, channel: str, after: int, limit: int) -> list[bytes]:
        """Stored ``message`` frames with ``seq > after``, in order, at most ``limit``.

        Segments of one channel written by different processes can interleave in number (process A
        stores 101 and 103, B stores 102), so a frame is returned only once no unread segment could
        hold a smaller number.
        """
        listing = await self._list(channel, after, max_keys=1000)
        if not listing:
            return []
        spans = [keys.parse_segment(key) for key in listing]
        # lowest first-seq among the segments after position i
        floor_after = [0] * len(spans)
        lowest = 1 << 63
        for i in range(len(spans) - 1, -1, -1):
            floor_after[i] = lowest
            lowest = min(lowest, spans[i][0])
        collected: list[tuple[int, bytes]] = []
        for i, key in enumerate(listing):
            obj = await self.store.get(key)
            if obj is None:  # removed by compaction between list and get; the caller retries later
                break
            for frame in parse_segment_frames(obj.data):
                seq = frame_seq(frame)
                if seq > after:
                    collected.append((seq, frame))
            safe_below = floor_after[i]
            ready = sum(1 for seq, _ in collected if seq < safe_below)
            if ready >= limit:
                break
        collected.sort(key=lambda item: item[0])
        return [frame for _, frame in collected[:limit]]

    async def _list(self, channel: str, after: int, max_keys: int) -> list[str]:
        return await self.store.list(
            keys.segment_prefix(channel), start_after=keys.segment_after(channel, after), limit=max_keys
        )

    async def last_seq(self, channel: str) -> int:
        """Highest stored sequence number of a channel (0 if none)."""
        prefix = keys.segment_prefix(channel)
        highest, start_after = 0, ""
        while True:
            page = await self.store.list(prefix, start_after=start_after, limit=1000)
            if not page:
                return highest
            highest = max(highest, *(keys.parse_segment(key)[1] for key in page))
            start_after = page[-1]

    async def tail(self, channel: str, count: int) -> list[bytes]:
        """The last ``count`` or so stored frames (used to rebuild idempotency after a bus restart)."""
        last = await self.last_seq(channel)
        return await self.read(channel, max(0, last - count), count)


@dataclass(slots=True)
class _Pending:
    seq: int
    frame: bytes
    on_durable: OnDurable | None


@dataclass
class WriterStats:
    segments_written: int = 0
    messages_written: int = 0
    write_failures: int = 0
    last_flush_seconds: float = 0.0


class SegmentWriter:
    def __init__(
        self, store: ObjectStore, *, max_messages: int, max_delay: float, pending_max: int,
        on_flush: Callable[[int, float], None] | None = None,
    ) -> None:
        """``on_flush(messages, seconds)`` is called after each batch is stored (for metrics)."""
        self.on_flush = on_flush
        self.store = store
        self.max_messages = max_messages
        self.max_delay = max_delay
        self.pending_max = pending_max
        self._queue: dict[str, list[_Pending]] = {}
        self._queued = 0
        self._in_flight = 0
        self._oldest = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.stats = WriterStats()
        self.healthy = True

    @property
    def pending(self) -> int:
        return self._queued + self._in_flight

    def has_room(self, n: int = 1) -> bool:
        return not self._closing and self.pending + n <= self.pending_max

    def add(self, channel: str, seq: int, frame: bytes, on_durable: OnDurable | None) -> None:
        if self._queued == 0:
            self._oldest = time.monotonic()
        self._queue.setdefault(channel, []).append(_Pending(seq, frame, on_durable))
        self._queued += 1
        if self._queued >= self.max_messages or self._queued == 1:
            self._wake.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="segment-writer")

    async def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (for up to ``timeout`` seconds), then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout)
            except asyncio.TimeoutError:
                log.error("shutdown: %d messages could not be stored in time", self.pending)

    async def _run(self) -> None:
        while True:
            if self._queued == 0:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            wait = self._oldest + self.max_delay - time.monotonic()
            if wait > 0 and self._queued < self.max_messages and not self._closing:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                except asyncio.TimeoutError:
                    pass
                continue
            batch, self._queue = self._queue, {}
            count, self._queued = self._queued, 0
            self._in_flight = count
            await self._write_until_stored(batch)
            self._in_flight = 0
            for items in batch.values():
                for item in items:
                    if item.on_durable is not None:
                        try:
                            item.on_durable(item.seq)
                        except Exception:  # one broken callback must not stop the writer
                            log.exception("on_durable callback failed")

    async def _write_until_stored(self, batch: dict[str, list[_Pending]]) -> None:
        started = time.monotonic()
        todo = {}
        for channel, items in batch.items():
            items.sort(key=lambda item: item.seq)
            key = keys.segment(channel, items[0].seq, items[-1].seq)
            todo[key] = b"\n".join(item.frame for item in items)
        delay = 0.05
        while todo:
            results = await asyncio.gather(*(self._put(key, data) for key, data in todo.items()),
                                           return_exceptions=True)
            failed = {}
            for (key, data), result in zip(todo.items(), results):
                if isinstance(result, BaseException):
                    failed[key] = data
                    self.stats.write_failures += 1
                    log.warning("storing segment %s failed: %r; retrying", key, result)
            todo = failed
            self.healthy = not failed
            if failed:
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)
        count = sum(len(items) for items in batch.values())
        self.stats.segments_written += len(batch)
        self.stats.messages_written += count
        self.stats.last_flush_seconds = time.monotonic() - started
        if self.on_flush is not None:
            self.on_flush(count, self.stats.last_flush_seconds)

    async def _put(self, key: str, data: bytes) -> None:
        try:
            await self.store.put(key, data, if_none_match=True)
        except PreconditionFailed:
            # An earlier attempt was stored before its answer was lost: the same key holds the same
            # frames, because keys and contents are fixed when the batch is cut.
            pass
