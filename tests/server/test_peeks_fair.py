"""Peeks that are fair to both sides (protocol/peek.md): no charge without a key, the peeker may
withdraw during the countdown, shares fixed when the countdown starts, no peek of a channel nobody is
online to hand over. Dev payments; the ledger is checked after each test."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson
from aiohttp import WSMsgType

from agentchat.core import ledger as money
from agentchat.core.peek import PeekState
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


async def test_unpaid_peeks_are_capped_per_address_and_in_all(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(build_app(fast(tmp_path, peek_unpaid_per_address=3, peek_unpaid_total=4,
                                                           trusted_proxies=1)))
    alice = await RestAgent(client, "alice").register()
    channel, _ = await create_channel(alice, [])
    online = await go_online(client, alice)
    opened = [await open_peek(client, channel) for _ in range(3)]
    response = await client.post("/api/v1/peeks", json={"channel": channel, "peeker_public_key": "B" * 42 + "E"})
    body = await response.json()
    assert (response.status, body["error"]["code"]) == (429, "too_many_unpaid_peeks")
    # Paying for one (or canceling it) frees its place.
    first, auth = opened[0]
    await call(client, "POST", f"/api/v1/peeks/{first['peek']['id']}/confirm", auth)
    second, auth2 = opened[1]
    await call(client, "POST", f"/api/v1/peeks/{second['peek']['id']}/cancel", auth2)
    await open_peek(client, channel)
    await open_peek(client, channel)
    # Another address: the per-address cap is its own, the total cap is shared (3 unpaid so far).
    other = {"X-Forwarded-For": "203.0.113.9"}
    response = await client.post("/api/v1/peeks", json={"channel": channel, "peeker_public_key": "B" * 42 + "E"},
                                 headers=other)
    assert response.status == 201, await response.json()
    response = await client.post("/api/v1/peeks", json={"channel": channel, "peeker_public_key": "B" * 42 + "E"},
                                 headers=other)
    body = await response.json()
    assert (response.status, body["error"]["code"]) == (503, "peeks_busy")
    await online.close()


async def test_the_periodic_scan_reads_only_what_is_due(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(build_app(fast(tmp_path, peek_scan_seconds=3600.0, peek_unpaid_per_address=50)))
    alice = await RestAgent(client, "alice").register()
    channel, _ = await create_channel(alice, [])
    online = await go_online(client, alice)
    opened = [await open_peek(client, channel) for _ in range(20)]  # awaiting payment: due in 900 s
    service = client.server.app[PEEKS]
    store = service.store
    calls: list[tuple[str, str]] = []
    real_get, real_list = store.get, store.list

    async def get(key: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(("get", key))
        return await real_get(key, *args, **kwargs)

    async def listing(prefix: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(("list", prefix))
        return await real_list(prefix, *args, **kwargs)

    store.get, store.list = get, listing  # type: ignore[method-assign]
    try:
        await service.scan()
        assert calls == [("list", "peeks-due/")]  # one listing, no peek read
        calls.clear()
        expiring, auth = opened[0]
        service.clock = lambda: time.time() + 901  # every payment window has passed
        try:
            await service.scan()
        finally:
            service.clock = time.time
        assert len([c for c in calls if c == ("get", f"peeks/{expiring['peek']['id']}.json")]) >= 1
    finally:
        store.get, store.list = real_get, real_list  # type: ignore[method-assign]
    assert (await wait_state(client, expiring["peek"]["id"], auth, "expired"))["peek"]["state"] == "expired"
    await online.close()


async def test_an_expired_peek_is_deleted_after_a_while(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(build_app(fast(tmp_path, peek_payment_timeout_seconds=0.3)))
    alice = await RestAgent(client, "alice").register()
    channel, _ = await create_channel(alice, [])
    online = await go_online(client, alice)
    opened, auth = await open_peek(client, channel)
    peek_id = opened["peek"]["id"]
    await wait_state(client, peek_id, auth, "expired")
    service = client.server.app[PEEKS]
    service.clock = lambda: time.time() + 601
    try:
        await service.scan()
    finally:
        service.clock = time.time
    status, body = await call(client, "GET", f"/api/v1/peeks/{peek_id}", auth)
    assert (status, body["error"]["code"]) == (404, "peek_not_found")
    left = [key for prefix in ("peeks/", "peek-payments/", "peeks-open/", "peeks-due/")
            for key in await service.store.list(prefix, limit=1000) if peek_id in key]
    assert left == []
    await online.close()


async def test_a_peek_stored_by_the_previous_layout_is_driven_after_a_restart(aiohttp_client: Any,
                                                                               tmp_path: Path) -> None:
    """A countdown stored before grant waits, fixed members and due markers existed (only its open
    marker): a restarted server indexes it, drives it past its deadline and splits as before."""
    settings = fast(tmp_path)
    first = await aiohttp_client(build_app(settings))
    alice = await RestAgent(first, "alice").register()
    channel, _ = await create_channel(alice, [])
    store = first.server.app[PEEKS].store
    now = time.time()
    old = {"id": "pk_" + "o" * 22, "channel": channel, "peeker_public_key": "A" * 42 + "E", "price_cents": 500,
           "refusal_fee_cents": 100, "refusal_window_seconds": 0.6, "duration_seconds": 30.0, "state": "countdown",
           "version": 2, "created_at": now - 5, "updated_at": now - 2, "payment_expires_at": now + 895,
           "deadline": now - 1.4, "activated_at": None, "ends_at": None, "refused_by": None,
           "payment_ref": "devpi_" + "o" * 22, "failure_reason": None}
    await store.put(f"peeks-open/{old['id']}", b"")
    await store.put(f"peeks/{old['id']}.json", orjson.dumps(old))
    await store.put(f"peek-payments/{old['id']}.json", orjson.dumps(
        {"provider": "dev", "ref": old["payment_ref"], "client": {}}))
    second = await aiohttp_client(build_app(settings))  # a process starting on the same store
    online = await go_online(second, alice)
    peek = await second.server.app[PEEKS].load(old["id"])
    assert peek.state in (PeekState.AWAITING_KEY, PeekState.CAPTURING, PeekState.ACTIVE) and peek.members is None
    ledger = await check_ledger(second.server.app, lambda l: l.transaction(f"capture/{old['id']}"))
    assert ledger.balance(money.agent_account(alice.did)) == 350  # the channel's members at capture, as before
    await online.close()
