"""The Redis bus on a Redis Cluster: ``redis+cluster://host:port[,host:port...]/[?namespace=NAME]``.

Everything a channel has on the bus lives in one hash slot: the key or topic names the channel inside a
hash tag (``agentchat:seq:seq:{<channel>}``, ``agentchat:kv:cid:{<channel>}:<sender>:<id>``,
``agentchat:t:c:{<channel>}``), so a send's claim, counter and publish are one script on one master.
Topics are sharded pub/sub channels (SSUBSCRIBE / SPUBLISH, Redis 7): a message travels only inside its
shard. Keys that name no channel (heartbeats, challenges, rate windows) hash as a whole. Calls that span
channels (``set_many``, ``index_add``, ``index_remove`` with keys of several channels) run as one script
per slot: atomic per channel, not across channels (no caller needs more).

Only the cluster uses hash tags: a single Redis (``redis://``) keeps its key strings.

Failover. Replication is asynchronous: a promoted replica may hold a channel's counter *below* numbers
its old master already handed out. So a counter is a hash ``{n, owner}`` where ``owner`` is the cluster
node id of the master that last seeded it; the sequencing scripts compare it with the id of the node
they run on (the client passes the id it read with ``CLUSTER MYID`` from that very connection) and
answer "unknown counter" on a mismatch. The caller then re-seeds from the store, as after a Redis
restart (the hub re-seeds above the last stored number plus a gap), and the seed takes the new owner.
An acknowledged message is stored, so it is never numbered again.

Commands are pipelined per master (``CommandLink``); a ``MOVED``/``ASK``/``TRYAGAIN``/``CLUSTERDOWN``
reply (the command did not run) refreshes the slot map and retries; a broken connection is reported as
``bus_unavailable`` and never retried (a sequenced publish may have run).

Pub/sub: one connection per master. If any breaks, or a master drops a sharded subscription because
it lost the slot, every connection is made again from a fresh slot map, every topic subscribed again,
then ``on_reconnect`` is called: the caller fills the gap from the store, as with one Redis.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio.connection import AbstractConnection
from redis.cluster import key_slot
from redis.exceptions import AskError, ClusterDownError, ResponseError, TryAgainError

from agentchat.bus import keys as bus_keys
from agentchat.bus.base import BusHandler
from agentchat.bus.redis import _CLAIM_AND_PUBLISH_MANY_BODY, RedisBus
from agentchat.bus.redis_link import CONNECTION_ERRORS, CommandLink, Script
from agentchat.bus.redis_pubsub import RECONNECT_BASE, PubSub, PubSubStream, deliver

log = logging.getLogger(__name__)

SLOTS = 16384
REDIRECTS = 8  # MOVED/TRYAGAIN retries of one command before giving up
_REDIRECTS = (AskError, TryAgainError, ClusterDownError)  # the command did not run (MovedError is an AskError)
READ_RETRIES = 3  # retries of a read after a broken connection (then bus_unavailable: the caller retries)


class _FencedScript(Script):
    """A script whose last argument is the id of the node it runs on (appended by the router)."""


# A counter: hash {n = last number handed out, owner = node id of the master that seeded it}.
# KEYS[1] counter; ARGV[1] channel, ARGV[2] body, ARGV[3] node id. nil if unknown or owned elsewhere.
CLUSTER_PUBLISH_SEQUENCED = _FencedScript("""
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[3] then return false end
local seq = redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('SPUBLISH', ARGV[1], string.format('%d:', seq) .. ARGV[2])
return seq
""")
# As CLAIM_AND_PUBLISH_MANY of the single-Redis bus; ARGV[#ARGV] node id.
CLUSTER_CLAIM_AND_PUBLISH_MANY = _FencedScript(_CLAIM_AND_PUBLISH_MANY_BODY.format(
    known="redis.call('HGET', KEYS[1], 'owner') == ARGV[#ARGV]",
    take="redis.call('HINCRBY', KEYS[1], 'n', fresh)", publish="SPUBLISH"))
# KEYS[1] counter; ARGV[1] floor, ARGV[2] node id. Never lowers the counter; takes ownership.
CLUSTER_SEED_SEQUENCE = _FencedScript("""
local current = tonumber(redis.call('HGET', KEYS[1], 'n') or '0')
local floor = tonumber(ARGV[1])
if current < floor then current = floor end
redis.call('HSET', KEYS[1], 'n', current, 'owner', ARGV[2])
return 0
""")


def tagged(key: str) -> str:
    """``key`` with the channel it belongs to (if any) in a hash tag; other keys hash as a whole."""
    channel_prefix = bus_keys.channel_scope(key)
    if channel_prefix is None:
        return key
    prefix, channel, rest = channel_prefix
    return f"{prefix}{{{channel}}}{rest}"


def _parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], str]:
    """``redis+cluster://h:p,h:p/?q`` → (addresses, a ``redis://`` URL of the first with the query)."""
    parts = urlsplit(url)
    if parts.scheme != "redis+cluster":
        raise ValueError("cluster bus URL must start with redis+cluster://")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    addresses: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"cluster bus URL: {item!r} is not host:port")
        addresses.append((host, int(port)))
    if parts.path not in ("", "/"):
        raise ValueError("cluster bus URL: a cluster has no database number")
    host, port = addresses[0]
    netloc = (userinfo + "@" if userinfo else "") + f"{host}:{port}"
    return addresses, urlunsplit(("redis", netloc, "/0", parts.query, ""))


# Commands that change nothing: safe to ask again after a connection broke mid-call.
_READS = frozenset({"GET", "MGET", "HGET", "ZRANGEBYSCORE", "PING", "CLUSTER"})


def _key_of(args: tuple[Any, ...]) -> Any:
    """The key (or shard channel) a command is routed by; ``None`` for keyless commands."""
    name = args[0]
    if name in ("EVALSHA", "EVAL"):
        return args[3] if int(args[2]) > 0 else None
    return args[1] if len(args) > 1 else None


def _slot(key: Any) -> int:
    return int(key_slot(key.encode() if isinstance(key, str) else key))


class _ClusterCommands:
    """Routes each command to the master of its key's slot, over one pipelined link per master."""

    def __init__(self, bus: RedisClusterBus, seeds: list[tuple[str, int]], timeout: float) -> None:
        self._bus = bus
        self._seeds = seeds
        self._timeout = timeout
        self._slots: list[tuple[str, int] | None] = [None] * SLOTS
        self._links: dict[tuple[str, int], CommandLink] = {}
        self._ids: dict[tuple[str, int], bytes] = {}
        self._refreshing: asyncio.Lock | None = None

    def _link(self, address: tuple[str, int]) -> CommandLink:
        link = self._links.get(address)
        if link is None:
            location = f"redis://{address[0]}:{address[1]}"
            link = self._links[address] = CommandLink(lambda: self._bus._node_connection(address), location,
                                                     self._timeout)
        return link

    def masters(self) -> set[tuple[str, int]]:
        return {address for address in self._slots if address is not None}

    def owner(self, key: Any) -> tuple[str, int] | None:
        return self._slots[_slot(key)]

    async def refresh(self) -> None:
        """Read the slot map from the first node that answers (known masters first, then the seeds)."""
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        async with self._refreshing:
            last: BaseException | None = None
            for address in [*self.masters(), *self._seeds]:
                try:
                    reply = await self._link(address).execute("CLUSTER", "SLOTS")
                except (*CONNECTION_ERRORS, ResponseError) as exc:
                    last = exc
                    continue
                slots: list[tuple[str, int] | None] = [None] * SLOTS
                for start, end, master, *_ in reply:
                    host = master[0].decode() or address[0]
                    for slot in range(int(start), int(end) + 1):
                        slots[slot] = (host, int(master[1]))
                self._slots = slots
                return
            raise ConnectionError(f"no cluster node answered CLUSTER SLOTS: {last}")

    async def _node_id(self, address: tuple[str, int]) -> bytes:
        node_id = self._ids.get(address)
        if node_id is None:
            node_id = self._ids[address] = bytes(await self._link(address).execute("CLUSTER", "MYID"))
        return node_id

    async def execute(self, *args: Any) -> Any:
        return await self._routed(None, args)

    async def script(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        return await self._routed(script, ("EVALSHA", script.sha, len(keys), *keys, *args))

    async def _routed(self, script: Script | None, args: tuple[Any, ...]) -> Any:
        key = _key_of(args)
        for attempt in range(REDIRECTS):
            address = self.owner(key) if key is not None else next(iter(self.masters()), None)
            if address is None:
                await self.refresh()
                address = self.owner(key) if key is not None else next(iter(self.masters()), None)
                if address is None:
                    raise ConnectionError("the cluster serves no node for this key's slot")
            try:
                if script is None:
                    return await self._link(address).execute(*args)
                call = args
                if isinstance(script, _FencedScript):
                    call = (*args, await self._node_id(address))
                return await self._link(address).script(script, list(call[3:3 + int(call[2])]),
                                                        list(call[3 + int(call[2]):]))
            except ResponseError as exc:
                # redis-py's classes for MOVED/ASK, TRYAGAIN, CLUSTERDOWN (their text drops the code)
                if not isinstance(exc, _REDIRECTS) or attempt == REDIRECTS - 1:
                    raise
                # Not run: the slot moved (failover, resharding) or is briefly unserved.
                if isinstance(exc, (TryAgainError, ClusterDownError)):
                    await asyncio.sleep(0.05 * 2**attempt)
                await self.refresh()
            except CONNECTION_ERRORS:
                self._ids.pop(address, None)  # it may come back as another node
                self._forget_soon()
                # A read is asked again of the slot's master as the cluster now names it (a failover
                # promoted a replica); anything else may have run before the connection broke.
                if script is not None or args[0] not in _READS or attempt >= READ_RETRIES:
                    raise
                await asyncio.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")

    def _forget_soon(self) -> None:
        # The master may be gone: the next call reads the slot map again.
        self._slots = [None] * SLOTS

    async def close(self) -> None:
        await asyncio.gather(*(link.close() for link in self._links.values()), return_exceptions=True)


class RedisClusterBus(RedisBus):
    """A ``Bus`` on a Redis Cluster: see the module docstring."""

    _publish_command = "SPUBLISH"
    _publish_sequenced = CLUSTER_PUBLISH_SEQUENCED
    _seed_sequence = CLUSTER_SEED_SEQUENCE
    _claim_and_publish_many = CLUSTER_CLAIM_AND_PUBLISH_MANY

    def __init__(self, url: str, **options: Any) -> None:
        seeds, single = _parse_cluster_url(url)
        super().__init__(single, **options)
        self.location = "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in seeds) + "/"
        self._commands = _ClusterCommands(self, seeds, self._command_timeout)  # type: ignore[assignment]
        self._cluster: _ClusterCommands = self._commands  # type: ignore[assignment]
        self._pubsub = _ClusterPubSub(self, self._cluster)

    @classmethod
    def from_url(cls, url: str) -> RedisClusterBus:
        return cls(url)

    def _node_connection(self, address: tuple[str, int]) -> AbstractConnection:
        kwargs = {**self._factory.connection_kwargs, "host": address[0], "port": address[1]}
        return self._factory.connection_class(**{**kwargs, "socket_timeout": None})

    # -- names: the channel in a hash tag ------------------------------------------------------

    def _seq_name(self, counter: str) -> str:
        return self._seq_prefix + tagged(counter)

    def _value_name(self, key: str) -> str:
        return self._value_prefix + tagged(key)

    def _index_name(self, index: str) -> str:
        return self._index_prefix + tagged(index)

    def _topic_name(self, topic: str) -> str:
        return self._topic_prefix + tagged(topic)

    # -- sequencing: the counter, the claim and the topic must share a slot ----------------------

    async def publish_sequenced(self, topic: str, counter: str, body: bytes) -> int | None:
        self._same_slot(self._seq_name(counter), self._topic_name(topic))
        return await super().publish_sequenced(topic, counter, body)

    async def claim_and_publish(
        self, claim: str, mark: bytes, ttl: float, topic: str, counter: str, body: bytes, *, in_flight: str
    ) -> int | bytes | None:
        self._same_slot(self._seq_name(counter), self._topic_name(topic), self._value_name(claim),
                        self._index_name(in_flight))
        return await super().claim_and_publish(claim, mark, ttl, topic, counter, body, in_flight=in_flight)

    async def read_counters(self, counters: Sequence[str]) -> list[int | None]:
        # One HGET per counter (they live in different slots), pipelined per master. A value read
        # from a promoted replica may be older; membership versions only ever look stale then.
        values = await asyncio.gather(*(self._call("HGET", self._seq_name(counter), "n") for counter in counters))
        return [None if value is None else int(value) for value in values]

    @staticmethod
    def _same_slot(*names: str) -> None:
        # A script may SPUBLISH to another slot without an error, reaching the wrong shard's readers.
        if len({_slot(name) for name in names}) != 1:
            raise ValueError(f"on a Redis Cluster these must name one channel: {names}")

    # -- calls spanning channels: one script per slot -------------------------------------------

    async def set_many(self, items: Sequence[tuple[str, bytes]], ttl: float) -> None:
        await self._per_slot(items, lambda group: super(RedisClusterBus, self).set_many(group, ttl),
                             self._value_name)

    async def index_add(self, items: Sequence[tuple[str, str, int]]) -> None:
        await self._per_slot(items, super().index_add, self._index_name)

    async def index_remove(self, items: Sequence[tuple[str, str]]) -> None:
        await self._per_slot(items, super().index_remove, self._index_name)

    async def _per_slot(self, items: Sequence[Any], call: Callable[[list[Any]], Any],
                        name: Callable[[str], str]) -> None:
        groups: dict[int, list[Any]] = defaultdict(list)
        for item in items:
            groups[_slot(name(item[0]))].append(item)
        await asyncio.gather(*(call(group) for group in groups.values()))

    async def start(self, handler: BusHandler, on_reconnect: Callable[[], None] | None = None) -> None:
        if self._pubsub.started:
            raise RuntimeError("RedisClusterBus.start() called twice")
        await self._pubsub.start(handler, on_reconnect, lambda: self._commands.execute("PING"))


class _ClusterPubSub(PubSub):
    """One pub/sub connection per master, on sharded channels (SSUBSCRIBE / SPUBLISH)."""

    _subscribe_command = "SSUBSCRIBE"
    _unsubscribe_command = "SUNSUBSCRIBE"

    def __init__(self, bus: RedisClusterBus, cluster: _ClusterCommands) -> None:
        super().__init__(bus._connect, bus.location, bus._unavailable, reconnect_max_delay=bus._reconnect_max_delay,
                         command_timeout=bus._command_timeout, health_interval=bus._health_interval)
        self._bus = bus
        self._cluster = cluster
        self._shards: dict[tuple[str, int], AbstractConnection] = {}
        self._rebuild = asyncio.Event()

    async def start(self, handler: BusHandler, on_reconnect: Callable[[], None] | None,
                    ping: Callable[[], Awaitable[object]]) -> None:
        self._handler = handler
        self._on_reconnect = on_reconnect
        try:
            await self._cluster.refresh()
            await ping()
            await self._open_shards()
        except CONNECTION_ERRORS as exc:
            await self._close_shards()
            raise self._unavailable(exc) from exc
        self._reader = asyncio.create_task(self._run_cluster(), name=f"redis-bus-reader {self.location}")

    async def close(self) -> None:
        await super().close()
        await self._close_shards()

    async def _open_shards(self) -> None:
        shards: dict[tuple[str, int], AbstractConnection] = {}
        try:
            for address in self._cluster.masters():
                conn = self._bus._node_connection(address)
                shards[address] = conn
                await asyncio.wait_for(conn.connect(), self._command_timeout)
                self._streams[id(conn)] = PubSubStream(conn, self._reply)
        except BaseException:
            for conn in shards.values():
                self._streams.pop(id(conn), None)
                await conn.disconnect(nowait=True)
            raise
        self._shards = shards

    async def _close_shards(self) -> None:
        shards, self._shards = self._shards, {}
        for conn in shards.values():
            self._streams.pop(id(conn), None)
            await conn.disconnect(nowait=True)

    async def _run_cluster(self) -> None:
        """Read every master's pub/sub connection; on any loss, make them all again and restore."""
        attempt = 0
        first = True
        while not self._closing:
            if not first:
                delay = random.uniform(0, min(self._reconnect_max_delay, RECONNECT_BASE * 2**attempt))
                attempt += 1
                await asyncio.sleep(delay)
                try:
                    await self._cluster.refresh()
                    await self._open_shards()
                except CONNECTION_ERRORS as exc:
                    log.warning("bus: cannot reconnect to %s (attempt %d): %s", self.location, attempt, exc)
                    continue
            readers = [asyncio.create_task(self._serve(conn)) for conn in self._shards.values()]
            rebuild = asyncio.create_task(self._rebuild.wait())
            try:
                if not first:
                    await self._restore_all()
                    attempt = 0
                await asyncio.wait([*readers, rebuild], return_when=asyncio.FIRST_COMPLETED)
                for task in readers:
                    if task.done() and not task.cancelled() and task.exception() is not None:
                        log.warning("bus: lost a pub/sub connection to %s: %r", self.location, task.exception())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self._closing:
                    log.warning("bus: restoring the pub/sub connections to %s failed: %r", self.location, exc)
            finally:
                self._rebuild.clear()
                for task in [*readers, rebuild]:
                    task.cancel()
                await asyncio.gather(*readers, rebuild, return_exceptions=True)
                self._drop_waiters()
                await self._close_shards()
            first = False

    async def _restore_all(self) -> None:
        """Subscribe the new connections to every topic (one SSUBSCRIBE per slot), then announce."""
        by_slot: dict[int, list[bytes]] = defaultdict(list)
        for channel in list(self._channels):
            by_slot[_slot(channel)].append(channel)
        restored: list[asyncio.Future[None]] = []
        for slot, channels in by_slot.items():
            conn = self._shards.get(self._cluster._slots[slot])  # type: ignore[arg-type]
            if conn is None:
                raise ConnectionError(f"no master serves slot {slot} yet")
            restored += [self._expect(channel) for channel in channels]
            await conn.send_command("SSUBSCRIBE", *channels)
        await asyncio.wait_for(asyncio.gather(*restored), self._command_timeout)
        self._announce()

    def _reply(self, reply: Any) -> None:
        self._received += 1
        if type(reply) is not list:
            return
        kind = reply[0]
        if kind == b"smessage":
            topic = self._channels.get(reply[1])
            if topic is None:
                return
            handler = self._handler
            if handler is not None:
                deliver(handler, topic, reply[2])
        elif kind == b"ssubscribe":
            self._subscription_confirmed(reply[1])
        elif kind == b"sunsubscribe" and reply[1] in self._channels:
            # Not asked for: this master lost the slot (failover, resharding). Start over (raised
            # here, it ends this connection, and the reader makes them all again).
            raise ConnectionError(f"the shard dropped {reply[1]!r}")

    def _connection_of(self, channel: bytes, restore: bool = True) -> AbstractConnection | None:
        conn = self._shards.get(self._cluster.owner(channel))  # type: ignore[arg-type]
        if conn is None and restore:  # disconnected, or the slot map changed: the rebuild subscribes it
            self._rebuild.set()
        return conn
