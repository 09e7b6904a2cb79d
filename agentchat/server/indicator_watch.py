"""The sockets watching the public indicators (``watch_indicators``) and the pushes to them: each
channel's changed numbers at most once per ``UPDATE_INTERVAL``, and only when what the public sees
changed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from agentchat.core import frames
from agentchat.core.indicators import ChannelIndicators, Throttle
from agentchat.server.session import Session

UPDATE_INTERVAL = 1.0


def indicators_frame(items: Iterable[ChannelIndicators], ref: str | None = None, more: bool | None = None) -> bytes:
    frame: dict[str, Any] = {"type": "indicators", "channels": [item.to_wire() for item in items]}
    if ref is not None:
        frame["ref"] = ref
    if more is not None:
        frame["more"] = more
    return frames.encode(frame)


class IndicatorWatchers:
    """Who watches which channels (all of them, or a list), and the throttled pushes."""

    def __init__(self, *, view: Callable[[str], ChannelIndicators | None], clock: Callable[[], float]) -> None:
        # What the public sees of a channel now (None: not known here, or unlisted).
        self._view = view
        self.clock = clock
        self._throttle: Throttle[str] = Throttle(UPDATE_INTERVAL)
        self._watch_all: set[Session] = set()
        self._watch_some: dict[Session, frozenset[str]] = {}
        self._watchers_of: dict[str, set[Session]] = {}
        self._pushed: dict[str, dict[str, Any]] = {}  # channel -> the view last pushed
        self._push_timer: asyncio.TimerHandle | None = None
        self._push_at = 0.0
        self._closed = False

    def close(self) -> None:
        self._closed = True
        if self._push_timer is not None:
            self._push_timer.cancel()

    def watch_all(self, session: Session) -> None:
        self._watch_all.add(session)

    def watch_some(self, session: Session, wanted: frozenset[str]) -> None:
        if wanted:
            self._watch_some[session] = wanted
            for channel in wanted:
                self._watchers_of.setdefault(channel, set()).add(session)

    def unwatch(self, session: Session) -> None:
        self._watch_all.discard(session)
        wanted = self._watch_some.pop(session, None)
        for channel in wanted or ():
            watchers = self._watchers_of.get(channel)
            if watchers is not None:
                watchers.discard(session)
                if not watchers:
                    del self._watchers_of[channel]

    def forget(self, channel: str) -> None:
        self._pushed.pop(channel, None)

    @property
    def count(self) -> int:
        return len(self._watch_all) + len(self._watch_some)

    def prune(self) -> None:
        for session in [s for s in self._watch_all if s.closed] + [s for s in self._watch_some if s.closed]:
            self.unwatch(session)

    def changed(self, channels: Iterable[str]) -> None:
        """Some channels' numbers may have changed: push them now, or as soon as the throttle allows."""
        if not self._watch_all and not self._watchers_of:
            return
        now = self.clock()
        ready = [channel for channel in channels if self._watched(channel) and self._throttle.offer(channel, now)]
        if ready:
            self._push(ready)
        self._arm_push_timer()

    def _watched(self, channel: str) -> bool:
        return bool(self._watch_all) or channel in self._watchers_of

    def _arm_push_timer(self) -> None:
        at = self._throttle.next_due()
        if at is None or self._closed:
            return
        if self._push_timer is not None:
            if self._push_at <= at:
                return
            self._push_timer.cancel()
        self._push_at = at
        self._push_timer = asyncio.get_running_loop().call_later(max(0.0, at - self.clock()), self._on_push_timer)

    def _on_push_timer(self) -> None:
        self._push_timer = None
        due = self._throttle.due(self.clock())
        if due:
            self._push(due)
        self._arm_push_timer()
        self._throttle.prune(self.clock())

    def _push(self, channels: list[str]) -> None:
        updates: list[ChannelIndicators] = []
        for channel in channels:
            item = self._view(channel)
            if item is None:
                continue
            wire = item.to_wire()
            if self._pushed.get(channel) == wire:
                continue
            self._pushed[channel] = wire
            updates.append(item)
        if not updates:
            return
        if self._watch_all:
            frame = indicators_frame(updates)
            for session in list(self._watch_all):
                session.push(frame)
        if self._watchers_of:
            per_session: dict[Session, list[ChannelIndicators]] = {}
            for item in updates:
                for session in self._watchers_of.get(item.channel, ()):
                    per_session.setdefault(session, []).append(item)
            for session, items in per_session.items():
                session.push(indicators_frame(items))
