"""Peeks with the SDK on both sides, against aiohttp's test server: agents' clients grant the key and
rotate the epoch by themselves, the peeker decrypts what they say, and the server never holds a key."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from agentchat import crypto
from agentchat.client import Agent
from agentchat.client.agent import AgentChatClientError
from agentchat.client.peeker import PeekEvent, Peeker
from agentchat.config import Settings, load_settings
from agentchat.server.appkeys import PEEKS
from tests.server.test_peeks import check_ledger


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(env={}, store=f"file://{tmp_path}/data", token_secret="t" * 40,
                         peek_refusal_window_seconds=1.0, peek_duration_seconds=2.0, peek_scan_seconds=0.2)


def server_url(client: Any) -> str:
    return str(client.make_url("")).rstrip("/")


async def next_event(peeker: Peeker, events: Any, kind: str, timeout: float = 10.0) -> PeekEvent:
    async def find() -> PeekEvent:
        async for event in events:
            if event.kind == kind:
                return event
            assert event.kind != "closed", f"closed ({event.reason}) while waiting for {kind}"
        raise AssertionError("no more events")
    return await asyncio.wait_for(find(), timeout)


async def wait_for(condition: Any, timeout: float = 10.0) -> None:
    async def poll() -> None:
        while not await condition():
            await asyncio.sleep(0.05)
    await asyncio.wait_for(poll(), timeout)


async def test_peeker_decrypts_history_and_live_then_is_cut_off_and_the_epoch_rotates(
        client: Any, sdk_agents: Any, tmp_path: Path) -> None:
    alice, bob = await sdk_agents("alice"), await sdk_agents("bob")
    channel = await alice.create_channel([bob.did], name="pair")
    await alice.connect()
    await bob.connect()
    await bob.channel(channel)  # a member once its invitation is accepted (by its policy)
    secrets_said = ["before-the-peek-1f3a", "during-the-peek-7c2e", "after-the-peek-9d41"]
    await alice.send(channel, secrets_said[0])

    async with Peeker(server_url(client)) as peeker:
        view = await peeker.open(channel)
        await peeker.connect()
        events = peeker.events()
        assert (await next_event(peeker, events, "state")).peek["state"] == "awaiting_payment"
        await peeker.confirm()
        request = await asyncio.wait_for(bob.events.get(), 5)
        while request["type"] != "peek_request":  # the invitation and 'added' came first
            request = await asyncio.wait_for(bob.events.get(), 5)
        assert request["peek"] == view["id"]
        assert request["peeker_public_key"] == peeker.public_key
        assert (await next_event(peeker, events, "tick")).seconds_left == 1

        grant = await next_event(peeker, events, "grant")
        assert grant.epoch == 1
        history = await next_event(peeker, events, "message")
        assert history.message is not None and history.message.text == secrets_said[0]
        assert history.message.sender == alice.did
        await bob.send(channel, secrets_said[1])
        live = await next_event(peeker, events, "message")
        assert live.message is not None and (live.message.text, live.message.sender) == (secrets_said[1], bob.did)

        closed = await next_event(peeker, events, "closed")
        assert closed.reason == "peek_ended"
        assert set(peeker.epoch_keys) == {1}

    # Both members saw the end; one of them started epoch 2, for the members only.
    async def rotated() -> bool:
        return (await alice.channel(channel))["epoch"] == 2
    await wait_for(rotated)
    await alice.send(channel, secrets_said[2])
    assert [(await bob.next_message(5)).text for _ in range(2)] == [secrets_said[0], secrets_said[2]]
    epoch_keys = [await alice.epoch_key(channel, 1), await alice.epoch_key(channel, 2)]

    # The server's data: no plaintext, no epoch key, only what it may hold.
    await check_ledger(client.server.app, lambda l: l.transaction(f"capture/{view['id']}"))
    checked = 0
    for path in (tmp_path / "data").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            checked += 1
            for text in secrets_said:
                assert text.encode() not in data, f"plaintext in {path}"
            for key in epoch_keys:
                assert key not in data and crypto.b64e(key).encode() not in data, f"an epoch key in {path}"
    assert checked > 10


async def test_policies_refuse_automatically_or_decide_per_request(client: Any, sdk_agents: Any) -> None:
    alice = await sdk_agents("alice")
    careful = Agent(server_url(client), crypto.AgentKeys.generate(), peek_policy=False)
    await careful.register("careful")
    seen: list[dict[str, Any]] = []

    async def decide(request: dict[str, Any]) -> bool:
        seen.append(request)
        return True

    chooser = Agent(server_url(client), crypto.AgentKeys.generate(), peek_policy=decide)
    await chooser.register("chooser")
    try:
        # careful has no earnings: it needs a card on file to pay for refusing.
        setup = await careful.start_card()
        assert (await careful.confirm_card(setup["setup"]))["label"] == "dev card"
        channel = await alice.create_channel([careful.did, chooser.did])
        for agent in (alice, careful, chooser):
            await agent.connect()
        async with Peeker(server_url(client)) as peeker:
            await peeker.open(channel)
            await peeker.connect()
            await peeker.confirm()
            states = []
            async for event in peeker.events():
                if event.kind == "state":
                    states.append(event.peek["state"])
                if event.kind == "closed":
                    assert event.reason == "peek_refused"
                    break
            assert states[-1] == "refused"
            assert (await peeker.state())["refused_by"] == careful.did
        assert [r["channel"] for r in seen] == [channel]
        ledger = await check_ledger(client.server.app, lambda l: len(l) == 2)
        assert ledger.balance("platform") == 100 and ledger.balance(f"agent:{careful.did}") == 0
    finally:
        await careful.close()
        await chooser.close()


async def test_an_sdk_refusal_with_no_money_still_stops_the_peek_and_past_the_limit_it_does_not_start(
        client: Any, sdk_agents: Any) -> None:
    """An agent with no earnings and no card refuses: the fee becomes a debt and the peek is refused.
    At the debt limit the SDK refuses to start refusing and says how to fund it."""
    alice = await sdk_agents("alice")
    keys = crypto.AgentKeys.generate()
    broke = Agent(server_url(client), keys, peek_policy=False)
    await broke.register("broke")
    try:
        channel = await alice.create_channel([broke.did])
        funding = await broke.refusal_funding()
        assert funding["funded"] and funding["refusals_as_debt"] == 3 and "debt" in funding["message"]
        await broke.connect()  # funded (as a debt): sets the standing choice
        assert (await broke.refusal_funding())["choice"] == "refuse"
        await alice.connect()
        async with Peeker(server_url(client)) as peeker:
            await peeker.open(channel)
            await peeker.confirm()

            async def refused() -> bool:
                return (await peeker.state())["state"] == "refused"
            await wait_for(refused)

        async def in_debt() -> bool:  # the fee follows the refusal into the ledger
            return (await broke.ledger())["balance_cents"] == -100
        await wait_for(in_debt)
    finally:
        await broke.close()
    service = client.server.app[PEEKS]
    service.refusals.settings = dataclasses.replace(service.settings, refusal_debt_limit_cents=100)
    again = Agent(server_url(client), keys, peek_policy=False)
    try:
        with pytest.raises(AgentChatClientError) as caught:
            await again.connect()
        assert caught.value.code == "refusal_unfunded" and "agentchat card" in caught.value.message
    finally:
        await again.close()
