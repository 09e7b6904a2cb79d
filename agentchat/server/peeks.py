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
from agentchat.core import ledger as money
from agentchat.core.peek import (ArmTimer, CancelPayment, CapturePayment, CaptureFailed, CaptureSucceeded,
                                 ChargeRefusalFee, DeadlineReached, Effect, Event, KeyGranted, PaymentAuthorized,
                                 PaymentFailed, Peek, PeekState, Refuse, RevokeAccess, SplitCapture, TimeUp,
                                 countdown_seconds_left, open_peek, step)
from agentchat.core.peek import Cancel as CancelPeek
from agentchat.errors import AgentChatError, error
from agentchat.payments.base import Hold, HoldState, PaymentProvider
from agentchat.payments.ledger import LedgerStore
from agentchat.server.hub import Hub, HubListenerBase
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
# A peek found in ``capturing`` for this long gets its capture re-issued (by any process).
CAPTURE_RETRY_SECONDS = 5.0
# How long a peeker's socket may take to receive its last frames before it is closed.
CLOSE_FLUSH_SECONDS = 2.0
# The states after the countdown that the channel's agents are sent (``peek`` frames).
STATES_AGENTS_HEAR = frozenset({PeekState.REFUSED, PeekState.AWAITING_KEY, PeekState.CAPTURING, PeekState.ACTIVE,
                                PeekState.ENDED, PeekState.PAYMENT_FAILED, PeekState.WITHDRAWN, PeekState.NO_KEY})
# The states in which a member may hand over the channel key (kept; given to the peeker once active).
STATES_TAKING_GRANTS = frozenset({PeekState.AWAITING_KEY, PeekState.CAPTURING, PeekState.ACTIVE})




# --- wire shapes -------------------------------------------------------------------------------------


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else int(round(seconds * 1000))


def peek_view(peek: Peek) -> dict[str, Any]:
    """The peek as clients see it (times in milliseconds since the epoch, money in cents)."""
    return {
        "id": peek.id, "channel": peek.channel, "state": str(peek.state),
        "peeker_public_key": peek.peeker_public_key,
        "price_cents": peek.price_cents, "refusal_fee_cents": peek.refusal_fee_cents,
        "refusal_window_seconds": peek.refusal_window_seconds, "duration_seconds": peek.duration_seconds,
        "created_at": _ms(peek.created_at), "updated_at": _ms(peek.updated_at),
        "payment_expires_at": _ms(peek.payment_expires_at), "deadline": _ms(peek.deadline),
        "key_deadline": _ms(peek.key_deadline),
        "activated_at": _ms(peek.activated_at), "ends_at": _ms(peek.ends_at),
        "refused_by": peek.refused_by, "failure_reason": peek.failure_reason,
    }


def peek_frame(peek: Peek, ref: str | None = None) -> bytes:
    frame: dict[str, Any] = {"type": "peek", "peek": peek_view(peek)}
    if ref is not None:
        frame["ref"] = ref
    return frames.encode(frame)


def request_frame(peek: Peek) -> bytes:
    return frames.encode({"type": "peek_request", "peek": peek.id, "channel": peek.channel,
                          "deadline": _ms(peek.deadline), "peeker_public_key": peek.peeker_public_key,
                          "price_cents": peek.price_cents, "refusal_fee_cents": peek.refusal_fee_cents})


def tick_frame(peek: Peek, seconds_left: int) -> bytes:
    return frames.encode({"type": "peek_tick", "peek": peek.id, "seconds_left": seconds_left,
                          "deadline": _ms(peek.deadline)})


def grant_frame(grant: dict[str, Any]) -> bytes:
    return frames.encode({"type": "peek_grant", "peek": grant["peek"], "channel": grant["channel"],
                          "epoch": grant["epoch"], "wrapped_key": grant["wrapped_key"]})


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
        self.refusals = Refusals(settings=settings, store=store, payments=payments, ledger=ledger)
        # Peeks this process knows to be under way (from its own transitions, the bus and the scan).
        self.known: dict[str, Peek] = {}
        self._delivered: dict[str, int] = {}  # peek id -> last version told to local sockets
        self._timers: dict[str, tuple[int, asyncio.TimerHandle]] = {}  # peek id -> (version, timer)
        self._watchers: dict[str, set[Session]] = {}  # peek id -> the peeker's sockets here
        self._resume: dict[Session, int] = {}
        self._tickers: dict[str, asyncio.Task[None]] = {}
        self._grants_delivered: set[tuple[str, int]] = set()
        self._settled: set[tuple[str, int]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._scanner: asyncio.Task[None] | None = None
        self._closing = False

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.bus.subscribe(bus_keys.PEEK_STATE)
        await self.bus.subscribe(bus_keys.PEEK_GRANT)
        try:
            await self.scan()
        except AgentChatError as exc:  # the loop tries again
            log.warning("first peek scan failed: %r", exc)
        self._scanner = asyncio.create_task(self._scan_loop(), name="peek-scan")

    async def close(self) -> None:
        self._closing = True
        if self._scanner is not None:
            self._scanner.cancel()
        for _, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        tasks = [*self._tasks, *self._tickers.values(), *([self._scanner] if self._scanner else [])]
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
        """``HubListener``: whether a peek token may read its channel now: only while its peek is active."""
        peek = self.known.get(peek_id)
        return peek is not None and peek.state is PeekState.ACTIVE

    async def payment(self, peek_id: str) -> dict[str, Any] | None:
        found = await self.store.get(store_keys.peek_payment(peek_id))
        return None if found is None else orjson.loads(found.data)

    async def grants(self, peek_id: str) -> list[dict[str, Any]]:
        keys = await self.store.list(store_keys.peek_grant_prefix(peek_id), limit=1000)
        found = await asyncio.gather(*(self.store.get(key) for key in keys))
        return [orjson.loads(obj.data) for obj in found if obj is not None]

    # ------------------------------------------------------------------------------ what users do

    def agents_online_here(self, channel: str) -> bool:
        """Whether an agent of ``channel`` holds a socket on this process (the indicators know the others)."""
        room = self.hub.rooms.get(channel)
        return room is not None and any(s.principal.is_agent for s in room.subscribers)

    async def open(self, channel: str, peeker_public_key: str, *, agents_online: int = 0) -> tuple[Peek, Hold]:
        """A human asks to peek: the peek (awaiting payment) and the hold their browser completes.

        ``agents_online``: the channel's agents online on any process, by the indicators. With none
        here either, nobody could hand over the key, so the peek is refused before any money is held."""
        if await self.records.get_channel(channel) is None:
            raise error("channel_not_found", f"no channel {channel}")
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
        await self.store.put(store_keys.peek_open(peek_id), b"")  # first: a stored peek is always found by the scan
        await self.store.put(store_keys.peek(peek_id), peek.to_bytes(), if_none_match=True)
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
            {"provider": self.payments.name, "ref": hold.ref, "client": hold.client}))
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
            self._deliver_grant(grant)
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
        try:
            for effect in effects:
                await self._execute(peek, effect)
            if peek.state.terminal:
                await self._finish(peek)
        except AgentChatError as exc:
            # The scan redoes what is missing (every effect is idempotent).
            log.warning("peek %s (%s): an effect failed, the scan will retry: %r", peek.id, peek.state, exc)
            return
        # A transition's effects include what its state implies (``_durable_effects``): this
        # process's scan need not redo them.
        self._settled.add((peek.id, peek.version))

    async def _execute(self, peek: Peek, effect: Effect) -> None:
        if isinstance(effect, ArmTimer):
            self._arm(peek, effect.at)
        elif isinstance(effect, CancelPayment):
            await self._cancel_hold(peek)
        elif isinstance(effect, CapturePayment):
            await self._capture(peek)
        elif isinstance(effect, ChargeRefusalFee):
            await self.refusals.settle(peek)
        elif isinstance(effect, SplitCapture):
            await self._record_split(peek)
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

    async def _hold_ref(self, peek: Peek) -> str | None:
        if peek.payment_ref:
            return peek.payment_ref
        record = await self.payment(peek.id)
        return None if record is None else record["ref"]

    async def _cancel_hold(self, peek: Peek) -> None:
        ref = await self._hold_ref(peek)
        if ref is None:
            return
        hold = await self.payments.cancel(ref, key=idempotency_key(peek.id, "cancel"))
        if hold.state is HoldState.CAPTURED:  # never expected: a captured peek is never canceled
            log.error("peek %s: the hold %s was captured, not released", peek.id, ref)

    async def _capture(self, peek: Peek) -> None:
        """Capture the price, then move the peek on. A transient failure leaves it in ``capturing``;
        a timer here and the scan everywhere retry it."""
        ref = await self._hold_ref(peek)
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

    async def _record_split(self, peek: Peek) -> None:
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

    async def scan(self) -> None:
        """Re-read every open peek and drive it; forget peeks that are no longer open."""
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
            except AgentChatError as exc:
                log.warning("peek %s: scan could not drive it: %r", peek_id, exc)
        self._settled = {(i, v) for i, v in self._settled if i in open_ids}
        self._delivered = {i: v for i, v in self._delivered.items() if i in open_ids or i in self.known}
        self._grants_delivered = {(i, e) for i, e in self._grants_delivered if i in open_ids}

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
                self._deliver_grant(orjson.loads(body))
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
        self._deliver(peek)

    def _deliver(self, peek: Peek) -> None:
        agents_frame: bytes | None = None
        if peek.state is PeekState.COUNTDOWN:
            agents_frame = request_frame(peek)
        elif peek.state in STATES_AGENTS_HEAR and peek.deadline is not None:
            agents_frame = peek_frame(peek)
        room = self.hub.rooms.get(peek.channel)
        if agents_frame is not None and room is not None:
            for session in list(room.subscribers):
                if session.principal.is_agent:
                    session.push(agents_frame)
        watchers = self._watchers.get(peek.id)
        if not watchers:
            return
        frame = peek_frame(peek)
        for session in list(watchers):
            session.push(frame)
        if peek.state is PeekState.COUNTDOWN:
            self._start_ticker(peek.id)
        elif peek.state is PeekState.ACTIVE:
            for session in list(watchers):
                self._spawn(self._open_channel(session, peek), f"peek-open-{peek.id}")
        elif peek.state.terminal:
            for session in list(watchers):
                self.hub.detach(session, peek.channel)  # before the hub's own peek_ended handling
                self._spawn(self._close_peeker(session, peek), f"peek-close-{peek.id}")

    def _deliver_grant(self, grant: dict[str, Any]) -> None:
        known = self.known.get(grant["peek"])
        if known is None or known.state is not PeekState.ACTIVE:
            return  # a key reaches the peeker only once paid for (the active state sends those kept)
        marker = (grant["peek"], int(grant["epoch"]))
        if marker in self._grants_delivered:
            return
        self._grants_delivered.add(marker)
        frame = grant_frame(grant)
        for session in list(self._watchers.get(grant["peek"], ())):
            session.push(frame)

    async def session_opened(self, session: Session, resume: dict[str, int]) -> None:
        """A socket said hello. A peeker gets its peek's state (and what goes with it); an agent gets
        the requests of peeks counting down on its channels, and active peeks it may grant keys to."""
        principal: Principal = session.principal
        if principal.is_agent:
            for peek in list(self.known.values()):
                if peek.channel in session.cursors:
                    if peek.state is PeekState.COUNTDOWN:
                        session.push(request_frame(peek))
                    elif peek.state in (PeekState.AWAITING_KEY, PeekState.CAPTURING, PeekState.ACTIVE):
                        session.push(peek_frame(peek))
            return
        peek_id = principal.subject
        self._watchers.setdefault(peek_id, set()).add(session)
        if principal.channel:
            self._resume[session] = resume.get(principal.channel, 0)
        try:
            peek = await self.load(peek_id)
        except AgentChatError as exc:
            session.push(frames.error_frame(exc.to_wire()))
            session.close_soon(CLOSE_REMOVED, exc.code)
            return
        self._observe(peek)
        session.push(peek_frame(peek))
        if peek.state is PeekState.COUNTDOWN:
            self._start_ticker(peek_id)
        elif peek.state is PeekState.ACTIVE:
            await self._open_channel(session, peek)
        elif peek.state.terminal:
            await self._close_peeker(session, peek)

    def session_closed(self, session: Session) -> None:
        if session.principal.is_agent:
            return
        self._resume.pop(session, None)
        watchers = self._watchers.get(session.principal.subject)
        if watchers is not None:
            watchers.discard(session)
            if not watchers:
                del self._watchers[session.principal.subject]

    async def on_frame(self, frame: frames.Refuse | frames.GrantKey, principal: Principal) -> bytes:
        """A ``refuse`` or ``grant_key`` frame from an agent's socket; the answer frame."""
        did = principal.did  # a peek token cannot refuse or grant: forbidden
        if isinstance(frame, frames.Refuse):
            peek = await self.refuse(frame.peek, did)
        else:
            peek = await self.grant(frame.peek, did, frame.epoch, frame.wrapped_key)
        return peek_frame(peek, frame.ref)

    async def _open_channel(self, session: Session, peek: Peek) -> None:
        """The peek is active: the peeker's socket reads the channel (history first) and gets the
        keys granted so far."""
        if session.closed:
            return
        for grant in sorted(await self.grants(peek.id), key=lambda g: g["epoch"]):
            self._grants_delivered.add((peek.id, int(grant["epoch"])))
            session.push(grant_frame(grant))
        try:
            await self.hub.attach(session, peek.channel, self._resume.get(session, 0))
        except AgentChatError as exc:
            session.push(frames.error_frame(exc.to_wire()))

    async def _close_peeker(self, session: Session, peek: Peek) -> None:
        try:
            await asyncio.wait_for(session.wait_drained(), CLOSE_FLUSH_SECONDS)
        except asyncio.TimeoutError:
            pass
        session.close_soon(CLOSE_REMOVED, f"peek_{peek.state}")

    def _start_ticker(self, peek_id: str) -> None:
        running = self._tickers.get(peek_id)
        if running is not None and not running.done():
            return
        task = asyncio.get_running_loop().create_task(self._tick(peek_id), name=f"peek-tick-{peek_id}")
        self._tickers[peek_id] = task
        task.add_done_callback(lambda _: self._tickers.pop(peek_id, None) if self._tickers.get(peek_id) is task else None)

    async def _tick(self, peek_id: str) -> None:
        """Every whole second of the countdown, the seconds left (server's clock), down to 0."""
        while True:
            peek = self.known.get(peek_id)
            watchers = self._watchers.get(peek_id)
            if peek is None or peek.state is not PeekState.COUNTDOWN or not watchers or peek.deadline is None:
                return
            left = countdown_seconds_left(peek, self.clock())
            frame = tick_frame(peek, left)
            for session in list(watchers):
                session.push(frame)
            if left == 0:
                return
            next_tick = peek.deadline - (left - 1)
            await asyncio.sleep(max(0.0, next_tick - self.clock()) + 0.001)
