"""The Redis Cluster bus beyond the contract suite: its key layout, its URL, and a master lost mid-stream.

The contract suite runs on a 3-master cluster too (``bus_backend`` "redis-cluster")."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentchat.bus import bus_from_url
from agentchat.bus import keys as bus_keys
from agentchat.bus.redis import RedisBus
from agentchat.bus.redis_cluster import RedisClusterBus, tagged
from agentchat.errors import AgentChatError
from tests.contract.conftest import Recorder
from tests.services import RedisCluster, RedisProcess


def test_a_channel_s_names_share_one_hash_tag() -> None:
    channel = "ch_abc"
    names = [tagged(bus_keys.channel_messages(channel)), tagged(bus_keys.channel_events(channel)),
             tagged(bus_keys.sequence_counter(channel)), tagged(bus_keys.send_claim(channel, "did:x", "c1")),
             tagged(bus_keys.wal_index(channel)), tagged(bus_keys.indicator_counter(channel)),
             tagged(bus_keys.membership_version(channel))]
    assert all("{ch_abc}" in name for name in names)
    assert tagged(bus_keys.send_claim(channel, "did:x", "c1")) == "cid:{ch_abc}:did:x:c1"
    assert tagged(bus_keys.heartbeat("p1")) == "proc:p1"  # no channel: hashed as a whole


def test_cluster_url() -> None:
    bus = bus_from_url("redis+cluster://127.0.0.1:7000,127.0.0.1:7001/?namespace=prod")
    assert isinstance(bus, RedisClusterBus)
    assert bus.location == "redis+cluster://127.0.0.1:7000,127.0.0.1:7001/"
    for bad in ("redis+cluster://127.0.0.1/", "redis+cluster://127.0.0.1:7000/3"):
        with pytest.raises(ValueError):
            bus_from_url(bad)


async def test_single_redis_keeps_its_key_strings(redis_server: RedisProcess) -> None:
    """Stored layout: a counter written by a single-Redis bus before the cluster existed still counts."""
    namespace = f"t{uuid.uuid4().hex[:12]}"
    bus = RedisBus(f"{redis_server.url}?namespace={namespace}")
    await bus.start(Recorder())
    try:
        await bus._call("SET", f"{namespace}:seq:seq:ch_old", "41")  # as today's code stores it
        assert await bus.publish_sequenced("c:ch_old", "seq:ch_old", b"x") == 42
        await bus.set("cid:ch_old:a:1", b"v", 30)
        assert await bus._call("GET", f"{namespace}:kv:cid:ch_old:a:1") == b"v"
    finally:
        await bus.close()


@pytest.mark.slow
async def test_a_channel_s_topic_counter_and_claim_must_be_one_channel(redis_cluster: RedisCluster) -> None:
    bus = RedisClusterBus(f"{redis_cluster.url}?namespace=t{uuid.uuid4().hex[:12]}")
    await bus.start(Recorder())
    try:
        await bus.seed_sequence("seq:ch_a", 0)
        with pytest.raises(ValueError):  # would publish on ch_a's shard what ch_b's readers wait for
            await bus.publish_sequenced("c:ch_b", "seq:ch_a", b"x")
        # set_many / index_add across channels: one script per slot, every item applied
        await bus.set_many([(f"ind:ch_{i}", b"v") for i in range(20)], 30)
        assert [await bus.get(f"ind:ch_{i}") for i in range(20)] == [b"v"] * 20
        await bus.index_add([(f"wal:ch_{i}", "obj", i) for i in range(20)])
        assert [await bus.index_range(f"wal:ch_{i}", 0) for i in range(3)] == [[("obj", i)] for i in range(3)]
    finally:
        await bus.close()


@pytest.mark.slow
async def test_a_stale_slot_map_follows_the_moved_answer(redis_cluster: RedisCluster) -> None:
    """After a resharding or a failover the bus may ask the wrong master: it is told MOVED (the
    command did not run), reads the slot map again and asks the right one, instead of failing."""
    bus = RedisClusterBus(f"{redis_cluster.url}?namespace=t{uuid.uuid4().hex[:12]}")
    await bus.start(Recorder())
    try:
        await bus.set("proc:p1", b"alive", 30)
        await bus.seed_sequence("seq:ch_m", 0)
        router = bus._cluster
        right = router.owner(bus._value_name("proc:p1"))
        wrong = next(address for address in router.masters() if address != right)
        router._slots = [wrong] * len(router._slots)  # as if every slot had moved there
        assert await bus.get("proc:p1") == b"alive"
        router._slots = [wrong] * len(router._slots)
        assert await bus.publish_sequenced("c:ch_m", "seq:ch_m", b"x") == 1
    finally:
        await bus.close()


@pytest.fixture
def replicated_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    cluster = RedisCluster(tmp_path / "cluster", masters=3, replicas=1)
    yield cluster
    cluster.stop()


@pytest.mark.slow
async def test_a_promoted_replica_with_an_older_counter_hands_out_no_number_twice(
    replicated_cluster: RedisCluster,
) -> None:
    """Acknowledged numbers are "stored" (a list here) as the hub does before it acks. The replica of
    the channel's master is frozen and cut off, so the master hands out numbers the replica never sees;
    then the master dies and the replica is promoted holding an older counter that still exists."""
    cluster = replicated_cluster
    channel = "ch_failover"
    topic, counter = bus_keys.channel_messages(channel), bus_keys.sequence_counter(channel)
    url = f"{cluster.url}?namespace=t{uuid.uuid4().hex[:12]}"
    sender, reader = RedisClusterBus(url, reconnect_max_delay=0.2), RedisClusterBus(url, reconnect_max_delay=0.2)
    received, reconnects = Recorder(), []
    await sender.start(Recorder())
    await reader.start(received, lambda: reconnects.append(time.monotonic()))
    stored: list[int] = []

    async def send(i: int) -> None:
        """Send until acknowledged, re-seeding from the store when the bus disowns the counter."""
        deadline = time.monotonic() + 60
        while True:
            try:
                outcome = await sender.claim_and_publish(bus_keys.send_claim(channel, "s", f"k{i}"), b"p", 30,
                                                         topic, counter, f"m{i}".encode(),
                                                         in_flight=bus_keys.in_flight(channel, "s"))
                if outcome is None:
                    await sender.seed_sequence(counter, max(stored, default=0))
                    continue
                assert isinstance(outcome, int), "a fresh client id is never claimed already"
                stored.append(outcome)
                return
            except AgentChatError:
                assert time.monotonic() < deadline, "the cluster did not come back"
                await asyncio.sleep(0.1)

    try:
        await reader.subscribe(topic)
        await sender.seed_sequence(counter, 0)
        for i in range(20):
            await send(i)
        master = cluster.master_of(f"{{{channel}}}")
        replica = cluster.replica_of(master)
        cluster.wait_ok()
        replica.pause()  # from here the replica sees nothing the master hands out:
        cluster.command(master, "CLIENT", "KILL", "TYPE", "replica")  # nor what is in flight
        for i in range(20, 40):
            await send(i)
        master.kill()
        replica.resume()  # it is elected after the node timeout, with the counter at 20
        for i in range(40, 80):
            await send(i)
        assert len(stored) == len(set(stored)) == 80, "no number handed out twice"
        assert stored == sorted(stored)
        await received.wait_for(lambda: bool(reconnects), timeout=30)
        # After the reader resubscribed on the new master, every message reaches it again.
        later = []
        for i in range(80, 90):
            await send(i)
            later.append(stored[-1])
        await received.wait_for(lambda: {seq for seq, _ in received.on(topic)} >= set(later), timeout=30)
        seqs = [seq for seq, _ in received.on(topic)]
        assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))
    finally:
        await sender.close()
        await reader.close()
