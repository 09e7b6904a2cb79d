"""When a peek's work is due: the timers this process arms, the due scan and the startup scan.

The process that makes a transition arms a timer at the peek's ``wake_at``; every other process learns
the transition from the bus and arms a backup timer ``BACKUP_DELAY`` later. Every process also lists the
due markers (``peeks-due/<ms>/<id>``, kept by ``peek_index.DueIndex``) every ``peek_scan_seconds`` and
drives the peeks whose time has come; at startup it re-reads every open peek (``peeks-open/``), which
re-arms what a restart forgot and indexes peeks stored before the due index existed. What "driving" a
peek means is ``PeekTransitions.drive``'s business; this module only decides when.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from agentchat.config import Settings
from agentchat.core.peek import Peek, PeekState
from agentchat.errors import AgentChatError
from agentchat.server.peek_index import EXPIRED_RETENTION_SECONDS, DueIndex
from agentchat.store import keys as store_keys
from agentchat.store.base import ObjectStore, StoredObject

log = logging.getLogger(__name__)

# Processes that did not make a transition fire its timer this much later: the one that did usually
# wins alone, and another takes over if it is gone.
BACKUP_DELAY = 0.25
TIMER_SLACK = 0.002
SCAN_TIMEOUT_SECONDS = 30.0
# The due scan lists due markers this many at a time, stopping at the first one not yet due.
DUE_PAGE = 100

Spawn = Callable[[Coroutine[Any, Any, None], str], None]


class PeekTimers:
    """One timer per peek in this process, for its latest known version; firing calls ``wake``."""

    def __init__(self, *, clock: Callable[[], float], spawn: Spawn,
                 wake: Callable[[str], Coroutine[Any, Any, None]]) -> None:
        self.clock = clock
        self._spawn = spawn
        self._wake = wake
        self._timers: dict[str, tuple[int, asyncio.TimerHandle]] = {}  # peek id -> (version, timer)
        self._closing = False

    def arm(self, peek: Peek, at: float, *, backup: bool = False) -> None:
        current = self._timers.get(peek.id)
        if current is not None and current[0] >= peek.version and backup:
            return  # this process armed it itself, on time
        self.arm_at(peek.id, peek.version, at + (BACKUP_DELAY if backup else 0.0))

    def arm_at(self, peek_id: str, version: int, at: float) -> None:
        if self._closing:
            return
        current = self._timers.get(peek_id)
        if current is not None:
            if current[0] > version:  # a timer for a later state of the peek stands
                return
            current[1].cancel()
        # A hair late rather than early: the deadline event is only accepted once it is due.
        delay = max(0.0, at - self.clock()) + TIMER_SLACK
        handle = asyncio.get_running_loop().call_later(
            delay, lambda: self._spawn(self._fire(peek_id), f"peek-wake-{peek_id}"))
        self._timers[peek_id] = (version, handle)

    def disarm(self, peek_id: str) -> None:
        current = self._timers.pop(peek_id, None)
        if current is not None:
            current[1].cancel()

    async def _fire(self, peek_id: str) -> None:
        self._timers.pop(peek_id, None)
        await self._wake(peek_id)

    def close(self) -> None:
        self._closing = True
        for _, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()


class DueScan:
    """The scans: every ``peek_scan_seconds`` the due markers; at startup every open peek.

    ``observe`` takes note of a peek read from the store (without arming: ``drive`` arms what it
    leaves for later); ``drive`` does what is due for it; ``forget`` drops per-peek notes of every peek
    not in the set it is given."""

    def __init__(self, *, settings: Settings, store: ObjectStore, index: DueIndex, clock: Callable[[], float],
                 known: Callable[[], set[str]], observe: Callable[[Peek], None],
                 drive: Callable[[Peek, StoredObject], Coroutine[Any, Any, None]],
                 forget: Callable[[set[str]], None]) -> None:
        self.settings = settings
        self.store = store
        self.index = index
        self.clock = clock
        self._known = known
        self._observe = observe
        self._drive = drive
        self._forget = forget
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="peek-scan")

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def wake(self, peek_id: str) -> None:
        """A timer fired: drive the peek as the store has it now."""
        found = await self.store.get(store_keys.peek(peek_id))
        if found is None:
            return
        peek = Peek.from_bytes(found.data)
        self._observe(peek)
        await self._drive(peek, found)

    async def scan(self) -> None:
        """Drive the peeks that are due, and only those: list ``peeks-due/`` from the start (keys sort
        by time) and stop at the first marker not yet due. Idle, that is one small listing per scan
        whatever the number of open peeks."""
        now_ms = int(self.clock() * 1000)
        start_after = ""
        while True:
            page = await self.store.list(store_keys.PEEK_DUE_PREFIX, start_after=start_after, limit=DUE_PAGE)
            for key in page:
                at_ms, peek_id = store_keys.parse_peek_due(key)
                if at_ms > now_ms:
                    return self._forget(self._known())
                try:
                    await self._drive_due(key, at_ms, peek_id)
                except AgentChatError as exc:  # its marker stays: the next scan tries again
                    log.warning("peek %s: scan could not drive it: %r", peek_id, exc)
            if len(page) < DUE_PAGE:
                return self._forget(self._known())
            start_after = page[-1]

    async def _drive_due(self, key: str, at_ms: int, peek_id: str) -> None:
        found = await self.store.get(store_keys.peek(peek_id))
        if found is None:
            await self.store.delete(key)
            return
        peek = Peek.from_bytes(found.data)
        self._observe(peek)
        if peek.state is PeekState.EXPIRED and self.clock() >= peek.updated_at + EXPIRED_RETENTION_SECONDS:
            await self.index.purge(peek)
            await self.store.delete(key)
            return
        await self._drive(peek, found)
        current = await self.store.get(store_keys.peek(peek_id))
        due = None if current is None else self.index.due_at(Peek.from_bytes(current.data))
        if due is None or int(due * 1000) != at_ms:
            await self.store.delete(key)  # done, or moved to another time by the transition
            if current is not None and due is not None:
                await self.store.put(store_keys.peek_due(int(due * 1000), peek_id), b"")

    async def scan_all(self, forget_missing: Callable[[str], None]) -> None:
        """At startup: re-read every open peek (``peeks-open/``), drive it and index its due time. This
        also indexes peeks stored before the due index existed, and finishes what a process that died
        left half done; afterwards the periodic scan reads only what is due. ``forget_missing``: a
        peek this process followed that the store no longer has."""
        open_ids: set[str] = set()
        start_after = ""
        while True:
            page = await self.store.list(store_keys.PEEK_OPEN_PREFIX, start_after=start_after, limit=1000)
            if not page:
                break
            open_ids.update(key[len(store_keys.PEEK_OPEN_PREFIX):] for key in page)
            start_after = page[-1]
        known = self._known()
        log.debug("peek scan: %d open, %d known", len(open_ids), len(known))
        for peek_id in sorted(open_ids | known):
            try:
                found = await self.store.get(store_keys.peek(peek_id))
                if found is None:
                    if peek_id in open_ids:
                        await self.store.delete(store_keys.peek_open(peek_id))  # opened by a process that died
                    forget_missing(peek_id)
                    continue
                peek = Peek.from_bytes(found.data)
                self._observe(peek)
                if peek_id in open_ids:
                    await self._drive(peek, found)
                    current = await self.store.get(store_keys.peek(peek_id))
                    if current is not None:
                        await self.index.move(None, Peek.from_bytes(current.data))
            except AgentChatError as exc:
                log.warning("peek %s: scan could not drive it: %r", peek_id, exc)
        self._forget(open_ids | self._known())

    async def _loop(self) -> None:
        # A scan stuck on a backend is abandoned rather than left to hold up every later one.
        limit = max(SCAN_TIMEOUT_SECONDS, 10 * self.settings.peek_scan_seconds)
        while True:
            await asyncio.sleep(self.settings.peek_scan_seconds)
            try:
                await asyncio.wait_for(self.scan(), limit)
            except asyncio.CancelledError:
                if self._closing:
                    raise
                log.warning("a peek scan was cancelled; the next one starts on time")
            except asyncio.TimeoutError:
                log.warning("a peek scan took over %.0f s and was abandoned", limit)
            except Exception:
                log.exception("peek scan failed")
