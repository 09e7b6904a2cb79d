"""Fixtures that run each contract suite against every implementation of its interface.

``bus_backend`` / ``store_backend`` are parametrized over the implementations; a test asks for as many
buses or stores on one backend as it needs (two buses on one Redis are two server processes).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agentchat.bus.base import Bus
from agentchat.store.base import ObjectStore
from tests.services import RedisCluster, RedisProcess, S3Server, redis_cluster, redis_server, s3_server  # noqa: F401

BUS_KINDS = ["memory", "redis", pytest.param("redis-cluster", marks=pytest.mark.slow)]
STORE_KINDS = ["local", "s3"]


@dataclass
class Recorder:
    """A bus handler that keeps what it was given, for assertions."""

    messages: list[tuple[str, int, bytes]] = field(default_factory=list)
    fail_on: bytes | None = None  # raise when handed this body (a broken handler)

    def __call__(self, topic: str, seq: int, body: bytes) -> None:
        self.messages.append((topic, seq, body))
        if body == self.fail_on:
            raise RuntimeError("handler failure on purpose")

    def on(self, topic: str) -> list[tuple[int, bytes]]:
        return [(seq, body) for t, seq, body in self.messages if t == topic]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; received so far: {self.messages[-10:]}")
            await asyncio.sleep(0.001)

    async def wait_count(self, topic: str, count: int, timeout: float = 5.0) -> None:
        await self.wait_for(lambda: len(self.on(topic)) >= count, timeout)


@dataclass
class Node:
    """One started bus (one server process) and what its handler received."""

    bus: Bus
    received: Recorder
    reconnects: list[float]


BusMaker = Callable[[], Bus]
NodeMaker = Callable[[], Awaitable[Node]]


@pytest.fixture(params=BUS_KINDS)
def bus_backend(request: pytest.FixtureRequest) -> Iterator[BusMaker]:
    """Makes unstarted buses that all share one backend (a broker, or a namespace on one Redis)."""
    if request.param == "memory":
        from agentchat.bus.memory import MemoryBroker, MemoryBus

        broker = MemoryBroker()
        yield lambda: MemoryBus(broker)
    elif request.param == "redis-cluster":
        from agentchat.bus.redis_cluster import RedisClusterBus

        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        cluster_url = f"{cluster.url}?namespace=t{uuid.uuid4().hex[:12]}"
        yield lambda: RedisClusterBus(cluster_url)
    else:
        from agentchat.bus.redis import RedisBus

        server: RedisProcess = request.getfixturevalue("redis_server")
        url = f"{server.url}?namespace=t{uuid.uuid4().hex[:12]}"
        yield lambda: RedisBus(url)


@pytest.fixture
async def make_node(bus_backend: BusMaker) -> AsyncIterator[NodeMaker]:
    """``await make_node()`` starts one more bus on the shared backend; all are closed afterwards."""
    async with AsyncExitStack() as stack:

        async def make() -> Node:
            bus = bus_backend()
            node = Node(bus, Recorder(), [])
            await bus.start(node.received, lambda: node.reconnects.append(time.monotonic()))
            stack.push_async_callback(bus.close)
            return node

        yield make


@pytest.fixture
async def nodes(make_node: NodeMaker) -> tuple[Node, Node]:
    """Two buses on one backend: two server processes."""
    return await make_node(), await make_node()


StoreMaker = Callable[[], ObjectStore]
StartedStoreMaker = Callable[[], Awaitable[ObjectStore]]


@pytest.fixture(params=STORE_KINDS)
def store_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreMaker]:
    """Makes unstarted stores that all share one backend (a directory, or a bucket)."""
    if request.param == "local":
        from agentchat.store.local import LocalStore

        yield lambda: LocalStore(tmp_path / "store")
    else:
        from agentchat.store.s3 import S3Store

        server: S3Server = request.getfixturevalue("s3_server")
        url = server.url(server.create_bucket())
        yield lambda: S3Store.from_url(url)


@pytest.fixture
async def make_store(store_backend: StoreMaker) -> AsyncIterator[StartedStoreMaker]:
    async with AsyncExitStack() as stack:

        async def make() -> ObjectStore:
            store = store_backend()
            await store.start()
            stack.push_async_callback(store.close)
            return store

        yield make


@pytest.fixture
async def store(make_store: StartedStoreMaker) -> ObjectStore:
    return await make_store()
