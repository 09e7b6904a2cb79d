"""Peeks, payments and the ledger over REST (protocol/peek.md, "REST").

Who may do what: anyone opens a peek (rate-limited per address) and gets a token scoped to it; that
token confirms the payment, cancels before the countdown, reads the peek and, while it is active, the
channel. Members of the channel read the peek and refuse it. Agents read their own ledger and put a
card on file. The operator (``AGENTCHAT_OPERATOR_TOKEN``) reads the platform's revenue. The payment
provider posts its webhooks, authenticated by their signature.
"""

from __future__ import annotations

import hmac
import re
import time
import secrets
from collections import defaultdict
from typing import Any

from aiohttp import web

from agentchat import crypto
from agentchat.bus import keys as bus_keys
from agentchat.core import frames
from agentchat.core import ledger as money
from agentchat.core.peek import PeekState
from agentchat.errors import error
from agentchat.server.http import (agent_did, bearer_token, client_address, json_response, principal, rate_limit,
                                   read_json, require_str)
from agentchat.server.appkeys import BUS, INDICATORS, LEDGER, PAYMENTS, PEEKS, RECORDS, SETTINGS, STORE, TOKENS
from agentchat.server.peeks import peek_view
from agentchat.server.tokens import Principal

routes = web.RouteTableDef()

# A peek token outlives the longest peek by this margin.
TOKEN_MARGIN_SECONDS = 300
EVENT_ID_RE = re.compile(r"^[A-Za-z0-9_]{1,200}$")
# Stripe events after which the captured money is no longer the platform's: the peek's capture is reversed.
REVERSING_EVENTS = frozenset({"charge.refunded"})
# Wrong operator tokens an address may present per minute before it is refused without a comparison.
OPERATOR_FAILURES_PER_MINUTE = 10


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole raw body, however many TCP writes it arrived in, or ``too_large`` past ``limit``
    (``content.read(n)`` returns what has arrived so far, not ``n`` bytes)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.read(limit + 1 - size)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise error("too_large", f"the body is over {limit} bytes")


def _peek_id(request: web.Request) -> str:
    return frames.check_peek_id(request.match_info["peek"], "peek id")


def _peeker(request: web.Request, peek_id: str) -> Principal:
    who = principal(request)
    if who.is_agent or who.subject != peek_id:
        raise error("forbidden", "this route needs the token of this peek")
    return who


def _public_key(body: dict[str, Any]) -> str:
    value = require_str(body, "peeker_public_key", 64)
    try:
        raw = crypto.b64d(value)
    except ValueError:
        raw = b""
    if len(raw) != 32 or raw == bytes(32):
        raise error("invalid_field", "field 'peeker_public_key' must be an X25519 public key (32 bytes, base64url)")
    return value


# ------------------------------------------------------------------------------ peeks


@routes.post("/api/v1/peeks")
async def open_peek(request: web.Request) -> web.Response:
    """A human asks to peek: the peek, a token scoped to it, and what the payment step needs."""
    await rate_limit(request, "peeks", request.app[SETTINGS].limits.auth_requests_per_second)
    body = await read_json(request, frozenset({"channel", "peeker_public_key"}))
    channel = frames.check_channel_id(body.get("channel"))
    key = _public_key(body)
    shown = request.app[INDICATORS].view(channel)
    peek, hold = await request.app[PEEKS].open(channel, key, agents_online=shown.agents_online if shown else 0,
                                               address=client_address(request))
    ttl = int(peek.payment_expires_at - peek.created_at + peek.refusal_window_seconds + peek.duration_seconds
              + TOKEN_MARGIN_SECONDS)
    token, expires_at = request.app[TOKENS].issue("peek", peek.id, channel=channel, ttl=ttl)
    return json_response({"peek": peek_view(peek), "token": token, "expires_at": expires_at,
                          "payment": hold.client}, 201)


@routes.get("/api/v1/peeks/{peek}")
async def get_peek(request: web.Request) -> web.Response:
    """The peek, for its peeker (with the payment step while it is awaited and the keys granted while
    it is active) or for a member of its channel."""
    peek_id = _peek_id(request)
    who = principal(request)
    service = request.app[PEEKS]
    peek = await service.load(peek_id)
    if who.is_agent:
        meta = await request.app[RECORDS].get_channel(peek.channel)
        if meta is None or who.subject not in meta["members"]:
            raise error("not_member", f"only members of {peek.channel} and the peeker may read this peek")
    elif who.subject != peek_id:
        raise error("forbidden", "this token is for another peek")
    body: dict[str, Any] = {"peek": peek_view(peek)}
    if not who.is_agent:
        if peek.state is PeekState.AWAITING_PAYMENT:
            record = await service.payment(peek_id)
            body["payment"] = record["client"] if record else None
        if peek.state is PeekState.ACTIVE:
            body["grants"] = [{"epoch": g["epoch"], "wrapped_key": g["wrapped_key"]}
                              for g in sorted(await service.grants(peek_id), key=lambda g: g["epoch"])]
    return json_response(body)


@routes.post("/api/v1/peeks/{peek}/confirm")
async def confirm_payment(request: web.Request) -> web.Response:
    """The peeker completed the payment step. Dev payments: this is the payment (``{"decline": true}``
    simulates a declined card); Stripe: the PaymentIntent's status is read from Stripe."""
    peek_id = _peek_id(request)
    _peeker(request, peek_id)
    body = await read_json(request, frozenset({"decline"})) if request.can_read_body else {}
    if "decline" in body and not isinstance(body["decline"], bool):
        raise error("invalid_field", "field 'decline' must be a boolean")
    peek = await request.app[PEEKS].confirm_payment(peek_id, body)
    return json_response({"peek": peek_view(peek)})


@routes.post("/api/v1/peeks/{peek}/cancel")
async def cancel_peek(request: web.Request) -> web.Response:
    """The peeker withdraws: before the countdown (``canceled``) or during it (``withdrawn``); either
    way the hold is released."""
    peek_id = _peek_id(request)
    _peeker(request, peek_id)
    peek = await request.app[PEEKS].cancel(peek_id)
    return json_response({"peek": peek_view(peek)})


@routes.post("/api/v1/peeks/{peek}/refuse")
async def refuse_peek(request: web.Request) -> web.Response:
    """A member refuses during the countdown; it pays the refusal fee, the peeker pays nothing."""
    peek_id = _peek_id(request)
    did = agent_did(request)
    peek = await request.app[PEEKS].refuse(peek_id, did)
    return json_response({"peek": peek_view(peek)})


# ------------------------------------------------------------------------------ payment provider


@routes.post("/api/v1/webhooks/stripe")
async def stripe_webhook(request: web.Request) -> web.Response:
    """Stripe's events: the signature is checked over the raw body, events are handled once by id,
    and the PaymentIntent is read back from Stripe, so their order does not matter."""
    limit = request.app[SETTINGS].limits.max_body_bytes
    raw = await read_body(request, limit)
    signature = request.headers.get("Stripe-Signature", "")
    if not signature:
        raise error("bad_signature", "the Stripe-Signature header is missing")
    event = request.app[PAYMENTS].verify_webhook(raw, signature)
    if not EVENT_ID_RE.match(event.id):
        raise error("invalid_field", "the event has no usable id")
    store = request.app[STORE]
    seen_key = f"payment-events/stripe/{event.id}"
    if await store.get(seen_key) is not None:
        return json_response({"received": True, "duplicate": True})
    state = None
    if event.charge and event.type in REVERSING_EVENTS:
        # Money given back at Stripe (a refund from the dashboard): the ledger gives it back too.
        peek = await request.app[PEEKS].money.refunded(event.charge)
        state = str(peek.state) if peek else None
    elif event.ref and event.peek_id and frames.PEEK_ID_RE.match(event.peek_id):
        peek = await request.app[PEEKS].reconcile(event.peek_id, event.ref)
        state = str(peek.state) if peek else None
    # Marked only once handled: if handling failed, Stripe's retry handles it again.
    await store.put(seen_key, b"")
    return json_response({"received": True, "duplicate": False, "peek_state": state})


# ------------------------------------------------------------------------------ ledger and cards


def _entry_view(entry: money.Entry) -> dict[str, Any]:
    view: dict[str, Any] = {"txn": entry.txn_id, "kind": str(entry.kind), "amount_cents": entry.amount_cents,
                            "created_at": int(entry.created_at * 1000)}
    if entry.peek_id:
        view["peek"] = entry.peek_id
    if entry.payout_id:
        view["payout"] = entry.payout_id
    return view


@routes.get("/api/v1/agents/me/ledger")
async def my_ledger(request: web.Request) -> web.Response:
    did = agent_did(request)
    entries = await request.app[LEDGER].entries(money.agent_account(did))
    card = await request.app[PEEKS].refusals.card(did)
    return json_response({
        "did": did, "balance_cents": sum(e.amount_cents for e in entries),
        "entries": [_entry_view(e) for e in entries],
        "card": {"provider": card.provider, "label": card.label} if card else None,
    })


@routes.get("/api/v1/agents/me/peek-policy")
async def peek_policy(request: web.Request) -> web.Response:
    """The agent's standing choice and what its next refusals would cost and who would pay, said in
    advance (the SDK and ``agentchat listen --refuse-peeks`` read it before they refuse)."""
    did = agent_did(request)
    return json_response(await request.app[PEEKS].refusals.funding(did))


@routes.put("/api/v1/agents/me/peek-policy")
async def set_peek_policy(request: web.Request) -> web.Response:
    """Keep the agent's standing choice (``allow`` or ``refuse``), applied by the server when a
    countdown starts, online or not. A standing refusal that would not be funded is ``refusal_unfunded``."""
    did = agent_did(request)
    body = await read_json(request, frozenset({"choice"}))
    choice = require_str(body, "choice", 16)
    return json_response(await request.app[PEEKS].refusals.set_choice(did, choice))


@routes.post("/api/v1/agents/me/card")
async def start_card(request: web.Request) -> web.Response:
    """Start putting a card on file (for refusal fees beyond the agent's earnings)."""
    did = agent_did(request)
    setup = await request.app[PAYMENTS].setup_card(did, key=f"agentchat-card-{secrets.token_urlsafe(12)}")
    return json_response({"setup": setup.ref, "payment": setup.client}, 201)


@routes.post("/api/v1/agents/me/card/confirm")
async def confirm_card(request: web.Request) -> web.Response:
    did = agent_did(request)
    body = await read_json(request, frozenset({"setup", "card"}))
    setup = require_str(body, "setup", 128)
    card = await request.app[PAYMENTS].card_saved(did, setup, body)
    await request.app[PEEKS].refusals.save_card(did, card)
    return json_response({"card": {"provider": card.provider, "label": card.label}})


@routes.delete("/api/v1/agents/me/card")
async def remove_card(request: web.Request) -> web.Response:
    did = agent_did(request)
    await request.app[PEEKS].refusals.remove_card(did)
    return json_response({"card": None})


# ------------------------------------------------------------------------------ operator


@routes.get("/api/v1/operator/revenue")
async def revenue(request: web.Request) -> web.Response:
    """The platform's revenue and what it owes agents, recomputed from the whole ledger."""
    token = bearer_token(request)  # none: 401, whether or not the view is enabled
    expected = request.app[SETTINGS].operator_token
    if not expected:
        raise error("forbidden", "the operator view is disabled: set AGENTCHAT_OPERATOR_TOKEN")
    # Guessing is bounded: past a few wrong tokens a minute, an address is refused before any comparison.
    failures = bus_keys.rate_window("operator-failures", client_address(request), int(time.time() // 60))
    bus = request.app[BUS]
    if int(await bus.get(failures) or 0) >= OPERATOR_FAILURES_PER_MINUTE:
        raise error("rate_limited", "too many wrong operator tokens from this address; try again in a minute")
    if not hmac.compare_digest(token.encode(), expected.encode()):
        await bus.incr(failures, 120.0)
        raise error("token_invalid", "this is not the operator's token")
    ledger = await request.app[LEDGER].audit()  # raises if it does not balance
    balances = ledger.balances()
    by_kind: defaultdict[str, int] = defaultdict(int)
    for entry in ledger:
        if entry.account == money.PLATFORM:
            by_kind[str(entry.kind)] += entry.amount_cents
    owed = sum(cents for account, cents in balances.items() if account.startswith(money.AGENT_PREFIX))
    return json_response({
        "platform_cents": balances.get(money.PLATFORM, 0),
        "platform_by_kind": dict(by_kind),
        "owed_to_agents_cents": owed,
        "received_cents": -balances.get(money.EXTERNAL, 0),
        "transactions": len({entry.txn_id for entry in ledger}),
        "balanced": True,
    })


__all__ = ["routes"]
