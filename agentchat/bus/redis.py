"""The Redis bus: many server processes sharing one Redis (``redis://host:port/db``).

One dedicated pub/sub connection per process carries the topics this process subscribed to; a reader
task hands each message to the handler (``PubSub``, bus/redis_pubsub.py). Commands share one other
connection, pipelined (``CommandLink``, bus/redis_link.py). This module holds the bus operations.

``publish_sequenced`` is one Lua script: INCR the counter and PUBLISH ``b"<seq>:" + body`` in the same
atomic step, so the order of the numbers is the order in which Redis delivers the messages, to every
process. ``publish`` sends ``b"0:" + body``. ``claim_and_publish`` calls go in rounds, one on its way
at a time per process: a round is one script call (``CLAIM_AND_PUBLISH_MANY``) and one pub/sub message
per channel, ``b"*"`` then per message ``b"<seq>:<length>:" + body`` (every process of a deployment
must read this: upgrade them together). Replies on both connections are parsed in C as they arrive
(``RespProtocol``), not one awaited ``read_response`` per reply.

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
import math
import re
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.asyncio import ConnectionPool
from redis.asyncio.connection import URL_QUERY_ARGUMENT_PARSERS, AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from agentchat.bus import keys as bus_keys
from agentchat.bus.base import BusHandler, check_index_score
from agentchat.bus.redis_link import CONNECTION_ERRORS, CommandLink, Script
from agentchat.bus.redis_pubsub import PubSub
from agentchat.errors import AgentChatError, error


# -- Lua: each runs atomically on the server ----------------------------------------------------
# KEYS[1] counter; ARGV[1] channel, ARGV[2] body. nil if the counter is unknown.
PUBLISH_SEQUENCED = Script("""
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local seq = redis.call('INCR', KEYS[1])
redis.call('PUBLISH', ARGV[1], string.format('%d:', seq) .. ARGV[2])
return seq
""")
# KEYS[1] claim, KEYS[2] counter, KEYS[3] in-flight index; ARGV[1] mark, ARGV[2] ttl ms, ARGV[3] channel,
# ARGV[4] body. {1, seq} if claimed, published and recorded in flight, {0, value} if the claim exists,
# {2} if the counter is unknown.
CLAIM_AND_PUBLISH = Script("""
local current = redis.call('GET', KEYS[1])
if current then return {0, current} end
if redis.call('EXISTS', KEYS[2]) == 0 then return {2} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local seq = redis.call('INCR', KEYS[2])
redis.call('ZADD', KEYS[3], seq, string.format('%d', seq))
redis.call('PUBLISH', ARGV[3], string.format('%d:', seq) .. ARGV[4])
return {1, seq}
""")
# The claims and publishes of one round (see claim_and_publish) on one channel, as one call and one message.
# KEYS[1] counter, KEYS[2] in-flight index, KEYS[2 + i] claim i; ARGV[1] ttl ms, ARGV[2] channel,
# ARGV[2i + 1] mark i, ARGV[2i + 2] body i. Each item as CLAIM_AND_PUBLISH, in order: {1, seq}, {0, value}
# or {2}. The published messages go out as one pub/sub message: b"*" then, per message,
# b"<seq>:<length>:" + body.
CLAIM_AND_PUBLISH_MANY = Script("""
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
SET_MANY = Script("""
local ttl = ARGV[#KEYS + 1]
for i = 1, #KEYS do redis.call('SET', KEYS[i], ARGV[i], 'PX', ttl) end
return #KEYS
""")
# KEYS[i] index, ARGV[2i - 1] the score of member ARGV[2i]. ZADD replaces the score of a member.
INDEX_ADD = Script("""
for i = 1, #KEYS do redis.call('ZADD', KEYS[i], ARGV[2 * i - 1], ARGV[2 * i]) end
return #KEYS
""")
# KEYS[i] index, ARGV[i] member. Redis deletes a sorted set when its last member goes.
INDEX_REMOVE = Script("""
for i = 1, #KEYS do redis.call('ZREM', KEYS[i], ARGV[i]) end
return #KEYS
""")
# KEYS[1] counter; ARGV[1] floor.
SEED_SEQUENCE = Script("""
local current = redis.call('GET', KEYS[1])
if not current or tonumber(current) < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
return 0
""")
# KEYS[1] key; ARGV[1] value, ARGV[2] ttl ms. nil if stored, else the existing value.
SET_IF_ABSENT = Script("""
local current = redis.call('GET', KEYS[1])
if current then return current end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
""")
# KEYS[1] key; ARGV[1] '1' if a value is expected ('0': absence), ARGV[2] expected, ARGV[3] new,
# ARGV[4] ttl ms. 1 if set.
COMPARE_AND_SET = Script("""
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
INCR = Script("""
local value = redis.call('INCRBY', KEYS[1], ARGV[2])
if value == tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return value
""")

HEALTH_INTERVAL = 15.0  # seconds of silence on the pub/sub connection before it is sent a PING
COMMAND_TIMEOUT = 5.0  # seconds for Redis to answer (a command, a PING); then the connection is dropped
CONNECT_TIMEOUT = 2.0

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


class RedisBus:
    """A ``Bus`` on Redis: see the module docstring."""

    # The cluster bus publishes on sharded channels, with counters fenced by their master's id.
    _publish_command = "PUBLISH"
    _publish_sequenced = PUBLISH_SEQUENCED
    _claim_and_publish = CLAIM_AND_PUBLISH
    _seed_sequence = SEED_SEQUENCE
    _claim_and_publish_many = CLAIM_AND_PUBLISH_MANY
    _batch_sends = True  # claim_and_publish: one script call per channel and round

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
        # Used only to make configured connections (credentials, TLS, database): see CommandLink.
        self._factory = ConnectionPool.from_url(redis_url, **options)
        self._commands = CommandLink(self._command_connection, self.location, command_timeout)
        self._pubsub = self._make_pubsub()
        self._seq_prefix = f"{namespace}:{bus_keys.REDIS_SEQUENCE}"
        self._value_prefix = f"{namespace}:{bus_keys.REDIS_VALUE}"
        self._index_prefix = f"{namespace}:{bus_keys.REDIS_INDEX}"
        self._topic_prefix = f"{namespace}:{bus_keys.REDIS_TOPIC}"
        self._background: set[asyncio.Task[None]] = set()
        # claim_and_publish: sends waiting per (topic, counter, ttl ms, in-flight index); whether a round
        # is on its way
        self._send_batches: dict[tuple[str, str, int, str], list[tuple[str, bytes, bytes, asyncio.Future[Any]]]] = {}
        self._sending = False
        self._flush_scheduled = False
        self._closing = False

    def _make_pubsub(self) -> PubSub:
        return PubSub(self._connect, self.location, self._unavailable, reconnect_max_delay=self._reconnect_max_delay,
                      command_timeout=self._command_timeout, health_interval=self._health_interval)

    @classmethod
    def from_url(cls, url: str) -> RedisBus:
        return cls(url)

    def _unavailable(self, exc: BaseException) -> AgentChatError:
        return error("bus_unavailable", f"The message bus at {self.location} is unreachable: {exc}")

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self, handler: BusHandler, on_reconnect: Callable[[], None] | None = None) -> None:
        if self._pubsub.started:
            raise RuntimeError(f"{type(self).__name__}.start() called twice")
        await self._pubsub.start(handler, on_reconnect, lambda: self._commands.execute("PING"))

    async def close(self) -> None:
        self._closing = True
        await self._pubsub.close()
        for task in list(self._background):
            task.cancel()
        await self._commands.close()

    async def ping(self) -> None:
        await self._call("PING")

    async def _call(self, *args: Any) -> Any:
        try:
            return await self._commands.execute(*args)
        except CONNECTION_ERRORS as exc:
            raise self._unavailable(exc) from exc

    async def _run_script(self, script: Script, key: str, *args: Any) -> Any:
        return await self._run_script_many(script, [key], list(args))

    async def _run_script_many(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self._commands.script(script, keys, args)
        except CONNECTION_ERRORS as exc:
            raise self._unavailable(exc) from exc

    # -- connections ---------------------------------------------------------------------------

    def _command_connection(self) -> AbstractConnection:
        # No socket timeout here: CommandLink times out the oldest command itself.
        return self._factory.connection_class(**{**self._factory.connection_kwargs, "socket_timeout": None})

    async def _connect(self) -> AbstractConnection:
        conn = self._factory.make_connection()
        try:
            await conn.connect()
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        return conn

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
        await self._pubsub.subscribe(self._channel(topic), topic)

    async def unsubscribe(self, topic: str) -> None:
        await self._pubsub.unsubscribe(self._channel(topic))

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
        # The sends of one channel become one script call and one pub/sub message (see
        # CLAIM_AND_PUBLISH_MANY): a round trip, a script run and a delivery per batch rather than per
        # message, on this process, on Redis and on every subscribed process. The process has one
        # round of these calls on its way at a time: sends that come meanwhile wait for its answers
        # and go together, so under load a round holds what arrived during a round trip (idle, a
        # send leaves at the end of its event-loop turn). Fewer, fuller rounds are fewer pub/sub
        # pushes, and each wakes the subscribed processes once for more messages, which they then
        # write to each socket together. A channel's calls keep the order of its sends.
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        key = (topic, counter, _ttl_ms(ttl), in_flight)
        batch = self._send_batches.get(key)
        if batch is None:
            batch = self._send_batches[key] = []
            if not self._sending and not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush_sends)
        batch.append((self._value_name(claim), mark, body, future))
        return await future

    def _flush_sends(self) -> None:
        self._flush_scheduled = False
        if self._sending or not self._send_batches:
            return
        batches, self._send_batches = self._send_batches, {}
        self._sending = True
        task = asyncio.create_task(self._send_round(batches))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_round(self, batches: dict[tuple[str, str, int, str],
                                              list[tuple[str, bytes, bytes, asyncio.Future[Any]]]]) -> None:
        try:
            await asyncio.gather(*(self._send_claims(key, items) for key, items in batches.items()))
        finally:
            self._sending = False
            if self._closing:
                waiting, self._send_batches = self._send_batches, {}
                for items in waiting.values():
                    for _, _, _, future in items:
                        if not future.done():
                            future.set_exception(self._unavailable(RuntimeError("the bus is closing")))
            else:
                self._flush_sends()  # what came while this round was on its way

    async def _send_claims(self, key: tuple[str, str, int, str],
                           items: list[tuple[str, bytes, bytes, asyncio.Future[Any]]]) -> None:
        topic, counter, ttl_ms, in_flight = key
        keys = [self._seq_name(counter), self._index_name(in_flight), *(claim for claim, _, _, _ in items)]
        args: list[Any] = [ttl_ms, self._topic_name(topic)]
        for _, mark, body, _ in items:
            args += (mark, body)
        try:
            replies = await self._commands.script(self._claim_and_publish_many, keys, args)
        except BaseException as exc:
            failure = self._unavailable(exc) if isinstance(exc, CONNECTION_ERRORS) else exc
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
        except CONNECTION_ERRORS as exc:
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
