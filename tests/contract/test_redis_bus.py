"""What only the Redis bus can do: lose its server and get it back. Each test has its own Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from agentchat.bus.redis import RedisBus
from agentchat.errors import Unavailable
from tests.contract.conftest import Node, Recorder
from tests.services import RedisProcess, free_port, start_redis


@pytest.fixture
def redis_proc(tmp_path: Path) -> Iterator[RedisProcess]:
    proc = start_redis(tmp_path / "redis")
    yield proc
    proc.kill()


@pytest.fixture
async def connect(redis_proc: RedisProcess) -> AsyncIterator[Callable[..., Awaitable[Node]]]:
    started: list[RedisBus] = []

    async def make(url: str | None = None) -> Node:
        bus = RedisBus(url or redis_proc.url, reconnect_max_delay=0.2)
        node = Node(bus, Recorder(), [])
        await bus.start(node.received, lambda: node.reconnects.append(time.monotonic()))
        started.append(bus)
        return node

    yield make
    for bus in started:
        await bus.close()


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def test_restart_restores_subscriptions_then_calls_on_reconnect(
    redis_proc: RedisProcess, connect: Callable[..., Awaitable[Node]]
) -> None:
    a, b = await connect(), await connect()
    await b.bus.subscribe("t1")
    await b.bus.subscribe("t2")
    await a.bus.publish("t1", b"before")
    await b.received.wait_count("t1", 1)

    redis_proc.restart()
    await wait_until(lambda: len(b.reconnects) == 1)
    # on_reconnect came after the topics were subscribed again: a publish now is delivered.
    await a.bus.publish("t1", b"after")
    await a.bus.publish("t2", b"after")
    await b.received.wait_count("t1", 2)
    await b.received.wait_count("t2", 1)
    assert b.received.on("t1") == [(0, b"before"), (0, b"after")]
    assert len(b.reconnects) == 1


async def test_subscribe_while_down_takes_effect_on_reconnect(
    redis_proc: RedisProcess, connect: Callable[..., Awaitable[Node]]
) -> None:
    a, b = await connect(), await connect()
    redis_proc.stop()
    await asyncio.sleep(0.05)
    await b.bus.subscribe("late")  # returns without waiting for Redis
    await b.bus.unsubscribe("gone")
    redis_proc.start()
    await wait_until(lambda: len(b.reconnects) == 1)
    await a.bus.publish("late", b"x")
    await b.received.wait_count("late", 1)


async def test_restart_without_persistence_forgets_counters(
    redis_proc: RedisProcess, connect: Callable[..., Awaitable[Node]]
) -> None:
    a = await connect()
    await a.bus.seed_sequence("ch", 10)
    assert await a.bus.publish_sequenced("t", "ch", b"x") == 11
    redis_proc.restart()
    await wait_until(lambda: len(a.reconnects) == 1)
    assert await a.bus.publish_sequenced("t", "ch", b"x") is None  # the caller must re-seed
    await a.bus.seed_sequence("ch", 11)
    assert await a.bus.publish_sequenced("t", "ch", b"x") == 12


async def test_restart_with_persistence_keeps_counters(tmp_path: Path) -> None:
    proc = start_redis(tmp_path / "aof", appendonly=True)
    try:
        bus = RedisBus(proc.url, reconnect_max_delay=0.2)
        await bus.start(Recorder())
        await bus.seed_sequence("ch", 0)
        assert await bus.publish_sequenced("t", "ch", b"x") == 1
        proc.kill()  # a crash: only what was fsynced survives (appendfsync always: everything)
        await asyncio.sleep(0.05)  # let the pool see its connections close, as it would in service
        proc.start()
        # A connection the pool has not yet seen close answers bus_unavailable (retryable, and run
        # nowhere: the server it reached is gone); a caller retries, as the sequencer does.
        deadline = time.monotonic() + 30
        while True:
            try:
                assert await bus.publish_sequenced("t", "ch", b"x") == 2
                break
            except Unavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        await bus.close()
    finally:
        proc.kill()


async def test_down_means_bus_unavailable(redis_proc: RedisProcess, connect: Callable[..., Awaitable[Node]]) -> None:
    a = await connect()
    await a.bus.ping()
    redis_proc.stop()
    with pytest.raises(Unavailable) as info:
        await a.bus.ping()
    assert info.value.code == "bus_unavailable"
    assert "127.0.0.1" in info.value.message
    for call in (
        a.bus.publish("t", b"x"),
        a.bus.publish_sequenced("t", "c", b"x"),
        a.bus.seed_sequence("c", 1),
        a.bus.set("k", b"v", ttl=1),
        a.bus.get("k"),
        a.bus.take("k"),
        a.bus.set_if_absent("k", b"v", ttl=1),
        a.bus.compare_and_set("k", None, b"v", ttl=1),
        a.bus.incr("k", ttl=1),
        a.bus.delete("k"),
    ):
        with pytest.raises(Unavailable):
            await call
    redis_proc.start()
    await a.bus.ping()  # commands work again without any action from the caller


async def test_start_fails_fast_when_unreachable() -> None:
    bus = RedisBus(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(Unavailable) as info:
        await bus.start(Recorder())
    assert info.value.code == "bus_unavailable"
    await bus.close()


async def test_namespaces_do_not_see_each_other(
    redis_proc: RedisProcess, connect: Callable[..., Awaitable[Node]]
) -> None:
    a = await connect(redis_proc.url + "?namespace=one")
    b = await connect(redis_proc.url + "?namespace=two")
    await a.bus.set("k", b"1", ttl=30)
    assert await b.bus.get("k") is None
    await a.bus.seed_sequence("c", 0)
    assert await b.bus.publish_sequenced("t", "c", b"x") is None
    await b.bus.subscribe("t")
    await a.bus.subscribe("t")
    await a.bus.publish("t", b"x")
    await a.received.wait_count("t", 1)
    await b.bus.publish("t", b"y")
    await b.received.wait_count("t", 1)
    assert b.received.on("t") == [(0, b"y")]


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:6379", "redis://127.0.0.1:6379/0?nope=1", "redis://127.0.0.1/0?namespace=a:b",
     "redis://127.0.0.1/0?protocol=3"],
)
def test_url_is_checked(url: str) -> None:
    with pytest.raises(ValueError):
        RedisBus(url)


def test_password_is_not_echoed() -> None:
    bus = RedisBus("redis://:s3cret@127.0.0.1:1/0?namespace=x&socket_timeout=1")
    assert "s3cret" not in bus.location


async def test_a_hung_redis_times_out_then_recovers(redis_proc: RedisProcess) -> None:
    bus = RedisBus(redis_proc.url, reconnect_max_delay=0.1, command_timeout=0.3, health_interval=0.2)
    node = Node(bus, Recorder(), [])
    await bus.start(node.received, lambda: node.reconnects.append(time.monotonic()))
    try:
        await bus.subscribe("t")
        redis_proc.pause()
        started = time.monotonic()
        with pytest.raises(Unavailable):
            await bus.get("k")
        assert time.monotonic() - started < 2
        # The silent pub/sub connection is dropped too (PING unanswered) and made again on resume.
        await asyncio.sleep(0.8)
        redis_proc.resume()
        await wait_until(lambda: len(node.reconnects) >= 1)
        await bus.publish("t", b"back")
        await node.received.wait_count("t", 1)
    finally:
        redis_proc.resume()
        await bus.close()


@pytest.fixture
async def sender_and_reader(redis_proc: RedisProcess) -> AsyncIterator[tuple[RedisBus, Recorder]]:
    """A bus that sends on channel ``one`` (counter seeded) and the messages another bus receives."""
    namespace = f"t{uuid.uuid4().hex[:12]}"
    sender, reader, received = RedisBus(f"{redis_proc.url}?namespace={namespace}"), RedisBus(
        f"{redis_proc.url}?namespace={namespace}"), Recorder()
    await sender.start(Recorder())
    await reader.start(received)
    try:
        await reader.subscribe("c:one")
        await sender.seed_sequence("seq:one", 0)
        yield sender, received
    finally:
        await sender.close()
        await reader.close()


async def send_on_one(bus: RedisBus, claim: str) -> int | bytes | None:
    return await bus.claim_and_publish(claim, b"p", 30, "c:one", "seq:one", b"m", in_flight="inflight:one:s")


async def call_counts(bus: RedisBus) -> tuple[int, int]:
    """Script runs and PUBLISH calls Redis has served so far."""
    info = (await bus._call("INFO", "commandstats")).decode()
    calls = {line.split(":")[0]: int(line.split("calls=")[1].split(",")[0])
             for line in info.splitlines() if line.startswith("cmdstat_")}
    return calls.get("cmdstat_evalsha", 0), calls.get("cmdstat_publish", 0)


async def test_sends_of_one_turn_on_one_channel_are_one_call_and_one_message(
    sender_and_reader: tuple[RedisBus, Recorder]
) -> None:
    """Efficiency: 50 concurrent sends on one channel cost Redis one script run and one pub/sub
    message, not 50 of each (the readers still get 50 messages)."""
    sender, received = sender_and_reader
    await send_on_one(sender, "cid:one:s:first")  # loads it
    evalsha_before, publish_before = await call_counts(sender)
    await asyncio.gather(*(send_on_one(sender, f"cid:one:s:{i}") for i in range(50)))
    evalsha_after, publish_after = await call_counts(sender)
    await received.wait_count("c:one", 51)
    assert evalsha_after - evalsha_before == 1
    assert publish_after - publish_before == 1
    assert [seq for seq, _ in received.on("c:one")] == list(range(1, 52))


async def test_sends_that_come_while_a_round_is_on_its_way_go_together(
    redis_proc: RedisProcess, sender_and_reader: tuple[RedisBus, Recorder]
) -> None:
    """Efficiency under load: while a process's sends wait for Redis, the sends of the next event-loop
    turns wait for them and then go as one script run and one pub/sub message, in order."""
    sender, received = sender_and_reader
    await send_on_one(sender, "cid:one:s:first")  # loads it
    before, _ = await call_counts(sender)
    redis_proc.pause()  # the first round stays on its way
    try:
        sends = [asyncio.create_task(send_on_one(sender, "cid:one:s:0"))]
        for i in range(1, 6):
            for _ in range(3):
                await asyncio.sleep(0)  # each in a later event-loop turn
            sends.append(asyncio.create_task(send_on_one(sender, f"cid:one:s:{i}")))
        await asyncio.sleep(0.1)
    finally:
        redis_proc.resume()
    assert await asyncio.gather(*sends) == [2, 3, 4, 5, 6, 7]
    after, _ = await call_counts(sender)
    assert after - before == 2
    await received.wait_count("c:one", 7)
    assert [seq for seq, _ in received.on("c:one")] == list(range(1, 8))
