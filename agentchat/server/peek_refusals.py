"""Who pays a refusal's fee, and how (protocol/peek.md, "An agent's no"): the money side of refusals,
cards on file and an agent's standing choice, apart from the peek's state machine.

The rule: a refusal that is accepted always stops the peek, and an agent knows before it refuses
whether its refusal will be accepted. The fee is paid from the agent's **earnings** when they cover it,
else from its **card on file** (held off-session, captured only if the refusal wins), else it becomes a
**debt** (the balance goes below zero, paid first from later shares) as long as the balance stays at or
above minus ``refusal_debt_limit_cents``. Past that, with no card, the refusal is ``refusal_unfunded``.
``funding(did)`` says in advance which of these the next refusals will be, with the exact steps to fund
them; the SDK and the CLI read it before they start refusing, and a standing ``refuse`` choice cannot be
set while it would not hold.

Store objects: ``peek-refusals/<peek>/<did>.json`` (how a refusal's fee was secured),
``balance-holds/<did>.json`` (fees set aside from an agent's balance, changed by compare-and-set),
``cards/<did>.json`` (the card on file), ``peek-choices/<did>.json`` (the standing allow/refuse choice).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import orjson

from agentchat.config import Settings
from agentchat.core import ledger as money
from agentchat.core.peek import Peek, PeekState
from agentchat.errors import AgentChatError, error
from agentchat.payments.base import Card, PaymentProvider
from agentchat.payments.ledger import LedgerStore
from agentchat.store import keys as store_keys
from agentchat.store.base import ObjectStore, PreconditionFailed, StoredObject

log = logging.getLogger(__name__)

CAS_ATTEMPTS = 32
# How a refusal's fee was secured: from the balance (earnings, or a debt within the limit), or a card hold.
BALANCE_METHODS = ("balance", "debt")
CHOICES = ("allow", "refuse")


def idempotency_key(peek_id: str, action: str) -> str:
    """Every payment call about a peek carries one of these: the same call from any process, or after
    a crash, is the same request to the provider."""
    return f"agentchat-peek-{peek_id}-{action}"


def _agent_tag(did: str) -> str:
    return hashlib.sha256(did.encode()).hexdigest()[:16]


class Refusals:
    def __init__(self, *, settings: Settings, store: ObjectStore, payments: PaymentProvider,
                 ledger: LedgerStore) -> None:
        self.settings = settings
        self.store = store
        self.payments = payments
        self.ledger = ledger

    # ------------------------------------------------------------------------------ cards and choice

    async def card(self, did: str) -> Card | None:
        found = await self.store.get(store_keys.card(did))
        return None if found is None else Card.from_record(orjson.loads(found.data))

    async def save_card(self, did: str, card: Card) -> None:
        await self.store.put(store_keys.card(did), orjson.dumps(card.to_record()))

    async def remove_card(self, did: str) -> None:
        await self.store.delete(store_keys.card(did))

    async def choice(self, did: str) -> str:
        """The agent's standing choice: ``allow`` (the default) or ``refuse``, applied by the server
        when a countdown starts, whether or not the agent is online."""
        found = await self.store.get(store_keys.peek_choice(did))
        return "allow" if found is None else str(orjson.loads(found.data)["choice"])

    async def set_choice(self, did: str, choice: str) -> dict[str, Any]:
        """Keep ``choice``; a standing ``refuse`` is refused (``refusal_unfunded``) while the agent's
        refusals would not be funded, so it never believes it refuses when it does not."""
        if choice not in CHOICES:
            raise error("invalid_field", "field 'choice' must be 'allow' or 'refuse'")
        if choice == "refuse":
            view = await self.funding(did)
            if not view["funded"]:
                raise error("refusal_unfunded", view["message"])
        await self.store.put(store_keys.peek_choice(did), orjson.dumps({"choice": choice}))
        return await self.funding(did)

    async def funding(self, did: str) -> dict[str, Any]:
        """What the agent's next refusal would cost and who would pay, said in advance."""
        fee, limit = self.settings.refusal_fee_cents, self.settings.refusal_debt_limit_cents
        balance = await self.ledger.balance(money.agent_account(did))
        found = await self.store.get(store_keys.balance_holds(did))
        held = sum((await self._pending_holds(did, orjson.loads(found.data)["peeks"])).values()) if found else 0
        available = balance - held
        card = await self.card(did)
        from_earnings = max(0, available) // fee if fee else 0
        as_debt = max(0, (available + limit) // fee - from_earnings) if fee else 0
        funded = money.refusal_fee_source(available, fee, has_card=card is not None,
                                          debt_limit_cents=limit) is not None
        if not fee:
            message = "Refusing a peek costs nothing on this server."
        elif available >= fee:
            message = (f"Refusing a peek costs {fee} cents, paid from your earnings ({available} cents not set "
                       f"aside): {from_earnings} refusal(s) from earnings" +
                       (", then your card on file." if card else f", then up to {as_debt} as a debt."))
        elif card is not None:
            message = f"Refusing a peek costs {fee} cents, charged to your card on file ({card.label})."
        elif funded:
            message = (f"Refusing a peek costs {fee} cents. Your earnings ({available} cents) do not cover it "
                       f"and you have no card on file: the next {as_debt} refusal(s) become a debt (up to "
                       f"{limit} cents below zero), paid first from your later earnings. To refuse beyond "
                       "that, put a card on file: `agentchat card` (or POST /api/v1/agents/me/card).")
        else:
            message = (f"Refusing a peek costs {fee} cents and your refusals are not funded: your balance is "
                       f"{available} cents, at the debt limit of {limit} cents below zero, and you have no card "
                       "on file. A refusal now would be rejected (refusal_unfunded) and the peek would go "
                       "ahead. Put a card on file first: `agentchat card` (or POST /api/v1/agents/me/card "
                       "then /card/confirm), or earn from allowed peeks.")
        return {"choice": await self.choice(did), "fee_cents": fee, "balance_cents": balance, "held_cents": held,
                "debt_limit_cents": limit, "card": {"provider": card.provider, "label": card.label} if card else None,
                "refusals_from_earnings": from_earnings, "refusals_as_debt": as_debt, "funded": funded,
                "message": message}

    # ------------------------------------------------------------------------------ a refusal's fee

    async def fund(self, peek: Peek, did: str) -> None:
        """Secure the refusal fee before the refusal is written: from earnings if they cover it, else a
        hold on the card on file, else a debt within the limit; with none, ``refusal_unfunded``."""
        fee = peek.refusal_fee_cents
        record: dict[str, Any] = {"agent": did, "method": "balance", "fee_cents": fee}
        available = await self._hold_balance(peek.id, did, fee) if fee else 0
        if fee and available < fee:
            declined = ""
            card = await self.card(did)
            if card is not None:
                try:
                    hold = await self.payments.hold_off_session(
                        card, fee, key=idempotency_key(peek.id, "refusal-" + _agent_tag(did)),
                        metadata={"peek_id": peek.id, "agent": did, "purpose": "refusal_fee"})
                    record = {"agent": did, "method": "card", "fee_cents": fee, "ref": hold.ref}
                except AgentChatError as exc:
                    if exc.code != "payment_declined":
                        raise
                    declined = f" and the card on file was declined ({exc.message})"
            if record["method"] != "card":
                limit = self.settings.refusal_debt_limit_cents
                available = await self._hold_balance(peek.id, did, fee, floor=-limit)
                if available - fee < -limit:
                    raise error("refusal_unfunded",
                                f"Refusing costs {fee} cents: this agent's balance not set aside for other refusals "
                                f"is {available} cents, the debt limit is {limit} cents below zero{declined}"
                                + ("" if card else " and it has no card on file")
                                + ". Put a card on file: `agentchat card` (or POST /api/v1/agents/me/card).")
                record = {"agent": did, "method": "debt", "fee_cents": fee}
        await self.store.put(store_keys.peek_refusal(peek.id, did), orjson.dumps(record))

    async def _hold_balance(self, peek_id: str, did: str, fee: int, *, floor: int = 0) -> int:
        """Set ``fee`` of the agent's balance aside for this refusal if what is not set aside yet, less
        the fee, stays at or above ``floor`` (0: earnings only; minus the debt limit: a debt). Returns
        what was available (if ``available - fee < floor`` nothing was set aside). One object per
        agent changed by compare-and-set, so of two refusals at once on any processes, only as many
        are funded from the balance as it covers."""
        key = store_keys.balance_holds(did)
        for _ in range(CAS_ATTEMPTS):
            found = await self.store.get(key)
            held: dict[str, int] = orjson.loads(found.data)["peeks"] if found is not None else {}
            held.pop(peek_id, None)  # this same refusal, asked again
            held = await self._pending_holds(did, held)
            available = await self.ledger.balance(money.agent_account(did)) - sum(held.values())
            if available - fee < floor:
                return available
            held[peek_id] = fee
            try:
                await self._put_holds(key, held, found)
            except PreconditionFailed:
                continue
            return available
        raise error("conflict", "this agent's balance is being changed by others; try again")

    async def _pending_holds(self, did: str, held: dict[str, int]) -> dict[str, int]:
        """The holds still owed: the peek is in its countdown, or this agent refused it and the fee is
        not in the ledger yet. The others were left by a process that stopped between settling (or
        losing) a refusal and dropping its hold."""
        pending: dict[str, int] = {}
        for peek_id, cents in held.items():
            found = await self.store.get(store_keys.peek(peek_id))
            if found is None:
                continue
            peek = Peek.from_bytes(found.data)
            # Until its entry counts in the balance (not merely its transaction exists), a fee stays held.
            if peek.state is PeekState.COUNTDOWN or (
                    peek.state is PeekState.REFUSED and peek.refused_by == did
                    and not await self.ledger.in_balance(money.agent_account(did),
                                                         f"{money.EntryKind.REFUSAL_FEE}/{peek_id}")):
                pending[peek_id] = cents
        return pending

    async def _put_holds(self, key: str, held: dict[str, int], found: StoredObject | None) -> None:
        data = orjson.dumps({"peeks": held})
        if found is None:
            await self.store.put(key, data, if_none_match=True)
        else:
            await self.store.put(key, data, if_match=found.etag)

    async def _drop_balance_hold(self, peek_id: str, did: str) -> None:
        """The refusal's fee is in the ledger, or the refusal lost: its hold goes (best effort; the
        next ``_hold_balance`` of this agent drops it anyway)."""
        key = store_keys.balance_holds(did)
        try:
            for _ in range(CAS_ATTEMPTS):
                found = await self.store.get(key)
                if found is None:
                    return
                held = orjson.loads(found.data)["peeks"]
                if held.pop(peek_id, None) is None:
                    return
                try:
                    await self._put_holds(key, held, found)
                    return
                except PreconditionFailed:
                    continue
        except AgentChatError as exc:
            log.warning("peek %s: could not drop %s's balance hold; its next refusal will: %r", peek_id, did, exc)

    async def _refusal_record(self, peek_id: str, did: str) -> dict[str, Any] | None:
        found = await self.store.get(store_keys.peek_refusal(peek_id, did))
        return None if found is None else orjson.loads(found.data)

    async def release(self, peek_id: str, did: str) -> None:
        """A refusal that did not go through: release its card hold, unless the peek was refused by
        this same agent meanwhile (a concurrent duplicate of the refusal won)."""
        try:
            found = await self.store.get(store_keys.peek(peek_id))
            if found is None:
                return
            peek = Peek.from_bytes(found.data)
            if peek.state is PeekState.REFUSED and peek.refused_by == did:
                return
            record = await self._refusal_record(peek_id, did)
            if record is not None and record.get("method") == "card":
                await self.payments.cancel(record["ref"], key=idempotency_key(peek_id, "refusal-cancel-" + _agent_tag(did)))
            if record is not None and record.get("method") in BALANCE_METHODS:
                await self._drop_balance_hold(peek_id, did)
        except AgentChatError as exc:
            log.warning("peek %s: could not release %s's refusal hold; the scan will: %r", peek_id, did, exc)

    async def release_losing(self, peek: Peek) -> None:
        winner = peek.refused_by if peek.state is PeekState.REFUSED else None
        for key in await self.store.list(store_keys.peek_refusal_prefix(peek.id), limit=1000):
            found = await self.store.get(key)
            if found is None:
                continue
            record = orjson.loads(found.data)
            if record.get("agent") != winner and record.get("method") == "card":
                await self.payments.cancel(record["ref"], key=idempotency_key(
                    peek.id, "refusal-cancel-" + _agent_tag(record["agent"])))
            elif record.get("agent") != winner and record.get("method") in BALANCE_METHODS:
                await self._drop_balance_hold(peek.id, record["agent"])

    async def settle(self, peek: Peek) -> None:
        """The refusing agent pays the fee to the platform: from its card if it was held (the money
        then comes from outside the ledger), else from its balance (earnings, or a debt)."""
        did, fee = peek.refused_by, peek.refusal_fee_cents
        assert did is not None
        if not fee:
            return
        record = await self._refusal_record(peek.id, did)
        kind = money.EntryKind.REFUSAL_FEE
        created_at = peek.updated_at
        entries = money.refusal_fee_entries(peek.id, did, fee, created_at=created_at)
        if record is not None and record.get("method") == "card":
            try:
                await self.payments.capture(record["ref"], key=idempotency_key(peek.id, "refusal-capture"))
                entries = [money.Entry(money.EXTERNAL, -fee, kind, created_at, peek_id=peek.id),
                           money.Entry(money.PLATFORM, fee, kind, created_at, peek_id=peek.id)]
            except AgentChatError as exc:
                if exc.retryable:
                    raise
                log.warning("peek %s: the refusal fee hold could not be captured (%s); charged to %s's "
                            "balance", peek.id, exc.message, did)
        await self.ledger.record(entries)
        if record is None or record.get("method") in BALANCE_METHODS:
            await self._drop_balance_hold(peek.id, did)
