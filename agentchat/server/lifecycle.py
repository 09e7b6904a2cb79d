"""Deleting a channel (its owner) and an account (the agent itself).

Both are idempotent: a tombstone is written first and the removal runs to the end again on every
repeat, so a request cut off half-way is finished by asking again. Ledger entries and peek records
stay (money is history); everything else of the channel or agent goes.

- Channel: ``tombstones/channels/<id>`` (the id is never used again), the channel record (readers see
  ``channel_not_found`` from then on), a ``deleted`` event to every process (members' sockets get the
  ``channel`` frame with ``event: deleted``, the processes stop compacting it and the indicators forget
  it), then memberships, the channel index marker, peek index markers, segments and epoch keys, a
  thousand keys per request. Messages still in write-ahead batches go with those batches: no segment
  is written for a deleted channel, and the batches are deleted once the other channels in them are
  compacted (within a minute).
- Account: ``tombstones/agents/<did>`` (the DID can never be registered again: ``agent_deleted``), the
  agent leaves every channel as ``DELETE .../members/<did>`` would (a channel it was alone in is deleted),
  then its profile and card on file go and its sockets are closed.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from agentchat.errors import error
from agentchat.server.appkeys import HUB, RECORDS, STORE
from agentchat.store import keys
from agentchat.store.base import ObjectStore
from agentchat.store.records import Record

LIST_PAGE = 1000


async def delete_prefix(store: ObjectStore, prefix: str) -> int:
    """Delete every key under ``prefix``, a listed page (one DeleteObjects request) at a time."""
    removed = 0
    while page := await store.list(prefix, limit=LIST_PAGE):
        await store.delete_many(page)
        removed += len(page)
    return removed


def _now_ms() -> int:
    return int(time.time() * 1000)


async def delete_channel(app: web.Application, channel_id: str, by: str) -> Record:
    """The owner ``by`` deletes the channel; returns the tombstone."""
    records = app[RECORDS]
    meta = await records.get_channel(channel_id)
    found = await records.get_json(keys.channel_tombstone(channel_id))
    if meta is None:
        if found is None or found[0]["owner"] != by:
            raise error("channel_not_found", f"no channel {channel_id}")
        tombstone = found[0]  # deleted before: finish what may have been cut off
    else:
        if meta["owner"] != by:
            raise error("forbidden", "only the channel's owner deletes it")
        tombstone = found[0] if found else await _bury_channel(app, meta, by)
    await purge_channel(app, channel_id, tombstone["members"])
    return tombstone


async def _bury_channel(app: web.Application, meta: Record, by: str) -> Record:
    tombstone = {"channel": meta["id"], "owner": meta["owner"], "members": meta["members"],
                 "deleted_by": by, "deleted_at": _now_ms()}
    if not await app[RECORDS].create_json(keys.channel_tombstone(meta["id"]), tombstone):
        found = await app[RECORDS].get_json(keys.channel_tombstone(meta["id"]))
        assert found is not None
        return found[0]
    return tombstone


async def purge_channel(app: web.Application, channel_id: str, members: list[str]) -> None:
    store, hub = app[STORE], app[HUB]
    await store.delete(keys.channel(channel_id))
    await hub.publish_channel_event(channel_id, {"event": "deleted"})
    await hub.channel_deleted(channel_id)  # this process at once, subscribed to the channel or not
    await store.delete_many([keys.membership(did, channel_id) for did in members]
                            + [keys.channel_index(channel_id), keys.retention_index(channel_id)])
    for prefix in (keys.peek_index_prefix(channel_id), keys.segment_prefix(channel_id), keys.channel_prefix(channel_id)):
        await delete_prefix(store, prefix)


async def delete_account(app: web.Application, did: str) -> Record:
    """The agent ``did`` deletes its account; returns the tombstone."""
    records, store, hub = app[RECORDS], app[STORE], app[HUB]
    found = await records.get_json(keys.agent_tombstone(did))
    if found is None:
        if await records.get_agent(did) is None:
            raise error("agent_not_found", f"no agent {did}")
        tombstone: Record = {"did": did, "deleted_at": _now_ms()}
        if not await records.create_json(keys.agent_tombstone(did), tombstone):
            found = await records.get_json(keys.agent_tombstone(did))
    if found is not None:
        tombstone = found[0]
    for channel_id in await records.list_memberships(did, 1 << 30):
        await _leave(app, channel_id, did)
    await store.delete_many([keys.agent(did), keys.card(did)])
    await hub.publish_agent_event(did, {"event": "deleted"})
    await hub.agent_deleted(did)
    return tombstone


async def _leave(app: web.Application, channel_id: str, did: str) -> None:
    records = app[RECORDS]
    meta = await records.get_channel(channel_id)
    if meta is None or did not in meta["members"]:
        await records.remove_membership(did, channel_id)
        return
    if meta["members"] == [did]:  # the last member: nobody is left to read it
        await purge_channel(app, channel_id, (await _bury_channel(app, meta, did))["members"])
        return

    def remove(current: Record) -> Record | None:
        if did not in current["members"]:
            return None
        members = [m for m in current["members"] if m != did]
        owner = current["owner"] if current["owner"] != did else members[0]
        return {**current, "members": members, "owner": owner, "updated_at": _now_ms()}

    await records.update_channel(channel_id, remove)
    await records.remove_membership(did, channel_id)
    await app[HUB].publish_channel_event(channel_id, {"event": "member_removed", "did": did})


def tombstone_view(record: dict[str, Any]) -> dict[str, Any]:
    return {key: record[key] for key in ("channel", "did", "deleted_at") if key in record} | {"deleted": True}
