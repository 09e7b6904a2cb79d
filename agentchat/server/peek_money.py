"""The peek's money at the payment provider and in the ledger, apart from its state machine: the hold
(released, or reversed after a refund at the provider) and the capture's split.

Every call here is idempotent per peek (payment idempotency keys and ledger transaction ids derive from
the peek id), so the peek service and its scan may repeat any of them after a crash.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import orjson

from agentchat.core import ledger as money
from agentchat.core.peek import Peek
from agentchat.payments.base import HoldState, PaymentProvider
from agentchat.payments.ledger import LedgerStore
from agentchat.server.peek_refusals import idempotency_key
from agentchat.store import keys as store_keys
from agentchat.store.base import ObjectStore
from agentchat.store.records import Records

log = logging.getLogger(__name__)


class PeekMoney:
    def __init__(self, *, store: ObjectStore, payments: PaymentProvider, ledger: LedgerStore, records: Records,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.payments = payments
        self.ledger = ledger
        self.records = records
        self.clock = clock

    async def hold_ref(self, peek: Peek) -> str | None:
        if peek.payment_ref:
            return peek.payment_ref
        found = await self.store.get(store_keys.peek_payment(peek.id))
        record = None if found is None else orjson.loads(found.data)
        return None if record is None else record["ref"]

    async def cancel_hold(self, peek: Peek) -> None:
        ref = await self.hold_ref(peek)
        if ref is None:
            return
        hold = await self.payments.cancel(ref, key=idempotency_key(peek.id, "cancel"))
        if hold.state is HoldState.CAPTURED:  # never expected: a captured peek is never canceled
            log.error("peek %s: the hold %s was captured, not released", peek.id, ref)

    async def record_split(self, peek: Peek) -> None:
        txn = f"{money.EntryKind.CAPTURE}/{peek.id}"
        recorded = await self.ledger.transaction(txn)
        if recorded:
            await self.ledger.record(recorded)  # repairs the account index
            return
        if peek.members is not None:  # fixed when the countdown started
            members = list(peek.members)
        else:  # a peek stored before members were kept: those of the channel now, as then
            meta = await self.records.get_channel(peek.channel)
            members = sorted(meta["members"]) if meta else []
        created_at = peek.activated_at or peek.updated_at
        if members:
            entries = money.split_capture(peek.id, peek.price_cents, members, created_at=created_at)
        else:  # nobody left in the channel to share with
            entries = [money.Entry(money.EXTERNAL, -peek.price_cents, money.EntryKind.CAPTURE, created_at,
                                   peek_id=peek.id),
                       money.Entry(money.PLATFORM, peek.price_cents, money.EntryKind.CAPTURE, created_at,
                                   peek_id=peek.id)]
        try:
            await self.ledger.record(entries)
        except money.LedgerError:
            # Another process recorded the split first, with the members it saw: that one stands.
            await self.ledger.record(await self.ledger.transaction(txn))

    async def refunded(self, charge_ref: str) -> Peek | None:
        """The payment provider says a charge was refunded: if it is a peek's captured price, refunded
        in full, the peek's capture is reversed in the ledger (``reversal/<peek id>``). The provider is
        asked, not the event believed; a partial refund is logged and left to the operator (the ledger
        does not guess who gives back what). Repeats change nothing."""
        refund = await self.payments.refund_status(charge_ref)
        if refund.hold_ref is None:
            return None
        hold = await self.payments.status(refund.hold_ref)
        peek_id = hold.peek_id
        if not isinstance(peek_id, str):
            return None
        found = await self.store.get(store_keys.peek(peek_id))
        record = await self.store.get(store_keys.peek_payment(peek_id))
        if found is None or record is None or orjson.loads(record.data).get("ref") != refund.hold_ref:
            return None  # not a peek's price (a refusal fee's hold, or forged metadata)
        peek = Peek.from_bytes(found.data)
        if not refund.full:
            log.warning("peek %s: charge %s partly refunded (%d of %d cents); the ledger is left as it is",
                        peek_id, charge_ref, refund.refunded_cents, refund.amount_cents)
            return peek
        capture = await self.ledger.transaction(f"{money.EntryKind.CAPTURE}/{peek_id}")
        if capture:
            await self.ledger.record(money.reversal_entries(capture, created_at=self.clock()))
        return peek
