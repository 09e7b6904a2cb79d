"""Peeks paid through Stripe, emulated by localstripe over HTTP: the PaymentIntent's life, webhooks
(signature, replays, order), cards on file for refusal fees. The ledger is checked after each test."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import stripe

from agentchat.config import Settings, load_settings
from agentchat.core import ledger as money
from agentchat.server.appkeys import PEEKS
from tests.conftest import RestAgent
from tests.server.peek_agents import go_online
from tests.server.test_peeks import call, check_ledger, open_peek, wait_state
from tests.server.test_rest import create_channel
from tests.stripe_service import SECRET_KEY, LocalStripe, sign_webhook, stripe_server  # noqa: F401

# localstripe registers plain functions as aiohttp handlers, which aiohttp warns about on every request.
pytestmark = pytest.mark.filterwarnings("ignore:Bare functions are deprecated:DeprecationWarning")


@pytest.fixture
def settings(tmp_path: Path, stripe_server: LocalStripe) -> Settings:  # noqa: F811
    return load_settings(env={}, store=f"file://{tmp_path}/data", token_secret="t" * 40, payments="stripe://",
                         peek_refusal_window_seconds=30.0, peek_duration_seconds=30.0, peek_scan_seconds=0.2,
                         operator_token="operator-secret", **stripe_server.settings())


@pytest.fixture
async def browser(stripe_server: LocalStripe) -> AsyncIterator[Any]:  # noqa: F811
    """What the peeker's browser (Stripe.js) and the card holder do at Stripe, through the API."""
    http = stripe.AIOHTTPClient()
    client = stripe.StripeClient(SECRET_KEY, base_addresses={"api": stripe_server.url}, http_client=http)
    yield client.v1
    await http.close_async()


async def pay(browser: Any, payment_intent: str, method: str = "pm_card_visa") -> str:
    await browser.payment_intents.update_async(payment_intent, {"payment_method": method})
    intent = await browser.payment_intents.confirm_async(payment_intent, {})
    return intent.status


async def post_event(client: Any, event_type: str, obj: dict[str, Any], *, event_id: str | None = None,
                     signature: str | None = None) -> tuple[int, Any]:
    event = {"id": event_id or f"evt_{time.monotonic_ns()}", "object": "event", "type": event_type,
             "created": int(time.time()), "data": {"object": obj}}
    body = orjson.dumps(event)
    response = await client.post("/api/v1/webhooks/stripe", data=body,
                                 headers={"Stripe-Signature": signature or sign_webhook(body),
                                          "Content-Type": "application/json"})
    return response.status, await response.json()


async def intent(browser: Any, ref: str) -> dict[str, Any]:
    return (await browser.payment_intents.retrieve_async(ref)).to_dict()


async def put_card_on_file(agent: RestAgent, browser: Any, method: str = "pm_card_visa") -> dict[str, Any]:
    status, setup = await agent.call("POST", "/api/v1/agents/me/card")
    assert status == 201, setup
    assert setup["payment"]["provider"] == "stripe" and setup["payment"]["client_secret"]
    await browser.setup_intents.confirm_async(setup["setup"], {"payment_method": method})
    status, body = await agent.call("POST", "/api/v1/agents/me/card/confirm", json={"setup": setup["setup"]})
    assert status == 200, body
    return body["card"]


async def test_a_paid_peek_is_captured_at_the_deadline_and_split(client: Any, browser: Any) -> None:
    alice, bob = await RestAgent(client, "alice").register(), await RestAgent(client, "bob").register()
    channel, _ = await create_channel(alice, [bob])
    await go_online(client, alice)
    opened, auth = await open_peek(client, channel)
    peek_id, payment = opened["peek"]["id"], opened["payment"]
    assert payment["provider"] == "stripe" and payment["client_secret"].startswith(payment["payment_intent"])
    held = await intent(browser, payment["payment_intent"])
    assert (held["amount"], held["currency"], held["capture_method"]) == (500, "usd", "manual")
    assert held["metadata"] == {"peek_id": peek_id}

    assert await pay(browser, payment["payment_intent"]) == "requires_capture"
    status, body = await post_event(client, "payment_intent.amount_capturable_updated", held)
    assert status == 200 and body == {"received": True, "duplicate": False, "peek_state": "countdown"}, body
    # The same event again (Stripe retries): handled once.
    status, body = await post_event(client, "payment_intent.amount_capturable_updated", held,
                                     event_id="evt_same_twice")
    status, body = await post_event(client, "payment_intent.amount_capturable_updated", held,
                                     event_id="evt_same_twice")
    assert status == 200 and body["duplicate"] is True

    service = client.server.app[PEEKS]
    service.clock = lambda: time.time() + 31  # this process's clock says the deadline has passed
    try:
        await service.scan()
    finally:
        service.clock = time.time
    await wait_state(client, peek_id, auth, "active")
    assert (await intent(browser, payment["payment_intent"]))["status"] == "succeeded"
    ledger = await check_ledger(client.server.app, lambda l: l.transaction(f"capture/{peek_id}"))
    assert ledger.balance(money.PLATFORM) == 150
    assert sorted([ledger.balance(money.agent_account(a.did)) for a in (alice, bob)]) == [175, 175]


async def test_webhooks_bad_signatures_and_events_out_of_order(client: Any, browser: Any) -> None:
    alice = await RestAgent(client, "alice").register()
    channel, _ = await create_channel(alice, [])
    await go_online(client, alice)
    opened, auth = await open_peek(client, channel)
    peek_id, ref = opened["peek"]["id"], opened["payment"]["payment_intent"]
    pending = await intent(browser, ref)

    body = orjson.dumps({"id": "evt_x", "type": "payment_intent.amount_capturable_updated",
                         "data": {"object": pending}})
    for signature in ("t=1,v1=deadbeef", sign_webhook(body, secret="whsec_wrong"),
                      sign_webhook(body, timestamp=int(time.time()) - 3600), "nonsense"):
        response = await client.post("/api/v1/webhooks/stripe", data=body, headers={"Stripe-Signature": signature})
        assert (response.status, (await response.json())["error"]["code"]) == (400, "bad_signature"), signature
    response = await client.post("/api/v1/webhooks/stripe", data=body)
    assert (response.status, (await response.json())["error"]["code"]) == (400, "bad_signature")
    # The signature covers the exact bytes: the same JSON re-serialised does not verify.
    response = await client.post("/api/v1/webhooks/stripe", data=orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2),
                                 headers={"Stripe-Signature": sign_webhook(body)})
    assert response.status == 400

    # "capturable" before the payer paid (an old or forged-order event): Stripe says it is not.
    status, answer = await post_event(client, "payment_intent.amount_capturable_updated", pending)
    assert status == 200 and answer["peek_state"] == "awaiting_payment"
    # The payer pays; a stale "payment_failed" arrives after: Stripe says it is held, so it counts.
    await pay(browser, ref)
    status, answer = await post_event(client, "payment_intent.payment_failed", pending)
    assert status == 200 and answer["peek_state"] == "countdown"
    # A confirm after the webhook is paying twice.
    status, answer = await call(client, "POST", f"/api/v1/peeks/{peek_id}/confirm", auth)
    assert (status, answer["error"]["code"]) == (409, "peek_state")
    # An event naming this peek but another PaymentIntent moves nothing.
    other, _ = await open_peek(client, channel)
    stray = {**(await intent(browser, other["payment"]["payment_intent"])), "metadata": {"peek_id": peek_id}}
    status, answer = await post_event(client, "payment_intent.canceled", stray)
    assert status == 200 and answer["peek_state"] is None
    await wait_state(client, peek_id, auth, "countdown")
    await check_ledger(client.server.app)


async def test_confirm_reads_stripe_and_a_declined_card_fails_the_peek(client: Any, browser: Any) -> None:
    alice = await RestAgent(client, "alice").register()
    channel, _ = await create_channel(alice, [])
    await go_online(client, alice)
    opened, auth = await open_peek(client, channel)
    peek_id, ref = opened["peek"]["id"], opened["payment"]["payment_intent"]
    status, body = await call(client, "POST", f"/api/v1/peeks/{peek_id}/confirm", auth)
    assert status == 200 and body["peek"]["state"] == "awaiting_payment"  # nothing paid yet
    await pay(browser, ref)
    status, body = await call(client, "POST", f"/api/v1/peeks/{peek_id}/confirm", auth)
    assert status == 200 and body["peek"]["state"] == "countdown"
    assert body["peek"]["deadline"] > time.time() * 1000

    declined, auth2 = await open_peek(client, channel)
    await browser.payment_intents.update_async(declined["payment"]["payment_intent"],
                                               {"payment_method": "pm_card_chargeCustomerFail"})
    with pytest.raises(stripe.CardError):
        await browser.payment_intents.confirm_async(declined["payment"]["payment_intent"], {})
    status, body = await call(client, "POST", f"/api/v1/peeks/{declined['peek']['id']}/confirm", auth2)
    assert status == 200 and body["peek"]["state"] == "payment_failed", body

    canceled, auth3 = await open_peek(client, channel)
    status, body = await call(client, "POST", f"/api/v1/peeks/{canceled['peek']['id']}/cancel", auth3)
    assert status == 200 and body["peek"]["state"] == "canceled"
    assert (await intent(browser, canceled["payment"]["payment_intent"]))["status"] == "canceled"
    await check_ledger(client.server.app)


async def test_refusal_fee_from_a_card_on_file_and_the_peeker_is_released(client: Any, browser: Any) -> None:
    alice, bob = await RestAgent(client, "alice").register(), await RestAgent(client, "bob").register()
    channel, _ = await create_channel(alice, [bob])
    await go_online(client, alice)
    opened, auth = await open_peek(client, channel)
    peek_id, ref = opened["peek"]["id"], opened["payment"]["payment_intent"]
    await pay(browser, ref)
    await call(client, "POST", f"/api/v1/peeks/{peek_id}/confirm", auth)
    service = client.server.app[PEEKS]  # no debts: the card or nothing
    service.refusals.settings = dataclasses.replace(service.settings, refusal_debt_limit_cents=0)

    status, body = await call(client, "POST", f"/api/v1/peeks/{peek_id}/refuse", bob.auth)
    assert (status, body["error"]["code"]) == (409, "refusal_unfunded")
    # A card that declines when charged does not fund it.
    assert (await put_card_on_file(bob, browser, "pm_card_chargeCustomerFail"))["provider"] == "stripe"
    status, body = await call(client, "POST", f"/api/v1/peeks/{peek_id}/refuse", bob.auth)
    assert (status, body["error"]["code"]) == (409, "refusal_unfunded") and "declined" in body["error"]["message"]
    card = await put_card_on_file(bob, browser)
    assert card == {"provider": "stripe", "label": "visa ending 4242"}
    status, body = await call(client, "POST", f"/api/v1/peeks/{peek_id}/refuse", bob.auth)
    assert status == 200 and body["peek"]["state"] == "refused", body

    assert (await intent(browser, ref))["status"] == "canceled"  # the peeker is not charged
    fees = [pi for pi in (await browser.payment_intents.list_async({})).to_dict()["data"]
            if pi.get("metadata", {}).get("purpose") == "refusal_fee" and pi["metadata"].get("peek_id") == peek_id]
    assert [(pi["amount"], pi["status"], pi["metadata"]["agent"]) for pi in fees
            if pi["status"] == "succeeded"] == [(100, "succeeded", bob.did)]
    ledger = await check_ledger(client.server.app, lambda l: l.transaction(f"refusal_fee/{peek_id}"))
    assert ledger.balance(money.PLATFORM) == 100 and ledger.balance(money.agent_account(bob.did)) == 0
    status, body = await call(client, "POST", f"/api/v1/peeks/{peek_id}/refuse", alice.auth)
    assert (status, body["error"]["code"]) == (409, "peek_state")


async def test_a_card_setup_must_be_complete_and_ones_own(client: Any, browser: Any) -> None:
    alice, eve = await RestAgent(client, "alice").register(), await RestAgent(client, "eve").register()
    status, setup = await alice.call("POST", "/api/v1/agents/me/card")
    status, body = await alice.call("POST", "/api/v1/agents/me/card/confirm", json={"setup": setup["setup"]})
    assert (status, body["error"]["code"]) == (409, "payment_declined")  # not confirmed yet
    await browser.setup_intents.confirm_async(setup["setup"], {"payment_method": "pm_card_visa"})
    status, body = await eve.call("POST", "/api/v1/agents/me/card/confirm", json={"setup": setup["setup"]})
    assert (status, body["error"]["code"]) == (403, "forbidden")
    status, body = await alice.call("POST", "/api/v1/agents/me/card/confirm", json={"setup": "seti_nope"})
    assert (status, body["error"]["code"]) == (404, "not_found")
    status, body = await alice.call("POST", "/api/v1/agents/me/card/confirm", json={"setup": setup["setup"]})
    assert status == 200 and body["card"]["label"] == "visa ending 4242"


async def test_every_call_that_moves_money_carries_an_idempotency_key_from_the_peek(
        stripe_server: LocalStripe, browser: Any, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    from agentchat.payments.stripe import StripePayments
    from agentchat.server.peeks import idempotency_key

    sent: list[tuple[str, str, str | None]] = []

    class Recording(stripe.AIOHTTPClient):  # type: ignore[misc]
        async def request_async(self, method: str, url: str, headers: Any, post_data: Any = None) -> Any:
            sent.append((method, url.rsplit("/v1/", 1)[1], dict(headers).get("Idempotency-Key")))
            return await super().request_async(method, url, headers, post_data)

    monkeypatch.setattr(stripe, "AIOHTTPClient", Recording)
    provider = StripePayments(**{k.removeprefix("stripe_"): v for k, v in stripe_server.settings().items()})
    await provider.start()
    try:
        peek_id = "pk_" + "k" * 20
        held = await provider.authorize(peek_id, 500, key=idempotency_key(peek_id, "authorize"))
        await pay(browser, held.ref)
        await provider.capture(held.ref, key=idempotency_key(peek_id, "capture"))
        other = await provider.authorize(peek_id + "x", 500, key=idempotency_key(peek_id + "x", "authorize"))
        await provider.cancel(other.ref, key=idempotency_key(peek_id + "x", "cancel"))
    finally:
        await provider.close()
    posts = [(path, key) for method, path, key in sent if method == "post"]
    assert posts == [("payment_intents", f"agentchat-peek-{peek_id}-authorize"),
                     (f"payment_intents/{held.ref}/capture", f"agentchat-peek-{peek_id}-capture"),
                     ("payment_intents", f"agentchat-peek-{peek_id}x-authorize"),
                     (f"payment_intents/{other.ref}/cancel", f"agentchat-peek-{peek_id}x-cancel")]


async def test_a_signed_body_arriving_in_two_writes_verifies(client: Any) -> None:
    """A 6 KB event sent in two TCP writes: the server reads the whole body before verifying it."""
    event = {"id": "evt_two_writes", "object": "event", "type": "customer.updated", "created": int(time.time()),
             "data": {"object": {"object": "customer", "id": "cus_x", "description": "x" * 6000}}}
    body = orjson.dumps(event)
    head = (f"POST /api/v1/webhooks/stripe HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Stripe-Signature: {sign_webhook(body)}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(head.encode() + body[:1000])
    await writer.drain()
    await asyncio.sleep(0.2)  # the handler is already reading when the rest arrives
    writer.write(body[1000:])
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    assert b" 200 " in status_line, answer[:300]
    assert b'"received":true' in rest


async def test_a_signed_event_with_fields_of_the_wrong_type_is_a_400(client: Any) -> None:
    for obj in ({"object": "payment_intent", "id": "pi_x", "metadata": {"peek_id": 7}},
                {"object": "payment_intent", "id": ["pi_x"], "metadata": {}},
                {"object": "payment_intent", "id": "pi_x", "metadata": "peek"},
                {"object": "charge", "id": "ch_x", "payment_intent": {"id": 1}}):
        status, body = await post_event(client, "payment_intent.succeeded", obj)
        assert (status, body["error"]["code"]) == (400, "invalid_field"), (obj, body)
    status, body = await post_event(client, "payment_intent.succeeded", {"object": "payment_intent"},
                                     event_id=12345)  # type: ignore[arg-type]
    assert (status, body["error"]["code"]) == (400, "invalid_field")


async def test_wrong_operator_tokens_are_rate_limited(client: Any) -> None:
    codes = []
    for attempt in range(12):
        status, body = await call(client, "GET", "/api/v1/operator/revenue",
                                  {"Authorization": f"Bearer guess-{attempt}"})
        codes.append(body["error"]["code"])
    assert codes[:10] == ["token_invalid"] * 10 and codes[10:] == ["rate_limited"] * 2
    status, body = await call(client, "GET", "/api/v1/operator/revenue", {"Authorization": "Bearer operator-secret"})
    assert (status, body["error"]["code"]) == (429, "rate_limited")  # even the right one, for a minute


async def test_a_refund_at_stripe_reverses_the_peeks_capture_in_the_ledger(client: Any, browser: Any) -> None:
    alice, bob = await RestAgent(client, "alice").register(), await RestAgent(client, "bob").register()
    channel, _ = await create_channel(alice, [bob])
    await go_online(client, alice)
    opened, auth = await open_peek(client, channel)
    peek_id, ref = opened["peek"]["id"], opened["payment"]["payment_intent"]
    await pay(browser, ref)
    await call(client, "POST", f"/api/v1/peeks/{peek_id}/confirm", auth)
    service = client.server.app[PEEKS]
    service.clock = lambda: time.time() + 31
    try:
        await service.scan()
    finally:
        service.clock = time.time
    await wait_state(client, peek_id, auth, "active")
    await check_ledger(client.server.app, lambda l: l.transaction(f"capture/{peek_id}"))
    captured = await intent(browser, ref)
    charge = (captured.get("latest_charge") or (captured.get("charges") or {}).get("data", [{}])[0].get("id"))
    charge = charge["id"] if isinstance(charge, dict) else charge
    assert charge, captured

    # A partial refund leaves the ledger alone; a forged event about it moves nothing either.
    await browser.refunds.create_async({"charge": charge, "amount": 100})
    charge_obj = {"object": "charge", "id": charge, "payment_intent": ref}
    status, body = await post_event(client, "charge.refunded", charge_obj)
    assert status == 200, body
    ledger = await check_ledger(client.server.app)
    assert not ledger.transaction(f"reversal/{peek_id}")
    # Refunded in full in the dashboard: the capture is reversed, every balance back where it was.
    await browser.refunds.create_async({"charge": charge, "amount": 400})
    for event_id in ("evt_refund_1", "evt_refund_1", "evt_refund_2"):  # replays and repeats: once
        status, body = await post_event(client, "charge.refunded", charge_obj, event_id=event_id)
        assert status == 200, body
    ledger = await check_ledger(client.server.app, lambda l: l.transaction(f"reversal/{peek_id}"))
    assert ledger.balance(money.PLATFORM) == 0 and ledger.balance(money.EXTERNAL) == 0
    assert all(ledger.balance(money.agent_account(a.did)) == 0 for a in (alice, bob))
    assert len(ledger.transaction(f"reversal/{peek_id}")) == len(ledger.transaction(f"capture/{peek_id}"))
