"""The hub: this process's view of live channels, and the fan-out every message takes.

The sequencer (``server/sequencer.py``) numbers a sent message, publishes it and acks it once stored;
the hub delivers what the bus carries to this process's sockets and catches readers up from the store.

Bus topics: ``c:<channel>`` carries messages, ``e:<channel>`` channel events (membership, epoch),
``a:<did>`` events for one agent (added to a channel). A process subscribes to a channel's topics while
it has a room for it (a local reader, or a send in the last ``ROOM_IDLE_SECONDS``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from agentchat.bus.base import Bus
from agentchat.core import frames
from agentchat.errors import AgentChatError, error
from agentchat.server.metrics import Metrics
from agentchat.server.room import RECENT_MESSAGES, Room, topic_agent, topic_events, topic_messages
from agentchat.server.sequencer import SEQ_RESEED_GAP, AckTarget, Sequencer
from agentchat.server.session import CLOSE_REMOVED, Cursor, Session
from agentchat.store.messages import MessageLog, MessageWriter, frame_seq
from agentchat.store.records import Records

__all__ = ["Hub", "Room", "RECENT_MESSAGES", "SEQ_RESEED_GAP"]

log = logging.getLogger(__name__)

ROOM_IDLE_SECONDS = 60.0
HISTORY_PAGE = 500
GAP_FILL_TRIES = 4


class Hub:
    def __init__(self, bus: Bus, records: Records, history: MessageLog, writer: MessageWriter,
                 *, metrics: Metrics, send_queue_max: int, instance: str = "", gap_fill_wait: float = 0.0,
                 reseed_gap: int = SEQ_RESEED_GAP) -> None:
        """``gap_fill_wait``: with several processes, how long a resume waits (up to
        ``GAP_FILL_TRIES`` times) for numbers another process has sent but not yet stored; 0 for one
        process, where every such number is in this process's recent buffer."""
        self.gap_fill_wait = gap_fill_wait
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
        # Set by the peek service (server/peeks.py): whether a peek token may read its channel now
        # (only while the peek is active), and the handler of the peeks' bus topics ("p:...").
        self.peek_readable: Callable[[str], bool] = lambda peek_id: False
        self.on_peek_message: Callable[[str, bytes], None] | None = None
        # The handler of the indicators' bus topics ("i:...").
        self.on_indicators: Callable[[str, bytes], None] | None = None
        self.on_channel_created: Callable[[str], Awaitable[None]] | None = None

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.bus.start(self._on_bus, self._on_bus_reconnect)
        await self.sequencer.write_heartbeat()
        self._tasks.append(asyncio.create_task(self.sequencer.heartbeat_loop(), name="hub-heartbeat"))
        self._tasks.append(asyncio.create_task(self.sequencer.claims_loop(), name="hub-claims"))
        self._tasks.append(asyncio.create_task(self._sweep_loop(), name="hub-sweep"))

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
            await self.bus.subscribe(topic_messages(channel))
            await self.bus.subscribe(topic_events(channel))
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
                if not room.subscribers and now - room.last_used > ROOM_IDLE_SECONDS:
                    del self.rooms[channel]
                    try:
                        await self.bus.unsubscribe(topic_messages(channel))
                        await self.bus.unsubscribe(topic_events(channel))
                    except AgentChatError:
                        log.warning("could not unsubscribe from %s", channel)

    # ------------------------------------------------------------------------------ bus events

    def _on_bus(self, topic: str, seq: int, body: bytes) -> None:
        kind = topic[:2]
        if kind == "c:":
            room = self.rooms.get(topic[2:])
            if room is not None:
                self.metrics.messages_fanned_out += 1
                room.on_message(seq, frames.message_frame(seq, body))
                probes = self.sequencer.probes
                if probes:
                    started = probes.pop((room.id, seq), None)
                    if started is not None:
                        self.metrics.fanout_latency.observe(time.perf_counter() - started)
        elif kind == "e:":
            asyncio.get_running_loop().create_task(self._on_channel_event(topic[2:], orjson.loads(body)))
        elif kind == "a:":
            asyncio.get_running_loop().create_task(self._on_agent_event(topic[2:], orjson.loads(body)))
        elif kind == "p:" and self.on_peek_message is not None:
            self.on_peek_message(topic[2:], body)
        elif kind == "i:" and self.on_indicators is not None:
            self.on_indicators(topic[2:], body)

    def _on_bus_reconnect(self) -> None:
        # Messages published while the bus was away were not delivered here: every local reader
        # catches up from the store, from the last number it has; live messages are held meanwhile.
        log.warning("bus reconnected; catching up %d rooms from the store", len(self.rooms))
        self.metrics.bus_reconnects += 1
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
        # The bus may have lost everything: our heartbeat and claims go back first (retries stay
        # idempotent), then the index of stored but not yet compacted messages is made complete
        # (ours re-added, dead processes' recovered; reads wait for it), and (several processes) the
        # others get as long to do the same before local readers catch up.
        try:
            await self.sequencer.restore_claims()
            await self.writer.reindex()
            await self.writer.ensure_index()
        except AgentChatError as exc:
            log.warning("could not restore claims and the index after the bus came back: %r", exc)
        if self.gap_fill_wait:
            await asyncio.sleep(self.gap_fill_wait * GAP_FILL_TRIES)
        for session, room, after in readers:
            if not session.closed and room.id in session.cursors:
                asyncio.get_running_loop().create_task(self._catch_up_safely(session, room, after))

    async def _on_channel_event(self, channel: str, event: dict[str, Any]) -> None:
        room = self.rooms.get(channel)
        if room is None:
            return
        meta = await self.records.get_channel(channel)
        if meta is None:
            return
        room.apply(meta)
        notice = frames.encode({"type": "channel", "channel": channel, **event})
        for session in list(room.subscribers):
            did = session.principal.subject
            if session.principal.is_agent and did not in room.members:
                self.detach(session, channel)
                session.push(frames.encode({"type": "channel", "channel": channel, "event": "removed"}))
            else:
                session.push(notice)
        if event.get("event") == "peek_ended":
            for session in list(room.subscribers):
                if not session.principal.is_agent and session.principal.subject == event.get("peek"):
                    session.close_soon(CLOSE_REMOVED, "peek_ended")

    async def _on_agent_event(self, did: str, event: dict[str, Any]) -> None:
        if event.get("event") != "added":
            return
        channel = event["channel"]
        for session in list(self.sessions.get(did, ())):
            if channel not in session.cursors:
                try:
                    await self.attach(session, channel, resume_after=None)
                except AgentChatError:
                    continue
                session.push(frames.encode({"type": "channel", "channel": channel, "event": "added"}))

    async def publish_channel_event(self, channel: str, event: dict[str, Any]) -> None:
        await self.bus.publish(topic_events(channel), orjson.dumps(event))

    async def publish_agent_event(self, did: str, event: dict[str, Any]) -> None:
        await self.bus.publish(topic_agent(did), orjson.dumps(event))

    # ------------------------------------------------------------------------------ sessions

    async def register_session(self, session: Session) -> None:
        if session.principal.is_agent:
            did = session.principal.subject
            local = self.sessions.setdefault(did, set())
            if not local:
                await self.bus.subscribe(topic_agent(did))
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
                    await self.bus.unsubscribe(topic_agent(did))

    def readable_by(self, room: Room, session_or_principal: Any) -> bool:
        principal = getattr(session_or_principal, "principal", session_or_principal)
        if principal.is_agent:
            return principal.subject in room.members
        return principal.channel == room.id and self.peek_readable(principal.subject)

    async def attach(self, session: Session, channel: str, resume_after: int | None, *,
                     defer_catch_up: bool = False) -> None:
        """Start live delivery of ``channel`` to ``session``: every message published after this
        returns reaches it. With ``resume_after``, first everything stored or recent after that
        number, with no gap and no duplicate at the seam (live messages are held back meanwhile);
        ``defer_catch_up`` leaves that to a later ``catch_up`` call."""
        room = await self.room(channel)
        if not self.readable_by(room, session):
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
        """``Sequencer.send``: sequence, fan out and store one message, ack it once stored."""
        await self.sequencer.send(sender, channel, client_id, envelope, ack_to, ack_note)

    def take_sequenced(self) -> dict[tuple[str, int], int]:
        return self.sequencer.take_sequenced()

    async def is_alive(self, instance: str) -> bool:
        return await self.sequencer.is_alive(instance)

    async def flush_claims(self) -> None:
        await self.sequencer.flush_claims(final=True)

    async def seed_new_channel(self, channel: str) -> None:
        await self.sequencer.seed_new_channel(channel)
        if self.on_channel_created is not None:
            await self.on_channel_created(channel)
