"""Copy a store into another: ``agentchat backup`` and ``agentchat restore``.

A backup taken while servers write to the store is consistent in this sense (README, Operations):
every message acknowledged before the backup started is in it, with its channel, its epoch's keys and
its sender; a message acknowledged while it ran may be in it too, whole (objects are copied whole, one
``get`` and one ``put`` each), never half. That follows from the order of the phases, each one listed
only after the one before is fully copied:

1. ``wal/`` then ``messages/``. A message acknowledged before the start is in a write-ahead batch or a
   segment. A batch listed but gone when read was compacted: compaction writes the segment before it
   deletes the batch, so the segment exists by then and the ``messages/`` listing, made after, has it.
2. Everything that is neither messages nor channels nor agents (peeks, ledger, memberships, the
   channel index...).
3. Channel records (``meta.json``), then, listed again, the channels' epoch keys: a channel's epoch
   moves only after that epoch's keys are stored, so the keys of every epoch a copied message or
   channel names are listed in this later phase.
4. Agents, then the server's own objects (the token secret), except the clean-shutdown mark: a
   restored store always restarts its sequence counters with the safety gap.

Objects are only ever added in that direction (a message names an epoch that was stored before it,
an epoch's channel was stored before it, and so on), so copying the ones that name others first means
what they name is there when the later phase lists it.

The destination gets ``backup-manifest.json`` last: a backup without it did not finish, and
``restore`` refuses it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import orjson

from agentchat.store import keys
from agentchat.store.base import ObjectStore

MANIFEST = "backup-manifest.json"
MANIFEST_FORMAT = 1
COPY_CONCURRENCY = 16
LIST_PAGE = 1000
# Keys after every key under a prefix: '~' sorts after every character a key may hold.
_PAST = "~"

# Top-level prefixes with a phase of their own; every other one is copied in phase 2.
_OWN_PHASE = (keys.WAL_PREFIX, keys.SEGMENT_PREFIX, keys.CHANNEL_PREFIX, keys.AGENT_PREFIX, keys.SERVER_PREFIX)

Progress = Callable[[str], None]


@dataclass
class CopyReport:
    objects: int = 0
    bytes: int = 0
    vanished: int = 0  # listed, then gone before it was read (compacted, deleted)
    phases: list[dict[str, int | str]] = field(default_factory=list)


async def list_all(store: ObjectStore, prefix: str = "", *, start_after: str = "") -> AsyncIterator[str]:
    """Every key under ``prefix``, in order, a page at a time."""
    while True:
        page = await store.list(prefix, start_after=start_after, limit=LIST_PAGE)
        if not page:
            return
        for key in page:
            yield key
        start_after = page[-1]


def _is_other(key: str) -> bool:
    return not key.startswith(_OWN_PHASE) and key != MANIFEST


def _is_meta(key: str) -> bool:
    return key == keys.channel(key.split("/")[1])


def _phases() -> list[tuple[str, str, Callable[[str], bool]]]:
    """(name, prefix listed, which of its keys to copy), in the order they must run."""
    return [
        ("write-ahead batches", keys.WAL_PREFIX, lambda key: True),
        ("segments", keys.SEGMENT_PREFIX, lambda key: True),
        ("records", "", _is_other),
        ("channels", keys.CHANNEL_PREFIX, _is_meta),
        ("epoch keys", keys.CHANNEL_PREFIX, lambda key: not _is_meta(key)),
        ("agents", keys.AGENT_PREFIX, lambda key: True),
        ("server", keys.SERVER_PREFIX, lambda key: key != keys.clean_shutdown()),
    ]


async def _phase_keys(store: ObjectStore, prefix: str, wanted: Callable[[str], bool]) -> AsyncIterator[str]:
    start_after = ""
    while True:
        page = await store.list(prefix, start_after=start_after, limit=LIST_PAGE)
        if not page:
            return
        for key in page:
            if wanted(key):
                yield key
        start_after = page[-1]
        if not prefix:
            # The whole store is listed for the records phase: jump over the big prefixes copied in
            # phases of their own instead of paging through them.
            for own in _OWN_PHASE:
                if start_after.startswith(own):
                    start_after = own + _PAST


async def copy_store(source: ObjectStore, dest: ObjectStore, progress: Progress | None = None,
                     *, concurrency: int = COPY_CONCURRENCY) -> CopyReport:
    """Copy every object of ``source`` into ``dest`` phase by phase (module docstring)."""
    report = CopyReport()
    say = progress or (lambda line: None)
    for name, prefix, wanted in _phases():
        started = time.monotonic()
        copied = size = vanished = 0
        queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=concurrency * 4)

        async def worker() -> None:
            nonlocal copied, size, vanished
            while (key := await queue.get()) is not None:
                obj = await source.get(key)
                if obj is None:
                    vanished += 1
                    continue
                await dest.put(key, obj.data)
                copied += 1
                size += len(obj.data)
                if copied % 500 == 0:
                    say(f"  {name}: {copied} objects, {size / 1e6:.1f} MB")

        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        try:
            async for key in _phase_keys(source, prefix, wanted):
                await queue.put(key)
            for _ in workers:
                await queue.put(None)
            await asyncio.gather(*workers)
        finally:
            for task in workers:
                task.cancel()
        report.objects += copied
        report.bytes += size
        report.vanished += vanished
        report.phases.append({"phase": name, "objects": copied, "bytes": size})
        say(f"{name}: {copied} objects, {size / 1e6:.2f} MB in {time.monotonic() - started:.2f} s"
            + (f" ({vanished} gone while copying)" if vanished else ""))
    return report


async def is_empty(store: ObjectStore) -> bool:
    return not await store.list("", limit=1)


async def backup(source: ObjectStore, dest: ObjectStore, progress: Progress | None = None) -> CopyReport:
    """Copy a (possibly running) store into an empty ``dest``, then write the manifest."""
    if not await is_empty(dest):
        raise ValueError("the backup destination is not empty; give an empty directory or bucket prefix")
    started = int(time.time() * 1000)
    report = await copy_store(source, dest, progress)
    manifest = {"format": MANIFEST_FORMAT, "started_at": started, "finished_at": int(time.time() * 1000),
                "objects": report.objects, "bytes": report.bytes, "phases": report.phases}
    await dest.put(MANIFEST, orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    return report


async def restore(source: ObjectStore, dest: ObjectStore, progress: Progress | None = None) -> CopyReport:
    """Copy a finished backup into an empty store (no server may be running on it)."""
    found = await source.get(MANIFEST)
    if found is None:
        raise ValueError(f"no {MANIFEST} in the backup: it is not a backup, or it did not finish")
    manifest = orjson.loads(found.data)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"backup format {manifest.get('format')!r} is not one this release reads")
    if not await is_empty(dest):
        raise ValueError("the store to restore into is not empty; restore into an empty directory or bucket")
    report = await copy_store(source, dest, progress)
    if report.objects != manifest["objects"]:
        raise ValueError(f"the backup lists {manifest['objects']} objects but {report.objects} were copied")
    return report
