"""Membership through Redis faults, on the cluster harness of test_cluster_e2e: a removal is enforced
by every process within seconds of the bus being back, whatever was down when it was made."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from agentchat.bus.redis import RedisBus
from agentchat.client import Agent, AgentChatClientError
from agentchat.server.membership import membership_counter, version_of
from agentchat.store import store_from_url
from agentchat.store.records import Records
from tests.e2e.test_cluster_e2e import cluster_factory, redis, s3, send_until_acked  # noqa: F401 (fixtures)
from tests.services import RedisProcess, S3Server

pytestmark = pytest.mark.slow


async def _cut_off(bob: Agent, channel: str, timeout: float) -> float:
    """Seconds until bob's process refuses him the channel's history, his sends and a resume."""
    started = time.monotonic()
    while True:
        try:
            await bob.history(channel)
        except AgentChatClientError as exc:
            assert exc.code == "not_member"
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, "the removed member can still read"
        await asyncio.sleep(0.05)


async def _assert_fully_cut_off(alice: Agent, bob: Agent, channel: str) -> None:
    with pytest.raises(AgentChatClientError) as refused:
        await bob._request("POST", f"/api/v1/channels/{channel}/messages", {"client_id": "x", "envelope": {
            "v": 1, "epoch": 1, "nonce": "AAAAAAAAAAAAAAAA", "ciphertext": "AAAAAAAAAAAAAAAAAAAAAA==",
            "signature": "A" * 86}})
    assert refused.value.code in ("not_member", "invalid_field")
    await alice.send(channel, "after the removal")
    live: list[Any] = []
    try:
        while True:
            live.append(await bob.next_message(1.0))
    except asyncio.TimeoutError:
        pass
    assert [m.text for m in live if m.text == "after the removal"] == [], "delivered live to a removed member"


async def test_a_removal_during_a_redis_blip_is_enforced_everywhere_once_retried(cluster_factory,
                                                                                redis: RedisProcess) -> None:
    cluster = cluster_factory(3)
    alice, bob, carol = (await cluster.agent(0, name="alice"), await cluster.agent(1, name="bob"),
                         await cluster.agent(2, name="carol"))
    channel = await alice.create_channel([bob.did, carol.did])
    for agent in (bob, carol):
        await agent.connect()
    await send_until_acked(alice, channel, "before", "before")
    assert (await bob.next_message(10)).text == "before"
    redis.stop()
    with pytest.raises(AgentChatClientError) as first:
        await alice._request("DELETE", f"/api/v1/channels/{channel}/members/{bob.did}")
    assert first.value.retryable, first.value.code
    redis.start()
    back = time.monotonic()
    # The owner's client retries what it could not be sure of: the retry succeeds (not not_member),
    # and its rotation gives the channel an epoch bob has no key for.
    deadline = time.monotonic() + 20
    while True:
        try:
            meta = await alice.remove_member(channel, bob.did)
            break
        except AgentChatClientError as exc:
            assert exc.retryable and time.monotonic() < deadline, exc.code
            await asyncio.sleep(0.2)
    assert bob.did not in meta["members"] and meta["epoch"] == 2
    took = time.monotonic() - back + await _cut_off(bob, channel, 10)
    print(f"\nremoved member cut off {took:.2f} s after redis-server was back")
    await _assert_fully_cut_off(alice, bob, channel)
    texts = [(await carol.next_message(10)).text for _ in range(2)]
    assert texts == ["before", "after the removal"], "the members who stay go on reading"


async def test_a_stored_removal_the_bus_never_heard_of_is_enforced_after_a_redis_restart(
        cluster_factory, redis: RedisProcess, s3: S3Server) -> None:
    """The store took the removal; the bus lost the intent and the event (Redis restarted without
    persistence) and the process that wrote it is gone: the others re-read on reconnect."""
    store_url = s3.url(s3.create_bucket())
    cluster = cluster_factory(3, store=store_url)
    alice, bob = await cluster.agent(0, name="alice"), await cluster.agent(1, name="bob")
    channel = await alice.create_channel([bob.did])
    await bob.connect()
    await send_until_acked(alice, channel, "before", "before")
    assert (await bob.next_message(10)).text == "before"
    store = store_from_url(store_url)
    await store.start()
    try:
        def remove(current: dict[str, Any]) -> dict[str, Any]:
            return {**current, "members": [alice.did], "version": version_of(current) + 1}

        await Records(store).update_channel(channel, remove)
    finally:
        await store.close()
    redis.restart()
    back = time.monotonic()
    took = time.monotonic() - back + await _cut_off(bob, channel, 10)
    print(f"\nremoved member cut off {took:.2f} s after redis-server restarted")
    await _assert_fully_cut_off(alice, bob, channel)


async def test_a_stored_removal_whose_writer_died_before_announcing_it_is_enforced(
        cluster_factory, redis: RedisProcess, s3: S3Server) -> None:
    """Intent on the bus and the record in the store, then the writer is gone: no event ever comes."""
    store_url = s3.url(s3.create_bucket())
    cluster = cluster_factory(2, store=store_url)
    alice, bob = await cluster.agent(0, name="alice"), await cluster.agent(1, name="bob")
    channel = await alice.create_channel([bob.did])
    await bob.connect()
    await send_until_acked(alice, channel, "before", "before")
    assert (await bob.next_message(10)).text == "before"
    store = store_from_url(store_url)
    bus = RedisBus.from_url(redis.url)
    await store.start()
    await bus.start(lambda *_: None)
    try:
        def remove(current: dict[str, Any]) -> dict[str, Any]:
            return {**current, "members": [alice.did], "version": version_of(current) + 1}

        async def intent(updated: dict[str, Any]) -> None:
            await bus.seed_sequence(membership_counter(channel), updated["version"])

        await Records(store).update_channel(channel, remove, before_write=intent)
        stored = time.monotonic()
    finally:
        await bus.close()
        await store.close()
    took = time.monotonic() - stored + await _cut_off(bob, channel, 10)
    print(f"\nremoved member cut off {took:.2f} s after the unannounced removal was stored")
    await _assert_fully_cut_off(alice, bob, channel)
