"""Payments: holding, taking and releasing money at a payment provider.

Implementations: ``dev`` (the default: no money moves, holds succeed at once) and ``stripe``
(PaymentIntents with manual capture). Both pass ``tests/server/test_peeks_payments.py``.

Two kinds of holds exist: the peek's price, paid by the human who peeks (``authorize``; the browser
completes it), and a refusal fee charged to an agent's card on file (``hold_off_session``; no human
present). Either is then captured or canceled by its ``ref``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol


class HoldState(StrEnum):
    """Where a hold stands at the provider."""

    PENDING = "pending"  # not yet authorised by the payer
    AUTHORIZED = "authorized"  # the amount is held and can be captured
    CAPTURED = "captured"
    FAILED = "failed"  # the payer's attempt was declined (they may try again until canceled)
    CANCELED = "canceled"


@dataclass(frozen=True, slots=True)
class Hold:
    """A hold at the provider. ``client`` is what the payer's browser needs to complete it (Stripe: the
    PaymentIntent's client secret and the publishable key; dev: the path to confirm on)."""

    ref: str
    state: HoldState
    peek_id: str | None = None  # from the hold's metadata
    reason: str | None = None  # why it failed, for the payer
    client: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CardSetup:
    """A card being put on file: ``client`` is what the card holder's browser needs (Stripe: a
    SetupIntent's client secret)."""

    ref: str
    client: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Card:
    """A card on file for an agent, chargeable with no one present (``off_session``)."""

    provider: str
    customer: str
    payment_method: str
    label: str  # for display: brand and last digits, or "dev card"

    def to_record(self) -> dict[str, str]:
        return {"provider": self.provider, "customer": self.customer, "payment_method": self.payment_method,
                "label": self.label}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Card:
        return cls(record["provider"], record["customer"], record["payment_method"], record["label"])


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    """A verified provider event: ``ref`` is the hold it concerns (None if it concerns none)."""

    id: str
    type: str
    ref: str | None
    peek_id: str | None
    charge: str | None = None  # the charge an event is about (``charge.refunded``), if any


@dataclass(frozen=True, slots=True)
class Refund:
    """How much of a charge went back to the payer, as the provider says (never the event's word)."""

    charge: str
    hold_ref: str | None  # the hold (PaymentIntent) the charge captured
    amount_cents: int
    refunded_cents: int

    @property
    def full(self) -> bool:
        return self.refunded_cents >= self.amount_cents > 0


class PaymentProvider(Protocol):
    """Guarantees every implementation keeps:

    - Holds are idempotent by the caller's ``key``: calling ``authorize``, ``hold_off_session``,
      ``capture`` or ``cancel`` again with the same key (after a crash, a timeout, a lost answer, or
      from another process) has the effect of one call and returns the same hold. Callers derive keys
      from the peek id, so a peek can never be charged twice.
    - ``authorize`` and ``hold_off_session`` hold money, never take it. ``capture`` takes what was held,
      at most once; ``cancel`` releases a hold, and releasing one that is already canceled or was never
      completed is not an error. Capturing a canceled hold raises ``payment_declined``.
    - A definitive refusal (card declined, hold no longer capturable) raises
      ``AgentChatError('payment_declined')``; a transient failure raises
      ``Unavailable('payments_unavailable')`` and the same call may be retried with the same key.
    - ``status`` asks the provider, never a cache: it is how events arriving out of order, or twice,
      are reconciled with what really happened.
    - ``verify_webhook`` checks the signature over the exact raw body before anything else is read;
      a bad or stale signature raises ``InvalidInput('bad_signature')``.
    """

    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def authorize(self, peek_id: str, amount_cents: int, *, key: str) -> Hold:
        """Open a hold of ``amount_cents`` for a peek; the payer completes it (``Hold.client``)."""

    async def payer_confirmed(self, ref: str, body: dict[str, Any]) -> Hold:
        """The payer says they completed the hold. Dev: it is authorised now (``{"decline": true}``
        simulates a declined card). Stripe: the PaymentIntent's status, as Stripe reports it."""

    async def status(self, ref: str) -> Hold: ...

    async def capture(self, ref: str, *, key: str) -> Hold: ...

    async def cancel(self, ref: str, *, key: str) -> Hold: ...

    async def setup_card(self, agent_did: str, *, key: str) -> CardSetup:
        """Start putting a card on file for an agent (Stripe: a Customer and a SetupIntent)."""

    async def card_saved(self, agent_did: str, setup_ref: str, body: dict[str, Any]) -> Card:
        """The card holder completed ``setup_ref``: the card now on file (checked with the provider)."""

    async def hold_off_session(self, card: Card, amount_cents: int, *, key: str,
                               metadata: dict[str, str]) -> Hold:
        """Hold ``amount_cents`` on a card on file, with no one present. Raises ``payment_declined``."""

    async def refund_status(self, charge_ref: str) -> Refund:
        """What was refunded of ``charge_ref``, read from the provider."""

    def verify_webhook(self, raw_body: bytes, signature_header: str) -> WebhookEvent: ...
