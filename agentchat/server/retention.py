"""Retention: how long a channel's messages are kept, and the pass that deletes what expired.

A channel's owner sets ``retention_seconds`` (``PUT /api/v1/channels/{channel}/retention``); without
one the server's ``retention_default_seconds`` applies (0: forever), and ``retention_max_seconds``
(0: none) caps both. The pass runs in the message writer's compaction loop every
``retention_check_seconds``, on one process at a time (a lease on the bus): for each channel with a
retention it deletes the segments whose messages have all expired, a thousand per request, through
the same counted store as every other write (so the bench's persistence figure includes it), then
raises the channel's ``first_available`` and tells its readers (the ``channel`` event ``expired``).
History answers carry ``first_available`` and a resume from below it gets that event first: an
expired message is never a silent gap.

Channels with a retention of their own have a marker under ``retention-index/``; with no server
default nor maximum, the pass walks only those (one listing per page of them, then one listing per
channel), else every channel.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from agentchat.bus import keys as bus_keys
from agentchat.bus.base import Bus
from agentchat.config import Settings
from agentchat.errors import error
from agentchat.server.hub import Hub
from agentchat.store import keys
from agentchat.store.messages import MessageWriter
from agentchat.store.records import Record, Records

log = logging.getLogger(__name__)

LIST_PAGE = 1000


def effective_seconds(settings: Settings, meta: Record) -> int:
    """How long this channel's messages are kept, in seconds; 0: forever."""
    chosen = meta.get("retention_seconds") or settings.retention_default_seconds
    cap = settings.retention_max_seconds
    if cap:
        return min(chosen, cap) if chosen else cap
    return chosen


def check_retention(settings: Settings, value: Any) -> int | None:
    """A retention an owner may set: whole seconds, at least 1, at most the server's maximum; None
    (the server's default)."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise error("invalid_field", "field 'retention_seconds' must be a whole number of seconds (1 or more) or null")
    cap = settings.retention_max_seconds
    if cap and value > cap:
        raise error("invalid_field", f"this server keeps messages at most {cap} seconds")
    return value


class RetentionPolicy:
    """The ``Retention`` hook of ``MessageWriter``."""

    def __init__(self, settings: Settings, records: Records, bus: Bus, hub: Hub, instance: str) -> None:
        self.settings = settings
        self.records = records
        self.bus = bus
        self.hub = hub
        self.instance = instance
        self.every = settings.retention_check_seconds

    async def _channels(self) -> AsyncIterator[str]:
        everyone = bool(self.settings.retention_default_seconds or self.settings.retention_max_seconds)
        prefix = keys.CHANNEL_INDEX_PREFIX if everyone else keys.RETENTION_INDEX_PREFIX
        start_after = ""
        while page := await self.records.store.list(prefix, start_after=start_after, limit=LIST_PAGE):
            for key in page:
                yield key[len(prefix):]
            start_after = page[-1]

    async def run(self, writer: MessageWriter) -> None:
        # One process per period: the lease lasts a little less than the period.
        if await self.bus.set_if_absent(bus_keys.retention_lease(), self.instance.encode(), self.every * 0.9) is not None:
            return
        await self.expire_all(writer)

    async def expire_all(self, writer: MessageWriter) -> int:
        """One pass over the channels; returns how many had messages expire."""
        now_ms = int(time.time() * 1000)
        changed = 0
        async for channel in self._channels():
            meta = await self.records.get_channel(channel)
            if meta is None:
                continue
            seconds = effective_seconds(self.settings, meta)
            if not seconds:
                continue
            first = await writer.expire(channel, now_ms - seconds * 1000)
            if first is not None and first > meta.get("first_available", 1):
                await self.records.update_channel(channel, lambda current: (
                    {**current, "first_available": first} if first > current.get("first_available", 1) else None))
                await self.hub.publish_channel_event(channel, {"event": "expired", "first_available": first})
                changed += 1
        return changed
