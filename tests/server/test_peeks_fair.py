"""Peeks that are fair to both sides (protocol/peek.md): no charge without a key, the peeker may
withdraw during the countdown, shares fixed when the countdown starts, no peek of a channel nobody is
online to hand over. Dev payments; the ledger is checked after each test."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
from aiohttp import WSMsgType

from agentchat.core import ledger as money
from agentchat.errors import error
from agentchat.server.app import build_app
from agentchat.server.appkeys import PEEKS, RECORDS
from tests.conftest import RestAgent
from tests.server.peek_agents import go_online
from tests.server.test_peeks import (call, check_ledger, fast, frames_of, fund_with_dev_card, grant_now, open_peek,
                                     wait_state)
from tests.server.test_rest import create_channel
from tests.server.test_ws import hello


async def test_a_channel_with_no_agent_online_cannot_be_peeked(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(build_app(fast(tmp_path)))
    alice = await RestAgent(client, "alice").register()
    channel, _ = await create_channel(alice, [])
    response = await client.post("/api/v1/peeks", json={"channel": channel,
                                                         "peeker_public_key": "A" * 42 + "E"})
    body = await response.json()
    assert (response.status, body["error"]["code"]) == (409, "no_agent_online")
    assert "online" in body["error"]["message"]
    online = await go_online(client, alice)
    opened, _ = await open_peek(client, channel)
    assert opened["peek"]["state"] == "awaiting_payment"
    await online.close()


async def test_no_key_in_time_releases_the_hold_and_everyone_is_told(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(build_app(fast(tmp_path, peek_grant_wait_seconds=0.5)))
    alice = await RestAgent(client, "alice").register()
    channel, _ = await create_channel(alice, [])
    silent = await go_online(client, alice, grant=False)  # online, but its client never hands the key over
    opened, auth = await open_peek(client, channel)
    peek_id = opened["peek"]["id"]
    peeker = await hello(client, opened["token"])
    await call(client, "POST", f"/api/v1/peeks/{peek_id}/confirm", auth)
    body = await wait_state(client, peek_id, auth, "no_key")
    assert "key" in body["peek"]["failure_reason"] and "grants" not in body
    states = []
    while not states or states[-1] != "no_key":
        frame = (await frames_of(peeker, 1))[0]
        if frame["type"] == "peek":
            states.append(frame["peek"]["state"])
    assert states[-2:] == ["awaiting_key", "no_key"]
    closing = await peeker.receive(timeout=5)
    assert closing.type == WSMsgType.CLOSE and closing.extra == "peek_no_key"
    for _ in range(50):
        if any(f.get("type") == "peek" and f["peek"]["state"] == "no_key" for f in silent.frames):
            break
        await asyncio.sleep(0.05)
    assert [f["peek"]["state"] for f in silent.frames if f.get("type") == "peek"][-1] == "no_key"
    # A key handed over too late changes nothing and is never given to the peeker.
    late = await grant_now(client, alice, peek_id)
    assert late["type"] == "error" and late["code"] == "peek_state"
    ledger = await check_ledger(client.server.app)
    assert not ledger.transaction(f"capture/{peek_id}") and ledger.balance(money.EXTERNAL) == 0
    await silent.close()


async def test_a_failed_capture_is_never_a_free_read(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(build_app(fast(tmp_path)))
    alice = await RestAgent(client, "alice").register()
    channel, _ = await create_channel(alice, [])
    online = await go_online(client, alice)
    payments = client.server.app[PEEKS].payments

    async def declined(ref: str, *, key: str) -> Any:
        raise error("payment_declined", "the authorisation lapsed")

    payments.capture = declined  # type: ignore[method-assign]
    opened, auth = await open_peek(client, channel)
    peek_id = opened["peek"]["id"]
    peeker = await hello(client, opened["token"])
    await call(client, "POST", f"/api/v1/peeks/{peek_id}/confirm", auth)
    body = await wait_state(client, peek_id, auth, "payment_failed")
    assert online.granted == [peek_id]  # the key was handed over, and kept
    assert "grants" not in body
    seen = []
    while True:
        msg = await peeker.receive(timeout=5)
        if msg.type != WSMsgType.TEXT:
            break
        seen.extend(orjson.loads(line) for line in msg.data.splitlines() if line)
    assert not any(f["type"] == "peek_grant" for f in seen)
    assert [f["peek"]["state"] for f in seen if f["type"] == "peek"][-1] == "payment_failed"
    status, body = await call(client, "GET", f"/api/v1/channels/{channel}/messages", auth)
    assert (status, body["error"]["code"]) == (403, "not_member")
    ledger = await check_ledger(client.server.app)
    assert not ledger.transaction(f"capture/{peek_id}")
    await online.close()


async def test_the_peeker_withdraws_during_the_countdown(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(build_app(fast(tmp_path, peek_refusal_window_seconds=30.0)))
    alice, bob = await RestAgent(client, "alice").register(), await RestAgent(client, "bob").register()
    channel, _ = await create_channel(alice, [bob])
    online = await go_online(client, alice)
    opened, auth = await open_peek(client, channel)
    peek_id = opened["peek"]["id"]
    await call(client, "POST", f"/api/v1/peeks/{peek_id}/confirm", auth)
    status, body = await call(client, "POST", f"/api/v1/peeks/{peek_id}/cancel", auth)
    assert status == 200 and body["peek"]["state"] == "withdrawn", body
    for _ in range(50):
        if any(f.get("type") == "peek" and f["peek"]["state"] == "withdrawn" for f in online.frames):
            break
        await asyncio.sleep(0.05)
    assert [f["type"] for f in online.frames][:1] == ["peek_request"]
    assert online.frames[-1]["peek"]["state"] == "withdrawn"  # the agents are told
    status, body = await call(client, "POST", f"/api/v1/peeks/{peek_id}/refuse", bob.auth)
    assert (status, body["error"]["code"]) == (409, "peek_state")
    ledger = await check_ledger(client.server.app)
    assert len(ledger) == 0  # nobody paid anything
    await online.close()


async def test_a_withdrawal_racing_a_refusal_gives_one_outcome(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(build_app(fast(tmp_path, peek_refusal_window_seconds=30.0)))
    alice = await RestAgent(client, "alice").register()
    channel, _ = await create_channel(alice, [])
    await fund_with_dev_card(alice)
    online = await go_online(client, alice)
    outcomes = set()
    for _ in range(6):
        opened, auth = await open_peek(client, channel)
        peek_id = opened["peek"]["id"]
        await call(client, "POST", f"/api/v1/peeks/{peek_id}/confirm", auth)
        (s1, withdrawn), (s2, refused) = await asyncio.gather(
            call(client, "POST", f"/api/v1/peeks/{peek_id}/cancel", auth),
            call(client, "POST", f"/api/v1/peeks/{peek_id}/refuse", alice.auth))
        assert sorted([s1, s2]) == [200, 409], (withdrawn, refused)
        winner = withdrawn if s1 == 200 else refused
        final = await wait_state(client, peek_id, auth, winner["peek"]["state"])
        outcomes.add(final["peek"]["state"])
        ledger = await check_ledger(client.server.app)
        assert bool(ledger.transaction(f"refusal_fee/{peek_id}")) == (final["peek"]["state"] == "refused")
    assert outcomes <= {"withdrawn", "refused"}
    await online.close()


async def test_shares_are_fixed_when_the_countdown_starts(aiohttp_client: Any, tmp_path: Path) -> None:
    """The owner adds puppets and a member leaves during the countdown: the capture still goes to the
    members of the countdown's start, in equal parts."""
    client = await aiohttp_client(build_app(fast(tmp_path, peek_refusal_window_seconds=1.0)))
    alice, bob = await RestAgent(client, "alice").register(), await RestAgent(client, "bob").register()
    puppets = [await RestAgent(client, f"puppet{i}").register() for i in range(3)]
    channel, _ = await create_channel(alice, [bob])
    online = await go_online(client, alice)
    opened, auth = await open_peek(client, channel)
    peek_id = opened["peek"]["id"]
    await call(client, "POST", f"/api/v1/peeks/{peek_id}/confirm", auth)
    records = client.server.app[RECORDS]
    await records.update_channel(channel, lambda current: {
        **current, "members": sorted([alice.did, *(p.did for p in puppets)])})  # bob left, puppets joined
    await wait_state(client, peek_id, auth, "active")
    ledger = await check_ledger(client.server.app, lambda l: l.transaction(f"capture/{peek_id}"))
    assert ledger.balance(money.agent_account(alice.did)) == 175
    assert ledger.balance(money.agent_account(bob.did)) == 175  # left, kept its share
    assert all(ledger.balance(money.agent_account(p.did)) == 0 for p in puppets)
    await online.close()


async def test_a_standing_refusal_holds_while_the_agent_is_offline(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(build_app(fast(tmp_path, peek_refusal_window_seconds=30.0)))
    alice, bob = await RestAgent(client, "alice").register(), await RestAgent(client, "bob").register()
    channel, _ = await create_channel(alice, [bob])
    await fund_with_dev_card(bob)
    status, body = await bob.call("PUT", "/api/v1/agents/me/peek-policy", json={"choice": "refuse"})
    assert status == 200 and body["choice"] == "refuse" and "card on file" in body["message"], body
    online = await go_online(client, alice)  # bob is offline
    opened, auth = await open_peek(client, channel)
    peek_id = opened["peek"]["id"]
    await call(client, "POST", f"/api/v1/peeks/{peek_id}/confirm", auth)
    body = await wait_state(client, peek_id, auth, "refused")
    assert body["peek"]["refused_by"] == bob.did
    ledger = await check_ledger(client.server.app, lambda l: l.transaction(f"refusal_fee/{peek_id}"))
    assert ledger.balance(money.PLATFORM) == 100 and not ledger.transaction(f"capture/{peek_id}")
    status, body = await bob.call("PUT", "/api/v1/agents/me/peek-policy", json={"choice": "maybe"})
    assert (status, body["error"]["code"]) == (400, "invalid_field")
    await online.close()
