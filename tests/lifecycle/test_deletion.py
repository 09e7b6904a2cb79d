"""Deleting a channel and an account, on both stores: members are told live, the data goes (segments
and write-ahead batches too), the public indicators forget the channel, ledger entries stay, a DID is
never registered again, and every deletion can be repeated."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import Any

import pytest

from agentchat import crypto
from agentchat.client import Agent
from agentchat.client.agent import AgentChatClientError
from agentchat.config import load_settings
from agentchat.server.app import build_app
from agentchat.server.appkeys import STORE, WRITER
from agentchat.store import keys
from agentchat.store.messages import decode_wal
from agentchat.store.transfer import list_all
from tests.lifecycle.conftest import StoreUrlMaker, agent_keys, expected
from tests.services import redis_server  # noqa: F401  (fixture)


def url_of(client: Any) -> str:
    return str(client.make_url("")).rstrip("/")


async def fails_with(code: str, call: Any) -> None:
    with pytest.raises(AgentChatClientError) as raised:
        await call
    assert raised.value.code == code


async def next_event(agent: Agent, event: str, timeout: float = 5.0) -> dict[str, Any]:
    async def find() -> dict[str, Any]:
        while True:
            frame = await agent.events.get()
            if frame.get("event") == event:
                return frame
    return await asyncio.wait_for(find(), timeout)


async def traces_of(store: Any, channel: str) -> list[str]:
    """Every object that still holds something of ``channel`` (a key naming it, or a write-ahead
    batch with a section of it)."""
    found = []
    async for key in list_all(store):
        if channel in key and key != keys.channel_tombstone(channel):
            found.append(key)
        elif key.startswith(keys.WAL_PREFIX):
            obj = await store.get(key)
            if obj is not None and channel in decode_wal(obj.data):
                found.append(key)
    return found


async def test_the_owner_deletes_a_channel(empty_store_url: StoreUrlMaker, aiohttp_client: Any) -> None:
    client = await aiohttp_client(build_app(load_settings(env={}, store=empty_store_url(), token_secret="t" * 40)))
    app, server = client.server.app, url_of(client)
    alice, bob = Agent(server, crypto.AgentKeys.generate()), Agent(server, crypto.AgentKeys.generate())
    try:
        await alice.register("alice")
        await bob.register("bob")
        channel = await alice.create_channel([bob.did], name="doomed")
        other = await alice.create_channel([bob.did], name="stays")
        for i in range(5):
            await alice.send(channel, f"compacted {i}")
        await app[WRITER].compact([channel])  # these are in a segment now
        for i in range(3):
            await bob.send(channel, f"in a batch {i}")
            await bob.send(other, f"next door {i}")  # the same write-ahead batches hold the other channel
        store = app[STORE]
        assert await store.list(keys.segment_prefix(channel))
        assert await traces_of(store, channel)
        assert (await client.get(f"/api/v1/indicators/{channel}")).status == 200
        await bob.connect()

        await fails_with("forbidden", bob.delete_channel(channel))
        answer = await alice.delete_channel(channel)
        assert answer["deleted"] is True and answer["channel"] == channel
        assert (await next_event(bob, "deleted"))["channel"] == channel

        await fails_with("channel_not_found", bob.history(channel))
        await fails_with("channel_not_found", alice.channel(channel))
        await fails_with("channel_not_found", alice.send(channel, "too late"))
        assert channel not in [c["id"] for c in await bob.channels()]
        assert (await client.get(f"/api/v1/indicators/{channel}")).status == 404
        listed = await (await client.get("/api/v1/indicators")).json()
        assert channel not in [item["channel"] for item in listed["channels"]]
        assert await traces_of(store, channel) == []
        # The channel next door is untouched, its batches included.
        assert [m.text for m in await alice.history(other)] == [f"next door {i}" for i in range(3)]

        again = await alice.delete_channel(channel)  # idempotent
        assert again == answer
        await fails_with("channel_not_found", bob.delete_channel(channel))
    finally:
        await alice.close()
        await bob.close()


async def test_deleting_a_channel_keeps_its_ledger(old_store: str, aiohttp_client: Any, tmp_path: Path) -> None:
    want = expected("store-v1")
    client = await aiohttp_client(build_app(load_settings(env={}, store=old_store)))
    alice = Agent(url_of(client), agent_keys("store-v1", "alice", tmp_path))
    try:
        await alice.login()
        await alice.delete_channel(want["channel"])
        ledger = await alice.ledger()
        assert {"balance_cents": ledger["balance_cents"], "entries": ledger["entries"]} == want["ledgers"]["alice"]
        assert await traces_of(client.server.app[STORE], want["channel"]) == [
            key async for key in list_all(client.server.app[STORE]) if key.startswith(("peeks", "ledger"))
            and want["channel"] in key]  # peek records may name it: money is history
    finally:
        await alice.close()


async def test_an_agent_deletes_its_account(empty_store_url: StoreUrlMaker, aiohttp_client: Any) -> None:
    client = await aiohttp_client(build_app(load_settings(env={}, store=empty_store_url(), token_secret="t" * 40)))
    server = url_of(client)
    alice, bob, carol = (Agent(server, crypto.AgentKeys.generate()) for _ in range(3))
    try:
        for name, agent in (("alice", alice), ("bob", bob), ("carol", carol)):
            await agent.register(name)
        shared = await alice.create_channel([bob.did, carol.did])
        owned = await bob.create_channel([carol.did])
        alone = await bob.create_channel([])
        await bob.accept_invitation(shared)  # naming an agent invites it; members are those who accepted
        for channel in (shared, owned):
            await carol.accept_invitation(channel)
        await bob.send(shared, "bob was here")
        await carol.connect()

        answer = await bob.delete_account()
        assert answer["deleted"] is True and answer["did"] == bob.did
        removed = await next_event(carol, "member_removed")
        assert removed["did"] == bob.did
        assert (await alice.channel(shared))["members"] == sorted([alice.did, carol.did])
        meta = await carol.channel(owned)
        assert meta["members"] == [carol.did] and meta["owner"] == carol.did
        await fails_with("channel_not_found", carol.channel(alone))
        await fails_with("agent_not_found", alice.profile(bob.did))
        # What bob said stays in the channels he left (the others read it).
        assert [m.text for m in await alice.history(shared)] == ["bob was here"]

        again = await bob.delete_account()  # idempotent
        assert again == answer
        comeback = Agent(server, bob.keys)
        await fails_with("agent_deleted", comeback.register("bob again"))
        await fails_with("agent_deleted", comeback.login())
        await comeback.close()
        await fails_with("agent_not_found", bob.create_channel([]))  # an old token makes nothing
    finally:
        for agent in (alice, bob, carol):
            await agent.close()


@pytest.mark.parametrize("bus", ["memory", "redis"])
async def test_a_deletion_through_one_process_reaches_the_writer_of_another(
        empty_store_url: StoreUrlMaker, aiohttp_client: Any, bus: str, request: Any) -> None:
    """Process one holds the channel's latest messages, not yet in a segment, when process two deletes
    it: one writes no segment of it, and its write-ahead batches go."""
    name = f"deletion{secrets.token_hex(4)}"
    bus_url = f"memory://{name}" if bus == "memory" else f"{request.getfixturevalue('redis_server').url}?namespace={name}"
    store_url = empty_store_url()

    def settings() -> Any:
        return load_settings(env={}, store=store_url, bus=bus_url, token_secret="t" * 40)
    one, two = await aiohttp_client(build_app(settings())), await aiohttp_client(build_app(settings()))
    alice = Agent(url_of(one), crypto.AgentKeys.generate())
    alice_on_two = Agent(url_of(two), alice.keys)
    try:
        await alice.register("alice")
        channel = await alice.create_channel([])
        for i in range(4):
            await alice.send(channel, f"held by process one {i}")
        writer = one.server.app[WRITER]
        assert writer.holds(channel)
        await alice_on_two.login()
        await alice_on_two.delete_channel(channel)

        async def forgotten() -> None:
            while writer.holds(channel):
                await asyncio.sleep(0.02)
        await asyncio.wait_for(forgotten(), 10)
        await writer.compact([channel])
        assert await traces_of(one.server.app[STORE], channel) == []
    finally:
        await alice.close()
        await alice_on_two.close()
