"""Retention on both stores: the owner sets it within the server's maximum, the compactor's expiry pass
deletes the segments whose messages all expired (counted with the other storage requests), and
history and resume say where the kept messages start instead of leaving a silent gap."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from agentchat import crypto
from agentchat.client import Agent
from agentchat.client.agent import AgentChatClientError
from agentchat.config import load_settings
from agentchat.server.app import build_app
from agentchat.server.appkeys import METRICS, STORE, WRITER
from agentchat.store import keys
from tests.lifecycle.conftest import StoreUrlMaker
from tests.lifecycle.test_deletion import fails_with, next_event, url_of


async def history_page(client: Any, agent: Agent, channel: str, after: int = 0) -> dict[str, Any]:
    response = await client.get(f"/api/v1/channels/{channel}/messages", params={"after": after},
                                headers={"Authorization": f"Bearer {await agent.token()}"})
    assert response.status == 200
    return await response.json()


async def test_expired_segments_go_and_readers_are_told(empty_store_url: StoreUrlMaker, aiohttp_client: Any) -> None:
    settings = load_settings(env={}, store=empty_store_url(), token_secret="t" * 40, retention_max_seconds=3600)
    client = await aiohttp_client(build_app(settings))
    app = client.server.app
    server = url_of(client)
    alice, bob = Agent(server, crypto.AgentKeys.generate()), Agent(server, crypto.AgentKeys.generate())
    late = Agent(server, bob.keys, include_own=True)
    try:
        await alice.register("alice")
        await bob.register("bob")
        channel = await alice.create_channel([bob.did])
        assert (await bob.retention(channel))["effective_seconds"] == 3600  # no default: the maximum caps it
        await fails_with("forbidden", bob.set_retention(channel, 60))
        await fails_with("invalid_field", alice.set_retention(channel, 7200))  # over the server's maximum
        view = await alice.set_retention(channel, 3)
        assert (view["retention_seconds"], view["effective_seconds"], view["first_available"]) == (3, 3, 1)

        old = [await alice.send(channel, f"old {i}") for i in range(5)]
        await app[WRITER].compact([channel])
        await asyncio.sleep(3.2)
        kept = [await alice.send(channel, f"kept {i}") for i in range(3)]
        await app[WRITER].compact([channel])
        assert len(await app[STORE].list(keys.segment_prefix(channel))) == 2
        await bob.connect()

        deletes = app[METRICS].store_ops["delete"]
        writer = app[WRITER]
        assert writer.retention is not None
        assert await writer.retention.expire_all(writer) == 1
        assert app[METRICS].store_ops["delete"] == deletes + 1  # one batched request, counted
        assert len(await app[STORE].list(keys.segment_prefix(channel))) == 1
        event = await next_event(bob, "expired")
        assert event["first_available"] == old[-1] + 1

        page = await history_page(client, bob, channel)
        assert [m["seq"] for m in page["messages"]] == kept
        assert page["first_available"] == old[-1] + 1 > 0 + 1  # after=0: the gap is expiry, said so
        assert (await alice.retention(channel))["first_available"] == old[-1] + 1

        # A socket resuming from the start is told before it gets what is kept.
        late._last_seq[channel] = 0
        await late.connect()
        told = await next_event(late, "expired")
        assert told["first_available"] == old[-1] + 1
        assert [(await late.next_message(5)).seq for _ in kept] == kept

        await alice.set_retention(channel, None)
        assert (await alice.retention(channel))["retention_seconds"] is None
        assert await writer.retention.expire_all(writer) == 0  # back to the server's 3600 s
        assert await app[STORE].list(keys.RETENTION_INDEX_PREFIX) == []
    finally:
        for agent in (alice, bob, late):
            await agent.close()


async def test_the_compactor_runs_the_server_default(empty_store_url: StoreUrlMaker, aiohttp_client: Any) -> None:
    settings = load_settings(env={}, store=empty_store_url(), token_secret="t" * 40,
                             retention_default_seconds=1, retention_check_seconds=0.3)
    client = await aiohttp_client(build_app(settings))
    app = client.server.app
    alice = Agent(url_of(client), crypto.AgentKeys.generate())
    try:
        await alice.register("alice")
        channel = await alice.create_channel([])
        assert (await alice.retention(channel))["effective_seconds"] == 1
        sent = [await alice.send(channel, f"m {i}") for i in range(3)]
        await app[WRITER].compact([channel])
        deadline = time.monotonic() + 15
        while (await alice.retention(channel))["first_available"] != sent[-1] + 1:
            assert time.monotonic() < deadline, "the compactor did not expire the channel's segment"
            await asyncio.sleep(0.2)
        assert await alice.history(channel) == []
        assert await app[STORE].list(keys.segment_prefix(channel)) == []
    finally:
        await alice.close()
    # A clean restart with every stored message expired: numbering goes on above the expired ones.
    await client.close()
    client = await aiohttp_client(build_app(settings))
    alice = Agent(url_of(client), alice.keys)
    try:
        await alice.login()
        assert await alice.send(channel, "after the restart") > sent[-1]
    finally:
        await alice.close()


def test_retention_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        load_settings(env={"AGENTCHAT_RETENTION_DEFAULT_SECONDS": "-1"})
    assert load_settings(env={"AGENTCHAT_RETENTION_MAX_SECONDS": "86400"}).retention_max_seconds == 86400
