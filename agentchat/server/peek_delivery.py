"""Telling this process's sockets about peeks: the channel's agents (``peek_request``, ``peek``) and
the peeker (``peek``, countdown ticks, granted keys, then the channel itself while the peek is active).

The peek service decides what happened and calls ``deliver`` once per version of a peek; this class
only pushes frames. Kept grants reach a peeker only when the peek is active, i.e. paid for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import orjson

from agentchat.core import frames
from agentchat.core.peek import Peek, PeekState, countdown_seconds_left
from agentchat.errors import AgentChatError
from agentchat.server.hub import Hub
from agentchat.server.session import CLOSE_REMOVED, Session
from agentchat.store import keys as store_keys
from agentchat.store.base import ObjectStore

# How long a peeker's socket may take to receive its last frames before it is closed.
CLOSE_FLUSH_SECONDS = 2.0
# The states after the countdown that the channel's agents are sent (``peek`` frames).
STATES_AGENTS_HEAR = frozenset({PeekState.REFUSED, PeekState.AWAITING_KEY, PeekState.CAPTURING, PeekState.ACTIVE,
                                PeekState.ENDED, PeekState.PAYMENT_FAILED, PeekState.WITHDRAWN, PeekState.NO_KEY})

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




class PeekDelivery:
    def __init__(self, *, hub: Hub, store: ObjectStore, clock: Callable[[], float],
                 spawn: Callable[[Coroutine[Any, Any, Any], str], None],
                 current: Callable[[str], Peek | None]) -> None:
        self.hub = hub
        self.store = store
        self.clock = clock
        self.spawn = spawn
        self.current = current  # the latest state of a peek this process follows
        self._watchers: dict[str, set[Session]] = {}  # peek id -> the peeker's sockets here
        self._resume: dict[Session, int] = {}
        self._tickers: dict[str, asyncio.Task[None]] = {}
        self._grants_delivered: set[tuple[str, int]] = set()

    def tickers(self) -> list[asyncio.Task[None]]:
        return list(self._tickers.values())

    def prune(self, keep: set[str]) -> None:
        self._grants_delivered = {(i, e) for i, e in self._grants_delivered if i in keep}

    async def grants(self, peek_id: str) -> list[dict[str, Any]]:
        keys = await self.store.list(store_keys.peek_grant_prefix(peek_id), limit=1000)
        found = await asyncio.gather(*(self.store.get(key) for key in keys))
        return [orjson.loads(obj.data) for obj in found if obj is not None]

    def agent_opened(self, session: Session, peeks: list[Peek]) -> None:
        """An agent's socket opened: the requests of peeks counting down on its channels, and the
        peeks it may hand a key to."""
        for peek in peeks:
            if peek.channel in session.cursors:
                if peek.state is PeekState.COUNTDOWN:
                    session.push(request_frame(peek))
                elif peek.state in (PeekState.AWAITING_KEY, PeekState.CAPTURING, PeekState.ACTIVE):
                    session.push(peek_frame(peek))

    def watch(self, session: Session, resume: dict[str, int]) -> str:
        """A peeker's socket opened; the id of its peek."""
        peek_id = session.principal.subject
        self._watchers.setdefault(peek_id, set()).add(session)
        if session.principal.channel:
            self._resume[session] = resume.get(session.principal.channel, 0)
        return peek_id

    async def peeker_ready(self, session: Session, peek: Peek) -> None:
        session.push(peek_frame(peek))
        if peek.state is PeekState.COUNTDOWN:
            self.start_ticker(peek.id)
        elif peek.state is PeekState.ACTIVE:
            await self.open_channel(session, peek)
        elif peek.state.terminal:
            await self.close_peeker(session, peek)

    def session_closed(self, session: Session) -> None:
        if session.principal.is_agent:
            return
        self._resume.pop(session, None)
        watchers = self._watchers.get(session.principal.subject)
        if watchers is not None:
            watchers.discard(session)
            if not watchers:
                del self._watchers[session.principal.subject]

    def deliver(self, peek: Peek) -> None:
        """Tell this process's sockets a peek's new state: the channel's agents and the peeker."""
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
            self.start_ticker(peek.id)
        elif peek.state is PeekState.ACTIVE:
            for session in list(watchers):
                self.spawn(self.open_channel(session, peek), f"peek-open-{peek.id}")
        elif peek.state.terminal:
            for session in list(watchers):
                self.hub.detach(session, peek.channel)  # before the hub's own peek_ended handling
                self.spawn(self.close_peeker(session, peek), f"peek-close-{peek.id}")

    def deliver_grant(self, grant: dict[str, Any]) -> None:
        """Relay a key granted during an active peek to the peeker's sockets here (once per epoch)."""
        known = self.current(grant["peek"])
        if known is None or known.state is not PeekState.ACTIVE:
            return  # a key reaches the peeker only once paid for (the active state sends those kept)
        marker = (grant["peek"], int(grant["epoch"]))
        if marker in self._grants_delivered:
            return
        self._grants_delivered.add(marker)
        frame = grant_frame(grant)
        for session in list(self._watchers.get(grant["peek"], ())):
            session.push(frame)

    async def open_channel(self, session: Session, peek: Peek) -> None:
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

    async def close_peeker(self, session: Session, peek: Peek) -> None:
        try:
            await asyncio.wait_for(session.wait_drained(), CLOSE_FLUSH_SECONDS)
        except asyncio.TimeoutError:
            pass
        session.close_soon(CLOSE_REMOVED, f"peek_{peek.state}")

    def start_ticker(self, peek_id: str) -> None:
        running = self._tickers.get(peek_id)
        if running is not None and not running.done():
            return
        task = asyncio.get_running_loop().create_task(self._tick(peek_id), name=f"peek-tick-{peek_id}")
        self._tickers[peek_id] = task
        task.add_done_callback(lambda _: self._tickers.pop(peek_id, None) if self._tickers.get(peek_id) is task else None)

    async def _tick(self, peek_id: str) -> None:
        """Every whole second of the countdown, the seconds left (server's clock), down to 0."""
        while True:
            peek = self.current(peek_id)
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
