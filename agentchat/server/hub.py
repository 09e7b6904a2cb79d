"""The hub: this process's view of live channels, and the fan-out every message takes.

The sequencer (``server/sequencer.py``) numbers a sent message, publishes it and acks it once stored;
the hub delivers what the bus carries to this process's sockets; ``CatchUp`` (``server/catch_up.py``)
catches readers up from the store.

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
from typing import Any, Protocol

import orjson

from agentchat.bus import keys as bus_keys
from agentchat.bus.base import Bus
from agentchat.core import frames
from agentchat.errors import AgentChatError, error
from agentchat.server.catch_up import CatchUp
from agentchat.server.membership import MembershipSync, version_of
from agentchat.server.metrics import Metrics
from agentchat.server.room import RECENT_MESSAGES, Room
from agentchat.server.sequencer import SEQ_RESEED_GAP, AckTarget, Sequencer
from agentchat.server.session import CLOSE_REMOVED, Cursor, Session
from agentchat.store.messages import MessageLog, MessageWriter
from agentchat.store.records import Records

log = logging.getLogger(__name__)

__all__ = ["AckTarget", "Hub", "HubListener", "HubListenerBase", "RECENT_MESSAGES", "Room", "SEQ_RESEED_GAP"]

ROOM_IDLE_SECONDS = 60.0


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


class Hub:
    def __init__(self, bus: Bus, records: Records, history: MessageLog, writer: MessageWriter,
                 *, metrics: Metrics, send_queue_max: int, instance: str = "", gap_fill_wait: float = 0.0,
                 reseed_gap: int = SEQ_RESEED_GAP) -> None:
        """``gap_fill_wait``: with several processes, how long a resume waits (up to
        ``GAP_FILL_TRIES`` times) for numbers another process has sent but not yet stored; 0 for one
        process, where every such number is in this process's recent buffer."""
        self.instance = instance or secrets.token_hex(8)  # this process, in claims and heartbeats
        self.bus = bus
        self.records = records
        self.history = history
        self.writer = writer
        self.metrics = metrics
        self.send_queue_max = send_queue_max
        self.rooms: dict[str, Room] = {}
        self._room_loading: dict[str, asyncio.Future[Room]] = {}
        self.sessions: dict[str, set[Session]] = {}
        self.sequencer = Sequencer(bus, history, writer, metrics=metrics, instance=self.instance,
                                   reseed_gap=reseed_gap, room=self.room)
        self._tasks: list[asyncio.Task[None]] = []
        self._listeners: list[HubListener] = []
        self._listener_of_kind: dict[str, HubListener] = {}  # bus topic kind -> the listener reading it
        self.membership = MembershipSync(self)
        self.catch_ups = CatchUp(history, writer, self.sequencer, send_queue_max=send_queue_max,
                                 gap_fill_wait=gap_fill_wait)

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
        await self.sequencer.write_heartbeat()
        self._tasks.append(asyncio.create_task(self.sequencer.heartbeat_loop(), name="hub-heartbeat"))
        self._tasks.append(asyncio.create_task(self.sequencer.claims_loop(), name="hub-claims"))
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
            await self._live_from_now(room)
            future.set_result(room)
            return room
        except BaseException as exc:
            self.rooms.pop(channel, None)
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._room_loading[channel]

    async def _live_from_now(self, room: Room) -> None:
        """The room was just subscribed: every number above the channel's counter now reaches it
        live, so its recent buffer is complete from the next one. Without this a catch-up that
        found the store empty (another process numbered a message before this subscription and
        has not stored it yet) took the store's end for the channel's and let the next live
        message skip the one still being stored."""
        try:
            (counter,) = await self.bus.read_counters([room.counter])
        except AgentChatError:
            return  # complete from the first live message, as before
        if counter is not None and not room.complete_from:
            room.complete_from = counter + 1

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
                probes = self.sequencer.probes
                if probes:
                    started = probes.pop((room.id, seq), None)
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
        asyncio.get_running_loop().create_task(self.catch_ups.after_reconnect(readers))

    def apply_channel(self, meta: dict[str, Any], event: dict[str, Any] | None = None) -> None:
        """Bring the room of ``meta`` (if this process has one) to that record: a session whose agent
        is no longer a member is detached and told ``removed``; the others get ``event``, if any."""
        channel = meta["id"]
        room = self.rooms.get(channel)
        if room is None:
            return
        # Never back to an older read: an epoch change (a rotation) leaves the version as it is.
        if version_of(meta) >= room.version and meta["epoch"] >= room.epoch:
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
        if event.get("event") == "gap":
            self._on_gaps(channel, event["seqs"])
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

    def _on_gaps(self, channel: str, seqs: list[int]) -> None:
        """Numbers of ``channel`` that were handed out (maybe delivered live) will never be stored
        (``store/recovery.py``): every local reader gets a ``gap`` frame for each, whatever it got."""
        room = self.rooms.get(channel)
        if room is None:
            return
        gap_frames = room.retract(seqs, int(time.time() * 1000))
        for session in list(room.subscribers):
            for frame in gap_frames:
                session.push(frame)

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
        # Delivery starts after the number the channel had reached when the agent joined, whenever
        # this process hears of it (an older process's event has no number: live from now).
        after = event.get("after")
        resume_after = after if isinstance(after, int) and after >= 0 else None
        for session in list(self.sessions.get(did, ())):
            if channel not in session.cursors:
                try:
                    await self.attach(session, channel, resume_after=resume_after, defer_catch_up=True)
                except AgentChatError:
                    continue
                session.push(frames.encode({"type": "channel", "channel": channel, "event": "added"}))
                if resume_after is not None:
                    await self.catch_up(session, channel)

    async def announce_joined(self, did: str, channel: str) -> None:
        """``did`` is a member of ``channel`` now: its sockets, on every process, get every message
        numbered after this moment, even one sent before their process hears of the join."""
        try:
            (after,) = await self.bus.read_counters([bus_keys.sequence_counter(channel)])
        except AgentChatError:
            after = None  # its sockets get live delivery from when their process hears of it
        event: dict[str, Any] = {"event": "added", "channel": channel}
        if after is not None:
            event["after"] = after
        await self.publish_agent_event(did, event)

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
            await self.catch_ups.run(session, room, resume_after)

    async def catch_up(self, session: Session, channel: str) -> None:
        """Run the catch-up that ``attach(..., defer_catch_up=True)`` left pending."""
        room = self.rooms.get(channel)
        cursor = session.cursors.get(channel)
        if room is not None and cursor is not None and cursor.catching_up:
            await self.catch_ups.run(session, room, cursor.last)

    def detach(self, session: Session, channel: str) -> None:
        session.cursors.pop(channel, None)
        room = self.rooms.get(channel)
        if room is not None:
            room.subscribers.discard(session)
            room.last_used = time.monotonic()

    # ------------------------------------------------------------------------------ send

    async def send(self, sender: str, channel: str, client_id: str, envelope: dict[str, Any],
                   ack_to: AckTarget, ack_note: bytes = b"") -> None:
        """``Sequencer.send``: sequence, fan out and store one message, ack it once stored."""
        try:
            await self.sequencer.send(sender, channel, client_id, envelope, ack_to, ack_note)
        except AgentChatError as exc:
            room = self.rooms.get(channel)
            if exc.code != "stale_epoch" or room is None or envelope["epoch"] <= room.epoch:
                raise
            # The sender knows a newer epoch than this process: the event saying so may have been
            # lost (a bus blip). Re-read the record once rather than refuse every send until the
            # next membership change.
            meta = await self.records.get_channel(channel)
            if meta is None or meta["epoch"] <= room.epoch:
                raise
            self.apply_channel(meta)
            await self.sequencer.send(sender, channel, client_id, envelope, ack_to, ack_note)

    def take_sequenced(self) -> dict[tuple[str, int], int]:
        return self.sequencer.take_sequenced()

    async def is_alive(self, instance: str) -> bool:
        return await self.sequencer.is_alive(instance)

    async def flush_claims(self) -> None:
        await self.sequencer.flush_claims(final=True)

    async def seed_new_channel(self, channel: str) -> None:
        await self.sequencer.seed_new_channel(channel)
        for listener in list(self._listeners):
            await listener.on_channel_created(channel)
