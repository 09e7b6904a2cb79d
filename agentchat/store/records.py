"""Agents, channels and epoch keys as JSON objects in the store.

Objects that several processes may change (a channel's member list) are updated by compare-and-set on
the object's etag, retried on a lost race, so concurrent changes are never lost.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from agentchat.errors import error
from agentchat.store import keys
from agentchat.store.base import ObjectStore, PreconditionFailed

Record = dict[str, Any]
CAS_ATTEMPTS = 16


class Records:
    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    async def get_json(self, key: str) -> tuple[Record, str] | None:
        obj = await self.store.get(key)
        if obj is None:
            return None
        return orjson.loads(obj.data), obj.etag

    async def create_json(self, key: str, record: Record) -> bool:
        """Write ``record`` unless ``key`` exists; False if it did."""
        try:
            await self.store.put(key, orjson.dumps(record), if_none_match=True)
        except PreconditionFailed:
            return False
        return True

    async def update_json(self, key: str, change: Callable[[Record], Record | None], *,
                          before_write: Callable[[Record], Awaitable[None]] | None = None) -> Record:
        """Read-modify-write with compare-and-set; ``change`` may raise to refuse, or return None for
        'nothing to change'. ``before_write`` sees each record about to be written and may raise to
        stop it. Returns the record as stored."""
        for _ in range(CAS_ATTEMPTS):
            current = await self.get_json(key)
            if current is None:
                raise error("not_found", f"{key} does not exist")
            record, etag = current
            updated = change(dict(record))
            if updated is None:
                return record
            if before_write is not None:
                await before_write(updated)
            try:
                await self.store.put(key, orjson.dumps(updated), if_match=etag)
            except PreconditionFailed:
                continue
            return updated
        raise error("conflict", "the object is being changed by others; try again")

    # -- agents

    async def get_agent(self, did: str) -> Record | None:
        found = await self.get_json(keys.agent(did))
        return found[0] if found else None

    async def put_agent(self, record: Record) -> Record:
        """Create the agent, or update its name and encryption key (the DID, hence the signing key,
        cannot change)."""
        key = keys.agent(record["did"])
        if await self.create_json(key, record):
            return record

        def refresh(old: Record) -> Record:
            return {**old, "name": record["name"], "keys": record["keys"], "updated_at": record["updated_at"]}

        return await self.update_json(key, refresh)

    # -- channels

    async def get_channel(self, channel_id: str) -> Record | None:
        found = await self.get_json(keys.channel(channel_id))
        return found[0] if found else None

    async def create_channel(self, meta: Record, first_epoch: Record) -> None:
        channel_id = meta["id"]
        if await self.store.get(keys.channel_tombstone(channel_id)) is not None:
            raise error("conflict", "a channel with this id existed and was deleted; pick another id")
        # The first epoch's keys go first, created only if absent: that write claims the id, and a
        # channel visible in the store always has its current epoch's keys.
        if not await self.create_json(keys.epoch(channel_id, first_epoch["epoch"]), first_epoch):
            raise error("conflict", "a channel with this id exists; pick another id")
        if not await self.create_json(keys.channel(channel_id), meta):
            raise error("conflict", "a channel with this id exists; pick another id")
        for did in meta["members"]:
            await self.store.put(keys.membership(did, channel_id), b"")
        for did in meta.get("invited", {}):
            await self.store.put(keys.invitation(did, channel_id), b"")
        await self.store.put(keys.channel_index(channel_id), b"")

    async def update_channel(self, channel_id: str, change: Callable[[Record], Record | None], *,
                             before_write: Callable[[Record], Awaitable[None]] | None = None) -> Record:
        if await self.get_channel(channel_id) is None:
            raise error("channel_not_found")
        return await self.update_json(keys.channel(channel_id), change, before_write=before_write)

    async def add_membership(self, did: str, channel_id: str) -> None:
        await self.store.put(keys.membership(did, channel_id), b"")

    async def remove_membership(self, did: str, channel_id: str) -> None:
        await self.store.delete(keys.membership(did, channel_id))

    async def _list_page(self, prefix: str, after: str, limit: int) -> list[str]:
        """Up to ``limit`` names under ``prefix`` after ``after``, in order (one page of a listing)."""
        found: list[str] = []
        start_after = prefix + after if after else ""
        while len(found) < limit:
            page = await self.store.list(prefix, start_after=start_after, limit=min(1000, limit - len(found)))
            if not page:
                break
            found.extend(key[len(prefix):] for key in page)
            start_after = page[-1]
        return found

    async def list_memberships(self, did: str, limit: int, after: str = "") -> list[str]:
        """A page of the channels ``did`` is a member of, by id, after the id ``after``."""
        return await self._list_page(keys.membership_prefix(did), after, limit)

    async def all_memberships(self, did: str) -> list[str]:
        """Every channel ``did`` is a member of: never cut short, however many."""
        found: list[str] = []
        while True:
            page = await self.list_memberships(did, 1000, found[-1] if found else "")
            found.extend(page)
            if len(page) < 1000:
                return found

    async def add_invitation(self, did: str, channel_id: str) -> None:
        await self.store.put(keys.invitation(did, channel_id), b"")

    async def remove_invitation(self, did: str, channel_id: str) -> None:
        await self.store.delete(keys.invitation(did, channel_id))

    async def list_invitations(self, did: str, limit: int, after: str = "") -> list[str]:
        return await self._list_page(keys.invitation_prefix(did), after, limit)

    # -- blocks

    async def block(self, did: str, blocked: str) -> None:
        await self.store.put(keys.block(did, blocked), b"")

    async def unblock(self, did: str, blocked: str) -> None:
        await self.store.delete(keys.block(did, blocked))

    async def blocks(self, did: str, blocked: str) -> bool:
        return await self.store.get(keys.block(did, blocked)) is not None

    async def list_blocks(self, did: str, limit: int, after: str = "") -> list[str]:
        return await self._list_page(keys.block_prefix(did), after, limit)

    async def list_channels(self, *, start_after: str = "", limit: int = 100) -> list[str]:
        prefix = keys.CHANNEL_INDEX_PREFIX
        page = await self.store.list(prefix, start_after=prefix + start_after if start_after else "", limit=limit)
        return [key[len(prefix):] for key in page]

    # -- epochs

    async def put_epoch(self, channel_id: str, record: Record) -> bool:
        return await self.create_json(keys.epoch(channel_id, record["epoch"]), record)

    async def get_epoch(self, channel_id: str, epoch: int) -> Record | None:
        found = await self.get_json(keys.epoch(channel_id, epoch))
        return found[0] if found else None
