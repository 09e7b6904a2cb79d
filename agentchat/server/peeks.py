"""The peek service: what humans and agents do with a peek, and who hears of it.

Where things live
-----------------
- ``peek_transitions.py``: feeding ``core/peek.py`` an event, the compare-and-set on the stored peek,
  and executing the effects; ``peek_timers.py``: the timers and the scans that decide when a peek is
  driven; ``peek_money.py``, ``peek_refusals.py``: the price's hold and split, refusal fees and debts;
  ``peek_delivery.py``: what each socket is told; ``peek_index.py``: the due markers and unpaid caps.
- The store is the truth. ``peeks/<id>.json`` holds the peek. ``peeks-open/<id>`` marks a peek whose
  work is not finished: not terminal, or terminal with effects (ledger entries, releasing holds,
  revoking access) that may have been cut short. It is written before the peek and removed last.
- ``peek-payments/<id>.json`` is the hold of the peek's price; ``peek-refusals/<id>/<did>.json`` how
  a refusing agent pays its fee; ``balance-holds/<did>.json`` the refusal fees an agent's earnings are
  set aside for (``{"peeks": {id: cents}}``, changed by compare-and-set), so two refusals at once
  cannot both spend the same balance; ``peek-grants/<id>/<epoch>.json`` the epoch keys agents wrapped for
  the peeker; ``cards/<did>.json`` an agent's card on file.

Timers and crashes
------------------
A deadline is enforced, within one scan period at worst, whatever process dies, and the bus may forget
everything: see ``peek_timers.py``.

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
from agentchat.core.peek import ArmTimer, Event, PaymentAuthorized, PaymentFailed, Peek, PeekState, Refuse, open_peek, step
from agentchat.core.peek import Cancel as CancelPeek
from agentchat.errors import AgentChatError, error
from agentchat.payments.base import Hold, HoldState, PaymentProvider
from agentchat.payments.ledger import LedgerStore
from agentchat.server.hub import Hub, HubListenerBase
from agentchat.server.peek_delivery import PeekDelivery, peek_frame, peek_view  # noqa: F401 (peek_view: re-exported)
from agentchat.server.peek_index import DueIndex, UnpaidCaps
from agentchat.server.peek_money import PeekMoney
from agentchat.server.peek_refusals import Refusals, idempotency_key
from agentchat.server.peek_timers import DueScan, PeekTimers
from agentchat.server.peek_transitions import PeekTransitions
from agentchat.server.session import CLOSE_REMOVED, Session
from agentchat.server.tokens import Principal
from agentchat.store import keys as store_keys
from agentchat.store.base import ObjectStore, PreconditionFailed
from agentchat.store.records import Records

log = logging.getLogger(__name__)

# The states in which a member may hand over the channel key (kept; given to the peeker once active).
STATES_TAKING_GRANTS = frozenset({PeekState.AWAITING_KEY, PeekState.CAPTURING, PeekState.ACTIVE})


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
        self.clock = clock  # tests move it; the parts below read it through ``now``
        now = lambda: self.clock()  # noqa: E731
        self.index = DueIndex(store)
        self.unpaid = UnpaidCaps(settings=settings, bus=bus, store=store, clock=now)
        self.refusals = Refusals(settings=settings, store=store, payments=payments, ledger=ledger)
        self.money = PeekMoney(store=store, payments=payments, ledger=ledger, records=records, clock=clock)
        # Peeks this process knows to be under way (from its own transitions, the bus and the scan).
        self.known: dict[str, Peek] = {}
        self.delivery = PeekDelivery(hub=hub, store=store, clock=now, spawn=self._spawn, current=self.known.get)
        self._delivered: dict[str, int] = {}  # peek id -> last version told to local sockets
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self.timers = PeekTimers(clock=now, spawn=self._spawn, wake=lambda peek_id: self.scanner.wake(peek_id))
        self.transitions = PeekTransitions(
            store=store, bus=bus, hub=hub, records=records, payments=payments, index=self.index,
            unpaid=self.unpaid, refusals=self.refusals, money=self.money, timers=self.timers, clock=now,
            observe=lambda peek: self._observe(peek, arm=False),
            countdown_started=lambda peek: self._spawn(self._standing_refusals(peek), f"peek-standing-{peek.id}"))
        self.scanner = DueScan(settings=settings, store=store, index=self.index, clock=now,
                               known=lambda: set(self.known), observe=lambda peek: self._observe(peek, arm=False),
                               drive=self.transitions.drive, forget=self._forget)

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.bus.subscribe(bus_keys.PEEK_STATE)
        await self.bus.subscribe(bus_keys.PEEK_GRANT)
        try:
            await self.scanner.scan_all(forget_missing=lambda peek_id: self.known.pop(peek_id, None))
        except AgentChatError as exc:  # the due scan still runs; the next start tries again
            log.warning("first peek scan failed: %r", exc)
        self.scanner.start()

    async def close(self) -> None:
        self._closing = True
        self.timers.close()
        await self.scanner.close()
        tasks = [*self._tasks, *self.delivery.tickers()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def apply(self, peek_id: str, event_for: Callable[[Peek], Event]) -> Peek:
        """Step the stored peek with an event (``PeekTransitions.apply``); ``peek_state`` if it does not apply."""
        return await self.transitions.apply(peek_id, event_for)

    async def scan(self) -> None:
        """Drive the peeks that are due (``DueScan.scan``); the scan loop calls it every few seconds."""
        await self.scanner.scan()

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

    async def peek_readable_now(self, peek_id: str) -> bool:
        """``HubListener``: ``peek_readable`` after reading the peek from the store. The process that
        made a peek active stores it before its own view changes (and others hear of it later), so a
        peeker that read "active" may ask for messages a moment before this process knows. One store
        read per refused request, as ``GET /api/v1/peeks/{id}`` costs anyway."""
        if self.peek_readable(peek_id):
            return True
        try:
            peek = await self.load(peek_id)
        except AgentChatError:
            return False
        self._observe(peek, arm=False)
        return self.peek_readable(peek_id)

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
        log.info("peek %s opened on %s: %d cents, awaiting payment", peek_id, channel, peek.price_cents)
        await self.transitions.after(peek, [e for e in opened.effects if isinstance(e, ArmTimer)])
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
            return await self.transitions.key_kept(peek_id, did)
        if peek.state is PeekState.ACTIVE:  # a new epoch during the peek: the peeker needs it too
            self.delivery.deliver_grant(grant)
            await self.transitions.publish(bus_keys.PEEK_GRANT, orjson.dumps(grant))
        return peek

    # ------------------------------------------------------------------------------ bus and sockets

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
            self.timers.disarm(peek.id)
        else:
            current = self.known.get(peek.id)
            if current is None or current.version <= peek.version:
                self.known[peek.id] = peek
            if arm and peek.wake_at is not None:
                self.timers.arm(peek, peek.wake_at, backup=True)
        if self._delivered.get(peek.id, 0) >= peek.version:
            return
        self._delivered[peek.id] = peek.version
        self.delivery.deliver(peek)

    def _forget(self, keep: set[str]) -> None:
        """Forget per-peek notes of peeks this process no longer follows."""
        self.transitions.forget(keep)
        self._delivered = {i: v for i, v in self._delivered.items() if i in keep}
        self.delivery.prune(keep)

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

