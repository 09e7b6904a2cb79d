"""Public indicators maths: counts only, no I/O and no clock of its own (every call takes ``now``).

What a channel shows the public (``ChannelIndicators``): members, agents online, messages in all,
messages in the last minute, the minute of the last message, peeks in all and active. Never content,
and nothing that tells one message from another beyond counts: the finest grain anyone sees is a
count per second (live updates) and the minute of the last message.

How the numbers come together across server processes (``server/indicators.py`` does the I/O):

- Each process counts the messages it sequences per channel and second of their time stamp
  (``Hub.send``) and, once a second, adds them to the channel's ``SharedCount`` on the bus, then
  publishes one ``Report``: those counts, the totals after its additions, and which agents hold a
  session for each channel on that process, as short tags (``agent_tag``; changes only, the whole
  table every ``FULL_PRESENCE_EVERY`` reports).
- Every process merges every report (its own included) into an ``IndicatorBook``: per-second counts
  into a sliding ``RateWindow`` (so every process computes the same messages-per-minute), totals by
  maximum (a total only grows, so a late or repeated report cannot lower it), presence per process,
  forgotten when a process stops reporting (``PRESENCE_TTL``). Agents online are the distinct tags over
  every process: an agent with sessions on two processes (a reconnect that lands elsewhere before the
  old socket is gone) counts once.
- Live updates go out through a ``Throttle``: at most one per channel per second, whatever the rate.
"""

from __future__ import annotations

import base64
import functools
import hashlib
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
# 2: presence as agent tags per channel. Version 1 (counts) is still read, during a rolling upgrade:
# its agents count as distinct from everyone else's.
REPORT_VERSION = 2
AGENT_TAG_BYTES = 6


@functools.lru_cache(maxsize=1 << 16)
def agent_tag(did: str) -> str:
    """An agent's short name in presence reports: 8 characters instead of a ~60-character DID. With at
    most a few hundred members per channel, two agents of one channel sharing a tag (48 bits) would
    take more channels than exist."""
    return base64.urlsafe_b64encode(hashlib.sha256(did.encode()).digest()[:AGENT_TAG_BYTES]).decode()

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


# ------------------------------------------------------------------------------ the shared counter


@dataclass(frozen=True, slots=True)
class SharedCount:
    """A channel's total as kept on the bus, and how it survives the bus forgetting it.

    When the counter is missing it is made afresh with ``since``, a Unix second: from then on every
    process adds the messages whose ``ts`` falls in ``since`` or later, and one process recounts those
    before ``since`` from the store (``with_recount``; ``counted`` says it is done). Counts are kept per
    second of the messages' own time stamps, so no message is on both sides of the line.
    """

    total: int = 0
    last_activity_ms: int | None = None
    since: int = 0
    counted: bool = True

    def add(self, counts: dict[int, int]) -> SharedCount:
        """Add per-second counts; seconds before ``since`` are left to the recount."""
        kept = {second: n for second, n in counts.items() if second >= self.since and n > 0}
        if not kept:
            return self
        last = coarse_minute_ms(max(kept))
        return SharedCount(self.total + sum(kept.values()),
                           last if self.last_activity_ms is None else max(last, self.last_activity_ms),
                           self.since, self.counted)

    def with_recount(self, total: int, last_activity_ms: int | None) -> SharedCount:
        """Add what the store holds from before ``since`` (once)."""
        if self.counted:
            return self
        last = self.last_activity_ms
        if last_activity_ms is not None and (last is None or last_activity_ms > last):
            last = last_activity_ms
        return SharedCount(self.total + total, last, self.since, True)

    def to_bytes(self) -> bytes:
        return orjson.dumps({"total": self.total, "last": self.last_activity_ms, "since": self.since,
                             "counted": self.counted})

    @classmethod
    def from_bytes(cls, data: bytes) -> SharedCount:
        raw = orjson.loads(data)
        return cls(int(raw["total"]), raw.get("last"), int(raw.get("since", 0)), bool(raw.get("counted", True)))


def group_by_channel(counted: dict[tuple[str, int], int]) -> dict[str, dict[int, int]]:
    """``{(channel, second): n}`` (as the hub counts) to ``{channel: {second: n}}``."""
    grouped: dict[str, dict[int, int]] = {}
    for (channel, second), n in counted.items():
        per_second = grouped.setdefault(channel, {})
        per_second[second] = per_second.get(second, 0) + n
    return grouped


def merge_counts(into: dict[str, dict[int, int]], more: dict[str, dict[int, int]]) -> None:
    for channel, counts in more.items():
        target = into.setdefault(channel, {})
        for second, n in counts.items():
            target[second] = target.get(second, 0) + n


# ------------------------------------------------------------------------------ reports between processes


@dataclass(slots=True)
class Report:
    """What one process tells the others once a second (bus topic ``i:reports``)."""

    process: str
    # channel -> {second of the messages' ts: messages this process sequenced since its last report}
    messages: dict[str, dict[int, int]] = field(default_factory=dict)
    # channel -> the channel's total after this process's addition to the shared counter
    totals: dict[str, int] = field(default_factory=dict)
    # channel -> tags of the agents with a session for it on this process (the channels whose set
    # changed, empty when nobody is left; every channel if ``full``)
    presence: dict[str, frozenset[str]] = field(default_factory=dict)
    full: bool = False
    # channels created on this process since its last report
    created: list[str] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        return orjson.dumps({"v": REPORT_VERSION, "p": self.process,
                             "m": {ch: sorted(counts.items()) for ch, counts in self.messages.items()},
                             "n": self.totals, "o": {ch: sorted(tags) for ch, tags in self.presence.items()},
                             "f": self.full, "c": self.created})

    @classmethod
    def from_bytes(cls, data: bytes) -> Report:
        """Raises ``ValueError`` for anything malformed (the caller drops it)."""
        try:
            raw = orjson.loads(data)
            version = raw.get("v")
            if version not in (1, REPORT_VERSION):
                raise ValueError(f"report version {version!r}")
            process = str(raw["p"])
            messages = {str(ch): {int(second): int(n) for second, n in counts} for ch, counts in raw["m"].items()}
            totals = {str(ch): int(total) for ch, total in raw["n"].items()}
            if version == 1:  # a count: that many agents of that process, told apart from all others
                presence = {str(ch): frozenset(f"{process}/{i}" for i in range(int(count)))
                            for ch, count in raw["o"].items()}
            else:
                presence = {str(ch): frozenset(_tags(found)) for ch, found in raw["o"].items()}
            created = [str(ch) for ch in raw.get("c", [])]
            return cls(process, messages, totals, presence, bool(raw["f"]), created)
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError) as exc:
            raise ValueError(f"malformed indicators report: {exc!r}") from None


def _tags(found: Any) -> list[str]:
    if not isinstance(found, list) or not all(isinstance(tag, str) for tag in found):
        raise TypeError("presence must be a list of agent tags")
    return found


class ReportBuilder:
    """One process's side: turns what it counted and who is connected into its next ``Report``."""

    def __init__(self, process: str, full_every: int = FULL_PRESENCE_EVERY) -> None:
        self.process = process
        self.full_every = full_every
        self._published: dict[str, frozenset[str]] = {}  # presence as last reported
        self._count = 0

    def build(self, messages: dict[str, dict[int, int]], totals: dict[str, int],
              presence: dict[str, frozenset[str]], created: list[str] | None = None) -> Report | None:
        """``presence``: the tags of the agents online here for every channel that has any (channels
        not listed have none). None when there is nothing to say: no messages, no presence change, and
        no agent online here (a process with agents online reports every second, as a heartbeat)."""
        self._count += 1
        full = self.full_every == 1 or self._count % self.full_every == 1
        current = {ch: tags for ch, tags in presence.items() if tags}
        if full:
            changes = dict(current)
        else:
            changes = {ch: tags for ch, tags in current.items() if self._published.get(ch) != tags}
            changes.update({ch: frozenset() for ch in self._published if ch not in current})
        self._published = current
        if not messages and not totals and not changes and not current and not full and not created:
            return None
        return Report(self.process, dict(messages), dict(totals), changes, full, list(created or ()))


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
        self._presence: dict[str, dict[str, frozenset[str]]] = {}  # process -> channel -> agent tags
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
        for channel, counts in report.messages.items():
            entry = self._channel(channel)
            for second, count in counts.items():
                if count > 0:
                    entry.rate.add(second, count, now)
                    entry.rate_seen = True
                    minute = coarse_minute_ms(second)
                    if entry.last_activity_ms is None or minute > entry.last_activity_ms:
                        entry.last_activity_ms = minute
                    changed.add(channel)
        for channel, total in report.totals.items():
            entry = self._channel(channel)
            if total > entry.total:
                entry.total = total
                changed.add(channel)
        changed.update(report.created)
        self._heard[report.process] = now
        table = self._presence.get(report.process)
        if report.full or table is None:
            old = table or {}
            table = {ch: tags for ch, tags in report.presence.items() if tags}
            changed.update(ch for ch in old.keys() | table.keys() if old.get(ch) != table.get(ch))
            self._presence[report.process] = table
        else:
            for channel, tags in report.presence.items():
                if table.get(channel, frozenset()) != tags:
                    changed.add(channel)
                if tags:
                    table[channel] = tags
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
        """Distinct agents with a session for ``channel`` on any process."""
        found = [tags for table in self._presence.values() if (tags := table.get(channel))]
        if len(found) == 1:
            return len(found[0])
        return len(frozenset().union(*found))


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
