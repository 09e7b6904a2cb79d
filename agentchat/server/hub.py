"""The hub: this process's view of live channels, and the one path every message takes.

Send: check membership and epoch → ``bus.claim_and_publish``: claim the client id (idempotency), take
the next number and fan out live to every process, in number order, in one bus call → queue for group
commit → ``ack_to.acked(ack_note, seq)`` once the batch holding it is stored.

Bus topics: ``c:<channel>`` carries messages, ``e:<channel>`` channel events (membership, epoch),
``a:<did>`` events for one agent (added to a channel). A process subscribes to a channel's topics while
it has a room for it (a local reader, or a send in the last ``ROOM_IDLE_SECONDS``).

Listeners (``HubListener``, registered in ``app.py`` with ``Hub.add_listener``): the peek service
(``server/peeks.py``) reads the ``p:`` topics and says which peek tokens may read their channel now; the
indicator service (``server/indicators.py``) reads the ``i:`` topics and hears of new channels.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from typing import Any, Protocol

import orjson

from agentchat.bus import keys as bus_keys
from agentchat.bus.base import Bus
from agentchat.core import frames
from agentchat.errors import AgentChatError, error
from agentchat.server.membership import MembershipSync, version_of
from agentchat.server.metrics import LATENCY_SAMPLE_EVERY, Metrics
from agentchat.server.session import CLOSE_REMOVED, Cursor, Session
from agentchat.store.messages import MessageLog, MessageWriter, frame_seq
from agentchat.store.records import Records

log = logging.getLogger(__name__)

RECENT_MESSAGES = 1024
ROOM_IDLE_SECONDS = 60.0
HISTORY_PAGE = 500
# A claimed client id expires if its message is never stored (the process died holding it).
CLAIM_PENDING_TTL = 30.0
# How long a stored message's client id is remembered for idempotent retries. Retries come within
# seconds of a reconnect; every remembered id costs the bus (Redis, or this process's memory) about
# 150-250 bytes, so at 10,000 messages/s a day's worth would be ~150 GB and ten minutes' ~1.5 GB.
CLAIM_DONE_TTL = 10 * 60.0
# When the bus has forgotten a channel's counter, it restarts this far above the highest stored
# number, skipping every number that could have been handed out but not yet stored (at most the
# writers' pending limit per process), so no number is ever reused.
SEQ_RESEED_GAP = 1 << 20
# A claimed client id whose message is not stored yet: b"p:" + the claiming process's instance id.
PENDING = b"p:"
# Every process refreshes its heartbeat key this often (a third of its lifetime); a claim whose
# process has no heartbeat belongs to a dead process.
HEARTBEAT_TTL = 3.0
GAP_FILL_TRIES = 4
# Acks sent per event-loop turn when a stored batch releases many at once.
ACKS_PER_TURN = 64


class AckTarget(Protocol):
    """Who is told that a sent message is stored: a socket (``Session``) or a waiting REST request."""

    def acked(self, note: bytes, seq: int) -> None:
        """The message numbered ``seq`` is stored; ``note`` is what the sender gave ``Hub.send``."""


StoredClaim = tuple[str, int, AckTarget, bytes]  # (claim, seq, ack_to, ack_note)


class HubListener(Protocol):
    """A service the hub tells what it sees (``Hub.add_listener``). ``HubListenerBase`` gives
    do-nothing defaults, so a listener writes only the methods it needs."""

    # The two-character kind of the bus topics it reads (``bus_keys.PEEKS``, ...), "" for none.
    bus_kind: str

    def on_bus_message(self, topic: str, body: bytes) -> None:
        """A message on one of its topics (``topic`` without the kind); called from the bus's reader,
        so it must not block."""

    async def on_channel_created(self, channel: str) -> None:
        """A channel was just created through this process."""

    async def on_channel_deleted(self, channel: str) -> None:
        """A channel was deleted (through any process this one heard of it from)."""

    def peek_readable(self, peek_id: str) -> bool:
        """Whether the token of peek ``peek_id`` may read its channel now (any listener may allow it)."""

    async def peek_readable_now(self, peek_id: str) -> bool:
        """``peek_readable`` once more after reading the peek from the store, where it can be a step
        ahead of this process's view; asked only after ``peek_readable`` said no."""


class HubListenerBase:
    """Do-nothing defaults of every ``HubListener`` method."""

    bus_kind = ""

    def on_bus_message(self, topic: str, body: bytes) -> None:
        pass

    async def on_channel_created(self, channel: str) -> None:
        pass

    async def on_channel_deleted(self, channel: str) -> None:
        pass

    def peek_readable(self, peek_id: str) -> bool:
        return False

    async def peek_readable_now(self, peek_id: str) -> bool:
        return self.peek_readable(peek_id)


def _claim_sender(done: StoredClaim) -> str:
    """``cid:<channel>:<sender>`` of a stored claim (client ids hold no colon)."""
    return done[0].rpartition(":")[0]


class Room:
    """A channel with a presence in this process."""

    __slots__ = ("id", "topic", "counter", "members", "epoch", "owner", "version", "subscribers", "recent",
                 "complete_from", "last_seq", "last_used", "first_available")

    def __init__(self, meta: dict[str, Any]) -> None:
        self.id: str = meta["id"]
        self.topic = bus_keys.channel_messages(self.id)
        self.counter = bus_keys.sequence_counter(self.id)
        self.subscribers: set[Session] = set()
        self.recent: deque[tuple[int, bytes]] = deque(maxlen=RECENT_MESSAGES)
        # Every message numbered complete_from or above is in ``recent`` (0: nothing seen live yet).
        self.complete_from = 0
        self.last_seq = 0
        self.last_used = time.monotonic()
        self.apply(meta)

    def apply(self, meta: dict[str, Any]) -> None:
        self.members: frozenset[str] = frozenset(meta["members"])  # accepted members only
        self.epoch: int = meta["epoch"]
        self.owner: str = meta["owner"]
        self.version: int = version_of(meta)  # of the membership (server/membership.py)
        # Lower numbers have expired (retention): history and resume say so rather than skip them.
        self.first_available: int = meta.get("first_available", 1)

    def on_message(self, seq: int, frame: bytes) -> None:
        if seq <= self.last_seq:
            return
        self.last_seq = seq
        recent = self.recent
        if len(recent) == RECENT_MESSAGES:
            recent.popleft()
            self.complete_from = recent[0][0]
        recent.append((seq, frame))
        if not self.complete_from:
            self.complete_from = seq
        channel = self.id
        for session in self.subscribers:
            session.offer(channel, seq, frame)

    def frame(self, seq: int, body: bytes) -> bytes:
        """The message frame of ``seq``: the one fanned out here if the bus delivered it already (the
        in-process bus delivers before ``publish`` returns, Redis usually after), else a new one."""
        for held_seq, frame in reversed(self.recent):
            if held_seq == seq:
                return frame
            if held_seq < seq:
                break
        return frames.message_frame(seq, body)

    def forget_recent(self) -> None:
        self.recent.clear()
        self.complete_from = 0

    def recent_after(self, after: int) -> list[bytes] | None:
        """Frames numbered above ``after`` if the recent buffer holds all of them, else None."""
        if not self.complete_from or after + 1 < self.complete_from:
            return None
        return [frame for seq, frame in self.recent if seq > after]


class Hub:
    def __init__(self, bus: Bus, records: Records, history: MessageLog, writer: MessageWriter,
                 *, metrics: Metrics, send_queue_max: int, instance: str = "", gap_fill_wait: float = 0.0,
                 reseed_gap: int = SEQ_RESEED_GAP) -> None:
        """``gap_fill_wait``: with several processes, how long a resume waits (up to
        ``GAP_FILL_TRIES`` times) for numbers another process has sent but not yet stored; 0 for one
        process, where every such number is in this process's recent buffer."""
        self.gap_fill_wait = gap_fill_wait
        self.reseed_gap = reseed_gap
        self.instance = instance or secrets.token_hex(8)  # this process, in claims and heartbeats
        self._pending_mark = PENDING + self.instance.encode()
        self.bus = bus
        self.records = records
        self.history = history
        self.writer = writer
        self.metrics = metrics
        self.send_queue_max = send_queue_max
        self.rooms: dict[str, Room] = {}
        self._room_loading: dict[str, asyncio.Future[Room]] = {}
        self.sessions: dict[str, set[Session]] = {}
        self._claims_done: list[StoredClaim] = []
        self._on_durable = self._durable  # one bound method for every message, not one per message
        self._probes: dict[tuple[str, int], float] = {}  # sampled sends awaiting local fan-out
        self._claims_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._listeners: list[HubListener] = []
        self._listener_of_kind: dict[str, HubListener] = {}  # bus topic kind -> the listener reading it
        # Messages sequenced here per (channel, second of their ``ts``) since the indicators last took
        # them (server/indicators.py).
        self.sequenced: dict[tuple[str, int], int] = {}
        self.membership = MembershipSync(self)

    def add_listener(self, listener: HubListener) -> None:
        """Tell ``listener`` from now on what ``HubListener`` lists (one listener per bus topic kind)."""
        kind = listener.bus_kind
        if kind:
            if kind in (bus_keys.MESSAGES, bus_keys.CHANNEL_EVENTS, bus_keys.AGENT_EVENTS) \
                    or kind in self._listener_of_kind:
                raise ValueError(f"bus topic kind {kind!r} already has a reader")
            self._listener_of_kind[kind] = listener
        self._listeners.append(listener)

    def remove_listener(self, listener: HubListener) -> None:
        self._listeners.remove(listener)
        if self._listener_of_kind.get(listener.bus_kind) is listener:
            del self._listener_of_kind[listener.bus_kind]

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.bus.start(self._on_bus, self._on_bus_reconnect)
        await self.bus.set(bus_keys.heartbeat(self.instance), b"1", HEARTBEAT_TTL)
        self._tasks.append(asyncio.create_task(self._heartbeat_loop(), name="hub-heartbeat"))
        self._tasks.append(asyncio.create_task(self._claims_loop(), name="hub-claims"))
        self._tasks.append(asyncio.create_task(self._sweep_loop(), name="hub-sweep"))
        self._tasks.append(asyncio.create_task(self.membership.run(), name="hub-membership"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.flush_claims()

    # ------------------------------------------------------------------------------ rooms

    async def room(self, channel: str) -> Room:
        room = self.rooms.get(channel)
        if room is not None:
            room.last_used = time.monotonic()
            return room
        loading = self._room_loading.get(channel)
        if loading is not None:
            return await asyncio.shield(loading)
        future: asyncio.Future[Room] = asyncio.get_running_loop().create_future()
        self._room_loading[channel] = future
        try:
            meta = await self.records.get_channel(channel)
            if meta is None:
                raise error("channel_not_found", f"no channel {channel}")
            room = Room(meta)
            self.rooms[channel] = room
            await self.bus.subscribe(bus_keys.channel_messages(channel))
            await self.bus.subscribe(bus_keys.channel_events(channel))
            future.set_result(room)
            return room
        except BaseException as exc:
            self.rooms.pop(channel, None)
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._room_loading[channel]

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(ROOM_IDLE_SECONDS / 4)
            now = time.monotonic()
            for channel, room in list(self.rooms.items()):
                # A room whose messages this process has not compacted yet stays subscribed: a
                # deletion of the channel must reach the writer before it writes a segment.
                if not room.subscribers and now - room.last_used > ROOM_IDLE_SECONDS \
                        and not self.writer.holds(channel):
                    del self.rooms[channel]
                    try:
                        await self.bus.unsubscribe(bus_keys.channel_messages(channel))
                        await self.bus.unsubscribe(bus_keys.channel_events(channel))
                    except AgentChatError:
                        log.warning("could not unsubscribe from %s", channel)

    # ------------------------------------------------------------------------------ bus events

    def _on_bus(self, topic: str, seq: int, body: bytes) -> None:
        kind, rest = topic[:bus_keys.KIND_LENGTH], topic[bus_keys.KIND_LENGTH:]
        if kind == bus_keys.MESSAGES:
            room = self.rooms.get(rest)
            if room is not None:
                self.metrics.messages_fanned_out += 1
                room.on_message(seq, frames.message_frame(seq, body))
                if self._probes:
                    started = self._probes.pop((room.id, seq), None)
                    if started is not None:
                        self.metrics.fanout_latency.observe(time.perf_counter() - started)
        elif kind == bus_keys.CHANNEL_EVENTS:
            asyncio.get_running_loop().create_task(self._on_channel_event(rest, orjson.loads(body)))
        elif kind == bus_keys.AGENT_EVENTS:
            asyncio.get_running_loop().create_task(self._on_agent_event(rest, orjson.loads(body)))
        else:
            listener = self._listener_of_kind.get(kind)
            if listener is not None:
                listener.on_bus_message(rest, body)

    def _on_bus_reconnect(self) -> None:
        # Messages published while the bus was away were not delivered here: every local reader
        # catches up from the store, from the last number it has; live messages are held meanwhile.
        log.warning("bus reconnected; catching up %d rooms from the store", len(self.rooms))
        self.metrics.bus_reconnects += 1
        self.membership.reconnected()  # membership events published meanwhile were lost too
        readers: list[tuple[Session, Room, int]] = []
        for room in self.rooms.values():
            room.forget_recent()
            for session in room.subscribers:
                cursor = session.cursors.get(room.id)
                if cursor is not None and not cursor.catching_up:
                    cursor.catching_up = True
                    readers.append((session, room, cursor.last))
        asyncio.get_running_loop().create_task(self._after_reconnect(readers))

    async def _after_reconnect(self, readers: list[tuple[Session, Room, int]]) -> None:
        # The bus may have lost the index of stored but not yet compacted messages: put ours back,
        # and (several processes) give the others as long to do the same before reading it.
        try:
            await self.writer.reindex()
        except AgentChatError as exc:
            log.warning("could not re-index stored messages after the bus came back: %r", exc)
        if self.gap_fill_wait:
            await asyncio.sleep(self.gap_fill_wait * GAP_FILL_TRIES)
        for session, room, after in readers:
            if not session.closed and room.id in session.cursors:
                asyncio.get_running_loop().create_task(self._catch_up_safely(session, room, after))

    def apply_channel(self, meta: dict[str, Any], event: dict[str, Any] | None = None) -> None:
        """Bring the room of ``meta`` (if this process has one) to that record: a session whose agent
        is no longer a member is detached and told ``removed``; the others get ``event``, if any."""
        channel = meta["id"]
        room = self.rooms.get(channel)
        if room is None:
            return
        if version_of(meta) >= room.version:  # never back to an older read
            room.apply(meta)
        notice = frames.encode({"type": "channel", "channel": channel, **event}) if event else None
        for session in list(room.subscribers):
            if session.principal.is_agent and session.principal.subject not in room.members:
                self.detach(session, channel)
                session.push(frames.encode({"type": "channel", "channel": channel, "event": "removed"}))
            elif notice is not None:
                session.push(notice)

    async def _on_channel_event(self, channel: str, event: dict[str, Any]) -> None:
        if event.get("event") == "deleted":
            await self.channel_deleted(channel)
            return
        room = self.rooms.get(channel)
        if room is None:
            return
        meta = await self.records.get_channel(channel)
        if meta is None:
            return
        self.apply_channel(meta, event)
        if event.get("event") == "peek_ended":
            for session in list(room.subscribers):
                if not session.principal.is_agent and session.principal.subject == event.get("peek"):
                    session.close_soon(CLOSE_REMOVED, "peek_ended")

    async def channel_deleted(self, channel: str) -> None:
        """The channel is gone (deleted by its owner): its readers here are told and detached, this
        process stops compacting it, and the indicators forget it. Safe to call more than once."""
        room = self.rooms.pop(channel, None)
        if room is not None:
            notice = frames.encode({"type": "channel", "channel": channel, "event": "deleted"})
            for session in list(room.subscribers):
                session.cursors.pop(channel, None)
                if session.principal.is_agent:
                    session.push(notice)
                else:  # a peeker's socket reads this channel only
                    session.close_soon(CLOSE_REMOVED, "channel_deleted")
            room.subscribers.clear()
            try:
                await self.bus.unsubscribe(bus_keys.channel_messages(channel))
                await self.bus.unsubscribe(bus_keys.channel_events(channel))
            except AgentChatError:
                log.warning("could not unsubscribe from %s", channel)
        await self.writer.forget(channel)
        for listener in list(self._listeners):
            await listener.on_channel_deleted(channel)

    async def agent_deleted(self, did: str) -> None:
        """The agent deleted its account: its sockets here are closed."""
        for session in list(self.sessions.get(did, ())):
            session.close_soon(CLOSE_REMOVED, "agent_deleted")

    async def _on_agent_event(self, did: str, event: dict[str, Any]) -> None:
        if event.get("event") == "deleted":
            await self.agent_deleted(did)
            return
        if event.get("event") == "invited":  # told live; nothing is delivered until it accepts
            frame = frames.encode({"type": "invitation", **{k: v for k, v in event.items() if k != "event"}})
            for session in list(self.sessions.get(did, ())):
                session.push(frame)
            return
        if event.get("event") != "added":
            return
        channel = event["channel"]
        room = self.rooms.get(channel)
        if room is not None and did not in room.members:
            # The record that made it a member is newer than this process's copy: the channel's own
            # event saying so may come after this one (another topic, another task), and attaching
            # against the old copy would refuse the new member and leave it with no live delivery.
            meta = await self.records.get_channel(channel)
            if meta is not None:
                self.apply_channel(meta)
        for session in list(self.sessions.get(did, ())):
            if channel not in session.cursors:
                try:
                    await self.attach(session, channel, resume_after=None)
                except AgentChatError:
                    continue
                session.push(frames.encode({"type": "channel", "channel": channel, "event": "added"}))

    async def publish_channel_event(self, channel: str, event: dict[str, Any]) -> None:
        await self.bus.publish(bus_keys.channel_events(channel), orjson.dumps(event))

    async def publish_agent_event(self, did: str, event: dict[str, Any]) -> None:
        await self.bus.publish(bus_keys.agent_events(did), orjson.dumps(event))

    # ------------------------------------------------------------------------------ sessions

    async def register_session(self, session: Session) -> None:
        if session.principal.is_agent:
            did = session.principal.subject
            local = self.sessions.setdefault(did, set())
            if not local:
                await self.bus.subscribe(bus_keys.agent_events(did))
            local.add(session)
        self.metrics.sessions += 1

    async def unregister_session(self, session: Session) -> None:
        for channel in list(session.cursors):
            self.detach(session, channel)
        self.metrics.sessions -= 1
        if session.principal.is_agent:
            did = session.principal.subject
            local = self.sessions.get(did)
            if local is not None:
                local.discard(session)
                if not local:
                    del self.sessions[did]
                    await self.bus.unsubscribe(bus_keys.agent_events(did))

    def readable_by(self, room: Room, session_or_principal: Any) -> bool:
        principal = getattr(session_or_principal, "principal", session_or_principal)
        if principal.is_agent:
            return principal.subject in room.members
        return principal.channel == room.id and any(listener.peek_readable(principal.subject)
                                                    for listener in self._listeners)

    async def may_read(self, room: Room, session_or_principal: Any) -> bool:
        """``readable_by``, and for a peek token that it refuses, the same question after the peek is
        read from the store: a peeker told "active" by any process may read at once, even if this
        process has not heard of that transition yet."""
        if self.readable_by(room, session_or_principal):
            return True
        principal = getattr(session_or_principal, "principal", session_or_principal)
        if principal.is_agent or principal.channel != room.id:
            return False
        for listener in self._listeners:
            if await listener.peek_readable_now(principal.subject):
                return True
        return False

    async def attach(self, session: Session, channel: str, resume_after: int | None, *,
                     defer_catch_up: bool = False) -> None:
        """Start live delivery of ``channel`` to ``session``: every message published after this
        returns reaches it. With ``resume_after``, first everything stored or recent after that
        number, with no gap and no duplicate at the seam (live messages are held back meanwhile);
        ``defer_catch_up`` leaves that to a later ``catch_up`` call."""
        room = await self.room(channel)
        if not await self.may_read(room, session):
            raise error("not_member", f"not a member of {channel}")
        existing = session.cursors.get(channel)
        if existing is not None and resume_after is None:
            return
        cursor = Cursor(last=resume_after or 0, catching_up=resume_after is not None)
        if resume_after is None:
            cursor.last = room.last_seq
        session.cursors[channel] = cursor
        room.subscribers.add(session)
        if resume_after is not None and not defer_catch_up:
            await self._catch_up_safely(session, room, resume_after)

    async def catch_up(self, session: Session, channel: str) -> None:
        """Run the catch-up that ``attach(..., defer_catch_up=True)`` left pending."""
        room = self.rooms.get(channel)
        cursor = session.cursors.get(channel)
        if room is not None and cursor is not None and cursor.catching_up:
            await self._catch_up_safely(session, room, cursor.last)

    def detach(self, session: Session, channel: str) -> None:
        session.cursors.pop(channel, None)
        room = self.rooms.get(channel)
        if room is not None:
            room.subscribers.discard(session)
            room.last_used = time.monotonic()

    async def _catch_up_safely(self, session: Session, room: Room, after: int) -> None:
        try:
            await self._catch_up(session, room, after)
        except AgentChatError as exc:
            session.push(frames.error_frame(exc.to_wire()))
            cursor = session.cursors.get(room.id)
            if cursor is not None:
                cursor.catching_up = False

    async def _catch_up(self, session: Session, room: Room, after: int) -> None:
        cursor = session.cursors.get(room.id)
        if cursor is None:
            return
        cursor.catching_up = True
        cursor.last = max(cursor.last, after)
        if room.first_available > cursor.last + 1:
            session.push(frames.encode({"type": "channel", "channel": room.id, "event": "expired",
                                        "first_available": room.first_available}))
        recent = room.recent_after(cursor.last)
        gap_fill_tries = GAP_FILL_TRIES if self.gap_fill_wait else 0
        while recent is None:
            page = await self.history.read(room.id, cursor.last, HISTORY_PAGE)
            if not page:
                if gap_fill_tries and room.complete_from and cursor.last + 1 < room.complete_from:
                    # Numbers between the store's end and the first one this process saw live may
                    # still sit in another process's group commit: give them a moment to land.
                    gap_fill_tries -= 1
                    await asyncio.sleep(self.gap_fill_wait)
                    continue
                # The store has nothing more: whatever lies between it and the recent buffer was
                # never stored (a burned number) and never will be.
                recent = [frame for seq, frame in room.recent if seq > cursor.last]
                break
            for frame in page:
                cursor.last = frame_seq(frame)
                session.push(frame)
            if session.closed:
                return
            if session.backlog() > self.send_queue_max // 2:
                await session.wait_drained()
            recent = room.recent_after(cursor.last)
        for frame in recent:
            seq = frame_seq(frame)
            if seq > cursor.last:
                cursor.last = seq
                session.push(frame)
        held, cursor.held = cursor.held, []
        cursor.catching_up = False
        for seq, frame in held:
            if seq > cursor.last:
                cursor.last = seq
                session.push(frame)

    # ------------------------------------------------------------------------------ send

    async def send(self, sender: str, channel: str, client_id: str, envelope: dict[str, Any],
                   ack_to: AckTarget, ack_note: bytes = b"") -> None:
        """Sequence, fan out and store one message; ``ack_to.acked(ack_note, seq)`` runs once it is
        durable (at once for a retry of a stored message). Raises before anything is published if it
        cannot be taken. An object and a note rather than a callback: a closure per message would
        live until its batch is stored, and the garbage collector visits every such survivor."""
        room = self.rooms.get(channel) or await self.room(channel)
        if sender not in room.members:
            raise error("not_member", f"not a member of {channel}")
        if envelope["epoch"] != room.epoch:
            raise error("stale_epoch", f"channel {channel} is at epoch {room.epoch}; fetch its key and re-encrypt")
        claim = bus_keys.send_claim(channel, sender, client_id)
        if not self.writer.has_room():
            previous = await self.bus.get(claim)
            if previous is not None and not previous.startswith(PENDING):
                ack_to.acked(ack_note, int(previous))  # a retry of a stored message needs no room
                return
            raise error("store_unavailable", "too many messages are waiting to be stored; retry shortly")
        ts_ms = int(time.time() * 1000)
        body = frames.message_body(channel, sender, client_id, ts_ms, envelope)
        started = time.perf_counter()
        # The claim (idempotency) and the number are one bus call. If that call fails ambiguously the
        # claim may be left pending under this process's mark: retries get duplicate_pending until it
        # expires (CLAIM_PENDING_TTL), never a second number for a stored message.
        outcome = await self.bus.claim_and_publish(claim, self._pending_mark, CLAIM_PENDING_TTL, room.topic,
                                                   room.counter, body)
        if outcome is None:  # the bus forgot the channel's counter
            outcome = await self._reseed_and_claim(claim, room, body)
        if isinstance(outcome, bytes):
            if not outcome.startswith(PENDING):
                ack_to.acked(ack_note, int(outcome))
                return
            if not await self._take_over_claim(claim, outcome):
                raise error("duplicate_pending")
            try:
                seq = await self._publish(channel, body)
            except BaseException:
                await self._release_claim(claim)
                raise
        else:
            seq = outcome
        room.last_used = time.monotonic()
        self.metrics.messages_in += 1
        sequenced, counted = self.sequenced, (channel, ts_ms // 1000)
        sequenced[counted] = sequenced.get(counted, 0) + 1
        if self.metrics.messages_in % LATENCY_SAMPLE_EVERY == 0:
            if room.last_seq >= seq:  # the bus fanned it out locally before publish returned
                self.metrics.fanout_latency.observe(time.perf_counter() - started)
            elif len(self._probes) < 1000:
                self._probes[(channel, seq)] = started
        self.writer.add(channel, seq, room.frame(seq, body), self._on_durable, (claim, ack_to, ack_note))

    def _durable(self, stored_seq: int, note: tuple[str, AckTarget, bytes]) -> None:
        # The ack waits until the claim records the number: a retry that reaches another process
        # after this one dies must find the stored message, not a stale claim.
        claim, ack_to, ack_note = note
        self._claims_done.append((claim, stored_seq, ack_to, ack_note))
        self._claims_wake.set()

    def take_sequenced(self) -> dict[tuple[str, int], int]:
        """Per (channel, second), the messages sequenced here since the last call (the indicators'
        counts; the second is that of the messages' ``ts``)."""
        taken, self.sequenced = self.sequenced, {}
        return taken

    async def _take_over_claim(self, claim: str, previous: bytes) -> bool:
        """A claim still pending from a process that died (no heartbeat) will never be stored by it:
        take it over so the retry goes through now rather than when the claim expires."""
        owner = previous[len(PENDING):]
        if owner == self.instance.encode() or await self.bus.get(bus_keys.heartbeat(owner.decode())) is not None:
            return False
        return await self.bus.compare_and_set(claim, previous, self._pending_mark, CLAIM_PENDING_TTL)

    async def is_alive(self, instance: str) -> bool:
        """Whether the process ``instance`` still writes its heartbeat."""
        return await self.bus.get(bus_keys.heartbeat(instance)) is not None

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                await self.bus.set(bus_keys.heartbeat(self.instance), b"1", HEARTBEAT_TTL)
            except AgentChatError:
                log.warning("could not write this process's heartbeat to the bus")
            await asyncio.sleep(HEARTBEAT_TTL / 3)

    async def _release_claim(self, claim: str) -> None:
        try:
            await self.bus.delete(claim)
        except AgentChatError:
            pass

    async def _reseed_and_claim(self, claim: str, room: Room, body: bytes) -> int | bytes:
        await self._reseed(room.id)
        outcome = await self.bus.claim_and_publish(claim, self._pending_mark, CLAIM_PENDING_TTL, room.topic,
                                                   room.counter, body)
        if outcome is None:
            raise error("bus_unavailable", "the bus lost the channel's counter twice; retry")
        return outcome

    async def _publish(self, channel: str, body: bytes) -> int:
        seq = await self.bus.publish_sequenced(bus_keys.channel_messages(channel), bus_keys.sequence_counter(channel), body)
        if seq is None:
            await self._reseed(channel)
            seq = await self.bus.publish_sequenced(bus_keys.channel_messages(channel), bus_keys.sequence_counter(channel), body)
            if seq is None:
                raise error("bus_unavailable", "the bus lost the channel's counter twice; retry")
        return seq

    async def _reseed(self, channel: str) -> None:
        """The bus forgot this channel's counter: restart it above anything ever handed out, and
        remember the client ids of the latest stored messages so retries stay idempotent."""
        tail = await self.history.tail(channel, RECENT_MESSAGES)
        last = frame_seq(tail[-1]) if tail else 0
        room = self.rooms.get(channel)
        if room is not None:  # what was stored may all have expired: the numbers below stay used
            last = max(last, room.first_available - 1)
        floor = last + self.reseed_gap
        for frame in tail:
            record = orjson.loads(frame)
            await self.bus.set_if_absent(bus_keys.send_claim(channel, record["sender"], record["client_id"]),
                                         str(record["seq"]).encode(), CLAIM_DONE_TTL)
        await self.bus.seed_sequence(bus_keys.sequence_counter(channel), floor)
        log.info("re-seeded the counter of %s at %d", channel, floor)

    async def seed_new_channel(self, channel: str) -> None:
        await self.bus.seed_sequence(bus_keys.sequence_counter(channel), 0)
        for listener in list(self._listeners):
            await listener.on_channel_created(channel)

    async def _claims_loop(self) -> None:
        while True:
            await self._claims_wake.wait()
            self._claims_wake.clear()
            await self.flush_claims()

    async def flush_claims(self) -> None:
        """Record the numbers of stored messages in their claims, then ack them (all at once)."""
        done, self._claims_done = self._claims_done, []
        if not done:
            return
        try:
            await self.bus.set_many([(claim, str(seq).encode()) for claim, seq, _, _ in done], CLAIM_DONE_TTL)
        except AgentChatError:
            # The messages are stored whatever happens here; if the bus lost the claims too, a
            # retry finds them again through the store (see _reseed).
            log.warning("could not record %d stored client ids on the bus", len(done))
        # One sender's acks next to each other (a stable sort: still in number order): the acks that
        # go out in one event-loop turn then reach few sockets, in few writes, instead of one write
        # to each of ACKS_PER_TURN senders.
        done.sort(key=_claim_sender)
        for i, (_, seq, ack_to, ack_note) in enumerate(done, 1):
            try:
                ack_to.acked(ack_note, seq)
            except Exception:
                log.exception("ack callback failed")
            if i % ACKS_PER_TURN == 0 and i < len(done):
                # A batch can hold thousands of acks: let the deliveries waiting behind them go first.
                await asyncio.sleep(0)
