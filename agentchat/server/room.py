"""A channel's presence in this process (``Room``), shared by the hub (fan-out, catch-up) and the
sequencer (numbers and claims)."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from agentchat.bus import keys as bus_keys
from agentchat.core import frames
from agentchat.server.membership import version_of
from agentchat.server.session import Session

RECENT_MESSAGES = 1024


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

    def retract(self, seqs: list[int], ts_ms: int) -> list[bytes]:
        """Numbers ``seqs`` will never be stored (a gap): their ``gap`` frames, which also take their
        place in the recent buffer, so a later catch-up from it gives the gap, not the message."""
        found = {seq: frames.gap_frame(self.id, seq, ts_ms) for seq in seqs}
        recent = self.recent
        for i, (seq, _) in enumerate(recent):
            if seq in found:
                recent[i] = (seq, found[seq])
        return [found[seq] for seq in sorted(found)]

    def forget_recent(self) -> None:
        self.recent.clear()
        self.complete_from = 0

    def recent_after(self, after: int) -> list[bytes] | None:
        """Frames numbered above ``after`` if the recent buffer holds all of them, else None."""
        if not self.complete_from or after + 1 < self.complete_from:
            return None
        return [frame for seq, frame in self.recent if seq > after]
