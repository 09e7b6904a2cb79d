"""The Redis bus: many server processes sharing one Redis (``redis://host:port/db``).

One dedicated pub/sub connection per process carries the topics this process subscribed to; a reader
task hands each message to the handler (``PubSub``, bus/redis_pubsub.py). Commands share one other
connection, pipelined (``CommandLink``, bus/redis_link.py). This module holds the bus operations.

``publish_sequenced`` is one Lua script: INCR the counter and PUBLISH ``b"<seq>:" + body`` in the same
atomic step, so the order of the numbers is the order in which Redis delivers the messages, to every
process. ``publish`` sends ``b"0:" + body``. ``claim_and_publish`` calls go in rounds, one on its way
at a time per process: a round is one script call (``CLAIM_AND_PUBLISH_MANY``) and one pub/sub message
per channel, ``b"+<first>:"`` then per message ``b"<length>:" + body`` (numbered from first up), or
``b"*"`` then per message ``b"<seq>:<length>:" + body`` when some claims of the round already existed
(every process of a deployment must read these: upgrade them together). Replies on both connections
are parsed in C as they arrive (``RespProtocol``), not one awaited ``read_response`` per reply.

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
from agentchat.bus.base import BusHandler, PlacedFuture, check_index_score
from agentchat.bus.redis_link import CONNECTION_ERRORS, CommandLink, Script
from agentchat.bus.redis_pubsub import PubSub
from agentchat.errors import AgentChatError, error


# -- Lua: each runs atomically on the server ----------------------------------------------------
# The body of the batched claim script, shared with the cluster bus (which fences the counter by its
# master): {known} whether the counter exists, {take} adds ``fresh`` to it and returns the new value.
_CLAIM_AND_PUBLISH_MANY_BODY = """
local n = #KEYS - 2
local claims = {{}}
for i = 1, n do claims[i] = KEYS[i + 2] end
local current = redis.call('MGET', unpack(claims))
local mark, packed = ARGV[3], ARGV[4]
local out, seen, fresh = {{}}, {{}}, 0
for i = 1, n do
  local key = KEYS[i + 2]
  if current[i] then
    out[i] = {{0, current[i]}}
  elseif seen[key] then
    out[i] = {{0, mark}}
  else
    seen[key] = true
    fresh = fresh + 1
    out[i] = false
  end
end
if fresh == 0 then return out end
if not ({known}) then
  for i = 1, n do if not out[i] then out[i] = {{2}} end end
  return out
end
local first = {take} - fresh + 1
local scored = {{}}
for seq = first, first + fresh - 1 do
  scored[#scored + 1] = seq
  scored[#scored + 1] = seq
end
redis.call('ZADD', KEYS[2], unpack(scored))
if fresh == n then
  for i = 1, n do redis.call('SET', KEYS[i + 2], mark, 'PX', ARGV[1]) end
  redis.call('{publish}', ARGV[2], string.format('+%d:', first) .. packed)
  return first
end
local parts, at, seq = {{}}, 1, first
for i = 1, n do
  local colon = string.find(packed, ':', at, true)
  local stop = colon + tonumber(string.sub(packed, at, colon - 1))
  if not out[i] then
    redis.call('SET', KEYS[i + 2], mark, 'PX', ARGV[1])
    parts[#parts + 1] = string.format('%d:', seq) .. string.sub(packed, at, stop)
    out[i] = {{1, seq}}
    seq = seq + 1
  end
  at = stop + 1
end
redis.call('{publish}', ARGV[2], '*' .. table.concat(parts))
return out
"""
# KEYS[1] counter; ARGV[1] channel, ARGV[2] body. nil if the counter is unknown.
PUBLISH_SEQUENCED = Script("""
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local seq = redis.call('INCR', KEYS[1])
redis.call('PUBLISH', ARGV[1], string.format('%d:', seq) .. ARGV[2])
return seq
""")
# The claims and publishes of one round (see claim_and_publish) on one channel, as one call and one message.
# KEYS[1] counter, KEYS[2] in-flight index, KEYS[2 + i] claim i; ARGV[1] ttl ms, ARGV[2] channel, ARGV[3]
# the mark of every claim, ARGV[4] the bodies, each as b"<length>:" + body. If every claim is new (the
# usual case) the reply is the first of their consecutive numbers and the pub/sub message is b"+<first>:"
# then ARGV[4] as it came: Redis copies the bodies once, builds nothing per message. Otherwise, per item
# in order: {1, seq} if claimed, published and recorded in flight, {0, value} if the claim exists, {2} if
# the counter is unknown; the new ones go out as b"*" then, per message, b"<seq>:<length>:" + body.
# Per round: one MGET, one INCRBY, one ZADD, one PUBLISH; per message only the claim's SET (each claim
# has its own expiry). A client id twice in one round: the second finds
# the first's pending mark, as it would one round later.
CLAIM_AND_PUBLISH_MANY = Script(_CLAIM_AND_PUBLISH_MANY_BODY.format(
    known="redis.call('EXISTS', KEYS[1]) == 1", take="redis.call('INCRBY', KEYS[1], fresh)", publish="PUBLISH"))
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
# KEYS[i] index, ARGV[i] member; one ZREM per run of equal keys (callers put an index's members
# together). Redis deletes a sorted set when its last member goes.
INDEX_REMOVE = Script("""
local i = 1
while i <= #KEYS do
  local members, j = {}, i
  while j <= #KEYS and KEYS[j] == KEYS[i] and #members < 1000 do
    members[#members + 1] = ARGV[j]
    j = j + 1
  end
  redis.call('ZREM', KEYS[i], unpack(members))
  i = j
end
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
# Sends of one channel per script call: Lua's unpack() of a call's claims and numbers stays far below
# its stack limit (8,000 values).
SENDS_PER_CALL = 1000

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


# claim_and_publish: the sends of one call share (topic, counter, ttl ms, in-flight index, mark); each is
# (claim key, body, the caller's future).
_SendKey = tuple[str, str, int, str, bytes]
_Send = tuple[str, bytes, "asyncio.Future[Any]"]


def _ttl_ms(ttl: float) -> int:
    if not ttl > 0:
        raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")
    return max(1, math.ceil(ttl * 1000))


class RedisBus:
    """A ``Bus`` on Redis: see the module docstring."""

    # The cluster bus publishes on sharded channels, with counters fenced by their master's id.
    _publish_command = "PUBLISH"
    _publish_sequenced = PUBLISH_SEQUENCED
    _seed_sequence = SEED_SEQUENCE
    _claim_and_publish_many = CLAIM_AND_PUBLISH_MANY

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
        # claim_and_publish: sends waiting per call key; whether a round is on its way
        self._send_batches: dict[_SendKey, list[_Send]] = {}
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
        # The sends of one channel become one script call and one pub/sub message (see
        # CLAIM_AND_PUBLISH_MANY): a round trip, a script run and a delivery per batch rather than per
        # message, on this process, on Redis and on every subscribed process. The process has one
        # round of these calls on its way at a time: sends that come meanwhile wait for its answers
        # and go together, so under load a round holds what arrived during a round trip (idle, a
        # send leaves at the end of its event-loop turn). Fewer, fuller rounds are fewer pub/sub
        # pushes, and each wakes the subscribed processes once for more messages, which they then
        # write to each socket together. A channel's calls keep the order of its sends.
        future: asyncio.Future[Any] = PlacedFuture()
        key = (topic, counter, _ttl_ms(ttl), in_flight, mark)
        batch = self._send_batches.get(key)
        if batch is None:
            batch = self._send_batches[key] = []
            if not self._sending and not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush_sends)
        batch.append((self._value_name(claim), body, future))
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

    async def _send_round(self, batches: dict[_SendKey, list[_Send]]) -> None:
        try:
            await asyncio.gather(*(self._send_claims(key, items) for key, items in batches.items()))
        finally:
            self._sending = False
            if self._closing:
                waiting, self._send_batches = self._send_batches, {}
                for items in waiting.values():
                    for _, _, future in items:
                        if not future.done():
                            future.set_exception(self._unavailable(RuntimeError("the bus is closing")))
            else:
                self._flush_sends()  # what came while this round was on its way

    async def _send_claims(self, key: _SendKey, items: list[_Send]) -> None:
        for start in range(0, len(items), SENDS_PER_CALL):
            await self._send_claims_call(key, items[start:start + SENDS_PER_CALL])

    async def _send_claims_call(self, key: _SendKey, items: list[_Send]) -> None:
        topic, counter, ttl_ms, in_flight, mark = key
        keys = [self._seq_name(counter), self._index_name(in_flight), *(claim for claim, _, _ in items)]
        packed = b"".join([b"%d:%b" % (len(body), body) for _, body, _ in items])
        try:
            reply = await self._commands.script(self._claim_and_publish_many, keys,
                                                [ttl_ms, self._topic_name(topic), mark, packed])
        except BaseException as exc:
            failure = self._unavailable(exc) if isinstance(exc, CONNECTION_ERRORS) else exc
            for _, _, future in items:
                if not future.done():
                    future.set_exception(failure)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        if isinstance(reply, int):  # every claim was new: consecutive numbers from reply
            for seq, (_, _, future) in enumerate(items, reply):
                if not future.done():
                    future.set_result(seq)
            return
        for (_, _, future), outcome in zip(items, reply):
            if not future.done():
                kind = int(outcome[0])
                future.set_result(int(outcome[1]) if kind == 1 else bytes(outcome[1]) if kind == 0 else None)

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
