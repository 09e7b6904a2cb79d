"""The peek service: the I/O shell around ``core/peek.py`` (state machine) and ``core/ledger.py``.

Where things live
-----------------
- The store is the truth. ``peeks/<id>.json`` holds the peek; every change is a compare-and-set on the
  object's etag (the calling contract of ``core/peek.py``), so when a refusal races the deadline on
  different processes exactly one write wins and the other caller gets ``peek_state``.
- ``peeks-open/<id>`` marks a peek whose work is not finished: not terminal, or terminal with effects
  (ledger entries, releasing holds, revoking access) that may have been cut short. It is written before
  the peek and removed last.
- ``peek-payments/<id>.json`` is the hold of the peek's price; ``peek-refusals/<id>/<did>.json`` how
  a refusing agent pays its fee; ``balance-holds/<did>.json`` the refusal fees an agent's earnings are
  set aside for (``{"peeks": {id: cents}}``, changed by compare-and-set), so two refusals at once
  cannot both spend the same balance; ``peek-grants/<id>/<epoch>.json`` the epoch keys agents wrapped for
  the peeker; ``cards/<did>.json`` an agent's card on file.

Timers and crashes
------------------
The process that makes a transition arms a timer at the peek's ``wake_at``; every other process learns
the transition from the bus (topic ``p:state``) and arms a backup timer ``BACKUP_DELAY`` later. Every
process also re-reads the open peeks every ``peek_scan_seconds``: it drives those that are due, re-issues
a capture left hanging, and redoes the effects a dead process may have cut short (all idempotent: ledger
transaction ids and payment idempotency keys derive from the peek id). So a deadline is enforced,
within one scan period at worst, whatever process dies, and the bus may forget everything.

Live delivery
-------------
Every transition is published on ``p:state``; each process tells its own sockets: the channel's agents
(``peek_request`` at the countdown, ``peek`` for later states) and the peeker (``peek`` for every
state, ``peek_tick`` every second of the countdown, ``peek_grant`` for each wrapped key). The process
that wins a compare-and-set tells its sockets and the bus before it executes any effect, so an outcome
goes out as soon as the store holds it: at the deadline that is ``capturing`` (nobody refused), and
the capture, the ``active`` state and the ledger entries follow. While the peek
is active the peeker's socket reads the channel (history, then live); when it ends the socket is closed
and the channel's agents get a ``peek_ended`` channel event, on which the SDK starts a new epoch.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

import orjson

from agentchat.bus import keys as bus_keys
from agentchat.bus.base import Bus
from agentchat.config import Settings
from agentchat.core import frames
from agentchat.core.peek import (ArmTimer, CancelPayment, CapturePayment, CaptureFailed, CaptureSucceeded,
                                 ChargeRefusalFee, DeadlineReached, Effect, Event, KeyGranted, PaymentAuthorized,
                                 PaymentFailed, Peek, PeekState, Refuse, RevokeAccess, SplitCapture, TimeUp,
                                 open_peek, step)
from agentchat.core.peek import Cancel as CancelPeek
from agentchat.errors import AgentChatError, error
from agentchat.payments.base import Hold, HoldState, PaymentProvider
from agentchat.payments.ledger import LedgerStore
from agentchat.server.hub import Hub, HubListenerBase
from agentchat.server.peek_index import CAPTURE_RETRY_SECONDS, EXPIRED_RETENTION_SECONDS, DueIndex, UnpaidCaps
from agentchat.server.peek_delivery import PeekDelivery, peek_frame, peek_view  # noqa: F401 (peek_view: re-exported)
from agentchat.server.peek_money import PeekMoney
from agentchat.server.peek_refusals import Refusals, idempotency_key
from agentchat.server.session import CLOSE_REMOVED, Session
from agentchat.server.tokens import Principal
from agentchat.store import keys as store_keys
from agentchat.store.base import ObjectStore, PreconditionFailed, StoredObject
from agentchat.store.records import Records

log = logging.getLogger(__name__)

CAS_ATTEMPTS = 32
# Processes that did not make a transition fire its timer this much later: the one that did usually
# wins alone, and another takes over if it is gone.
BACKUP_DELAY = 0.25
TIMER_SLACK = 0.002
SCAN_TIMEOUT_SECONDS = 30.0
# The due scan lists due markers this many at a time, stopping at the first one not yet due.
DUE_PAGE = 100
# The states in which a member may hand over the channel key (kept; given to the peeker once active).
STATES_TAKING_GRANTS = frozenset({PeekState.AWAITING_KEY, PeekState.CAPTURING, PeekState.ACTIVE})




# --- the service -------------------------------------------------------------------------------------


class PeekService(HubListenerBase):
    bus_kind = bus_keys.PEEKS

    def __init__(self, *, settings: Settings, store: ObjectStore, bus: Bus, hub: Hub, records: Records,
                 payments: PaymentProvider, ledger: LedgerStore, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.store = store
        self.bus = bus
        self.hub = hub
        self.records = records
        self.payments = payments
        self.ledger = ledger
        self.clock = clock
        self.index = DueIndex(store)
        self.unpaid = UnpaidCaps(settings=settings, bus=bus, store=store, clock=lambda: self.clock())
        self.refusals = Refusals(settings=settings, store=store, payments=payments, ledger=ledger)
        self.money = PeekMoney(store=store, payments=payments, ledger=ledger, records=records, clock=clock)
        # Peeks this process knows to be under way (from its own transitions, the bus and the scan).
        self.known: dict[str, Peek] = {}
        self.delivery = PeekDelivery(hub=hub, store=store, clock=lambda: self.clock(), spawn=self._spawn,
                                     current=self.known.get)
        self._delivered: dict[str, int] = {}  # peek id -> last version told to local sockets
        self._timers: dict[str, tuple[int, asyncio.TimerHandle]] = {}  # peek id -> (version, timer)
        self._settled: set[tuple[str, int]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._scanner: asyncio.Task[None] | None = None
        self._closing = False

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.bus.subscribe(bus_keys.PEEK_STATE)
        await self.bus.subscribe(bus_keys.PEEK_GRANT)
        try:
            await self.scan_all()
        except AgentChatError as exc:  # the due scan still runs; the next start tries again
            log.warning("first peek scan failed: %r", exc)
        self._scanner = asyncio.create_task(self._scan_loop(), name="peek-scan")

    async def close(self) -> None:
        self._closing = True
        if self._scanner is not None:
            self._scanner.cancel()
        for _, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        tasks = [*self._tasks, *self.delivery.tickers(), *([self._scanner] if self._scanner else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coro: Any, name: str) -> None:
        if self._closing:
            coro.close()
            return
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if isinstance(exc, AgentChatError):
                log.info("peek task %s: %r", task.get_name(), exc)
            else:
                log.error("peek task %s failed", task.get_name(), exc_info=exc)

    # ------------------------------------------------------------------------------ reading

    async def load(self, peek_id: str) -> Peek:
        frames.check_peek_id(peek_id, "peek id")
        found = await self.store.get(store_keys.peek(peek_id))
        if found is None:
            raise error("peek_not_found", f"no peek {peek_id}")
        return Peek.from_bytes(found.data)

    def peek_readable(self, peek_id: str) -> bool:
        """``HubListener``: whether a peek token may read its channel now: only while its peek is active
        (and its time is not up, even if the transition to ``ended`` has not reached this process yet)."""
        peek = self.known.get(peek_id)
        return (peek is not None and peek.state is PeekState.ACTIVE
                and peek.ends_at is not None and self.clock() < peek.ends_at)

    async def payment(self, peek_id: str) -> dict[str, Any] | None:
        found = await self.store.get(store_keys.peek_payment(peek_id))
        return None if found is None else orjson.loads(found.data)

    async def grants(self, peek_id: str) -> list[dict[str, Any]]:
        return await self.delivery.grants(peek_id)

    # ------------------------------------------------------------------------------ what users do

    def agents_online_here(self, channel: str) -> bool:
        """Whether an agent of ``channel`` holds a socket on this process (the indicators know the others)."""
        room = self.hub.rooms.get(channel)
        return room is not None and any(s.principal.is_agent for s in room.subscribers)

    async def open(self, channel: str, peeker_public_key: str, *, agents_online: int = 0,
                   address: str = "") -> tuple[Peek, Hold]:
        """A human asks to peek: the peek (awaiting payment) and the hold their browser completes.

        ``agents_online``: the channel's agents online on any process, by the indicators. With none
        here either, nobody could hand over the key, so the peek is refused before any money is held."""
        meta = await self.records.get_channel(channel)
        if meta is None:
            raise error("channel_not_found", f"no channel {channel}")
        if meta.get("listed", True) is False:  # its owner keeps it off the market
            raise error("channel_unlisted", f"{channel} is unlisted: it cannot be peeked")
        if not agents_online and not self.agents_online_here(channel):
            raise error("no_agent_online", f"No agent of {channel} is online to hand over its key, so it cannot "
                                           "be peeked now; try again when its indicators show an agent online.")
        settings = self.settings
        peek_id = "pk_" + secrets.token_urlsafe(16)
        opened = open_peek(peek_id, channel, peeker_public_key, self.clock(),
                           price_cents=settings.peek_price_cents, refusal_fee_cents=settings.refusal_fee_cents,
                           refusal_window_seconds=float(settings.peek_refusal_window_seconds),
                           duration_seconds=float(settings.peek_duration_seconds),
                           payment_timeout_seconds=float(settings.peek_payment_timeout_seconds),
                           grant_wait_seconds=float(settings.peek_grant_wait_seconds))
        peek = opened.peek
        tag = hashlib.sha256(address.encode()).hexdigest()[:16]  # the address itself is never stored
        await self.unpaid.claim(peek, tag)
        await self.store.put(store_keys.peek_open(peek_id), b"")  # first: a stored peek is always found by the scan
        await self.store.put(store_keys.peek(peek_id), peek.to_bytes(), if_none_match=True)
        await self.index.move(None, peek)
        try:
            hold = await self.payments.authorize(peek_id, peek.price_cents, key=idempotency_key(peek_id, "authorize"))
        except AgentChatError as exc:
            reason = exc.message
            try:
                await self.apply(peek_id, lambda _: PaymentFailed(reason))
            except AgentChatError:
                pass
            raise
        await self.store.put(store_keys.peek_payment(peek_id), orjson.dumps(
            {"provider": self.payments.name, "ref": hold.ref, "client": hold.client, "opened_by": tag}))
        await self._after(peek, [e for e in opened.effects if isinstance(e, ArmTimer)])
        return peek, hold

    async def confirm_payment(self, peek_id: str, body: dict[str, Any]) -> Peek:
        """The peeker says they paid (dev: this is the payment). Paying again is ``peek_state``."""
        peek = await self.load(peek_id)
        if peek.state is not PeekState.AWAITING_PAYMENT:
            if peek.state in (PeekState.COUNTDOWN, PeekState.CAPTURING, PeekState.ACTIVE):
                raise error("peek_state", f"The peek is already paid for: it is {peek.state}.")
            raise error("peek_state", f"The peek can no longer be paid for: it is {peek.state}.")
        record = await self.payment(peek_id)
        if record is None:
            raise error("peek_state", "The peek's payment has not been started yet; retry shortly.")
        hold = await self.payments.payer_confirmed(record["ref"], body)
        return await self._on_hold(peek_id, hold)

    async def reconcile(self, peek_id: str, ref: str) -> Peek | None:
        """A payment provider event about ``ref``: ask the provider where the hold stands and move the
        peek accordingly. Events arriving twice or out of order change nothing wrongly."""
        try:
            peek = await self.load(peek_id)
        except AgentChatError:
            return None
        record = await self.payment(peek_id)
        if record is None or record["ref"] != ref:
            return None  # not this peek's price (a refusal fee's hold, or a forged metadata)
        if peek.state is not PeekState.AWAITING_PAYMENT:
            return peek  # captures and cancels are the server's own doing
        return await self._on_hold(peek_id, await self.payments.status(ref))

    async def _on_hold(self, peek_id: str, hold: Hold) -> Peek:
        event: Event
        if hold.state is HoldState.AUTHORIZED:
            # The members now share the capture; later joins get nothing from this peek.
            peek = await self.load(peek_id)
            meta = await self.records.get_channel(peek.channel)
            event = PaymentAuthorized(hold.ref, tuple(meta["members"]) if meta else ())
        elif hold.state in (HoldState.FAILED, HoldState.CANCELED):
            event = PaymentFailed(hold.reason or f"the payment was {hold.state}")
        else:
            return await self.load(peek_id)  # still pending: nothing to do yet
        try:
            return await self.apply(peek_id, lambda _: event)
        except AgentChatError as exc:
            if exc.code != "peek_state":
                raise
            current = await self.load(peek_id)
            if hold.state is HoldState.AUTHORIZED and current.state is not PeekState.AWAITING_PAYMENT:
                if current.payment_ref == hold.ref:
                    raise error("peek_state", f"The peek is already paid for: it is {current.state}.") from None
            raise

    async def cancel(self, peek_id: str) -> Peek:
        return await self.apply(peek_id, lambda _: CancelPeek())

    async def refuse(self, peek_id: str, did: str) -> Peek:
        """An agent refuses. Its fee is secured first (earnings, else a hold on its card on file); the
        refusal then races the deadline, and a refusal that loses releases what it secured."""
        peek = await self.load(peek_id)
        meta = await self.records.get_channel(peek.channel)
        if meta is None or did not in meta["members"]:
            raise error("not_member", f"only members of {peek.channel} may refuse this peek")
        step(peek, Refuse(did), self.clock())  # raises peek_state now rather than after charging
        await self.refusals.fund(peek, did)
        try:
            return await self.apply(peek_id, lambda _: Refuse(did))
        except AgentChatError:
            await self.refusals.release(peek_id, did)
            raise

    async def _standing_refusals(self, peek: Peek) -> None:
        """The countdown started: a member whose standing choice is ``refuse`` refuses now, online or
        not (its funding was checked when it made the choice; the first refusal ends the peek)."""
        for did in peek.members or ():
            if await self.refusals.choice(did) != "refuse":
                continue
            try:
                await self.refuse(peek.id, did)
                log.info("peek %s refused by %s's standing choice", peek.id, did)
                return
            except AgentChatError as exc:
                if exc.code == "peek_state":
                    return  # decided already
                log.warning("peek %s: %s's standing refusal failed: %r", peek.id, did, exc)

    async def grant(self, peek_id: str, did: str, epoch: int, wrapped_key: dict[str, Any]) -> Peek:
        """A member hands the active peek the channel's current epoch key, wrapped for the peeker. The
        first grant of an epoch is kept; later ones change nothing."""
        peek = await self.load(peek_id)
        meta = await self.records.get_channel(peek.channel)
        if meta is None or did not in meta["members"]:
            raise error("not_member", f"only members of {peek.channel} may grant keys to this peek")
        if peek.state not in STATES_TAKING_GRANTS:
            raise error("peek_state", "Keys are handed over once the countdown is over and nobody refused; "
                                      f"this peek is {peek.state}.")
        if epoch != meta["epoch"]:
            raise error("stale_epoch", f"channel {peek.channel} is at epoch {meta['epoch']}; grant that one")
        grant = {"peek": peek_id, "channel": peek.channel, "epoch": epoch, "wrapped_key": wrapped_key,
                 "granted_by": did, "granted_at": int(self.clock() * 1000)}
        try:
            await self.store.put(store_keys.peek_grant(peek_id, epoch), orjson.dumps(grant), if_none_match=True)
        except PreconditionFailed:
            if peek.state is not PeekState.AWAITING_KEY:
                return peek
        if peek.state is PeekState.AWAITING_KEY:
            # Kept, not handed over: the peeker gets it once the capture succeeded (``_open_channel``).
            return await self._key_kept(peek_id, did)
        if peek.state is PeekState.ACTIVE:  # a new epoch during the peek: the peeker needs it too
            self.delivery.deliver_grant(grant)
            await self._publish(bus_keys.PEEK_GRANT, orjson.dumps(grant))
        return peek

    async def _key_kept(self, peek_id: str, did: str) -> Peek:
        """A grant is stored for a peek awaiting its key: the capture may go ahead (once)."""
        try:
            return await self.apply(peek_id, lambda _: KeyGranted(did))
        except AgentChatError as exc:
            if exc.code != "peek_state":
                raise
            return await self.load(peek_id)  # another grant moved it on first

    # ------------------------------------------------------------------------------ transitions

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
            try:
                await self.index.move(peek, transition.peek)
            except AgentChatError as exc:  # the startup scan re-indexes every open peek
                log.warning("peek %s: could not index its next due time: %r", peek_id, exc)
            await self._after(transition.peek, transition.effects)
            return transition.peek
        raise error("conflict", "the peek is being changed by others; try again")

    async def _after(self, peek: Peek, effects: Any) -> None:
        """Tell everyone, then execute the effects in order; a terminal peek whose effects all went
        through leaves the open index."""
        self._observe(peek, arm=False)
        await self._publish(bus_keys.PEEK_STATE, peek.to_bytes())
        if peek.state is PeekState.COUNTDOWN:
            self._spawn(self._standing_refusals(peek), f"peek-standing-{peek.id}")
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
        # A transition's effects include what its state implies (``_durable_effects``): this
        # process's scan need not redo them.
        self._settled.add((peek.id, peek.version))

    async def _execute(self, peek: Peek, effect: Effect) -> None:
        if isinstance(effect, ArmTimer):
            self._arm(peek, effect.at)
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
        # process; each sends its peeker sockets the kept grants when it sees ``active`` (_open_channel).

    def _durable_effects(self, peek: Peek) -> list[Effect]:
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

    async def _finish(self, peek: Peek) -> None:
        """A terminal peek: release refusal holds that did not win, then leave the open index."""
        await self.refusals.release_losing(peek)
        await self.store.delete(store_keys.peek_open(peek.id))

    # ------------------------------------------------------------------------------ money

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
                self._arm_at(peek.id, peek.version, self.clock() + CAPTURE_RETRY_SECONDS)
                raise
            event = CaptureFailed(exc.message)
        try:
            await self.apply(peek.id, lambda _: event)
        except AgentChatError as exc:
            if exc.code != "peek_state":  # peek_state: another process recorded the result first
                raise

    # ------------------------------------------------------------------------------ access

    async def _revoke(self, peek: Peek) -> None:
        meta = await self.records.get_channel(peek.channel)
        event: dict[str, Any] = {"event": "peek_ended", "peek": peek.id}
        if meta is not None:
            event["epoch"] = meta["epoch"]  # the members start the epoch after this one
        await self.hub.publish_channel_event(peek.channel, event)

    # ------------------------------------------------------------------------------ timers and scan

    def _arm(self, peek: Peek, at: float, *, backup: bool = False) -> None:
        current = self._timers.get(peek.id)
        if current is not None and current[0] >= peek.version and backup:
            return  # this process armed it itself, on time
        self._arm_at(peek.id, peek.version, at + (BACKUP_DELAY if backup else 0.0))

    def _arm_at(self, peek_id: str, version: int, at: float) -> None:
        if self._closing:
            return
        current = self._timers.get(peek_id)
        if current is not None:
            if current[0] > version:  # a timer for a later state of the peek stands
                return
            current[1].cancel()
        # A hair late rather than early: the deadline event is only accepted once it is due.
        delay = max(0.0, at - self.clock()) + TIMER_SLACK
        handle = asyncio.get_running_loop().call_later(
            delay, lambda: self._spawn(self._wake(peek_id), f"peek-wake-{peek_id}"))
        self._timers[peek_id] = (version, handle)

    def _disarm(self, peek_id: str) -> None:
        current = self._timers.pop(peek_id, None)
        if current is not None:
            current[1].cancel()

    async def _wake(self, peek_id: str) -> None:
        self._timers.pop(peek_id, None)
        found = await self.store.get(store_keys.peek(peek_id))
        if found is None:
            return
        peek = Peek.from_bytes(found.data)
        self._observe(peek, arm=False)
        await self._drive(peek, found)

    async def _drive(self, peek: Peek, found: StoredObject) -> None:
        """Do what is due for ``peek`` (stored as ``found``) now: its time event, a capture left
        hanging, or the effects a crash may have cut short."""
        now = self.clock()
        at = peek.wake_at
        if peek.state is PeekState.AWAITING_KEY and at is not None and now >= at:
            # A grant kept just before a crash wins over the grant wait's end: the key was handed over.
            kept = await self.store.list(store_keys.peek_grant_prefix(peek.id), limit=1)
            if kept:
                granted = await self.store.get(kept[0])
                if granted is not None:
                    await self._key_kept(peek.id, orjson.loads(granted.data)["granted_by"])
                    return
        if at is not None and now >= at:
            event: Event = TimeUp() if peek.state is PeekState.ACTIVE else DeadlineReached()
            log.info("peek %s: %s is due (%.3f s late)", peek.id, event.name, now - at)
            try:
                await self.apply(peek.id, lambda _: event, found)
            except AgentChatError as exc:
                if exc.code != "peek_state":
                    raise
            return
        if at is not None:
            self._arm(peek, at, backup=True)
        if peek.state is PeekState.AWAITING_KEY:
            kept = await self.store.list(store_keys.peek_grant_prefix(peek.id), limit=1)
            if kept:
                granted = orjson.loads((await self.store.get(kept[0])).data)["granted_by"]
                await self._key_kept(peek.id, granted)
            return
        if peek.state is PeekState.CAPTURING:
            if now - peek.updated_at >= CAPTURE_RETRY_SECONDS:
                await self._capture(peek)
            else:
                self._arm_at(peek.id, peek.version, peek.updated_at + CAPTURE_RETRY_SECONDS)
            return
        if (peek.id, peek.version) in self._settled:
            return
        for effect in self._durable_effects(peek):
            await self._execute(peek, effect)
        if peek.state.terminal:
            await self._finish(peek)
        self._settled.add((peek.id, peek.version))

    # ------------------------------------------------------------------------------ the due index

    async def scan(self) -> None:
        """Drive the peeks that are due, and only those: list ``peeks-due/`` from the start (keys sort
        by time) and stop at the first marker not yet due. Idle, that is one small listing per scan
        whatever the number of open peeks."""
        now_ms = int(self.clock() * 1000)
        start_after = ""
        while True:
            page = await self.store.list(store_keys.PEEK_DUE_PREFIX, start_after=start_after, limit=DUE_PAGE)
            for key in page:
                at_ms, peek_id = store_keys.parse_peek_due(key)
                if at_ms > now_ms:
                    return self._prune()
                try:
                    await self._drive_due(key, at_ms, peek_id)
                except AgentChatError as exc:  # its marker stays: the next scan tries again
                    log.warning("peek %s: scan could not drive it: %r", peek_id, exc)
            if len(page) < DUE_PAGE:
                return self._prune()
            start_after = page[-1]

    async def _drive_due(self, key: str, at_ms: int, peek_id: str) -> None:
        found = await self.store.get(store_keys.peek(peek_id))
        if found is None:
            await self.store.delete(key)
            return
        peek = Peek.from_bytes(found.data)
        self._observe(peek, arm=False)
        if peek.state is PeekState.EXPIRED and self.clock() >= peek.updated_at + EXPIRED_RETENTION_SECONDS:
            await self.index.purge(peek)
            await self.store.delete(key)
            return
        await self._drive(peek, found)
        current = await self.store.get(store_keys.peek(peek_id))
        due = None if current is None else self.index.due_at(Peek.from_bytes(current.data))
        if due is None or int(due * 1000) != at_ms:
            await self.store.delete(key)  # done, or moved to another time by the transition
            if current is not None and due is not None:
                await self.store.put(store_keys.peek_due(int(due * 1000), peek_id), b"")

    def _prune(self) -> None:
        """Forget per-peek notes of peeks this process no longer follows."""
        self._settled = {(i, v) for i, v in self._settled if i in self.known}
        self._delivered = {i: v for i, v in self._delivered.items() if i in self.known}
        self.delivery.prune(set(self.known))

    async def scan_all(self) -> None:
        """At startup: re-read every open peek (``peeks-open/``), drive it and index its due time. This
        also indexes peeks stored before the due index existed, and finishes what a process that died
        left half done; afterwards the periodic scan reads only what is due."""
        open_ids: set[str] = set()
        start_after = ""
        while True:
            page = await self.store.list(store_keys.PEEK_OPEN_PREFIX, start_after=start_after, limit=1000)
            if not page:
                break
            open_ids.update(key[len(store_keys.PEEK_OPEN_PREFIX):] for key in page)
            start_after = page[-1]
        log.debug("peek scan: %d open, %d known", len(open_ids), len(self.known))
        for peek_id in sorted(open_ids | set(self.known)):
            try:
                found = await self.store.get(store_keys.peek(peek_id))
                if found is None:
                    if peek_id in open_ids:
                        await self.store.delete(store_keys.peek_open(peek_id))  # opened by a process that died
                    self.known.pop(peek_id, None)
                    continue
                peek = Peek.from_bytes(found.data)
                self._observe(peek, arm=False)
                if peek_id in open_ids:
                    await self._drive(peek, found)
                    current = await self.store.get(store_keys.peek(peek_id))
                    if current is not None:
                        await self.index.move(None, Peek.from_bytes(current.data))
            except AgentChatError as exc:
                log.warning("peek %s: scan could not drive it: %r", peek_id, exc)
        self._settled = {(i, v) for i, v in self._settled if i in open_ids}
        self._delivered = {i: v for i, v in self._delivered.items() if i in open_ids or i in self.known}
        self.delivery.prune(open_ids)

    async def _scan_loop(self) -> None:
        # A scan stuck on a backend is abandoned rather than left to hold up every later one.
        limit = max(SCAN_TIMEOUT_SECONDS, 10 * self.settings.peek_scan_seconds)
        while True:
            await asyncio.sleep(self.settings.peek_scan_seconds)
            try:
                await asyncio.wait_for(self.scan(), limit)
            except asyncio.CancelledError:
                if self._closing:
                    raise
                log.warning("a peek scan was cancelled; the next one starts on time")
            except asyncio.TimeoutError:
                log.warning("a peek scan took over %.0f s and was abandoned", limit)
            except Exception:
                log.exception("peek scan failed")

    # ------------------------------------------------------------------------------ bus and sockets

    async def _publish(self, topic: str, body: bytes) -> None:
        try:
            await self.bus.publish(topic, body)
        except AgentChatError as exc:  # other processes catch up at their next scan
            log.warning("could not publish on %s: %r", topic, exc)

    def on_bus_message(self, topic: str, body: bytes) -> None:
        """``HubListener``: a message on a ``p:...`` topic, from the bus reader: must not block."""
        try:
            if topic == bus_keys.PEEK_STATE[bus_keys.KIND_LENGTH:]:
                self._observe(Peek.from_bytes(body))
            elif topic == bus_keys.PEEK_GRANT[bus_keys.KIND_LENGTH:]:
                self.delivery.deliver_grant(orjson.loads(body))
        except (ValueError, KeyError) as exc:
            log.warning("ignoring a malformed peek message on %s: %r", topic, exc)

    def _observe(self, peek: Peek, *, arm: bool = True) -> None:
        """Take note of a peek's state (from this process, the bus or the store) and tell the local
        sockets about it once per version. ``arm``: also arm a backup timer for its next time (the
        caller that drives the peek itself arms its own)."""
        if peek.state.terminal:
            self.known.pop(peek.id, None)
            self._disarm(peek.id)
        else:
            current = self.known.get(peek.id)
            if current is None or current.version <= peek.version:
                self.known[peek.id] = peek
            if arm and peek.wake_at is not None:
                self._arm(peek, peek.wake_at, backup=True)
        if self._delivered.get(peek.id, 0) >= peek.version:
            return
        self._delivered[peek.id] = peek.version
        self.delivery.deliver(peek)

    async def session_opened(self, session: Session, resume: dict[str, int]) -> None:
        """A socket said hello. A peeker gets its peek's state (and what goes with it); an agent gets
        the requests of peeks counting down on its channels, and the peeks it may hand a key to."""
        if session.principal.is_agent:
            self.delivery.agent_opened(session, list(self.known.values()))
            return
        peek_id = self.delivery.watch(session, resume)
        try:
            peek = await self.load(peek_id)
        except AgentChatError as exc:
            session.push(frames.error_frame(exc.to_wire()))
            session.close_soon(CLOSE_REMOVED, exc.code)
            return
        self._observe(peek)
        await self.delivery.peeker_ready(session, peek)

    def session_closed(self, session: Session) -> None:
        self.delivery.session_closed(session)

    async def on_frame(self, frame: frames.Refuse | frames.GrantKey, principal: Principal) -> bytes:
        """A ``refuse`` or ``grant_key`` frame from an agent's socket; the answer frame."""
        did = principal.did  # a peek token cannot refuse or grant: forbidden
        if isinstance(frame, frames.Refuse):
            peek = await self.refuse(frame.peek, did)
        else:
            peek = await self.grant(frame.peek, did, frame.epoch, frame.wrapped_key)
        return peek_frame(peek, frame.ref)

