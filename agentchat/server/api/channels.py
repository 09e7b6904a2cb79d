"""Channels: create, list, read, change members, rotate epoch keys; and the REST message routes.

Who may do what: any agent creates a channel (and owns it); members read it, rotate its epoch and
send; the owner adds and removes members; any member may remove itself (if the owner leaves, the
member with the lowest DID becomes owner).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from aiohttp import web

from agentchat import crypto
from agentchat.core import frames
from agentchat.errors import error
from agentchat.server.http import agent_did, json_response, principal, query_int, read_json
from agentchat.server.appkeys import HISTORY, HUB, RECORDS, SETTINGS
from agentchat.store.records import Record

routes = web.RouteTableDef()

# How long a REST send waits for its message to be stored before answering store_unavailable.
REST_ACK_TIMEOUT = 30.0


def channel_view(meta: Record) -> dict[str, Any]:
    return {key: meta[key] for key in ("id", "name", "owner", "members", "epoch", "created_at")}


def _check_did(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise error("invalid_field", f"{what} must be a DID string")
    try:
        crypto.signing_key_from_did(value)
    except ValueError:
        raise error("invalid_field", f"{what} is not a did:agentchat DID") from None
    return value


def _check_keys_cover(keys_field: Any, members: set[str]) -> dict[str, Any]:
    if not isinstance(keys_field, dict):
        raise error("invalid_field", "field 'epoch_keys' must be an object of member DID -> wrapped key")
    if set(keys_field) != members:
        missing = sorted(members - set(keys_field))
        extra = sorted(set(keys_field) - members)
        raise error("invalid_field", f"'epoch_keys' must cover exactly the members (missing {missing[:3]}, "
                                     f"not members {extra[:3]})")
    for did, wrapped in keys_field.items():
        frames.check_wrapped_key(wrapped, f"epoch_keys[{did}]")
    return keys_field


async def _member_channel(request: web.Request, did: str) -> Record:
    channel_id = frames.check_channel_id(request.match_info["channel"], "channel id")
    meta = await request.app[RECORDS].get_channel(channel_id)
    if meta is None:
        raise error("channel_not_found", f"no channel {channel_id}")
    if did not in meta["members"]:
        raise error("not_member", f"not a member of {channel_id}")
    return meta


@routes.post("/api/v1/channels")
async def create_channel(request: web.Request) -> web.Response:
    did = agent_did(request)
    limits = request.app[SETTINGS].limits
    body = await read_json(request, frozenset({"id", "name", "members", "epoch_keys"}))
    # The creator picks the id, because the first epoch's keys are wrapped for it (protocol/crypto.md).
    channel_id = frames.check_channel_id(body.get("id"), "id")
    name = body.get("name", "")
    if not isinstance(name, str) or len(name) > limits.max_name_chars or not name.isprintable():
        raise error("invalid_field", f"field 'name' must be printable text of at most {limits.max_name_chars} characters")
    raw_members = body.get("members", [])
    if not isinstance(raw_members, list):
        raise error("invalid_field", "field 'members' must be an array of DIDs")
    members = {_check_did(m, "members[]") for m in raw_members} | {did}
    if len(members) > limits.max_channel_members:
        raise error("invalid_field", f"a channel has at most {limits.max_channel_members} members")
    records = request.app[RECORDS]
    for member in members:  # the creator too: a token may outlive its deleted account
        if await records.get_agent(member) is None:
            raise error("agent_not_found", f"no agent {member}")
    epoch_keys = _check_keys_cover(body.get("epoch_keys"), members)
    now = int(time.time() * 1000)
    meta = {"id": channel_id, "name": name, "owner": did, "members": sorted(members), "epoch": 1,
            "created_at": now, "updated_at": now}
    await records.create_channel(meta, {"channel": channel_id, "epoch": 1, "created_by": did,
                                        "created_at": now, "keys": epoch_keys})
    hub = request.app[HUB]
    await hub.seed_new_channel(channel_id)
    for member in members:
        await hub.publish_agent_event(member, {"event": "added", "channel": channel_id})
    return json_response(channel_view(meta), 201)


@routes.get("/api/v1/channels")
async def list_channels(request: web.Request) -> web.Response:
    did = agent_did(request)
    limit = request.app[SETTINGS].limits.max_channels_per_agent
    records = request.app[RECORDS]
    ids = await records.list_memberships(did, limit)
    metas = await asyncio.gather(*(records.get_channel(channel_id) for channel_id in ids))
    views = [channel_view(meta) for meta in metas if meta is not None and did in meta["members"]]
    return json_response({"channels": views})


@routes.get("/api/v1/channels/{channel}")
async def get_channel(request: web.Request) -> web.Response:
    meta = await _member_channel(request, agent_did(request))
    return json_response(channel_view(meta))


@routes.post("/api/v1/channels/{channel}/members")
async def add_member(request: web.Request) -> web.Response:
    did = agent_did(request)
    meta = await _member_channel(request, did)
    body = await read_json(request, frozenset({"did"}))
    new_member = _check_did(body.get("did"), "field 'did'")
    records = request.app[RECORDS]
    if await records.get_agent(new_member) is None:
        raise error("agent_not_found", f"no agent {new_member}")
    limit = request.app[SETTINGS].limits.max_channel_members

    def add(current: Record) -> Record | None:
        if current["owner"] != did:
            raise error("forbidden", "only the channel's owner adds members")
        if new_member in current["members"]:
            return None
        if len(current["members"]) >= limit:
            raise error("invalid_field", f"a channel has at most {limit} members")
        return {**current, "members": sorted([*current["members"], new_member]),
                "updated_at": int(time.time() * 1000)}

    updated = await records.update_channel(meta["id"], add)
    await records.add_membership(new_member, meta["id"])
    hub = request.app[HUB]
    await hub.publish_channel_event(meta["id"], {"event": "member_added", "did": new_member})
    await hub.publish_agent_event(new_member, {"event": "added", "channel": meta["id"]})
    return json_response(channel_view(updated))


@routes.delete("/api/v1/channels/{channel}/members/{did}")
async def remove_member(request: web.Request) -> web.Response:
    did = agent_did(request)
    meta = await _member_channel(request, did)
    leaving = _check_did(request.match_info["did"], "the DID in the path")

    def remove(current: Record) -> Record | None:
        if leaving != did and current["owner"] != did:
            raise error("forbidden", "only the owner removes other members; a member may remove itself")
        if leaving not in current["members"]:
            raise error("not_member", f"{leaving} is not a member")
        members = [m for m in current["members"] if m != leaving]
        owner = current["owner"] if current["owner"] != leaving else (members[0] if members else "")
        return {**current, "members": members, "owner": owner, "updated_at": int(time.time() * 1000)}

    records = request.app[RECORDS]
    updated = await records.update_channel(meta["id"], remove)
    await records.remove_membership(leaving, meta["id"])
    await request.app[HUB].publish_channel_event(meta["id"], {"event": "member_removed", "did": leaving})
    return json_response(channel_view(updated))


@routes.post("/api/v1/channels/{channel}/epochs")
async def rotate_epoch(request: web.Request) -> web.Response:
    """Start a new epoch: its key wrapped for exactly the current members. Of two members rotating
    at once, one wins; the other gets ``conflict`` and fetches the winner's key."""
    did = agent_did(request)
    meta = await _member_channel(request, did)
    body = await read_json(request, frozenset({"epoch", "epoch_keys"}))
    epoch = body.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool):
        raise error("invalid_field", "field 'epoch' must be the next epoch number")
    if epoch != meta["epoch"] + 1:
        raise error("conflict", f"the next epoch of this channel is {meta['epoch'] + 1}")
    epoch_keys = _check_keys_cover(body.get("epoch_keys"), set(meta["members"]))
    records = request.app[RECORDS]
    created = await records.put_epoch(meta["id"], {"channel": meta["id"], "epoch": epoch, "created_by": did,
                                                   "created_at": int(time.time() * 1000), "keys": epoch_keys})

    def advance(current: Record) -> Record | None:
        if current["epoch"] >= epoch:
            return None
        return {**current, "epoch": epoch, "updated_at": int(time.time() * 1000)}

    # Commit even if another rotator wrote the epoch's keys and then failed to advance the channel:
    # the keys object is the lock, the channel's epoch follows it.
    updated = await records.update_channel(meta["id"], advance)
    if not created:
        raise error("conflict", f"epoch {epoch} was started by another member; fetch its key")
    await request.app[HUB].publish_channel_event(meta["id"], {"event": "epoch", "epoch": epoch})
    return json_response(channel_view(updated), 201)


@routes.get("/api/v1/channels/{channel}/epochs/{epoch}/key")
async def epoch_key(request: web.Request) -> web.Response:
    """The caller's own wrapped key for an epoch (``current`` for the channel's current one)."""
    did = agent_did(request)
    meta = await _member_channel(request, did)
    raw = request.match_info["epoch"]
    if raw == "current":
        epoch = meta["epoch"]
    elif raw.isdigit() and len(raw) < 10:
        epoch = int(raw)
    else:
        raise error("invalid_field", "epoch must be a number or 'current'")
    record = await request.app[RECORDS].get_epoch(meta["id"], epoch)
    if record is None or did not in record["keys"]:
        raise error("key_not_found", f"no key for you in epoch {epoch} of this channel")
    return json_response({"channel": meta["id"], "epoch": epoch, "created_by": record["created_by"],
                          "wrapped_key": record["keys"][did]})


# ------------------------------------------------------------------------------ messages (REST)


class _Acked:
    """The ack target of a message sent over REST: the request waits on ``seq``."""

    __slots__ = ("seq",)

    def __init__(self) -> None:
        self.seq: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def acked(self, note: bytes, seq: int) -> None:
        if not self.seq.done():
            self.seq.set_result(seq)


@routes.post("/api/v1/channels/{channel}/messages")
async def post_message(request: web.Request) -> web.Response:
    did = agent_did(request)
    limits = request.app[SETTINGS].limits
    channel = frames.check_channel_id(request.match_info["channel"], "channel id")
    body = await read_json(request, frozenset({"client_id", "envelope"}))
    client_id = frames.check_client_id(body.get("client_id"))
    envelope = frames.check_envelope(body.get("envelope"), limits.max_ciphertext_bytes)
    acked = _Acked()
    await request.app[HUB].send(did, channel, client_id, envelope, acked)
    try:
        seq = await asyncio.wait_for(asyncio.shield(acked.seq), REST_ACK_TIMEOUT)
    except asyncio.TimeoutError:
        raise error("store_unavailable", "the message was not stored in time; retry with the same client_id") from None
    return json_response({"channel": channel, "client_id": client_id, "seq": seq}, 201)


@routes.get("/api/v1/channels/{channel}/messages")
async def get_messages(request: web.Request) -> web.Response:
    who = principal(request)
    channel = frames.check_channel_id(request.match_info["channel"], "channel id")
    hub = request.app[HUB]
    room = await hub.room(channel)
    if not hub.readable_by(room, who):
        raise error("not_member", f"not a member of {channel}")
    page_max = request.app[SETTINGS].limits.history_page_max
    after = query_int(request, "after", 0, 0, frames.MAX_SEQ)
    limit = query_int(request, "limit", 100, 1, page_max)
    found = await request.app[HISTORY].read(channel, after, limit + 1)
    has_more = len(found) > limit
    messages = [orjson.loads(frame) for frame in found[:limit]]
    for message in messages:
        del message["type"]
    next_after = messages[-1]["seq"] if messages else after
    # first_available > after + 1: the messages in between expired (retention), not a gap.
    return json_response({"channel": channel, "messages": messages, "next_after": next_after,
                          "has_more": has_more, "first_available": room.first_available})
