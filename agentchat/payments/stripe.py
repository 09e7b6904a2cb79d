"""``stripe://``: Stripe PaymentIntents with manual capture, through the official SDK on aiohttp.

- A peek's price is a PaymentIntent (500 usd, ``capture_method=manual``, metadata ``peek_id``); the
  browser confirms it with Stripe.js and the client secret, which puts it in ``requires_capture``.
- A refusal fee charged to a card on file is a PaymentIntent with ``customer``, ``payment_method``,
  ``off_session=true``, ``confirm=true``, also with manual capture, so it is only taken if the refusal
  wins. A card is put on file with a SetupIntent (``usage=off_session``) that the card holder confirms.
- Every create, capture and cancel carries an idempotency key derived from the peek id, so a retry from
  any process is the same request to Stripe. Where Stripe (or an emulator) answers a repeated capture or
  cancel with an error, the PaymentIntent is read back and its state decides.
- Webhooks: ``stripe.Webhook.construct_event`` verifies the signature over the raw body (5 minutes of
  tolerance); the server de-duplicates events by id and re-reads the PaymentIntent, so the order
  events arrive in does not matter.

Settings: ``AGENTCHAT_STRIPE_SECRET_KEY``, ``..._PUBLISHABLE_KEY``, ``..._WEBHOOK_SECRET`` and, for a
test double such as localstripe, ``..._API_BASE``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

import stripe

from agentchat.config import ConfigError
from agentchat.errors import AgentChatError, error
from agentchat.payments.base import Card, CardSetup, Hold, HoldState, Refund, WebhookEvent

log = logging.getLogger(__name__)

T = TypeVar("T")
CURRENCY = "usd"
MAX_NETWORK_RETRIES = 2
WEBHOOK_TOLERANCE_SECONDS = 300

_STATES = {
    "requires_payment_method": HoldState.PENDING,
    "requires_confirmation": HoldState.PENDING,
    "requires_action": HoldState.PENDING,
    "processing": HoldState.PENDING,
    "requires_capture": HoldState.AUTHORIZED,
    "succeeded": HoldState.CAPTURED,
    "canceled": HoldState.CANCELED,
}


class StripePayments:
    name = "stripe"

    def __init__(self, *, secret_key: str, publishable_key: str = "", webhook_secret: str = "",
                 api_base: str = "") -> None:
        if not secret_key:
            raise ConfigError("payments stripe:// needs AGENTCHAT_STRIPE_SECRET_KEY")
        self._secret_key = secret_key
        self._publishable_key = publishable_key
        self._webhook_secret = webhook_secret
        self._api_base = api_base.rstrip("/")
        self._http: stripe.AIOHTTPClient | None = None
        self._client: stripe.StripeClient | None = None

    async def start(self) -> None:
        # The aiohttp session is made inside the running loop, and closed with it.
        self._http = stripe.AIOHTTPClient()
        options: dict[str, Any] = {}
        if self._api_base:
            options["base_addresses"] = {"api": self._api_base}
        self._client = stripe.StripeClient(self._secret_key, http_client=self._http,
                                           max_network_retries=MAX_NETWORK_RETRIES, **options)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close_async()
            self._http = None

    @property
    def _v1(self) -> Any:
        if self._client is None:
            raise RuntimeError("call start() first")
        return self._client.v1

    # -- the peek's price ----------------------------------------------------------------------

    async def authorize(self, peek_id: str, amount_cents: int, *, key: str) -> Hold:
        intent = await _call(self._v1.payment_intents.create_async(
            {"amount": amount_cents, "currency": CURRENCY, "capture_method": "manual",
             "payment_method_types": ["card"], "metadata": {"peek_id": peek_id}},
            {"idempotency_key": key}))
        return self._hold(intent)

    async def payer_confirmed(self, ref: str, body: dict[str, Any]) -> Hold:
        # The browser confirmed with Stripe.js; only Stripe's word counts.
        return await self.status(ref)

    async def status(self, ref: str) -> Hold:
        return self._hold(await _call(self._v1.payment_intents.retrieve_async(ref)))

    async def capture(self, ref: str, *, key: str) -> Hold:
        try:
            intent = await _call(self._v1.payment_intents.capture_async(ref, {}, {"idempotency_key": key}))
        except stripe.InvalidRequestError as exc:
            hold = await self.status(ref)
            if hold.state is HoldState.CAPTURED:  # a repeat of a capture that went through
                return hold
            raise error("payment_declined", f"the payment could not be captured: {_message(exc)}") from None
        return self._hold(intent)

    async def cancel(self, ref: str, *, key: str) -> Hold:
        try:
            intent = await _call(self._v1.payment_intents.cancel_async(ref, {}, {"idempotency_key": key}))
        except stripe.InvalidRequestError:
            # Already canceled (fine), or captured (the caller sees CAPTURED and decides).
            return await self.status(ref)
        return self._hold(intent)

    # -- cards on file ---------------------------------------------------------------------------

    async def setup_card(self, agent_did: str, *, key: str) -> CardSetup:
        customer = await _call(self._v1.customers.create_async(
            {"metadata": {"agent": agent_did}, "description": f"AgentChat agent {agent_did}"},
            {"idempotency_key": key + "-customer"}))
        setup = await _call(self._v1.setup_intents.create_async(
            {"customer": customer.id, "usage": "off_session", "payment_method_types": ["card"],
             "metadata": {"agent": agent_did}},
            {"idempotency_key": key + "-setup"}))
        return CardSetup(setup.id, {"provider": "stripe", "setup_intent": setup.id,
                                    "client_secret": setup.client_secret,
                                    "publishable_key": self._publishable_key})

    async def card_saved(self, agent_did: str, setup_ref: str, body: dict[str, Any]) -> Card:
        if not setup_ref.startswith("seti_"):
            raise error("invalid_field", "field 'setup' must be a SetupIntent id (seti_...)")
        try:
            setup = await _call(self._v1.setup_intents.retrieve_async(setup_ref))
        except stripe.InvalidRequestError:
            raise error("not_found", f"no card setup {setup_ref}") from None
        data = _plain(setup)
        if (data.get("metadata") or {}).get("agent") != agent_did:
            raise error("forbidden", "this card setup was started by another agent")
        method, customer = _id_of(data.get("payment_method")), _id_of(data.get("customer"))
        if data.get("status") != "succeeded" or not method or not customer:
            raise error("payment_declined", f"the card setup is not complete (it is {data.get('status')})")
        return Card("stripe", customer, method, await self._label(method))

    async def _label(self, payment_method: str) -> str:
        try:
            method = _plain(await _call(self._v1.payment_methods.retrieve_async(payment_method)))
            card = method.get("card") or {}
            last4 = card.get("last4") or str(card.get("number", ""))[-4:]
            return f"{card.get('brand') or 'card'} ending {last4}" if last4 else "card"
        except AgentChatError:
            raise
        except stripe.StripeError:
            return "card"

    async def hold_off_session(self, card: Card, amount_cents: int, *, key: str,
                               metadata: dict[str, str]) -> Hold:
        if card.provider != "stripe":
            raise error("payment_declined", "the card on file belongs to another payment provider")
        try:
            intent = await _call(self._v1.payment_intents.create_async(
                {"amount": amount_cents, "currency": CURRENCY, "capture_method": "manual",
                 "customer": card.customer, "payment_method": card.payment_method,
                 "off_session": True, "confirm": True, "metadata": metadata},
                {"idempotency_key": key}))
        except stripe.InvalidRequestError as exc:
            raise error("payment_declined", f"the card on file cannot be charged: {_message(exc)}") from None
        hold = self._hold(intent)
        if hold.state is not HoldState.AUTHORIZED:
            raise error("payment_declined", f"the card on file was not authorised ({intent.status})")
        return hold

    # -- webhooks --------------------------------------------------------------------------------

    def verify_webhook(self, raw_body: bytes, signature_header: str) -> WebhookEvent:
        if not self._webhook_secret:
            raise error("forbidden", "webhooks are not configured: set AGENTCHAT_STRIPE_WEBHOOK_SECRET")
        try:
            event = stripe.Webhook.construct_event(raw_body, signature_header, self._webhook_secret,
                                                   tolerance=WEBHOOK_TOLERANCE_SECONDS)
        except stripe.SignatureVerificationError:
            raise error("bad_signature", "the Stripe-Signature header does not verify over this body") from None
        except ValueError:
            raise error("bad_json", "the webhook body is not a Stripe event") from None
        # Signed is not well-formed: every field used is type-checked, and a wrong type is a 400.
        data = _plain(event)
        inner = _field(data, "data", dict)
        obj = _field(inner, "object", dict) if inner else {}
        kind = _field(obj, "object", str) if obj else None
        ref = peek_id = charge = None
        if kind == "payment_intent":
            ref = _field(obj, "id", str)
            metadata = _field(obj, "metadata", dict) or {}
            peek_id = _field(metadata, "peek_id", str)
        elif kind == "charge":
            charge = _field(obj, "id", str)
            ref = _field(obj, "payment_intent", str)
        return WebhookEvent(_field(data, "id", str) or "", _field(data, "type", str) or "", ref, peek_id, charge)

    async def refund_status(self, charge_ref: str) -> Refund:
        try:
            charge = _plain(await _call(self._v1.charges.retrieve_async(charge_ref)))
        except stripe.InvalidRequestError:
            raise error("not_found", f"no charge {charge_ref}") from None
        amount, refunded = charge.get("amount"), charge.get("amount_refunded")
        if charge.get("refunded") is True and not isinstance(refunded, int):
            refunded = amount
        return Refund(charge_ref, _id_of(charge.get("payment_intent")),
                      amount if isinstance(amount, int) else 0, refunded if isinstance(refunded, int) else 0)

    # -- helpers ---------------------------------------------------------------------------------

    def _hold(self, intent: Any) -> Hold:
        data = _plain(intent)
        status = data.get("status")
        state = _STATES.get(status, HoldState.PENDING)
        reason = None
        error_info = data.get("last_payment_error")
        if state is HoldState.PENDING and status == "requires_payment_method" and error_info:
            state = HoldState.FAILED
            reason = error_info.get("message") or "the card was declined"
        client = {"provider": "stripe", "payment_intent": data["id"], "client_secret": data.get("client_secret"),
                  "publishable_key": self._publishable_key}
        return Hold(data["id"], state, (data.get("metadata") or {}).get("peek_id"), reason, client)


async def _call(request: Awaitable[T]) -> T:
    """Await a Stripe call, turning Stripe's errors into the product's (``InvalidRequestError`` is left
    to the caller, which knows what a refused request means for it)."""
    try:
        return await request
    except stripe.CardError as exc:
        raise error("payment_declined", _message(exc)) from None
    except stripe.InvalidRequestError:
        raise
    except (stripe.APIConnectionError, stripe.RateLimitError, stripe.APIError, stripe.IdempotencyError) as exc:
        log.warning("stripe unavailable: %r", exc)
        raise error("payments_unavailable", "Stripe could not be reached; retry shortly") from None
    except stripe.StripeError as exc:  # authentication, permission: the server is misconfigured
        log.error("stripe refused the server's request: %r", exc)
        raise error("payments_unavailable", "the payment provider refused the server's credentials") from None


def _field(data: dict[str, Any], name: str, kind: type) -> Any:
    """``data[name]`` if it is a ``kind`` (or absent/null: None); any other type is ``invalid_field``."""
    value = data.get(name)
    if value is None or isinstance(value, kind):
        return value
    raise error("invalid_field", f"the event's field {name!r} is not a {kind.__name__}")


def _plain(obj: Any) -> dict[str, Any]:
    """A Stripe object as plain dicts and lists (the SDK's objects are not dicts)."""
    return obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)


def _id_of(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("id")
    return value or None


def _message(exc: stripe.StripeError) -> str:
    return (exc.user_message or str(exc) or type(exc).__name__)[:200]
