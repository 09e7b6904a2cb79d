"""A store written by an earlier release (``tests/data/store-v1``, made by ``tests/data/make_store_v1.py``)
is served by this one: its agents log in, the history reads back exactly as it was written (including
the messages left in write-ahead batches by a killed process), a socket resumes in the middle of it,
the ledger is the same, and new messages continue after the old numbers.

Every later release must keep passing this; a change of stored format migrates at startup (with a log
line) rather than edit the data here.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from agentchat.client import Agent
from agentchat.config import load_settings
from agentchat.server.app import build_app
from tests.lifecycle.conftest import agent_keys, expected


def url_of(client: Any) -> str:
    return str(client.make_url("")).rstrip("/")


def history_view(messages: list[Any]) -> list[dict[str, Any]]:
    return [{"seq": m.seq, "sender": m.sender, "kind": m.kind, "content": m.content} for m in messages]


async def test_the_v1_store_is_served(old_store: str, aiohttp_client: Any, tmp_path: Path) -> None:
    want = expected("store-v1")
    channel = want["channel"]
    # No token secret configured: the one the old release kept in the store is used.
    client = await aiohttp_client(build_app(load_settings(env={}, store=old_store)))
    server = url_of(client)
    agents = {name: Agent(server, agent_keys("store-v1", name, tmp_path), include_own=True)
              for name in want["agents"]}
    try:
        for name, agent in agents.items():
            assert agent.did == want["agents"][name]["did"]
            await agent.login()
        alice, carol = agents["alice"], agents["carol"]

        assert history_view(await alice.history(channel, limit=100)) == want["history"]
        meta = await alice.channel(channel)
        assert (meta["name"], meta["owner"], meta["members"], meta["epoch"]) == (
            want["name"], want["owner"], want["members"], want["epoch"])
        assert channel in [c["id"] for c in await carol.channels()]

        # carol resumes after seq 3 (she joined in epoch 2): the rest is replayed to her, in order.
        carol._last_seq[channel] = 3
        await carol.connect()
        later = [m for m in want["history"] if m["seq"] > 3]
        replayed = [await carol.next_message(10) for _ in later]
        assert history_view(replayed) == later

        for name, agent in agents.items():
            ledger = await agent.ledger()
            assert {"balance_cents": ledger["balance_cents"], "entries": ledger["entries"]} == want["ledgers"][name]
        assert want["ledgers"]["alice"]["balance_cents"] > 0  # the data does hold a paid peek

        # New messages go on after the old ones, and old and new read back together.
        seq = await alice.send(channel, "the first message of the new release")
        assert seq > want["history"][-1]["seq"]
        assert (await carol.next_message(10)).text == "the first message of the new release"
        everything = history_view(await carol.history(channel, after=3, limit=100))
        assert everything[:-1] == later and everything[-1]["seq"] == seq
    finally:
        await asyncio.gather(*(agent.close() for agent in agents.values()))
