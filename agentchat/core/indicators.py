"""Public indicators maths: counts only, no I/O and no clock of its own (every call takes ``now``).

What a channel shows the public (``ChannelIndicators``): members, agents online, messages in all,
messages in the last minute, the minute of the last message, peeks in all and active. Never content,
and nothing that tells one message from another beyond counts: the finest grain anyone sees is a
count per second (live updates) and the minute of the last message.

How the numbers come together across server processes (``server/indicators.py`` does the I/O):

- Each process counts the messages it sequences per channel (``Hub.send``) and, once a second, adds
  them to the channel's shared total on the bus, then publishes one ``Report``: per channel, the
  count of that second and the total after its addition, plus how many distinct agents hold a
  session for the channel on that process (changes only, the whole table every ``FULL_PRESENCE_EVERY``
  reports).
- Every process merges every report (its own included) into an ``IndicatorBook``: per-second counts
  into a sliding ``RateWindow`` (so every process computes the same messages-per-minute), totals by
  maximum (a total only grows, so a late or repeated report cannot lower it), presence per process,
  forgotten when a process stops reporting (``PRESENCE_TTL``).
- Live updates go out through a ``Throttle``: at most one per channel per second, whatever the rate.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import orjson

WINDOW_SECONDS = 60
MINUTE_MS = 60_000
# A process that has not reported for this long is gone: its agents no longer count as online.
PRESENCE_TTL = 5.0
# Every this many reports a process sends its whole presence table, so a process that just started
# (or missed a report) converges within that many seconds.
FULL_PRESENCE_EVERY = 10
REPORT_VERSION = 1

K = TypeVar("K", bound=Hashable)


def coarse_minute_ms(seconds: float) -> int:
    """The start of the minute holding ``seconds`` (Unix time), in milliseconds: how finely the last
    activity is shown."""
    return int(seconds // 60) * MINUTE_MS


# ------------------------------------------------------------------------------ messages per minute


class RateWindow:
    """Counts in one-second buckets over the last ``window`` seconds (the current one included)."""

    __slots__ = ("window", "_seconds", "_counts")

    def __init__(self, window: int = WINDOW_SECONDS) -> None:
        if window < 1:
            raise ValueError("window must be at least one second")
        self.window = window
        self._seconds = [-1] * window
        self._counts = [0] * window

    def add(self, second: int, count: int, now: float) -> None:
        """Count ``count`` events at Unix second ``second``. A second from the future (another
        process's clock ahead of ours) counts as now; one already out of the window is dropped."""
        current = int(now)
        if second > current:
            second = current
        if second <= current - self.window or count <= 0:
            return
        slot = second % self.window
        if self._seconds[slot] != second:
            self._seconds[slot] = second
            self._counts[slot] = 0
        self._counts[slot] += count

    def total(self, now: float) -> int:
        current = int(now)
        low = current - self.window
        return sum(count for second, count in zip(self._seconds, self._counts) if low < second <= current)


# ------------------------------------------------------------------------------ throttle


class Throttle(Generic[K]):
    """At most one update per key per ``interval`` seconds.

    Calling contract: call ``offer(key, now)`` whenever the key changes; if it returns True send the
    update now. Otherwise the key is pending: call ``due(now)`` at or after ``next_due()`` and send the
    keys it returns (each then counts as sent at ``now``). However often a key changes, it is sent at
    most once per interval, and a change is never left unsent for longer than one interval.
    """

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._sent: dict[K, float] = {}
        self._pending: dict[K, float] = {}  # key -> when it may be sent

    def offer(self, key: K, now: float) -> bool:
        if key in self._pending:
            return False
        last = self._sent.get(key)
        if last is None or now - last >= self.interval:
            self._sent[key] = now
            return True
        self._pending[key] = last + self.interval
        return False

    def due(self, now: float) -> list[K]:
        ready = [key for key, at in self._pending.items() if at <= now]
        for key in ready:
            del self._pending[key]
            self._sent[key] = now
        return ready

    def next_due(self) -> float | None:
        return min(self._pending.values(), default=None)

    def prune(self, now: float) -> None:
        """Forget keys sent over an interval ago and not pending (keeps memory bounded)."""
        stale = [key for key, at in self._sent.items() if now - at >= self.interval and key not in self._pending]
        for key in stale:
            del self._sent[key]


# ------------------------------------------------------------------------------ reports between processes


@dataclass(slots=True)
class Report:
    """What one process tells the others once a second (bus topic ``i:reports``)."""

    process: str
    second: int
    # channel -> (messages this process sequenced since its last report, the channel's total after
    # adding them to the shared counter; 0 if the addition is still pending)
    messages: dict[str, tuple[int, int]] = field(default_factory=dict)
    # channel -> distinct agents with a session for it on this process (changes, or all if ``full``)
    presence: dict[str, int] = field(default_factory=dict)
    full: bool = False

    def to_bytes(self) -> bytes:
        return orjson.dumps({"v": REPORT_VERSION, "p": self.process, "t": self.second,
                             "m": {ch: [n, total] for ch, (n, total) in self.messages.items()},
                             "o": self.presence, "f": self.full})

    @classmethod
    def from_bytes(cls, data: bytes) -> Report:
        """Raises ``ValueError`` for anything malformed (the caller drops it)."""
        try:
            raw = orjson.loads(data)
            if raw.get("v") != REPORT_VERSION:
                raise ValueError(f"report version {raw.get('v')!r}")
            messages = {str(ch): (int(n), int(total)) for ch, (n, total) in raw["m"].items()}
            presence = {str(ch): int(count) for ch, count in raw["o"].items()}
            return cls(str(raw["p"]), int(raw["t"]), messages, presence, bool(raw["f"]))
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError) as exc:
            raise ValueError(f"malformed indicators report: {exc!r}") from None


class ReportBuilder:
    """One process's side: turns what it counted and who is connected into its next ``Report``."""

    def __init__(self, process: str, full_every: int = FULL_PRESENCE_EVERY) -> None:
        self.process = process
        self.full_every = full_every
        self._published: dict[str, int] = {}  # presence as last reported
        self._count = 0

    def build(self, second: int, messages: dict[str, tuple[int, int]], presence: dict[str, int]) -> Report | None:
        """``presence``: this process's current count of every channel it has agents on (channels
        not listed have none). None when there is nothing to say: no messages, no presence change, and
        no agent online here (a process with agents online reports every second, as a heartbeat)."""
        self._count += 1
        full = self._count % self.full_every == 1 or self.full_every == 1
        current = {ch: n for ch, n in presence.items() if n > 0}
        if full:
            changes = dict(current)
        else:
            changes = {ch: n for ch, n in current.items() if self._published.get(ch) != n}
            changes.update({ch: 0 for ch in self._published if ch not in current})
        self._published = current
        if not messages and not changes and not current and not full:
            return None
        return Report(self.process, second, dict(messages), changes, full)


# ------------------------------------------------------------------------------ merging


@dataclass(slots=True)
class _Channel:
    total: int = 0
    last_activity_ms: int | None = None
    rate: RateWindow = field(default_factory=RateWindow)
    rate_seen: bool = False  # the rate window holds something (may need a recount as it slides)


class IndicatorBook:
    """Every process's reports merged: the message numbers and presence of every channel."""

    def __init__(self, *, window: int = WINDOW_SECONDS, presence_ttl: float = PRESENCE_TTL) -> None:
        self.window = window
        self.presence_ttl = presence_ttl
        self._channels: dict[str, _Channel] = {}
        self._presence: dict[str, dict[str, int]] = {}  # process -> channel -> agents
        self._heard: dict[str, float] = {}  # process -> when its last report arrived

    def _channel(self, channel: str) -> _Channel:
        entry = self._channels.get(channel)
        if entry is None:
            entry = self._channels[channel] = _Channel(rate=RateWindow(self.window))
        return entry

    def known(self, channel: str) -> bool:
        return channel in self._channels

    def apply(self, report: Report, now: float) -> set[str]:
        """Merge one report; the channels whose numbers it changed."""
        changed: set[str] = set()
        for channel, (count, total) in report.messages.items():
            entry = self._channel(channel)
            if count > 0:
                entry.rate.add(report.second, count, now)
                entry.rate_seen = True
                minute = coarse_minute_ms(report.second)
                if entry.last_activity_ms is None or minute > entry.last_activity_ms:
                    entry.last_activity_ms = minute
                changed.add(channel)
            if total > entry.total:
                entry.total = total
                changed.add(channel)
        self._heard[report.process] = now
        table = self._presence.get(report.process)
        if report.full or table is None:
            old = table or {}
            table = {ch: n for ch, n in report.presence.items() if n > 0}
            changed.update(ch for ch in old.keys() | table.keys() if old.get(ch) != table.get(ch))
            self._presence[report.process] = table
        else:
            for channel, count in report.presence.items():
                if table.get(channel, 0) != count:
                    changed.add(channel)
                if count > 0:
                    table[channel] = count
                else:
                    table.pop(channel, None)
        return changed

    def set_stored(self, channel: str, total: int, last_activity_ms: int | None) -> bool:
        """Numbers read from the shared counter (or recounted from the store); True if they changed
        what this book shows."""
        entry = self._channel(channel)
        changed = False
        if total > entry.total:
            entry.total = total
            changed = True
        if last_activity_ms is not None and (entry.last_activity_ms is None or last_activity_ms > entry.last_activity_ms):
            entry.last_activity_ms = last_activity_ms
            changed = True
        return changed

    def expire(self, now: float) -> set[str]:
        """Forget processes that stopped reporting; the channels whose online count that changed."""
        changed: set[str] = set()
        for process, heard in list(self._heard.items()):
            if now - heard > self.presence_ttl:
                del self._heard[process]
                changed.update(self._presence.pop(process, {}))
        return changed

    def sliding(self, now: float) -> set[str]:
        """Channels whose messages-per-minute may have changed since the window moved on (they had
        messages in the window at their last look); those that emptied stop being listed."""
        moving: set[str] = set()
        for channel, entry in self._channels.items():
            if entry.rate_seen:
                moving.add(channel)
                if entry.rate.total(now) == 0:
                    entry.rate_seen = False
        return moving

    def total(self, channel: str) -> int:
        entry = self._channels.get(channel)
        return entry.total if entry else 0

    def last_activity_ms(self, channel: str) -> int | None:
        entry = self._channels.get(channel)
        return entry.last_activity_ms if entry else None

    def per_minute(self, channel: str, now: float) -> int:
        entry = self._channels.get(channel)
        return entry.rate.total(now) if entry else 0

    def online(self, channel: str) -> int:
        return sum(table.get(channel, 0) for table in self._presence.values())


# ------------------------------------------------------------------------------ what the public sees


@dataclass(frozen=True, slots=True)
class ChannelIndicators:
    channel: str
    name: str
    members: int
    agents_online: int
    messages_total: int
    messages_per_minute: int
    last_activity_at: int | None  # start of the minute of the last message, ms since the Unix epoch
    peeks_total: int
    peeks_active: int

    def to_wire(self) -> dict[str, Any]:
        return {"channel": self.channel, "name": self.name, "members": self.members,
                "agents_online": self.agents_online, "messages_total": self.messages_total,
                "messages_per_minute": self.messages_per_minute, "last_activity_at": self.last_activity_at,
                "peeks": {"total": self.peeks_total, "active": self.peeks_active}}


def _by_activity(item: ChannelIndicators) -> tuple[Any, ...]:
    return (-item.messages_per_minute, -item.agents_online, -(item.last_activity_at or 0), -item.messages_total,
            item.channel)


SORTS: dict[str, Any] = {
    # the liveliest first: messages in the last minute, then agents online, then the latest activity
    "active": _by_activity,
    "recent": lambda i: (-(i.last_activity_at or 0), i.channel),
    "messages": lambda i: (-i.messages_total, i.channel),
    "members": lambda i: (-i.members, i.channel),
    "online": lambda i: (-i.agents_online, i.channel),
    "peeks": lambda i: (-i.peeks_total, -i.peeks_active, i.channel),
    "channel": lambda i: i.channel,
}


def sort_indicators(items: Iterable[ChannelIndicators], sort: str) -> list[ChannelIndicators]:
    """Sorted by one of ``SORTS`` (ties broken by channel id, so a page boundary is stable)."""
    return sorted(items, key=SORTS[sort])
