"""A peek's transitions: feed ``core/peek.py`` an event, store the result with compare-and-set, then
tell everyone and execute the effects; and drive a peek whose time has come.

The store is the truth: every change is a compare-and-set on the peek object's etag (the calling
contract of ``core/peek.py``), so when a refusal races the deadline on different processes exactly one
write wins and the other caller gets ``peek_state``. The winner tells its sockets and the bus before it
executes any effect, so an outcome goes out as soon as the store holds it. Every effect is idempotent
(ledger transaction ids and payment idempotency keys derive from the peek id), so the scan may redo
what a process that died cut short (``durable_effects``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from agentchat.bus import keys as bus_keys
from agentchat.bus.base import Bus
from agentchat.core.peek import (ArmTimer, CancelPayment, CapturePayment, CaptureFailed, CaptureSucceeded,
                                 ChargeRefusalFee, DeadlineReached, Effect, Event, KeyGranted, Peek, PeekState,
                                 RevokeAccess, SplitCapture, TimeUp, step)
from agentchat.errors import AgentChatError, error
from agentchat.payments.base import PaymentProvider
from agentchat.server.hub import Hub
from agentchat.server.peek_index import CAPTURE_RETRY_SECONDS, DueIndex, UnpaidCaps
from agentchat.server.peek_money import PeekMoney
from agentchat.server.peek_refusals import Refusals, idempotency_key
from agentchat.server.peek_timers import PeekTimers
from agentchat.store import keys as store_keys
from agentchat.store.base import ObjectStore, PreconditionFailed, StoredObject
from agentchat.store.records import Records

log = logging.getLogger(__name__)

CAS_ATTEMPTS = 32


def log_transition(peek: Peek) -> None:
    """One line per change of a peek's state, by the process that made it (the operator's record)."""
    detail = ""
    if peek.refused_by:
        detail = f" by {peek.refused_by}"
    elif peek.failure_reason:
        detail = f": {peek.failure_reason}"
    elif peek.state == PeekState.ACTIVE:
        detail = f": paid, {peek.price_cents} cents captured"
    log.info("peek %s on %s: %s%s", peek.id, peek.channel, peek.state, detail)


class PeekTransitions:
    """``observe``: take note of a peek's new state and tell the local sockets (the service's
    ``observe``); ``countdown_started``: called once by the process whose transition started it."""

    def __init__(self, *, store: ObjectStore, bus: Bus, hub: Hub, records: Records, payments: PaymentProvider,
                 index: DueIndex, unpaid: UnpaidCaps, refusals: Refusals, money: PeekMoney, timers: PeekTimers,
                 clock: Callable[[], float], observe: Callable[[Peek], None],
                 countdown_started: Callable[[Peek], None]) -> None:
        self.store = store
        self.bus = bus
        self.hub = hub
        self.records = records
        self.payments = payments
        self.index = index
        self.unpaid = unpaid
        self.refusals = refusals
        self.money = money
        self.timers = timers
        self.clock = clock
        self._observe = observe
        self._countdown_started = countdown_started
        # (peek id, version) whose effects this process saw through: the scan need not redo them.
        self._settled: set[tuple[str, int]] = set()

    def forget(self, keep: set[str]) -> None:
        self._settled = {(i, v) for i, v in self._settled if i in keep}

    async def apply(self, peek_id: str, event_for: Callable[[Peek], Event],
                    found: StoredObject | None = None) -> Peek:
        """Load, step, compare-and-set, then execute the effects (only the winner does). Raises
        ``peek_state`` if the event does not apply, including when another process got there first.
        ``found``: the peek as the caller just read it from the store, which saves the first read."""
        key = store_keys.peek(peek_id)
        for _ in range(CAS_ATTEMPTS):
            if found is None:
                found = await self.store.get(key)
            if found is None:
                raise error("peek_not_found", f"no peek {peek_id}")
            peek = Peek.from_bytes(found.data)
            transition = step(peek, event_for(peek), self.clock())
            try:
                await self.store.put(key, transition.peek.to_bytes(), if_match=found.etag)
            except PreconditionFailed:
                found = None
                continue
            if transition.peek.state != peek.state:
                log_transition(transition.peek)
            # Before any other await: a reader who sees the new state in the store (a peeker polling
            # for ``active``) finds this process agreeing at once (``peek_readable``).
            self._observe(transition.peek)
            try:
                await self.index.move(peek, transition.peek)
            except AgentChatError as exc:  # the startup scan re-indexes every open peek
                log.warning("peek %s: could not index its next due time: %r", peek_id, exc)
            await self.after(transition.peek, transition.effects)
            return transition.peek
        raise error("conflict", "the peek is being changed by others; try again")

    async def after(self, peek: Peek, effects: Iterable[Effect]) -> None:
        """Tell everyone, then execute the effects in order; a terminal peek whose effects all went
        through leaves the open index."""
        self._observe(peek)
        await self.publish(bus_keys.PEEK_STATE, peek.to_bytes())
        if peek.state is PeekState.COUNTDOWN:
            self._countdown_started(peek)
        if peek.version == 2:  # the first transition always leaves awaiting_payment
            await self.unpaid.release(peek)
        try:
            for effect in effects:
                await self._execute(peek, effect)
            if peek.state.terminal:
                await self._finish(peek)
        except AgentChatError as exc:
            # The scan redoes what is missing (every effect is idempotent): it is due again now.
            log.warning("peek %s (%s): an effect failed, the scan will retry: %r", peek.id, peek.state, exc)
            try:
                await self.store.put(store_keys.peek_due(int(self.clock() * 1000), peek.id), b"")
            except AgentChatError:
                pass  # the startup scan of the open markers finds it
            return
        # A transition's effects include what its state implies (``durable_effects``): this
        # process's scan need not redo them.
        self._settled.add((peek.id, peek.version))

    async def publish(self, topic: str, body: bytes) -> None:
        try:
            await self.bus.publish(topic, body)
        except AgentChatError as exc:  # other processes catch up at their next scan
            log.warning("could not publish on %s: %r", topic, exc)

    async def key_kept(self, peek_id: str, did: str) -> Peek:
        """A grant is stored for a peek awaiting its key: the capture may go ahead (once)."""
        try:
            return await self.apply(peek_id, lambda _: KeyGranted(did))
        except AgentChatError as exc:
            if exc.code != "peek_state":
                raise
            found = await self.store.get(store_keys.peek(peek_id))  # another grant moved it on first
            if found is None:
                raise error("peek_not_found", f"no peek {peek_id}") from None
            return Peek.from_bytes(found.data)

    async def drive(self, peek: Peek, found: StoredObject) -> None:
        """Do what is due for ``peek`` (stored as ``found``) now: its time event, a capture left
        hanging, or the effects a crash may have cut short."""
        now = self.clock()
        at = peek.wake_at
        if peek.state is PeekState.AWAITING_KEY and at is not None and now >= at:
            # A grant kept just before a crash wins over the grant wait's end: the key was handed over.
            if (granted_by := await self._kept_grant(peek)) is not None:
                await self.key_kept(peek.id, granted_by)
                return
        if at is not None and now >= at:
            event: Event = TimeUp() if peek.state is PeekState.ACTIVE else DeadlineReached()
            # Every peek passes here once or twice: only a late one is worth an operator's attention.
            log.log(logging.WARNING if now - at > 1.0 else logging.DEBUG,
                    "peek %s: %s is due (%.3f s late)", peek.id, event.name, now - at)
            try:
                await self.apply(peek.id, lambda _: event, found)
            except AgentChatError as exc:
                if exc.code != "peek_state":
                    raise
            return
        if at is not None:
            self.timers.arm(peek, at, backup=True)
        if peek.state is PeekState.AWAITING_KEY:
            if (granted_by := await self._kept_grant(peek)) is not None:
                await self.key_kept(peek.id, granted_by)
            return
        if peek.state is PeekState.CAPTURING:
            if now - peek.updated_at >= CAPTURE_RETRY_SECONDS:
                await self._capture(peek)
            else:
                self.timers.arm_at(peek.id, peek.version, peek.updated_at + CAPTURE_RETRY_SECONDS)
            return
        if (peek.id, peek.version) in self._settled:
            return
        for effect in durable_effects(peek):
            await self._execute(peek, effect)
        if peek.state.terminal:
            await self._finish(peek)
        self._settled.add((peek.id, peek.version))

    async def _kept_grant(self, peek: Peek) -> str | None:
        """Who handed over the key a peek awaiting it already holds (a grant stored before a crash)."""
        kept = await self.store.list(store_keys.peek_grant_prefix(peek.id), limit=1)
        if not kept:
            return None
        granted = await self.store.get(kept[0])
        return None if granted is None else str(orjson.loads(granted.data)["granted_by"])

    async def _execute(self, peek: Peek, effect: Effect) -> None:
        if isinstance(effect, ArmTimer):
            self.timers.arm(peek, effect.at)
        elif isinstance(effect, CancelPayment):
            await self.money.cancel_hold(peek)
        elif isinstance(effect, CapturePayment):
            await self._capture(peek)
        elif isinstance(effect, ChargeRefusalFee):
            await self.refusals.settle(peek)
        elif isinstance(effect, SplitCapture):
            await self.money.record_split(peek)
        elif isinstance(effect, RevokeAccess):
            await self._revoke(peek)
        # NotifyAgents, NotifyPeeker, RequestGrant, DeliverGrants: the p:state message already told every
        # process; each sends its peeker sockets the kept grants when it sees ``active`` (open_channel).

    async def _finish(self, peek: Peek) -> None:
        """A terminal peek: release refusal holds that did not win, then leave the open index."""
        await self.refusals.release_losing(peek)
        await self.store.delete(store_keys.peek_open(peek.id))

    async def _capture(self, peek: Peek) -> None:
        """Capture the price, then move the peek on. A transient failure leaves it in ``capturing``;
        a timer here and the scan everywhere retry it."""
        ref = await self.money.hold_ref(peek)
        try:
            if ref is None:
                raise error("payment_declined", "the peek has no authorised payment")
            await self.payments.capture(ref, key=idempotency_key(peek.id, "capture"))
            event: Event = CaptureSucceeded()
        except AgentChatError as exc:
            if exc.retryable:
                self.timers.arm_at(peek.id, peek.version, self.clock() + CAPTURE_RETRY_SECONDS)
                raise
            event = CaptureFailed(exc.message)
        try:
            await self.apply(peek.id, lambda _: event)
        except AgentChatError as exc:
            if exc.code != "peek_state":  # peek_state: another process recorded the result first
                raise

    async def _revoke(self, peek: Peek) -> None:
        meta = await self.records.get_channel(peek.channel)
        event: dict[str, Any] = {"event": "peek_ended", "peek": peek.id}
        if meta is not None:
            event["epoch"] = meta["epoch"]  # the members start the epoch after this one
        await self.hub.publish_channel_event(peek.channel, event)


def durable_effects(peek: Peek) -> list[Effect]:
    """What must have happened for a peek in its state, redone by the scan after a crash."""
    state = peek.state
    if state is PeekState.ACTIVE:
        return [SplitCapture(peek.id, peek.channel, peek.price_cents, peek.members)]
    if state is PeekState.ENDED:
        return [SplitCapture(peek.id, peek.channel, peek.price_cents, peek.members),
                RevokeAccess(peek.id, peek.channel)]
    if state is PeekState.REFUSED:
        assert peek.refused_by is not None
        return [CancelPayment(peek.id, peek.payment_ref),
                ChargeRefusalFee(peek.id, peek.refused_by, peek.refusal_fee_cents)]
    if state in (PeekState.PAYMENT_FAILED, PeekState.CANCELED, PeekState.EXPIRED, PeekState.WITHDRAWN,
                 PeekState.NO_KEY):
        return [CancelPayment(peek.id, peek.payment_ref)]
    return []
