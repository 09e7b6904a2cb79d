"""Peeks over REST and the socket with dev payments: the whole life of a peek, the money, and every
abuse the product must turn away. The ledger's invariants are checked after every test that moves
money (``ledger_checked``)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import WSMsgType
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agentchat import crypto
from agentchat.config import Settings, load_settings
from agentchat.core import ledger as money
from agentchat.server.app import build_app
from agentchat.server.appkeys import LEDGER, PEEKS
from agentchat.store.keys import balance_holds
from tests.conftest import RestAgent
from tests.server.peek_agents import go_online
from tests.server.test_rest import create_channel, envelope
from tests.server.test_ws import hello, receive_frames
from tests.unit.test_protocol import SERVER_FRAME, assert_valid, openapi_pointer


def documented(path: str, method: str, status: str, body: Any) -> Any:
    """``body`` as answered, checked against its schema in protocol/openapi.json."""
    assert_valid(openapi_pointer("paths", path, method, "responses", status, "content", "application/json",
                                 "schema"), body)
    return body


async def frames_of(ws: Any, count: int) -> list[dict[str, Any]]:
    """The next frames of a socket, each checked against protocol/frames/server-frame.json."""
    got = await receive_frames(ws, count)
    for frame in got:
        assert_valid(SERVER_FRAME, frame)
    return got


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # A refusal window long enough that nothing races it unless a test means it to.
    return load_settings(env={}, store=f"file://{tmp_path}/data", token_secret="t" * 40,
                         peek_refusal_window_seconds=30.0, peek_duration_seconds=30.0, peek_scan_seconds=0.2,
                         operator_token="operator-secret")


def fast(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"peek_refusal_window_seconds": 0.6, "peek_duration_seconds": 0.8,
                              "peek_scan_seconds": 0.2, "operator_token": "operator-secret"}
    values.update(overrides)
    return load_settings(env={}, store=f"file://{tmp_path}/data", token_secret="t" * 40, **values)


def peeker_key() -> tuple[X25519PrivateKey, str]:
    private = X25519PrivateKey.generate()
    return private, crypto.b64e(private.public_key().public_bytes_raw())


async def open_peek(client: Any, channel: str, key: str | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """POST /api/v1/peeks; (the answer, the peek token's auth header)."""
    key = key or peeker_key()[1]
    response = await client.post("/api/v1/peeks", json={"channel": channel, "peeker_public_key": key})
    body = await response.json()
    assert response.status == 201, body
    documented("/api/v1/peeks", "post", "201", body)
    return body, {"Authorization": f"Bearer {body['token']}"}


async def call(client: Any, method: str, path: str, auth: dict[str, str], **kwargs: Any) -> tuple[int, Any]:
    response = await client.request(method, path, headers=auth, **kwargs)
    return response.status, await response.json()


async def wait_state(client: Any, peek_id: str, auth: dict[str, str], state: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, body = await call(client, "GET", f"/api/v1/peeks/{peek_id}", auth)
        assert status == 200, body
        documented("/api/v1/peeks/{peek}", "get", "200", body)
        if body["peek"]["state"] == state:
            return body
        assert time.monotonic() < deadline, f"peek stayed {body['peek']['state']}, expected {state}"
        await asyncio.sleep(0.05)


async def check_ledger(app: Any, until: Any = None, timeout: float = 5.0) -> money.Ledger:
    """The invariants that must hold after any sequence of payments: every transaction sums to zero,
    balances agree with the entries, all balances together are zero, and each account's index holds
    exactly its entries. A peek's state is written before its ledger entries, so a check made just
    after a transition waits (up to ``timeout``) for them: until the invariants hold and ``until(ledger)``
    is true."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            ledger = await _check_ledger_once(app)
            assert until is None or until(ledger), "the expected entries are not recorded"
            return ledger
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def _check_ledger_once(app: Any) -> money.Ledger:
    store = app[LEDGER]
    ledger = await store.audit()
    ledger.check_balanced()
    assert sum(ledger.balances().values()) == 0
    for account, balance in ledger.balances().items():
        indexed = await store.entries(account)
        assert sum(e.amount_cents for e in indexed) == balance, account
        assert {e.entry_id for e in indexed} == {e.entry_id for e in ledger if e.account == account}
    for entry in ledger:
        assert type(entry.amount_cents) is int
    return ledger


@pytest.fixture
async def ledger_checked(client: Any) -> Any:
    yield client
    await check_ledger(client.server.app)


async def balance(agent: RestAgent) -> int:
    status, body = await agent.call("GET", "/api/v1/agents/me/ledger")
    assert status == 200, body
    documented("/api/v1/agents/me/ledger", "get", "200", body)
    return body["balance_cents"]


async def fund_with_dev_card(agent: RestAgent, card: str = "ok") -> dict[str, Any]:
    status, setup = await agent.call("POST", "/api/v1/agents/me/card")
    assert status == 201, setup
    assert setup["payment"]["provider"] == "dev"
    status, body = await agent.call("POST", "/api/v1/agents/me/card/confirm", json={"setup": setup["setup"], "card": card})
    assert status == 200, body
    return body["card"]


# ------------------------------------------------------------------------------ the happy path


async def test_peek_countdown_capture_split_and_end(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(build_app(fast(tmp_path)))
    agents = [await RestAgent(client, name).register() for name in ("alice", "bob", "carol")]
    channel, _ = await create_channel(agents[0], agents[1:])
    online = await go_online(client, agents[0])
    opened, auth = await open_peek(client, channel)
    peek = opened["peek"]
    assert peek["state"] == "awaiting_payment" and peek["channel"] == channel
    assert (peek["price_cents"], peek["refusal_fee_cents"]) == (500, 100)
    assert opened["payment"] == {"provider": "dev", "confirm": f"/api/v1/peeks/{peek['id']}/confirm"}
    body = await wait_state(client, peek["id"], auth, "awaiting_payment")
    assert body["payment"]["provider"] == "dev"

    before = time.time()
    status, body = await call(client, "POST", f"/api/v1/peeks/{peek['id']}/confirm", auth)
    assert status == 200 and body["peek"]["state"] == "countdown", body
    assert before * 1000 + 500 <= body["peek"]["deadline"] <= time.time() * 1000 + 700

    active = await wait_state(client, peek["id"], auth, "active")
    assert [g["epoch"] for g in active["grants"]] == [1] and online.granted == [peek["id"]]
    ledger = await check_ledger(client.server.app, lambda l: l.transaction(f"capture/{peek['id']}"))
    assert ledger.balance(money.PLATFORM) == 150 and ledger.balance(money.EXTERNAL) == -500
    shares = sorted([(a.did, await balance(a)) for a in agents])
    assert [cents for _, cents in shares] == [117, 117, 116]  # remainder cents to the first DIDs

    await wait_state(client, peek["id"], auth, "ended")
    status, body = await agents[0].call("GET", "/api/v1/agents/me/ledger")
    assert [e["kind"] for e in body["entries"]] == ["capture"] and body["entries"][0]["peek"] == peek["id"]
    await check_ledger(client.server.app)


async def test_operator_revenue_needs_the_operator_token(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(build_app(fast(tmp_path)))
    alice = await RestAgent(client, "alice").register()
    channel, _ = await create_channel(alice, [])
    await go_online(client, alice)
    opened, auth = await open_peek(client, channel)
    await call(client, "POST", f"/api/v1/peeks/{opened['peek']['id']}/confirm", auth)
    await wait_state(client, opened["peek"]["id"], auth, "active")
    await check_ledger(client.server.app, lambda l: len(l) == 3)
    assert (await call(client, "GET", "/api/v1/operator/revenue", {}))[1]["error"]["code"] == "auth_required"
    assert (await call(client, "GET", "/api/v1/operator/revenue", alice.auth))[1]["error"]["code"] == "token_invalid"
    status, body = await call(client, "GET", "/api/v1/operator/revenue", {"Authorization": "Bearer operator-secret"})
    assert status == 200, body
    documented("/api/v1/operator/revenue", "get", "200", body)
    assert body == {"platform_cents": 150, "platform_by_kind": {"capture": 150}, "owed_to_agents_cents": 350,
                    "received_cents": 500, "transactions": 1, "balanced": True}
    await check_ledger(client.server.app)


async def test_operator_view_is_off_without_a_token(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(build_app(fast(tmp_path, operator_token="")))
    status, body = await call(client, "GET", "/api/v1/operator/revenue", {"Authorization": "Bearer x"})
    assert (status, body["error"]["code"]) == (403, "forbidden")


# ------------------------------------------------------------------------------ refusals


async def test_refusal_is_paid_from_earnings_and_the_peeker_pays_nothing(client: Any, ledger_checked: Any) -> None:
    alice, bob = await RestAgent(client, "alice").register(), await RestAgent(client, "bob").register()
    channel, _ = await create_channel(alice, [bob])
    app = client.server.app
    # Give alice earnings: a peek of a channel of hers alone, captured.
    solo, _ = await create_channel(alice, [])
    await go_online(client, alice)
    opened, auth = await open_peek(client, solo)
    await call(client, "POST", f"/api/v1/peeks/{opened['peek']['id']}/confirm", auth)
    service = app[PEEKS]
    service.clock = lambda: time.time() + 31  # this process's clock says the window has passed
    try:
        await service.scan()
    finally:
        service.clock = time.time
    await wait_state(client, opened["peek"]["id"], auth, "active")
    await check_ledger(app, lambda l: l.balance(money.agent_account(alice.did)) == 350)

    opened, auth = await open_peek(client, channel)
    peek_id = opened["peek"]["id"]
    status, body = await call(client, "POST", f"/api/v1/peeks/{peek_id}/refuse", alice.auth)
    assert (status, body["error"]["code"]) == (409, "peek_state")  # not paid yet: nothing to refuse
    await call(client, "POST", f"/api/v1/peeks/{peek_id}/confirm", auth)
    status, body = await call(client, "POST", f"/api/v1/peeks/{peek_id}/refuse", alice.auth)
    assert status == 200 and body["peek"]["state"] == "refused" and body["peek"]["refused_by"] == alice.did
    ledger = await check_ledger(app, lambda l: l.transaction(f"refusal_fee/{peek_id}"))
    assert await balance(alice) == 250
    assert ledger.transaction(f"refusal_fee/{peek_id}") and not ledger.transaction(f"capture/{peek_id}")
    assert ledger.balance(money.PLATFORM) == 150 + 100

    # Twice, by the other member, and by the peeker: all refused, no money moves.
    status, body = await call(client, "POST", f"/api/v1/peeks/{peek_id}/refuse", alice.auth)
    assert (status, body["error"]["code"]) == (409, "peek_state")
    status, body = await call(client, "POST", f"/api/v1/peeks/{peek_id}/refuse", bob.auth)
    assert (status, body["error"]["code"]) == (409, "peek_state")
    status, body = await call(client, "POST", f"/api/v1/peeks/{peek_id}/refuse", auth)
    assert (status, body["error"]["code"]) == (403, "forbidden")
    assert await balance(alice) == 250 and await balance(bob) == 0
    body = await wait_state(client, peek_id, auth, "refused")
    assert "grants" not in body and "payment" not in body


async def test_refusals_at_once_spend_an_agents_earnings_only_as_far_as_they_go(client: Any, ledger_checked: Any) -> None:
    alice, bob = await RestAgent(client, "alice").register(), await RestAgent(client, "bob").register()
    app = client.server.app
    service = app[PEEKS]
    # No debts here: earnings, then the card (debts: test_refusals_become_a_debt_up_to_the_limit).
    service.refusals.settings = dataclasses.replace(service.settings, refusal_debt_limit_cents=0)
    solo, _ = await create_channel(alice, [])  # earnings: 350 cents from a peek of her own channel
    await go_online(client, alice, grant=False)
    opened, auth = await open_peek(client, solo)
    solo_peek = opened["peek"]["id"]
    await call(client, "POST", f"/api/v1/peeks/{solo_peek}/confirm", auth)
    service.clock = lambda: time.time() + 31
    try:
        await service.scan()
        await wait_state(client, solo_peek, auth, "awaiting_key")
        await grant_now(client, alice, solo_peek)
    finally:
        service.clock = time.time
    await check_ledger(app, lambda l: l.balance(money.agent_account(alice.did)) == 350)

    peeks = []
    for _ in range(5):
        channel, _ = await create_channel(alice, [bob])
        opened, auth = await open_peek(client, channel)
        await call(client, "POST", f"/api/v1/peeks/{opened['peek']['id']}/confirm", auth)
        peeks.append(opened["peek"]["id"])
    # A hold left behind (a process stopped between settling a refusal and dropping its hold) for a
    # peek that owes nothing: not counted.
    await service.store.put(balance_holds(alice.did), orjson.dumps({"peeks": {solo_peek: 300}}))
    # Five refusals at the same moment, a fee of 100 cents each: the balance pays for three.
    answers = await asyncio.gather(*(call(client, "POST", f"/api/v1/peeks/{peek_id}/refuse", alice.auth)
                                     for peek_id in peeks))
    refused = [peek_id for peek_id, (status, _) in zip(peeks, answers) if status == 200]
    assert len(refused) == 3, answers
    assert sorted(body["error"]["code"] for status, body in answers if status != 200) == ["refusal_unfunded"] * 2
    await check_ledger(app, lambda l: all(l.transaction(f"refusal_fee/{peek_id}") for peek_id in refused))
    assert await balance(alice) == 50  # never below zero
    held = await service.store.get(balance_holds(alice.did))
    assert held is not None and orjson.loads(held.data) == {"peeks": {}}  # settled: nothing set aside

    await fund_with_dev_card(alice)  # the rest are paid by card, the balance untouched
    rest = [peek_id for peek_id in peeks if peek_id not in refused]
    for peek_id in rest:
        status, body = await call(client, "POST", f"/api/v1/peeks/{peek_id}/refuse", alice.auth)
        assert status == 200, body
    await check_ledger(app, lambda l: all(l.transaction(f"refusal_fee/{peek_id}") for peek_id in rest))
    assert await balance(alice) == 50


async def test_refusals_become_a_debt_up_to_the_limit_then_need_a_card(client: Any, ledger_checked: Any) -> None:
    """With no earnings and no card a refusal still stops the peek: its fee becomes a debt, paid first
    from later earnings, up to the limit (300 cents by default). Past it the agent was told in advance
    (the funding view) and the refusal is rejected before the deadline."""
    alice, bob = await RestAgent(client, "alice").register(), await RestAgent(client, "bob").register()
    channel, _ = await create_channel(alice, [bob])
    await go_online(client, alice)
    status, view = await bob.call("GET", "/api/v1/agents/me/peek-policy")
    assert status == 200 and view["funded"] and view["refusals_as_debt"] == 3 and view["choice"] == "allow", view
    documented("/api/v1/agents/me/peek-policy", "get", "200", view)
    assert "debt" in view["message"] and "agentchat card" in view["message"]
    for expected_balance in (-100, -200, -300):
        opened, auth = await open_peek(client, channel)
        await call(client, "POST", f"/api/v1/peeks/{opened['peek']['id']}/confirm", auth)
        status, body = await call(client, "POST", f"/api/v1/peeks/{opened['peek']['id']}/refuse", bob.auth)
        assert status == 200 and body["peek"]["state"] == "refused", body
        await check_ledger(client.server.app, lambda l, b=expected_balance: l.balance(money.agent_account(bob.did)) == b)
    status, view = await bob.call("GET", "/api/v1/agents/me/peek-policy")
    assert not view["funded"] and "not funded" in view["message"] and "agentchat card" in view["message"]
    status, body = await bob.call("PUT", "/api/v1/agents/me/peek-policy", json={"choice": "refuse"})
    assert (status, body["error"]["code"]) == (409, "refusal_unfunded")  # a standing refusal that would not hold

    opened, auth = await open_peek(client, channel)
    peek_id = opened["peek"]["id"]
    await call(client, "POST", f"/api/v1/peeks/{peek_id}/confirm", auth)
    status, body = await call(client, "POST", f"/api/v1/peeks/{peek_id}/refuse", bob.auth)
    assert (status, body["error"]["code"]) == (409, "refusal_unfunded"), body
    assert "card on file" in body["error"]["message"] and "agentchat card" in body["error"]["message"]
    assert (await wait_state(client, peek_id, auth, "countdown"))["peek"]["refused_by"] is None

    # A card that declines does not fund it either; a working one does.
    assert (await fund_with_dev_card(bob, "declines"))["label"] == "dev card (declines)"
    status, body = await call(client, "POST", f"/api/v1/peeks/{peek_id}/refuse", bob.auth)
    assert (status, body["error"]["code"]) == (409, "refusal_unfunded")
    assert "declined" in body["error"]["message"]
    await fund_with_dev_card(bob)
    status, body = await call(client, "POST", f"/api/v1/peeks/{peek_id}/refuse", bob.auth)
    assert status == 200 and body["peek"]["state"] == "refused", body
    ledger = await check_ledger(client.server.app, lambda l: l.transaction(f"refusal_fee/{peek_id}"))
    status, body = await bob.call("GET", "/api/v1/agents/me/ledger")
    assert body["balance_cents"] == -300 and body["card"] == {"provider": "dev", "label": "dev card"}
    assert ledger.transaction(f"refusal_fee/{peek_id}")  # the card paid: external -100, platform +100
    assert ledger.balance(money.PLATFORM) == 400 and ledger.balance(money.EXTERNAL) == -100
    status, body = await bob.call("PUT", "/api/v1/agents/me/peek-policy", json={"choice": "refuse"})
    assert status == 200 and body["choice"] == "refuse" and body["funded"], body
    documented("/api/v1/agents/me/peek-policy", "put", "200", body)

    # Later earnings pay the debt first: a peek allowed (bob back to allow) with alice and bob.
    status, body = await bob.call("PUT", "/api/v1/agents/me/peek-policy", json={"choice": "allow"})
    assert status == 200 and body["choice"] == "allow"
    opened, auth = await open_peek(client, channel)
    await call(client, "POST", f"/api/v1/peeks/{opened['peek']['id']}/confirm", auth)
    client.server.app[PEEKS].clock = lambda: time.time() + 31
    try:
        await client.server.app[PEEKS].scan()
    finally:
        client.server.app[PEEKS].clock = time.time
    await wait_state(client, opened["peek"]["id"], auth, "active")
    await check_ledger(client.server.app, lambda l: l.balance(money.agent_account(bob.did)) == -300 + 175)
    status, _ = await bob.call("DELETE", "/api/v1/agents/me/card")
    assert status == 200 and (await bob.call("GET", "/api/v1/agents/me/ledger"))[1]["card"] is None


async def test_refusal_by_a_non_member_and_of_an_active_peek_are_refused(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(build_app(fast(tmp_path, peek_duration_seconds=30.0)))
    alice, eve = await RestAgent(client, "alice").register(), await RestAgent(client, "eve").register()
    channel, _ = await create_channel(alice, [])
    await fund_with_dev_card(eve)
    await fund_with_dev_card(alice)
    await go_online(client, alice)
    opened, auth = await open_peek(client, channel)
    peek_id = opened["peek"]["id"]
    await call(client, "POST", f"/api/v1/peeks/{peek_id}/confirm", auth)
    status, body = await call(client, "POST", f"/api/v1/peeks/{peek_id}/refuse", eve.auth)
    assert (status, body["error"]["code"]) == (403, "not_member")
    status, body = await call(client, "GET", f"/api/v1/peeks/{peek_id}", eve.auth)
    assert (status, body["error"]["code"]) == (403, "not_member")
    await wait_state(client, peek_id, auth, "active")
    status, body = await call(client, "POST", f"/api/v1/peeks/{peek_id}/refuse", alice.auth)
    assert (status, body["error"]["code"]) == (409, "peek_state")
    assert "no longer be refused" in body["error"]["message"]
    ledger = await check_ledger(client.server.app, lambda l: l.transaction(f"capture/{peek_id}"))
    assert not ledger.transaction(f"refusal_fee/{peek_id}")
    assert ledger.balance(money.agent_account(alice.did)) == 350


# ------------------------------------------------------------------------------ payment step


async def test_paying_twice_declines_cancel_and_expiry(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(build_app(fast(tmp_path, peek_payment_timeout_seconds=0.5)))
    alice = await RestAgent(client, "alice").register()
    channel, _ = await create_channel(alice, [])
    await go_online(client, alice)

    opened, auth = await open_peek(client, channel)
    peek_id = opened["peek"]["id"]
    results = await asyncio.gather(*(call(client, "POST", f"/api/v1/peeks/{peek_id}/confirm", auth) for _ in range(4)))
    assert sorted(status for status, _ in results) == [200, 409, 409, 409]
    assert all(body["error"]["code"] == "peek_state" for status, body in results if status == 409)
    status, body = await call(client, "POST", f"/api/v1/peeks/{peek_id}/confirm", auth)
    assert (status, body["error"]["code"]) == (409, "peek_state") and "already paid" in body["error"]["message"]
    await wait_state(client, peek_id, auth, "active")
    status, body = await call(client, "POST", f"/api/v1/peeks/{peek_id}/cancel", auth)
    assert (status, body["error"]["code"]) == (409, "peek_state")  # paid for and read: too late

    declined, auth2 = await open_peek(client, channel)
    status, body = await call(client, "POST", f"/api/v1/peeks/{declined['peek']['id']}/confirm", auth2,
                              json={"decline": True})
    assert status == 200 and body["peek"]["state"] == "payment_failed" and "declined" in body["peek"]["failure_reason"]

    canceled, auth3 = await open_peek(client, channel)
    status, body = await call(client, "POST", f"/api/v1/peeks/{canceled['peek']['id']}/cancel", auth3)
    assert status == 200 and body["peek"]["state"] == "canceled"
    status, body = await call(client, "POST", f"/api/v1/peeks/{canceled['peek']['id']}/confirm", auth3)
    assert (status, body["error"]["code"]) == (409, "peek_state")

    expiring, auth4 = await open_peek(client, channel)
    await wait_state(client, expiring["peek"]["id"], auth4, "expired")
    ledger = await check_ledger(client.server.app, lambda l: l.transaction(f"capture/{peek_id}"))
    assert ledger.balance(money.EXTERNAL) == -500  # only the one captured peek moved money


async def test_bad_peek_requests(client: Any, make_agent: Any) -> None:
    alice = await make_agent("alice")
    channel, _ = await create_channel(alice, [])
    missing = "ch_" + "x" * 20
    response = await client.post("/api/v1/peeks", json={"channel": missing, "peeker_public_key": peeker_key()[1]})
    assert (response.status, (await response.json())["error"]["code"]) == (404, "channel_not_found")
    for body, code in [
        ({"channel": channel, "peeker_public_key": "not-a-key"}, "invalid_field"),
        ({"channel": channel, "peeker_public_key": crypto.b64e(bytes(32))}, "invalid_field"),
        ({"channel": "general", "peeker_public_key": peeker_key()[1]}, "invalid_field"),
        ({"channel": channel}, "invalid_field"),
        ({"channel": channel, "peeker_public_key": peeker_key()[1], "price_cents": 1}, "invalid_field"),
    ]:
        response = await client.post("/api/v1/peeks", json=body)
        assert (response.status, (await response.json())["error"]["code"]) == (400, code), body
    status, body = await call(client, "GET", "/api/v1/peeks/pk_" + "y" * 20, alice.auth)
    assert (status, body["error"]["code"]) == (404, "peek_not_found")
    status, body = await call(client, "GET", "/api/v1/peeks/nonsense", alice.auth)
    assert (status, body["error"]["code"]) == (400, "invalid_field")
    response = await client.post("/api/v1/webhooks/stripe", data=b"{}", headers={"Stripe-Signature": "t=1,v1=00"})
    assert (response.status, (await response.json())["error"]["code"]) == (404, "not_found")  # dev payments


async def test_a_peek_token_reads_only_its_own_peek_and_channel_and_only_while_active(
        aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(build_app(fast(tmp_path, peek_duration_seconds=30.0)))
    alice = await RestAgent(client, "alice").register()
    channel, key = await create_channel(alice, [])
    other, _ = await create_channel(alice, [])
    status, _ = await alice.call("POST", f"/api/v1/channels/{channel}/messages",
                                 json={"client_id": "m1", "envelope": envelope(alice, channel, key, "hi", "m1")})
    assert status == 201
    await go_online(client, alice, epoch_key=key)
    opened, auth = await open_peek(client, channel)
    peek_id = opened["peek"]["id"]
    second, auth2 = await open_peek(client, channel)
    status, body = await call(client, "GET", f"/api/v1/channels/{channel}/messages", auth)
    assert (status, body["error"]["code"]) == (403, "not_member")  # not active: nothing to read
    await call(client, "POST", f"/api/v1/peeks/{peek_id}/confirm", auth)
    await wait_state(client, peek_id, auth, "active")
    status, body = await call(client, "GET", f"/api/v1/channels/{channel}/messages", auth)
    assert status == 200 and [m["client_id"] for m in body["messages"]] == ["m1"]
    status, body = await call(client, "GET", f"/api/v1/channels/{other}/messages", auth)
    assert (status, body["error"]["code"]) == (403, "not_member")
    status, body = await call(client, "GET", f"/api/v1/channels/{channel}/messages", auth2)
    assert (status, body["error"]["code"]) == (403, "not_member")  # another peek's token
    status, body = await call(client, "GET", f"/api/v1/peeks/{second['peek']['id']}", auth)
    assert (status, body["error"]["code"]) == (403, "forbidden")
    status, body = await call(client, "POST", f"/api/v1/peeks/{second['peek']['id']}/confirm", auth)
    assert (status, body["error"]["code"]) == (403, "forbidden")
    status, body = await call(client, "GET", "/api/v1/agents/me/ledger", auth)
    assert (status, body["error"]["code"]) == (403, "forbidden")
    status, body = await call(client, "POST", f"/api/v1/channels/{channel}/messages", auth,
                              json={"client_id": "m2", "envelope": envelope(alice, channel, key, "x", "m2")})
    assert (status, body["error"]["code"]) == (403, "forbidden")

    # Over the socket: the peeker reads its channel, cannot resume another, cannot send.
    ws = await hello(client, opened["token"], resume={other: 0})
    got = await frames_of(ws, 3)
    assert {f["type"] for f in got} >= {"peek"}
    await ws.send_str(orjson.dumps({"type": "send", "ref": "s", "channel": channel, "client_id": "m3",
                                    "envelope": envelope(alice, channel, key, "x", "m3")}).decode())
    await ws.send_str(orjson.dumps({"type": "resume", "ref": "r", "resume": {other: 0}}).decode())
    await ws.send_str(orjson.dumps({"type": "refuse", "ref": "f", "peek": peek_id}).decode())
    errors = {}
    while len(errors) < 3:
        for frame in await frames_of(ws, 1):
            if frame["type"] == "error" and frame.get("ref") in ("s", "r", "f"):
                errors[frame["ref"]] = frame["code"]
    assert errors == {"s": "forbidden", "r": "not_member", "f": "forbidden"}
    await ws.close()


# ------------------------------------------------------------------------------ the socket


async def grant_now(client: Any, agent: RestAgent, peek_id: str, epoch_key: bytes | None = None) -> dict[str, Any]:
    """``agent`` hands the peek the channel key over a socket of its own; the answer frame."""
    status, body = await agent.call("GET", f"/api/v1/peeks/{peek_id}")
    assert status == 200, body
    view = body["peek"]
    status, meta = await agent.call("GET", f"/api/v1/channels/{view['channel']}")
    wrapped = crypto.wrap_epoch_key(epoch_key or crypto.new_epoch_key(), crypto.b64d(view["peeker_public_key"]),
                                    channel=view["channel"], epoch=meta["epoch"], recipient="peek:" + peek_id)
    ws = await hello(client, agent.token)
    try:
        await ws.send_str(orjson.dumps({"type": "grant_key", "ref": "g", "peek": peek_id, "epoch": meta["epoch"],
                                        "wrapped_key": wrapped}).decode())
        while True:
            frame = (await frames_of(ws, 1))[0]
            if frame.get("ref") == "g":
                return frame
    finally:
        await ws.close()


async def test_at_the_deadline_agents_hear_the_outcome_then_a_key_is_kept_then_active(
        aiohttp_client: Any, tmp_path: Path) -> None:
    """Nobody refuses: the countdown's outcome (``awaiting_key``) reaches the agents as soon as it is
    stored; a member's grant moves the peek to ``capturing``, then ``active`` once the price is taken."""
    client = await aiohttp_client(build_app(fast(tmp_path)))
    alice, bob = await RestAgent(client, "alice").register(), await RestAgent(client, "bob").register()
    channel, _ = await create_channel(alice, [bob])
    alice_ws = await hello(client, alice.token)
    opened, auth = await open_peek(client, channel)
    peek_id = opened["peek"]["id"]
    await call(client, "POST", f"/api/v1/peeks/{peek_id}/confirm", auth)
    request, decided = await frames_of(alice_ws, 2)
    assert request["type"] == "peek_request" and request["peek"] == peek_id
    assert decided["type"] == "peek" and decided["peek"]["state"] == "awaiting_key"
    assert decided["peek"]["updated_at"] >= request["deadline"]
    assert (await wait_state(client, peek_id, auth, "awaiting_key")).get("grants") is None
    await grant_now(client, alice, peek_id)
    capturing, active = await frames_of(alice_ws, 2)
    assert capturing["type"] == "peek" and capturing["peek"]["state"] == "capturing"
    assert active["type"] == "peek" and active["peek"]["state"] == "active"
    assert active["peek"]["activated_at"] >= decided["peek"]["updated_at"]
    # An agent whose socket opens now hears of the active peek it may grant a key to.
    bob_ws = await hello(client, bob.token)
    again = (await frames_of(bob_ws, 1))[0]
    assert again["type"] == "peek" and again["peek"]["state"] == "active" and again["peek"]["id"] == peek_id
    await check_ledger(client.server.app, lambda l: l.transaction(f"capture/{peek_id}"))
    for ws in (alice_ws, bob_ws):
        await ws.close()


async def test_agents_get_the_request_the_peeker_ticks_and_a_refusal_frame_ends_it(
        aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(build_app(fast(tmp_path, peek_refusal_window_seconds=3.0)))
    alice, bob = await RestAgent(client, "alice").register(), await RestAgent(client, "bob").register()
    channel, _ = await create_channel(alice, [bob])
    await fund_with_dev_card(bob)
    alice_ws, bob_ws = await hello(client, alice.token), await hello(client, bob.token)
    opened, auth = await open_peek(client, channel)
    peek_id = opened["peek"]["id"]
    peeker_ws = await hello(client, opened["token"])
    first = (await frames_of(peeker_ws, 1))[0]
    assert first["type"] == "peek" and first["peek"]["state"] == "awaiting_payment"
    await call(client, "POST", f"/api/v1/peeks/{peek_id}/confirm", auth)

    request = (await frames_of(alice_ws, 1))[0]
    assert request == {"type": "peek_request", "peek": peek_id, "channel": channel,
                       "deadline": request["deadline"], "peeker_public_key": opened["peek"]["peeker_public_key"],
                       "price_cents": 500, "refusal_fee_cents": 100}
    assert abs(request["deadline"] - (time.time() + 3) * 1000) < 500
    assert (await frames_of(bob_ws, 1))[0]["type"] == "peek_request"

    countdown = (await frames_of(peeker_ws, 1))[0]
    assert countdown["peek"]["state"] == "countdown"
    ticks = [f["seconds_left"] for f in await frames_of(peeker_ws, 2)]
    assert ticks == [3, 2]
    await bob_ws.send_str(orjson.dumps({"type": "refuse", "ref": "no", "peek": peek_id}).decode())
    answer = (await frames_of(bob_ws, 1))[0]
    if answer.get("ref") != "no":  # the broadcast may come first
        answer = (await frames_of(bob_ws, 1))[0]
    assert answer["type"] == "peek" and answer["ref"] == "no" and answer["peek"]["state"] == "refused"
    outcome = (await frames_of(alice_ws, 1))[0]
    assert outcome["type"] == "peek" and outcome["peek"]["state"] == "refused" and outcome["peek"]["refused_by"] == bob.did
    frames_left = [f for f in await frames_of(peeker_ws, 1)]
    while frames_left[-1]["type"] == "peek_tick":
        frames_left = await frames_of(peeker_ws, 1)
    assert frames_left[-1]["type"] == "peek" and frames_left[-1]["peek"]["state"] == "refused"
    closing = await peeker_ws.receive(timeout=5)
    assert closing.type == WSMsgType.CLOSE and closing.data == 4003 and closing.extra == "peek_refused"
    # A refusal frame again: the race is decided.
    await bob_ws.send_str(orjson.dumps({"type": "refuse", "ref": "again", "peek": peek_id}).decode())
    again = (await frames_of(bob_ws, 1))[0]
    assert again["type"] == "error" and again["code"] == "peek_state" and again["ref"] == "again"
    await check_ledger(client.server.app)
    for ws in (alice_ws, bob_ws):
        await ws.close()
