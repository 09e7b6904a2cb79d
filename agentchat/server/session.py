"""One client socket's outgoing side: a bounded queue, its flushing, and per-channel cursors.

The hub never awaits a socket: it appends frames to the session's queue. Once per event-loop turn,
one callback flushes every session that has frames queued, several frames coalesced into one WebSocket
message (newline-separated), written straight to the socket's transport: no task and no coroutine per
delivery. While the transport's write buffer is over its high mark (``server/connections.py``) frames
stay queued and go out when it drains, so a slow peer can only fill its own queue. When the queue is
over its limit the socket is closed with ``4008 slow_consumer``; the client reconnects and resumes
from its last sequence number.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

# CLOSE_REMOVED is imported from here by the hub and the peek service.
from agentchat.core.frames import CLOSE_AUTH, CLOSE_REMOVED, CLOSE_SLOW_CONSUMER  # noqa: F401
from agentchat.core.rfc6455 import CLOSE_GOING_AWAY, CLOSE_POLICY, text_frame  # noqa: F401
from agentchat.server.tokens import Principal
from agentchat.server.connections import WebSocketConnection

if TYPE_CHECKING:
    from agentchat.server.metrics import Metrics

log = logging.getLogger(__name__)

# How many bytes of queued frames one WebSocket message may carry.
COALESCE_BYTES = 64 * 1024


def _coalesce_end(queue: list[bytes], start: int) -> int:
    """Where the run of queued frames from ``start`` that one WebSocket message carries ends."""
    end, count, size = start, len(queue), 0
    while end < count and size < COALESCE_BYTES:
        size += len(queue[end]) + 1
        end += 1
    return end


# Per event loop, the sessions with frames queued since its last flush; a loop has an entry exactly
# while a flush is scheduled on it (tests run many loops in one process; servers run one). A plain
# dict, looked up once per session per turn: a loop closed with a flush pending (tests) leaves its
# entry behind, which costs a little memory and nothing else.
_dirty: dict[asyncio.AbstractEventLoop, list[Session]] = {}


def _flush_dirty(loop: asyncio.AbstractEventLoop) -> None:
    for session in _dirty.pop(loop, ()):
        session._dirty = False
        session._flush()


@dataclass(slots=True)
class Cursor:
    """Where a session is in one channel: the last number it was given, and live frames held back
    while it catches up from history."""

    last: int = 0
    catching_up: bool = False
    held: list[tuple[int, bytes]] = field(default_factory=list)


class Session:
    """An idle session holds no task, no event, no frame and no queue; nor a ``__weakref__`` slot
    (nothing refers to a session weakly) or the heartbeat's count (the connection's sans-I/O state
    keeps it)."""

    __slots__ = ("connection", "principal", "queue_max", "cursors", "_queue", "_drain_waiters", "_closed",
                 "_close_with", "_metrics", "_dirty")

    def __init__(self, connection: WebSocketConnection, principal: Principal, queue_max: int,
                 metrics: Metrics | None = None) -> None:
        """``connection``: the socket, whose transport frames are written to (it calls ``_flush``
        again when a full write buffer has drained)."""
        self.connection = connection
        self._dirty = False
        self.principal = principal
        self.queue_max = queue_max
        self.cursors: dict[str, Cursor] = {}
        # None while empty (as an idle session's is): the first frame queued makes a list, and each flush
        # hands its frames to the transport and drops it. An empty list would cost every idle session
        # 56 bytes (an empty deque a 624-byte block); the list made per flush comes off the free list.
        self._queue: list[bytes] | None = None
        self._drain_waiters: list[asyncio.Future[None]] | None = None
        self._closed = False
        self._close_with: tuple[int, str] | None = None
        self._metrics = metrics

    @property
    def closed(self) -> bool:
        return self._closed

    def push(self, frame: bytes) -> None:
        """Queue a frame (ack, error, event) for this socket."""
        if self._closed:
            return
        queue = self._queue
        if queue is None:
            # Not ``[frame]``: that list holds one item and grows (a realloc) at the second frame.
            queue = self._queue = []
        elif len(queue) >= self.queue_max:
            self.close_soon(CLOSE_SLOW_CONSUMER, "slow_consumer")
            return
        queue.append(frame)
        if not self._dirty:
            self._schedule_flush()

    def acked(self, note: bytes, seq: int) -> None:
        """A message this socket sent is stored (``Hub.send``): ``note`` is its ack frame up to the
        number (``frames.ack_prefix``)."""
        self.push(b"%s%d}" % (note, seq))

    def _schedule_flush(self) -> None:
        self._dirty = True
        loop = asyncio.get_running_loop()
        waiting = _dirty.get(loop)
        if waiting is None:
            waiting = _dirty[loop] = []
            loop.call_soon(_flush_dirty, loop)
        waiting.append(self)

    def _flush(self) -> None:
        """Send what is queued, unless the transport's write buffer is full (then the connection
        calls this again once it has drained)."""
        queue = self._queue
        if not queue or self._closed:
            return
        transport = self.connection.out
        if transport is None:  # write buffer full (the connection calls again once drained), or closing
            if self.connection.closing:  # nothing more may follow a close frame
                self._queue = None
                self._wake_drain_waiters()
            return
        count = len(queue)
        if count == 1:
            transport.write(text_frame(queue[0]))
        else:
            start = 0
            while start < count:
                end = _coalesce_end(queue, start)
                transport.write(text_frame(b"\n".join(queue[start:end])))
                start = end
        self._queue = None
        if self._metrics is not None:
            self._metrics.frames_out += count
        if self._drain_waiters is not None:
            self._wake_drain_waiters()

    def _wake_drain_waiters(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def offer(self, channel: str, seq: int, frame: bytes) -> None:
        """A live channel message: sent once, in order, unless the session is catching up."""
        cursor = self.cursors.get(channel)
        if cursor is None:
            return
        if cursor.catching_up:
            cursor.held.append((seq, frame))
            if len(cursor.held) > self.queue_max:
                self.close_soon(CLOSE_SLOW_CONSUMER, "slow_consumer")
            return
        if seq <= cursor.last:
            return
        cursor.last = seq
        self.push(frame)

    def backlog(self) -> int:
        return len(self._queue) if self._queue is not None else 0

    async def wait_drained(self) -> None:
        """Return once every queued frame has been handed to the socket (or the session closed)."""
        while self._dirty:
            await asyncio.sleep(0)  # the flush scheduled for this turn runs first
        if not self._queue or self._closed:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._drain_waiters is None:
            self._drain_waiters = []
        self._drain_waiters.append(waiter)
        await waiter

    def close_soon(self, code: int, reason: str, *, flush: bool = False) -> None:
        """Close with ``code``. What is queued is dropped, unless ``flush``: then it is written first
        (if the write buffer has room), so that the frames that explain the close (the ``error`` frames
        of a refused flood) reach the client before the close frame, which nothing may follow."""
        if self._closed:
            return
        if flush:
            self._flush()
        self._closed = True
        self._close_with = (code, reason)
        self._queue = None
        self._wake_drain_waiters()
        self.connection.close(code, reason)

    def heartbeat(self, ping_at: int, drop_at: int) -> None:
        """One tick of the heartbeat (``server/agent_socket.py``) for a session that is still open: the
        connection pings a silent client or drops one that stayed silent (``core/rfc6455.py`` decides
        which); a dropped one's queue goes with it."""
        if self._closed:
            return
        if self.connection.heartbeat(ping_at, drop_at):
            self._closed = True
            self._queue = None
            self._wake_drain_waiters()

    async def aclose(self, code: int = CLOSE_GOING_AWAY, reason: str = "") -> None:
        """Close now (the close handshake finishes on its own); a reason given earlier by
        ``close_soon`` wins over this one."""
        self._closed = True
        self._queue = None
        self._wake_drain_waiters()
        code, reason = self._close_with or (code, reason)
        self.connection.close(code, reason)

    async def flush_and_stop(self) -> None:
        """Let what is queued go out (for up to 2 s), before a graceful close."""
        if not self._closed and (self._queue or self._dirty):
            try:
                await asyncio.wait_for(self.wait_drained(), 2.0)
            except asyncio.TimeoutError:
                pass


class SessionSocket(WebSocketConnection):
    """A connection whose outgoing side is a ``Session`` (once it has one): a drained write buffer
    sends what is queued."""

    __slots__ = ("session",)

    def __init__(self, max_message_bytes: int) -> None:
        super().__init__(max_message_bytes)
        self.session: Session | None = None

    def flush(self) -> None:
        if self.session is not None and not self.session.closed:
            self.session._flush()

    def writable(self) -> None:
        if self.session is not None:
            self.session._flush()
