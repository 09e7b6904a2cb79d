"""The Redis bus: many server processes sharing one Redis (``redis://host:port/db``).

One dedicated pub/sub connection per process carries the topics this process subscribed to; a reader
task hands each message to the handler. Commands share one other connection, pipelined (``_Commands``).

``publish_sequenced`` is one Lua script: INCR the counter and PUBLISH ``b"<seq>:" + body`` in the same
atomic step, so the order of the numbers is the order in which Redis delivers the messages, to every
process. ``publish`` sends ``b"0:" + body``. ``claim_and_publish`` calls of one event-loop turn on one
channel are one script call (``CLAIM_AND_PUBLISH_MANY``) and one pub/sub message, ``b"*"`` then per
message ``b"<seq>:<length>:" + body`` (every process of a deployment must read this: upgrade them
together). Profiled on the multiprocess bench, the command connection's writes (one system call per
turn, loopback TCP charged to the writer) and the per-message pub/sub replies dominated the bus's share.

If the pub/sub connection breaks, the reader reconnects with exponential backoff and full jitter,
subscribes again to every topic, then calls ``on_reconnect``; messages published in between are lost
(at most once), the caller fills the gap from the store. A silent connection is detected with a PING
every ``HEALTH_INTERVAL`` seconds.

Durability: counters are rebuilt from the store (``seed_sequence``), so Redis may run without
persistence. Values (challenges, peek states, rate windows) are lost with a restart; what must survive
one lives in the store as well.

URL: ``redis://[[user]:password@]host[:port][/db][?namespace=NAME&<redis-py options>]``; ``rediss://``
for TLS. Every key and channel name starts with ``NAME:`` (default ``agentchat``), so several
deployments or test runs can share one Redis. A Redis Cluster is ``bus/redis_cluster.py``
(``redis+cluster://``); these key strings stay as they are for a single Redis.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import time
from collections import deque
from collections.abc import Sequence, Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import hiredis
from redis.asyncio import ConnectionPool
from redis.asyncio.connection import URL_QUERY_ARGUMENT_PARSERS, AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from agentchat.bus import keys as bus_keys
from agentchat.bus.base import BusHandler, check_index_score
from agentchat.core.backoff import Backoff
from agentchat.errors import AgentChatError, error

log = logging.getLogger(__name__)



class _Script:
    """A Lua script, run by its SHA1 (loaded again if Redis no longer has it)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


# -- Lua: each runs atomically on the server ----------------------------------------------------
# KEYS[1] counter; ARGV[1] channel, ARGV[2] body. nil if the counter is unknown.
PUBLISH_SEQUENCED = _Script("""
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local seq = redis.call('INCR', KEYS[1])
redis.call('PUBLISH', ARGV[1], string.format('%d:', seq) .. ARGV[2])
return seq
""")
# KEYS[1] claim, KEYS[2] counter, KEYS[3] in-flight index; ARGV[1] mark, ARGV[2] ttl ms, ARGV[3] channel,
# ARGV[4] body. {1, seq} if claimed, published and recorded in flight, {0, value} if the claim exists,
# {2} if the counter is unknown.
CLAIM_AND_PUBLISH = _Script("""
local current = redis.call('GET', KEYS[1])
if current then return {0, current} end
if redis.call('EXISTS', KEYS[2]) == 0 then return {2} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local seq = redis.call('INCR', KEYS[2])
redis.call('ZADD', KEYS[3], seq, string.format('%d', seq))
redis.call('PUBLISH', ARGV[3], string.format('%d:', seq) .. ARGV[4])
return {1, seq}
""")
# The claims and publishes of one event-loop turn on one channel, as one call and one message.
# KEYS[1] counter, KEYS[2] in-flight index, KEYS[2 + i] claim i; ARGV[1] ttl ms, ARGV[2] channel,
# ARGV[2i + 1] mark i, ARGV[2i + 2] body i. Each item as CLAIM_AND_PUBLISH, in order: {1, seq}, {0, value}
# or {2}. The published messages go out as one pub/sub message: b"*" then, per message,
# b"<seq>:<length>:" + body.
CLAIM_AND_PUBLISH_MANY = _Script("""
local known = redis.call('EXISTS', KEYS[1]) == 1
local out, parts = {}, {}
for i = 3, #KEYS do
  local current = redis.call('GET', KEYS[i])
  if current then
    out[#out + 1] = {0, current}
  elseif not known then
    out[#out + 1] = {2}
  else
    redis.call('SET', KEYS[i], ARGV[2 * i - 3], 'PX', ARGV[1])
    local seq = redis.call('INCR', KEYS[1])
    redis.call('ZADD', KEYS[2], seq, string.format('%d', seq))
    local body = ARGV[2 * i - 2]
    parts[#parts + 1] = string.format('%d:%d:', seq, #body) .. body
    out[#out + 1] = {1, seq}
  end
end
if #parts > 0 then redis.call('PUBLISH', ARGV[2], '*' .. table.concat(parts)) end
return out
""")
# KEYS[i] key, ARGV[i] its value; ARGV[#KEYS + 1] ttl ms.
SET_MANY = _Script("""
local ttl = ARGV[#KEYS + 1]
for i = 1, #KEYS do redis.call('SET', KEYS[i], ARGV[i], 'PX', ttl) end
return #KEYS
""")
# KEYS[i] index, ARGV[2i - 1] the score of member ARGV[2i]. ZADD replaces the score of a member.
INDEX_ADD = _Script("""
for i = 1, #KEYS do redis.call('ZADD', KEYS[i], ARGV[2 * i - 1], ARGV[2 * i]) end
return #KEYS
""")
# KEYS[i] index, ARGV[i] member. Redis deletes a sorted set when its last member goes.
INDEX_REMOVE = _Script("""
for i = 1, #KEYS do redis.call('ZREM', KEYS[i], ARGV[i]) end
return #KEYS
""")
# KEYS[1] counter; ARGV[1] floor.
SEED_SEQUENCE = _Script("""
local current = redis.call('GET', KEYS[1])
if not current or tonumber(current) < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
return 0
""")
# KEYS[1] key; ARGV[1] value, ARGV[2] ttl ms. nil if stored, else the existing value.
SET_IF_ABSENT = _Script("""
local current = redis.call('GET', KEYS[1])
if current then return current end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
""")
# KEYS[1] key; ARGV[1] '1' if a value is expected ('0': absence), ARGV[2] expected, ARGV[3] new,
# ARGV[4] ttl ms. 1 if set.
COMPARE_AND_SET = _Script("""
local current = redis.call('GET', KEYS[1])
if ARGV[1] == '1' then
  if current ~= ARGV[2] then return 0 end
elseif current then
  return 0
end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
return 1
""")
# KEYS[1] key; ARGV[1] ttl ms, applied when the increment creates the key; ARGV[2] the amount.
INCR = _Script("""
local value = redis.call('INCRBY', KEYS[1], ARGV[2])
if value == tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return value
""")

HEALTH_INTERVAL = 15.0  # seconds of silence on the pub/sub connection before it is sent a PING
RECONNECT_BASE = 0.05  # seconds; the n-th attempt waits uniform(0, min(cap, base * 2**n))
COMMAND_TIMEOUT = 5.0  # seconds for Redis to answer (a command, a PING); then the connection is dropped
CONNECT_TIMEOUT = 2.0

_CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
_NAMESPACE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# Options passed through to redis-py besides its own URL parsers (TLS files, client name).
_PASSTHROUGH = {"ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "client_name"}


def _parse_url(url: str) -> tuple[str, str, str]:
    """Split our URL into (redis-py URL, namespace, printable location without credentials)."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError("bus URL must start with redis:// or rediss://")
    namespace = bus_keys.REDIS_DEFAULT_NAMESPACE
    kept: list[tuple[str, str]] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if name == "namespace":
            if not _NAMESPACE.fullmatch(value):
                raise ValueError(f"bus namespace {value!r}: use 1-64 of A-Z a-z 0-9 _ . -")
            namespace = value
        elif name == "protocol":
            raise ValueError("bus URL: the protocol is fixed (RESP2, which the pub/sub reader parses)")
        elif name in URL_QUERY_ARGUMENT_PARSERS or name in _PASSTHROUGH:
            kept.append((name, value))
        else:
            raise ValueError(f"bus URL: unknown parameter {name!r} (namespace or a redis-py option)")
    location = f"{parts.scheme}://{parts.hostname or '127.0.0.1'}:{parts.port or 6379}{parts.path}"
    return urlunsplit(parts._replace(query=urlencode(kept))), namespace, location


def _ttl_ms(ttl: float) -> int:
    if not ttl > 0:
        raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")
    return max(1, math.ceil(ttl * 1000))


class _Link:
    """One command connection and the callers waiting for its replies, oldest first."""

    __slots__ = ("conn", "pending", "outbox", "wakeup", "tasks")

    def __init__(self, conn: AbstractConnection) -> None:
        self.conn = conn
        self.pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.outbox: list[bytes] = []  # packed commands not yet written, in the order of pending
        self.wakeup = asyncio.Event()  # set when outbox has something
        self.tasks: list[asyncio.Task[None]] = []


class _Commands:
    """Every command of the process on one connection, pipelined.

    Commands issued while the writer task waits for its turn are written together (one system call),
    without waiting for the replies of earlier ones; Redis answers in order, so a reader task hands
    each reply to the oldest waiting caller. A pool of connections instead pays a round trip and a
    system call per command, and makes callers queue for a free connection. Measured on a 2-core VM
    with Redis local: 16-64 concurrent ``publish_sequenced`` callers reach about 25,000/s (redis-py's
    pooled client: about 3,600/s, and 64 callers starved its blocking pool into timeouts).

    If Redis does not answer the oldest command within ``timeout`` seconds or the connection breaks,
    every waiting caller gets a connection error and the next command opens a new connection.
    """

    def __init__(
        self, make_connection: Callable[[], AbstractConnection], location: str, timeout: float
    ) -> None:
        self._make_connection = make_connection
        self._location = location
        self._timeout = timeout
        self._link: _Link | None = None
        self._connecting = asyncio.Lock()

    async def execute(self, *args: Any) -> Any:
        link = self._link or await self._connect()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        link.pending.append((future, time.monotonic()))
        link.outbox.append(hiredis.pack_command(args))  # C; redis-py's asyncio packer is Python
        link.wakeup.set()
        return await future

    async def script(self, script: _Script, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:  # not run: Redis restarted or flushed its scripts; load and run once
            await self.execute("SCRIPT", "LOAD", script.source)
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)

    async def _connect(self) -> _Link:
        async with self._connecting:
            if self._link is not None:
                return self._link
            conn = self._make_connection()
            try:
                await asyncio.wait_for(conn.connect(), self._timeout)
            except BaseException:
                await conn.disconnect(nowait=True)
                raise
            link = self._link = _Link(conn)
            link.tasks = [asyncio.create_task(task(link)) for task in (self._write, self._read, self._watch)]
            return link

    async def _write(self, link: _Link) -> None:
        try:
            while True:
                await link.wakeup.wait()
                link.wakeup.clear()
                chunks, link.outbox = link.outbox, []
                await link.conn.send_packed_command(chunks, check_health=False)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._fail(link, exc)

    async def _read(self, link: _Link) -> None:
        conn, pending = link.conn, link.pending
        try:
            while True:
                try:
                    reply = await conn.read_response(timeout=math.inf, disconnect_on_error=False)
                except ResponseError as exc:  # an error reply answers one command
                    reply = exc
                future, _ = pending.popleft()
                if not future.done():  # the caller may have been cancelled
                    if isinstance(reply, ResponseError):
                        future.set_exception(reply)
                    else:
                        future.set_result(reply)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # includes a reply nobody asked for (IndexError): start over
            await self._fail(link, exc)

    async def _watch(self, link: _Link) -> None:
        while True:
            await asyncio.sleep(min(1.0, self._timeout / 2))
            if link.pending and time.monotonic() - link.pending[0][1] > self._timeout:
                await self._fail(link, RedisTimeoutError(f"no answer in {self._timeout} s"))
                return

    async def _fail(self, link: _Link, exc: BaseException) -> None:
        """Drop the connection (called by one of its tasks): every waiting caller gets an error."""
        if self._link is link:
            self._link = None
        current = asyncio.current_task()
        for task in link.tasks:
            if task is not current:
                task.cancel()
        # Whether the commands ran is unknown: the callers get a connection error, never a retry.
        lost = RedisConnectionError(f"connection to {self._location} lost: {exc}")
        while link.pending:
            future, _ = link.pending.popleft()
            if not future.done():
                future.set_exception(lost)
        await link.conn.disconnect(nowait=True)

    async def close(self) -> None:
        link = self._link
        if link is not None:
            await self._fail(link, RuntimeError("the bus is closing"))
            await asyncio.gather(*link.tasks, return_exceptions=True)


def deliver(handler: BusHandler, topic: str, data: bytes) -> None:
    """Hand one pub/sub payload to ``handler``: ``b"<seq>:" + body``, or a batch (``b"*"`` then, per
    message, ``b"<seq>:<length>:" + body``) as one call per message, in order. A failing call is
    logged and the next message still delivered."""
    if data[:1] != b"*":
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


class _ConnectionLost(Exception):
    """Resolves subscribe waiters when the pub/sub connection goes: the topic is restored later."""


class RedisBus:
    """A ``Bus`` on Redis: see the module docstring."""

    # The cluster bus publishes on sharded channels, with counters fenced by their master's id.
    _publish_command = "PUBLISH"
    _publish_sequenced = PUBLISH_SEQUENCED
    _claim_and_publish = CLAIM_AND_PUBLISH
    _seed_sequence = SEED_SEQUENCE
    _claim_and_publish_many = CLAIM_AND_PUBLISH_MANY
    _batch_sends = True  # claim_and_publish: one script call per channel and event-loop turn

    def __init__(
        self,
        url: str,
        *,
        reconnect_max_delay: float = 2.0,
        command_timeout: float = COMMAND_TIMEOUT,
        health_interval: float = HEALTH_INTERVAL,
    ) -> None:
        redis_url, namespace, self.location = _parse_url(url)
        self._reconnect_max_delay = reconnect_max_delay
        self._command_timeout = command_timeout
        self._health_interval = health_interval
        # Defaults; options given in the URL take precedence. No automatic retry: a command that may
        # have run (a sequenced publish) must not run twice.
        options: dict[str, Any] = {
            "socket_timeout": command_timeout,
            "socket_connect_timeout": CONNECT_TIMEOUT,
            "decode_responses": False,
            "protocol": 2,  # redis-py 8 defaults to RESP3, where pub/sub messages are push frames
            "retry": Retry(NoBackoff(), 0),
        }
        # Used only to make configured connections (credentials, TLS, database): see _Commands.
        self._factory = ConnectionPool.from_url(redis_url, **options)
        self._commands = _Commands(self._command_connection, self.location, command_timeout)
        self._seq_prefix = f"{namespace}:{bus_keys.REDIS_SEQUENCE}"
        self._value_prefix = f"{namespace}:{bus_keys.REDIS_VALUE}"
        self._index_prefix = f"{namespace}:{bus_keys.REDIS_INDEX}"
        self._topic_prefix = f"{namespace}:{bus_keys.REDIS_TOPIC}"

        self._handler: BusHandler | None = None
        self._on_reconnect: Callable[[], None] | None = None
        self._channels: dict[bytes, str] = {}  # subscribed channel -> topic
        self._waiters: dict[bytes, deque[asyncio.Future[None]]] = {}  # SUBSCRIBE sent, not confirmed
        self._conn: AbstractConnection | None = None  # the pub/sub connection while it is up
        self._reader: asyncio.Task[None] | None = None
        self._received = 0  # replies read on the pub/sub connection (for the health check)
        self._background: set[asyncio.Task[None]] = set()
        self._send_batches: dict[tuple[str, str, int, str], list[tuple[str, bytes, bytes, asyncio.Future[Any]]]] = {}
        self._closing = False

    @classmethod
    def from_url(cls, url: str) -> RedisBus:
        return cls(url)

    def _unavailable(self, exc: BaseException) -> AgentChatError:
        return error("bus_unavailable", f"The message bus at {self.location} is unreachable: {exc}")

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self, handler: BusHandler, on_reconnect: Callable[[], None] | None = None) -> None:
        if self._reader is not None:
            raise RuntimeError("RedisBus.start() called twice")
        self._handler = handler
        self._on_reconnect = on_reconnect
        try:
            conn = await self._connect()
        except _CONNECTION_ERRORS as exc:
            raise self._unavailable(exc) from exc
        try:
            await self._commands.execute("PING")
        except _CONNECTION_ERRORS as exc:
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
        await self._commands.close()

    async def ping(self) -> None:
        await self._call("PING")

    async def _call(self, *args: Any) -> Any:
        try:
            return await self._commands.execute(*args)
        except _CONNECTION_ERRORS as exc:
            raise self._unavailable(exc) from exc

    async def _run_script(self, script: _Script, key: str, *args: Any) -> Any:
        return await self._run_script_many(script, [key], list(args))

    async def _run_script_many(self, script: _Script, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self._commands.script(script, keys, args)
        except _CONNECTION_ERRORS as exc:
            raise self._unavailable(exc) from exc

    # -- the pub/sub connection ----------------------------------------------------------------

    def _command_connection(self) -> AbstractConnection:
        # No socket timeout here: _Commands times out the oldest command itself.
        return self._factory.connection_class(**{**self._factory.connection_kwargs, "socket_timeout": None})

    async def _connect(self) -> AbstractConnection:
        conn = self._factory.make_connection()
        try:
            await conn.connect()
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        return conn

    async def _run(self, conn: AbstractConnection | None) -> None:
        """Read the pub/sub connection forever, making it again whenever it breaks."""
        reconnected = False
        backoff = Backoff(RECONNECT_BASE, self._reconnect_max_delay)
        while not self._closing:
            if conn is None:
                await asyncio.sleep(backoff.next_delay())
                try:
                    conn = await self._connect()
                except _CONNECTION_ERRORS as exc:
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
                for waiters in self._waiters.values():
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.set_exception(_ConnectionLost())
                            waiter.exception()  # no warning if its caller stopped waiting
                self._waiters.clear()
                await conn.disconnect(nowait=True)
            conn = None
            reconnected = True

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

    async def _serve(self, conn: AbstractConnection) -> None:
        channel_topics = self._channels
        while True:
            reply = await conn.read_response(timeout=math.inf, disconnect_on_error=False)
            self._received += 1
            if not isinstance(reply, list):
                continue  # +PONG while nothing is subscribed
            kind = reply[0]
            if kind == b"message":
                topic = channel_topics.get(reply[1])
                if topic is None:
                    continue  # unsubscribed while the message was on its way
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
        except _ConnectionLost:
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
        except _CONNECTION_ERRORS:
            await conn.disconnect(nowait=True)

    # -- pub/sub -------------------------------------------------------------------------------

    def _channel(self, topic: str) -> bytes:
        return self._topic_name(topic).encode()

    # -- names: ``<namespace>:<family><key>`` (the cluster bus puts a hash tag in the key) ----------

    def _seq_name(self, counter: str) -> str:
        return self._seq_prefix + counter

    def _value_name(self, key: str) -> str:
        return self._value_prefix + key

    def _index_name(self, index: str) -> str:
        return self._index_prefix + index

    def _topic_name(self, topic: str) -> str:
        return self._topic_prefix + topic

    async def subscribe(self, topic: str) -> None:
        """Returns once Redis confirmed the subscription, or at once while disconnected (the topic
        is subscribed on reconnect, followed by ``on_reconnect``)."""
        if self._reader is None:
            raise RuntimeError("call start() before subscribe()")
        channel = self._channel(topic)
        if channel in self._channels:
            pending = self._waiters.get(channel)
            if pending:  # another caller's SUBSCRIBE is on its way: wait for the same confirmation
                await self._confirmed(pending[-1])
            return
        self._channels[channel] = topic
        conn = self._conn
        if conn is None:
            return
        confirmed = self._expect(channel)
        try:
            await conn.send_command("SUBSCRIBE", channel)
        except _CONNECTION_ERRORS:
            return  # the reader reconnects and restores it
        await self._confirmed(confirmed)

    async def _confirmed(self, future: asyncio.Future[None]) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(future), self._command_timeout)
        except _ConnectionLost:
            return
        except TimeoutError as exc:
            raise self._unavailable(exc) from exc

    async def unsubscribe(self, topic: str) -> None:
        channel = self._channel(topic)
        if self._channels.pop(channel, None) is None:
            return
        conn = self._conn
        if conn is not None:
            try:
                await conn.send_command("UNSUBSCRIBE", channel)
            except _CONNECTION_ERRORS:
                pass  # not restored on reconnect: it is no longer in self._channels

    async def publish(self, topic: str, body: bytes) -> None:
        await self._call(self._publish_command, self._topic_name(topic), b"0:" + body)

    async def publish_sequenced(self, topic: str, counter: str, body: bytes) -> int | None:
        seq = await self._run_script(self._publish_sequenced, self._seq_name(counter), self._topic_name(topic), body)
        return None if seq is None else int(seq)

    async def claim_and_publish(
        self, claim: str, mark: bytes, ttl: float, topic: str, counter: str, body: bytes, *, in_flight: str
    ) -> int | bytes | None:
        if not self._batch_sends:
            return await self._claim_and_publish_one(claim, mark, ttl, topic, counter, body, in_flight)
        # Sends of one event-loop turn on one channel become one script call and one pub/sub message
        # (see CLAIM_AND_PUBLISH_MANY): a round trip, a script run and a delivery per channel rather
        # than per message, on this process, on Redis and on every subscribed process.
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        batch = self._send_batches.get((topic, counter, _ttl_ms(ttl), in_flight))
        if batch is None:
            batch = self._send_batches[(topic, counter, _ttl_ms(ttl), in_flight)] = []
            if len(self._send_batches) == 1:
                asyncio.get_running_loop().call_soon(self._flush_sends)
        batch.append((self._value_name(claim), mark, body, future))
        return await future

    def _flush_sends(self) -> None:
        batches, self._send_batches = self._send_batches, {}
        for (topic, counter, ttl_ms, in_flight), items in batches.items():
            task = asyncio.create_task(self._send_batch(topic, counter, ttl_ms, in_flight, items))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _send_batch(self, topic: str, counter: str, ttl_ms: int, in_flight: str,
                          items: list[tuple[str, bytes, bytes, asyncio.Future[Any]]]) -> None:
        keys = [self._seq_name(counter), self._index_name(in_flight), *(claim for claim, _, _, _ in items)]
        args: list[Any] = [ttl_ms, self._topic_name(topic)]
        for _, mark, body, _ in items:
            args += (mark, body)
        try:
            replies = await self._commands.script(self._claim_and_publish_many, keys, args)
        except BaseException as exc:
            failure = self._unavailable(exc) if isinstance(exc, _CONNECTION_ERRORS) else exc
            for _, _, _, future in items:
                if not future.done():
                    future.set_exception(failure)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for (_, _, _, future), reply in zip(items, replies):
            if not future.done():
                outcome = int(reply[0])
                future.set_result(int(reply[1]) if outcome == 1 else bytes(reply[1]) if outcome == 0 else None)

    async def _claim_and_publish_one(
        self, claim: str, mark: bytes, ttl: float, topic: str, counter: str, body: bytes, in_flight: str
    ) -> int | bytes | None:
        keys = [self._value_name(claim), self._seq_name(counter), self._index_name(in_flight)]
        try:
            reply = await self._commands.script(self._claim_and_publish, keys,
                                                [mark, _ttl_ms(ttl), self._topic_name(topic), body])
        except _CONNECTION_ERRORS as exc:
            raise self._unavailable(exc) from exc
        outcome = int(reply[0])
        if outcome == 1:
            return int(reply[1])
        if outcome == 0:
            return bytes(reply[1])
        return None

    async def seed_sequence(self, counter: str, floor: int) -> None:
        await self._run_script(self._seed_sequence, self._seq_name(counter), int(floor))

    async def read_counters(self, counters: Sequence[str]) -> list[int | None]:
        if not counters:
            return []
        values = await self._call("MGET", *(self._seq_name(counter) for counter in counters))
        return [None if value is None else int(value) for value in values]

    # -- values --------------------------------------------------------------------------------

    async def set_if_absent(self, key: str, value: bytes, ttl: float) -> bytes | None:
        existing = await self._run_script(SET_IF_ABSENT, self._value_name(key), value, _ttl_ms(ttl))
        return None if existing is None else bytes(existing)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        await self._call("SET", self._value_name(key), value, "PX", _ttl_ms(ttl))

    async def set_many(self, items: Sequence[tuple[str, bytes]], ttl: float) -> None:
        if not items:
            return
        keys = [self._value_name(key) for key, _ in items]
        args: list[Any] = [value for _, value in items]
        args.append(_ttl_ms(ttl))
        await self._run_script_many(SET_MANY, keys, args)

    async def get(self, key: str) -> bytes | None:
        value = await self._call("GET", self._value_name(key))
        return None if value is None else bytes(value)

    async def take(self, key: str) -> bytes | None:
        value = await self._call("GETDEL", self._value_name(key))
        return None if value is None else bytes(value)

    async def delete(self, key: str) -> None:
        await self._call("DEL", self._value_name(key))

    async def compare_and_set(self, key: str, expected: bytes | None, new: bytes, ttl: float) -> bool:
        ms = _ttl_ms(ttl)
        if expected is None:
            done = await self._run_script(COMPARE_AND_SET, self._value_name(key), b"0", b"", new, ms)
        else:
            done = await self._run_script(COMPARE_AND_SET, self._value_name(key), b"1", expected, new, ms)
        return bool(done)

    async def incr(self, key: str, ttl: float, amount: int = 1) -> int:
        return int(await self._run_script(INCR, self._value_name(key), _ttl_ms(ttl), int(amount)))

    # -- sorted indexes ------------------------------------------------------------------------

    async def index_add(self, items: Sequence[tuple[str, str, int]]) -> None:
        if not items:
            return
        keys = [self._index_name(index) for index, _, _ in items]
        args: list[Any] = []
        for _, member, score in items:
            args += (check_index_score(score), member)
        await self._run_script_many(INDEX_ADD, keys, args)

    async def index_range(self, index: str, min_score: int) -> list[tuple[str, int]]:
        flat = await self._call(
            "ZRANGEBYSCORE", self._index_name(index), check_index_score(min_score), "+inf", "WITHSCORES"
        )
        # Scores come back as doubles in text; every integer up to 2**53 is one exactly.
        return [(flat[i].decode(), int(float(flat[i + 1]))) for i in range(0, len(flat), 2)]

    async def index_remove(self, items: Sequence[tuple[str, str]]) -> None:
        if not items:
            return
        keys = [self._index_name(index) for index, _ in items]
        await self._run_script_many(INDEX_REMOVE, keys, [member for _, member in items])
