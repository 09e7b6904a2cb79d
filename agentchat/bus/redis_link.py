"""The Redis bus's command connection: every command of the process on one pipelined connection.

Used by the Redis bus (``bus/redis.py``) and, one per master, by the cluster bus (``bus/redis_cluster.py``).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

# What a broken or silent connection raises, wherever it is read or written.
CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
_INCOMPLETE = object()  # hiredis: no complete reply in what was read so far
_parse_error = BaseParser.parse_error  # error replies as redis-py's exception classes (MOVED, NOSCRIPT...)


class Script:
    """A Lua script, run by its SHA1 (loaded again if Redis no longer has it)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


class RespProtocol(asyncio.Protocol):
    """The bytes of a connection redis-py opened (TLS, AUTH, SELECT and CLIENT SETNAME done), taken
    over: replies are parsed in C (hiredis) as they arrive, every complete one of a read in one go,
    and handed to ``reply`` in order; ``lost`` is called once when the connection ends.

    redis-py reads one reply per ``await read_response()``, a chain of Python coroutines and a stream
    buffer per reply; on the multiprocess bench that was most of the bus's own Python time on receipt.
    Commands are still written through the transport (or redis-py's ``send_command``, same socket).
    """

    def __init__(self) -> None:
        self._parser = hiredis.Reader(protocolError=InvalidResponse, replyError=_parse_error,
                                      notEnoughData=_INCOMPLETE)
        self.transport: asyncio.Transport | None = None
        self._ended = False

    def attach(self, conn: AbstractConnection) -> None:
        """Take over ``conn``, just connected (nothing sent on it yet that awaits a reply)."""
        # redis-py has no public accessor for its transport; its writer is the stream it writes to.
        transport = conn._writer.transport  # type: ignore[union-attr]
        self.transport = transport  # type: ignore[assignment]
        transport.set_protocol(self)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        parser.feed(data)
        try:
            while (reply := parser.gets()) is not _INCOMPLETE:
                self.reply(reply)
        except Exception as exc:  # bytes that are no RESP, or a reply this side cannot take: start over
            if self.transport is not None:
                self.transport.abort()
            self._end(exc)

    def eof_received(self) -> bool:
        return False  # close

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(exc or RedisConnectionError("closed by Redis"))

    def _end(self, exc: BaseException) -> None:
        if not self._ended:
            self._ended = True
            self.lost(exc)

    def reply(self, reply: Any) -> None:
        """One reply; an error reply is an exception instance (redis-py's classes), not raised."""
        raise NotImplementedError

    def lost(self, exc: BaseException) -> None:
        raise NotImplementedError


class _Connection(RespProtocol):
    """One command connection and the callers waiting for its replies, oldest first."""

    def __init__(self, link: CommandLink, conn: AbstractConnection) -> None:
        super().__init__()
        self.link = link
        self.conn = conn
        self.pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.outbox: list[bytes] = []  # packed commands not yet written, in the order of pending
        self.watchdog: asyncio.Task[None] | None = None
        self.failed = False

    def flush(self) -> None:
        chunks, self.outbox = self.outbox, []
        if chunks and not self.failed and self.transport is not None:
            self.transport.write(b"".join(chunks))

    def reply(self, reply: Any) -> None:
        future, _ = self.pending.popleft()  # IndexError: a reply nobody asked for (start over)
        if not future.done():  # the caller may have been cancelled
            if isinstance(reply, Exception):  # an error reply answers one command
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def lost(self, exc: BaseException) -> None:
        self.link._fail(self, exc)


class CommandLink:
    """Every command of the process on one connection, pipelined.

    Commands issued in one event-loop turn are written together at its end (one system call),
    without waiting for the replies of earlier ones; Redis answers in order, so each reply goes to
    the oldest waiting caller. A pool of connections instead pays a round trip and a system call
    per command, and makes callers queue for a free connection. Measured on a 2-core VM with Redis
    local: 16-64 concurrent ``publish_sequenced`` callers reach about 25,000/s (redis-py's pooled
    client: about 3,600/s, and 64 callers starved its blocking pool into timeouts).

    If Redis does not answer the oldest command within ``timeout`` seconds or the connection breaks,
    every waiting caller gets a connection error and the next command opens a new connection.
    """

    def __init__(
        self, make_connection: Callable[[], AbstractConnection], location: str, timeout: float
    ) -> None:
        self._make_connection = make_connection
        self._location = location
        self._timeout = timeout
        self._link: _Connection | None = None
        self._connecting = asyncio.Lock()

    async def execute(self, *args: Any) -> Any:
        link = self._link or await self._connect()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        link.pending.append((future, time.monotonic()))
        outbox = link.outbox
        outbox.append(hiredis.pack_command(args))  # C; redis-py's asyncio packer is Python
        if len(outbox) == 1:
            loop.call_soon(link.flush)
        return await future

    async def script(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:  # not run: Redis restarted or flushed its scripts; load and run once
            await self.execute("SCRIPT", "LOAD", script.source)
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)

    async def _connect(self) -> _Connection:
        async with self._connecting:
            if self._link is not None:
                return self._link
            conn = self._make_connection()
            try:
                await asyncio.wait_for(conn.connect(), self._timeout)
            except BaseException:
                await conn.disconnect(nowait=True)
                raise
            link = _Connection(self, conn)
            link.attach(conn)
            self._link = link
            link.watchdog = asyncio.create_task(self._watch(link))
            return link

    async def _watch(self, link: _Connection) -> None:
        while True:
            await asyncio.sleep(min(1.0, self._timeout / 2))
            if link.pending and time.monotonic() - link.pending[0][1] > self._timeout:
                self._fail(link, RedisTimeoutError(f"no answer in {self._timeout} s"))
                return

    def _fail(self, link: _Connection, exc: BaseException) -> None:
        """Drop the connection: every waiting caller gets an error."""
        if link.failed:
            return
        link.failed = True
        if self._link is link:
            self._link = None
        if link.watchdog is not None and link.watchdog is not asyncio.current_task():
            link.watchdog.cancel()
        # Whether the commands ran is unknown: the callers get a connection error, never a retry.
        lost = RedisConnectionError(f"connection to {self._location} lost: {exc}")
        while link.pending:
            future, _ = link.pending.popleft()
            if not future.done():
                future.set_exception(lost)
        if link.transport is not None:
            link.transport.abort()

    async def close(self) -> None:
        link = self._link
        if link is not None:
            self._fail(link, RuntimeError("the bus is closing"))
            if link.watchdog is not None:
                await asyncio.gather(link.watchdog, return_exceptions=True)
