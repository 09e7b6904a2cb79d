"""Catching a reader up: everything stored or recent after the last number it has, then live.

A reader that resumes (``Hub.attach`` with ``resume_after``) or whose process lost the bus for a moment
(``after_reconnect``) gets every number after its last one from the store, then from the room's recent
buffer, then the live messages held back meanwhile: no gap and no duplicate at the seam.

A number missing from the store may still be on its way there: another process handed it out and
its group commit has not stored it yet. Such a number is in that process's in-flight index
(``bus_keys.in_flight``), so with several processes the catch-up waits for every missing number that
is in flight until it is stored or, if its process died, declared a gap (it recovers that process
itself), for at most ``IN_FLIGHT_PATIENCE`` while that process still looks alive; a number in flight
nowhere was never handed out or is settled, and is not waited for.
"""

from __future__ import annotations

import asyncio
import logging
import time

from agentchat.bus import keys as bus_keys
from agentchat.core import frames
from agentchat.core.backoff import Backoff
from agentchat.errors import AgentChatError
from agentchat.server.room import Room
from agentchat.server.sequencer import Sequencer
from agentchat.server.session import Session
from agentchat.store.messages import MessageLog, MessageWriter, frame_seq

log = logging.getLogger(__name__)

HISTORY_PAGE = 500
GAP_FILL_TRIES = 4
# How long a catch-up keeps retrying a store or bus that answers "unavailable" (a failover, a
# restart) before it hands the reader back to its client (close 1013: reconnect and resume).
CATCH_UP_PATIENCE = 30.0
# How long a catch-up waits for numbers another process has in flight while that process still has a
# heartbeat: its group commit lands within a batch's wait and a store write; then the catch-up goes on
# without them, as with burned numbers. Short, because a resume in a socket's hello holds the socket's
# other frames (its sends) meanwhile, and a process just killed keeps its heartbeat for up to 3 s: its
# numbers then reach the reader as gap frames, live, once it is recovered.
IN_FLIGHT_PATIENCE = 1.0


class CatchUp:
    def __init__(self, history: MessageLog, writer: MessageWriter, sequencer: Sequencer, *,
                 send_queue_max: int, gap_fill_wait: float) -> None:
        """``gap_fill_wait``: with several processes, how long a resume waits (up to
        ``GAP_FILL_TRIES`` times) for numbers another process has sent but not yet stored; 0 for one
        process, where every such number is in this process's recent buffer."""
        self.history = history
        self.writer = writer
        self.sequencer = sequencer
        self.send_queue_max = send_queue_max
        self.gap_fill_wait = gap_fill_wait

    async def after_reconnect(self, readers: list[tuple[Session, Room, int]]) -> None:
        # The bus may have lost everything: our heartbeat and claims go back first (retries stay
        # idempotent), then the index of stored but not yet compacted messages is made complete
        # (ours re-added, dead processes' recovered; reads wait for it), and (several processes) the
        # others get as long to do the same before local readers catch up.
        try:
            await self.sequencer.restore_claims()
            await self.writer.reindex()
            await self.writer.recovery.ensure_index()
        except AgentChatError as exc:
            log.warning("could not restore claims and the index after the bus came back: %r", exc)
        if self.gap_fill_wait:
            await asyncio.sleep(self.gap_fill_wait * GAP_FILL_TRIES)
        for session, room, after in readers:
            if not session.closed and room.id in session.cursors:
                asyncio.get_running_loop().create_task(self.run(session, room, after))

    async def run(self, session: Session, room: Room, after: int) -> None:
        """``_catch_up``, retried while the store or bus is briefly away. Live messages stay held
        meanwhile; a reader is never let go on with a hole in its stream: if the catch-up cannot
        finish, the socket is closed (1013) and its client resumes from the last number it got."""
        backoff = Backoff(0.1, 2.0)
        deadline = time.monotonic() + CATCH_UP_PATIENCE
        while True:
            try:
                await self._catch_up(session, room, after)
                return
            except AgentChatError as exc:
                cursor = session.cursors.get(room.id)
                if session.closed or cursor is None:
                    return
                if exc.retryable and time.monotonic() < deadline:
                    log.info("catch-up of %s stalled (%s); retrying", room.id, exc.code)
                    after = cursor.last
                    await asyncio.sleep(backoff.next_delay())
                    continue
                log.warning("catch-up of %s failed (%s); the reader reconnects and resumes", room.id, exc.code)
                session.push(frames.error_frame(exc.to_wire()))
                session.close_soon(frames.CLOSE_TRY_AGAIN, "catch_up_failed", flush=True)
                return

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
        settle_until = time.monotonic() + IN_FLIGHT_PATIENCE
        while recent is None:
            page = await self.history.read(room.id, cursor.last, HISTORY_PAGE)
            if self.gap_fill_wait and await self._waits_in_flight(room, cursor.last, page, settle_until):
                continue
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

    async def _waits_in_flight(self, room: Room, after: int, page: list[bytes], until: float) -> bool:
        """Whether a number missing from ``page`` (stored frames above ``after``), below its end or
        below the first number this process saw live, is still in flight somewhere: then, after a
        pause, the page is read again."""
        below = frame_seq(page[-1]) if page else room.complete_from
        if below <= after + 1 or time.monotonic() >= until:
            return False
        if page and len(page) == below - after:
            return False  # no number missing
        present = {frame_seq(frame) for frame in page}
        if not await self._settle_in_flight(room.id, after, below, present):
            return False
        await asyncio.sleep(self.gap_fill_wait)
        return True

    async def _settle_in_flight(self, channel: str, after: int, below: int, present: set[int]) -> bool:
        """Whether some process has a number between ``after`` and ``below`` (not in ``present``) in
        flight. A dead process's are settled here (recovered: stored, or declared gaps)."""
        bus = self.sequencer.bus
        for instance, _ in await bus.index_range(bus_keys.IN_FLIGHT_PROCESSES, 0):
            numbers = await bus.index_range(bus_keys.in_flight(channel, instance), after + 1)
            if not any(seq < below and seq not in present for _, seq in numbers):
                continue
            if instance != self.sequencer.instance and not await self.sequencer.is_alive(instance):
                await self.writer.recovery.recover_instance(instance, dead=True)
            return True
        return False
