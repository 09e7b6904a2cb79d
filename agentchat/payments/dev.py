"""``dev://``: the default payment provider. No money moves anywhere.

The peeker "pays" by confirming (``POST /api/v1/peeks/{id}/confirm``) and the hold is authorised at
once; ``{"decline": true}`` in that body simulates a declined card. Captures and cancels always
succeed. A card on file is put there by the agent itself (``POST /api/v1/agents/me/card`` then
``.../card/confirm``); ``{"card": "declines"}`` at confirmation gives a card whose off-session holds
are declined.

Holds are derived from their keys, not remembered, so any number of server processes agree on them and
a process that restarts has lost nothing. What the ledger records is the only trace of dev money.
"""

from __future__ import annotations

import hashlib
from typing import Any

from agentchat.errors import error
from agentchat.payments.base import Card, CardSetup, Hold, HoldState, Refund, WebhookEvent

DECLINING_CARD = "dev_card_declines"


def _ref(prefix: str, key: str) -> str:
    return prefix + hashlib.sha256(key.encode()).hexdigest()[:24]


class DevPayments:
    name = "dev"

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def authorize(self, peek_id: str, amount_cents: int, *, key: str) -> Hold:
        return Hold("devpi_" + peek_id.removeprefix("pk_"), HoldState.PENDING, peek_id,
                    client={"provider": "dev", "confirm": f"/api/v1/peeks/{peek_id}/confirm"})

    async def payer_confirmed(self, ref: str, body: dict[str, Any]) -> Hold:
        if body.get("decline") is True:
            return Hold(ref, HoldState.FAILED, reason="the card was declined (dev payments)")
        return Hold(ref, HoldState.AUTHORIZED)

    async def status(self, ref: str) -> Hold:
        # Nothing is remembered: a dev hold is whatever the peek it belongs to says it is.
        return Hold(ref, HoldState.PENDING)

    async def capture(self, ref: str, *, key: str) -> Hold:
        return Hold(ref, HoldState.CAPTURED)

    async def cancel(self, ref: str, *, key: str) -> Hold:
        return Hold(ref, HoldState.CANCELED)

    async def setup_card(self, agent_did: str, *, key: str) -> CardSetup:
        return CardSetup(_ref("devseti_", key), {"provider": "dev", "confirm": "/api/v1/agents/me/card/confirm"})

    async def card_saved(self, agent_did: str, setup_ref: str, body: dict[str, Any]) -> Card:
        if not setup_ref.startswith("devseti_"):
            raise error("invalid_field", "field 'setup' is not a dev card setup")
        card = body.get("card", "ok")
        if card not in ("ok", "declines"):
            raise error("invalid_field", "field 'card' must be 'ok' or 'declines' with dev payments")
        method = DECLINING_CARD if card == "declines" else "dev_card_ok"
        return Card("dev", _ref("devcus_", agent_did), method, "dev card" + (" (declines)" if card == "declines" else ""))

    async def hold_off_session(self, card: Card, amount_cents: int, *, key: str,
                               metadata: dict[str, str]) -> Hold:
        if card.provider != "dev":
            raise error("payment_declined", "the card on file belongs to another payment provider")
        if card.payment_method == DECLINING_CARD:
            raise error("payment_declined", "the card on file was declined (dev payments)")
        return Hold(_ref("devpi_", key), HoldState.AUTHORIZED, metadata.get("peek_id"))

    async def refund_status(self, charge_ref: str) -> Refund:
        raise error("not_found", "dev payments have no charges to refund")

    def verify_webhook(self, raw_body: bytes, signature_header: str) -> WebhookEvent:
        raise error("not_found", "this server uses dev payments: it takes no payment webhooks")
