"""The Redis bus's pub/sub side: one connection that carries the topics this process subscribed to,
read by one task that hands each message to the handler, and made again (topics restored, then
``on_reconnect``) whenever it breaks.

Used by the Redis bus (``bus/redis.py``); the cluster bus (``bus/redis_cluster.py``) reads one such
connection per master with a subclass.

A pub/sub payload is ``b"<seq>:" + body``, or a batch: ``b"+<first>:"`` then, per message numbered
from first up, ``b"<length>:" + body``; or ``b"*"`` then, per message, ``b"<seq>:<length>:" + body``
(``deliver``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable

from typing import Any

from redis.asyncio.connection import AbstractConnection

from agentchat.bus.base import BusHandler
from agentchat.bus.redis_link import CONNECTION_ERRORS, RespProtocol
from agentchat.core.backoff import Backoff
from agentchat.errors import AgentChatError

log = logging.getLogger(__name__)

RECONNECT_BASE = 0.05  # seconds; the n-th attempt waits uniform(0, min(cap, base * 2**n))


def deliver(handler: BusHandler, topic: str, data: bytes) -> None:
    """Hand one pub/sub payload to ``handler``: ``b"<seq>:" + body``, or a batch as one call per
    message, in order: ``b"+<first>:"`` then, per message, ``b"<length>:" + body`` (numbered from
    first up), or ``b"*"`` then, per message, ``b"<seq>:<length>:" + body``. A failing call is logged
    and the next message still delivered."""
    kind = data[:1]
    if kind == b"+":
        colon = data.index(b":")
        seq, at, end = int(data[1:colon]), colon + 1, len(data)
        while at < end:
            colon = data.index(b":", at)
            stop = colon + 1 + int(data[at:colon])
            _call_handler(handler, topic, seq, data[colon + 1 : stop])
            seq += 1
            at = stop
        return
    if kind != b"*":
        colon = data.find(b":")
        _call_handler(handler, topic, int(data[:colon]), data[colon + 1 :])
        return
    at, end = 1, len(data)
    while at < end:
        colon = data.index(b":", at)
        second = data.index(b":", colon + 1)
        start = second + 1
        stop = start + int(data[colon + 1 : second])
        _call_handler(handler, topic, int(data[at:colon]), data[start:stop])
        at = stop


def _call_handler(handler: BusHandler, topic: str, seq: int, body: bytes) -> None:
    try:
        handler(topic, seq, body)
    except Exception:  # one broken handler call must not stop the reader
        log.exception("bus handler failed on topic %s", topic)


class ConnectionLost(Exception):
    """Resolves subscribe waiters when the pub/sub connection goes: the topic is restored later."""


class PubSubStream(RespProtocol):
    """A pub/sub connection's replies, each handed to ``on_reply`` as it is parsed; ``ended`` fails
    with the reason once the connection is gone."""

    def __init__(self, conn: AbstractConnection, on_reply: Callable[[Any], None]) -> None:
        super().__init__()
        self.conn = conn
        self.reply = on_reply  # type: ignore[method-assign]
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.attach(conn)

    def lost(self, exc: BaseException) -> None:
        if not self.ended.done():
            self.ended.set_exception(exc)
            self.ended.exception()  # retrieved: nobody may be waiting any more


class PubSub:
    """The subscribed topics of one process and the connection that carries them."""

    _subscribe_command = "SUBSCRIBE"  # the cluster's sharded channels: SSUBSCRIBE / SUNSUBSCRIBE
    _unsubscribe_command = "UNSUBSCRIBE"

    def __init__(
        self,
        connect: Callable[[], Awaitable[AbstractConnection]],
        location: str,
        unavailable: Callable[[BaseException], AgentChatError],
        *,
        reconnect_max_delay: float,
        command_timeout: float,
        health_interval: float,
    ) -> None:
        self._connect = connect
        self.location = location
        self._unavailable = unavailable
        self._reconnect_max_delay = reconnect_max_delay
        self._command_timeout = command_timeout
        self._health_interval = health_interval
        self._handler: BusHandler | None = None
        self._on_reconnect: Callable[[], None] | None = None
        self._channels: dict[bytes, str] = {}  # subscribed channel -> topic
        self._waiters: dict[bytes, deque[asyncio.Future[None]]] = {}  # SUBSCRIBE sent, not confirmed
        self._conn: AbstractConnection | None = None  # the pub/sub connection while it is up
        self._reader: asyncio.Task[None] | None = None
        self._received = 0  # replies read on the pub/sub connection (for the health check)
        self._streams: dict[int, PubSubStream] = {}  # by id() of each open connection: its reader
        self._background: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def started(self) -> bool:
        return self._reader is not None

    async def start(self, handler: BusHandler, on_reconnect: Callable[[], None] | None,
                    ping: Callable[[], Awaitable[object]]) -> None:
        """Connect, check the command side with ``ping``, then read until ``close``."""
        self._handler = handler
        self._on_reconnect = on_reconnect
        try:
            conn = await self._open()
        except CONNECTION_ERRORS as exc:
            raise self._unavailable(exc) from exc
        try:
            await ping()
        except CONNECTION_ERRORS as exc:
            self._streams.pop(id(conn), None)
            await conn.disconnect(nowait=True)
            raise self._unavailable(exc) from exc
        self._conn = conn  # nothing is subscribed yet: subscribe() sends on it from now on
        self._reader = asyncio.create_task(self._run(conn), name=f"redis-bus-reader {self.location}")

    async def close(self) -> None:
        self._closing = True
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        for task in list(self._background):
            task.cancel()
        self._handler = None

    # -- the connection ------------------------------------------------------------------------

    async def _run(self, conn: AbstractConnection | None) -> None:
        """Read the pub/sub connection forever, making it again whenever it breaks."""
        reconnected = False
        backoff = Backoff(RECONNECT_BASE, self._reconnect_max_delay)
        while not self._closing:
            if conn is None:
                await asyncio.sleep(backoff.next_delay())
                try:
                    conn = await self._open()
                except CONNECTION_ERRORS as exc:
                    log.warning("bus: cannot reconnect to %s (attempt %d): %s", self.location, backoff.attempts, exc)
                    continue
                backoff.reset()
            watchdog = asyncio.create_task(self._watch(conn))
            try:
                if reconnected:
                    await self._restore(conn)
                await self._serve(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection errors, and anything unexpected: start over
                if not self._closing:
                    log.warning("bus: lost the pub/sub connection to %s: %r", self.location, exc)
            finally:
                self._conn = None
                watchdog.cancel()
                self._drop_waiters()
                self._streams.pop(id(conn), None)
                await conn.disconnect(nowait=True)
            conn = None
            reconnected = True

    def _drop_waiters(self) -> None:
        """The connection went: every unconfirmed subscription is confirmed later, by a restore."""
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(ConnectionLost())
                    waiter.exception()  # no warning if its caller stopped waiting
        self._waiters.clear()

    async def _restore(self, conn: AbstractConnection) -> None:
        """Subscribe a new connection to every topic, then announce the reconnection."""
        # From here on subscribe() sends its own SUBSCRIBE; everything before is in the snapshot.
        self._conn = conn
        channels = list(self._channels)
        if not channels:
            self._announce()
            return
        restored = [self._expect(channel) for channel in channels]
        await conn.send_command("SUBSCRIBE", *channels)
        task = asyncio.create_task(self._announce_when(restored, conn))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _open(self) -> AbstractConnection:
        """A new pub/sub connection, read from now on (before anything is sent on it)."""
        conn = await self._connect()
        self._streams[id(conn)] = PubSubStream(conn, self._reply)
        return conn

    async def _serve(self, conn: AbstractConnection) -> None:
        """Until the connection ends (raising why): its replies go to ``_reply`` as they come."""
        await self._streams[id(conn)].ended

    def _reply(self, reply: Any) -> None:
        self._received += 1
        if type(reply) is not list:
            return  # +PONG while nothing is subscribed
        kind = reply[0]
        if kind == b"message":
            topic = self._channels.get(reply[1])
            if topic is None:
                return  # unsubscribed while the message was on its way
            handler = self._handler
            if handler is not None:
                deliver(handler, topic, reply[2])
        elif kind == b"subscribe":
            self._subscription_confirmed(reply[1])

    def _subscription_confirmed(self, channel: bytes) -> None:
        """A (S)SUBSCRIBE confirmation of ``channel`` came: the oldest waiter for it is done."""
        waiters = self._waiters.get(channel)
        if waiters:
            waiter = waiters.popleft()
            if not waiters:
                del self._waiters[channel]
            if not waiter.done():
                waiter.set_result(None)

    def _expect(self, channel: bytes) -> asyncio.Future[None]:
        """A future resolved by the next SUBSCRIBE confirmation of ``channel``."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(channel, deque()).append(future)
        return future

    async def _announce_when(self, restored: list[asyncio.Future[None]], conn: AbstractConnection) -> None:
        try:
            await asyncio.gather(*restored)
        except ConnectionLost:
            return  # lost again before every topic was back; the next connection announces
        if self._conn is conn:
            self._announce()

    def _announce(self) -> None:
        log.info("bus: reconnected to %s, %d topics restored", self.location, len(self._channels))
        if self._on_reconnect is not None:
            try:
                self._on_reconnect()
            except Exception:
                log.exception("bus on_reconnect callback failed")

    async def _watch(self, conn: AbstractConnection) -> None:
        """Drop the connection if it stays silent after a PING (a dead peer, a hung server)."""
        try:
            while True:
                seen = self._received
                await asyncio.sleep(self._health_interval)
                if self._received != seen:
                    continue
                await conn.send_command("PING")
                await asyncio.sleep(self._command_timeout)
                if self._received == seen:
                    log.warning("bus: no answer to PING from %s; reconnecting", self.location)
                    await conn.disconnect(nowait=True)
                    return
        except CONNECTION_ERRORS:
            await conn.disconnect(nowait=True)

    # -- topics --------------------------------------------------------------------------------

    async def subscribe(self, channel: bytes, topic: str) -> None:
        """Returns once Redis confirmed the subscription, or at once while disconnected (the topic
        is subscribed on reconnect, followed by ``on_reconnect``)."""
        if self._reader is None:
            raise RuntimeError("call start() before subscribe()")
        if channel in self._channels:
            pending = self._waiters.get(channel)
            if pending:  # another caller's SUBSCRIBE is on its way: wait for the same confirmation
                await self._confirmed(pending[-1])
            return
        self._channels[channel] = topic
        conn = self._connection_of(channel)
        if conn is None:
            return
        confirmed = self._expect(channel)
        try:
            await conn.send_command(self._subscribe_command, channel)
        except CONNECTION_ERRORS:
            return  # the reader reconnects and restores it
        await self._confirmed(confirmed)

    def _connection_of(self, channel: bytes, restore: bool = True) -> AbstractConnection | None:
        """The connection that carries ``channel``; None while there is none (a restore subscribes it)."""
        return self._conn

    async def _confirmed(self, future: asyncio.Future[None]) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(future), self._command_timeout)
        except ConnectionLost:
            return
        except TimeoutError as exc:
            raise self._unavailable(exc) from exc

    async def unsubscribe(self, channel: bytes) -> None:
        if self._channels.pop(channel, None) is None:
            return
        conn = self._connection_of(channel, restore=False)
        if conn is not None:
            try:
                await conn.send_command(self._unsubscribe_command, channel)
            except CONNECTION_ERRORS:
                pass  # not restored on reconnect: it is no longer in self._channels
