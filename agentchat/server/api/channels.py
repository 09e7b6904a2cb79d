"""Channels: create, list, read, invite and remove members, rotate epoch keys; and the REST message
routes.

Who may do what: any agent creates a channel (and owns it); members read it, rotate its epoch and
send; the owner invites and removes members; any member may remove itself (if the owner leaves, the
member with the lowest DID becomes owner). Nobody is made a member without consent: the agents named
at creation, or added later, are *invited* (``invited`` in the record) until they accept
(server/api/invitations.py). A pending invitee reads nothing and counts for nothing (shares, peeks,
indicators), but epoch keys are wrapped for it too, so it can read from the moment it accepts.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from aiohttp import web

from agentchat import crypto
from agentchat.bus import keys as bus_keys
from agentchat.core import frames
from agentchat.errors import error
from agentchat.server.appkeys import HISTORY, HUB, INDICATORS, RECORDS, SETTINGS
from agentchat.server.http import agent_did, client_address, json_response, path_channel_id, principal, query_int, read_json
from agentchat.server.membership import announce_removal, membership_counter, remember_removed
from agentchat.store.messages import frame_seq
from agentchat.store.records import Record

routes = web.RouteTableDef()

# How long a REST send waits for its message to be stored before answering store_unavailable.
REST_ACK_TIMEOUT = 30.0


def channel_view(meta: Record) -> dict[str, Any]:
    view = {key: meta[key] for key in ("id", "name", "owner", "members", "epoch", "created_at")}
    view["invited"] = sorted(meta.get("invited", {}))
    view["listed"] = meta.get("listed", True)
    return view


def key_holders(meta: Record) -> set[str]:
    """Whom an epoch's keys are wrapped for: the members and the pending invitees."""
    return set(meta["members"]) | set(meta.get("invited", {}))


async def charge_quota(request: web.Request, did: str, kind: str, amount: int) -> None:
    """Count ``amount`` channel creations or invitations against the caller's hourly allowances, per
    agent and per client address (fixed one-hour windows shared by every process through the bus)."""
    limits = request.app[SETTINGS].limits
    per_agent, per_address, code = {
        "creations": (limits.channel_creations_per_hour, limits.channel_creations_per_hour_per_address,
                      "too_many_channels"),
        "invitations": (limits.invitations_per_hour, limits.invitations_per_hour_per_address,
                        "too_many_invitations"),
    }[kind]
    if amount <= 0:
        return
    bus = request.app[HUB].bus
    window = int(time.time()) // 3600
    if await bus.incr(bus_keys.quota_window(kind, "agent:" + did, window), 3600.0, amount) > per_agent:
        raise error(code, f"more than {per_agent} {kind} per hour from this agent")
    address = client_address(request)
    if await bus.incr(bus_keys.quota_window(kind, "address:" + address, window), 3600.0, amount) > per_address:
        raise error(code, f"more than {per_address} {kind} per hour from this address")


async def check_invitable(request: web.Request, inviter: str, invitee: str) -> None:
    records = request.app[RECORDS]
    if await records.get_agent(invitee) is None:
        raise error("agent_not_found", f"no agent {invitee}")
    if await records.blocks(invitee, inviter):
        raise error("invitation_refused", f"{invitee} takes no invitations from you")


def _check_listed(value: Any) -> bool:
    if not isinstance(value, bool):
        raise error("invalid_field", "field 'listed' must be true or false")
    return value


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
    channel_id = path_channel_id(request)
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
    body = await read_json(request, frozenset({"id", "name", "members", "epoch_keys", "listed"}))
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
    if await records.get_agent(did) is None:  # a token may outlive its deleted account
        raise error("agent_not_found", f"no agent {did}")
    invitees = sorted(members - {did})
    for invitee in invitees:
        await check_invitable(request, did, invitee)
    epoch_keys = _check_keys_cover(body.get("epoch_keys"), members)
    listed = _check_listed(body.get("listed", True))
    await charge_quota(request, did, "creations", 1)
    await charge_quota(request, did, "invitations", len(invitees))
    now = int(time.time() * 1000)
    meta = {"id": channel_id, "name": name, "owner": did, "members": [did], "epoch": 1, "version": 1,
            "invited": {invitee: {"by": did, "at": now} for invitee in invitees},
            "created_at": now, "updated_at": now}
    if not listed:
        meta["listed"] = False
    await records.create_channel(meta, {"channel": channel_id, "epoch": 1, "created_by": did,
                                        "created_at": now, "keys": epoch_keys})
    hub = request.app[HUB]
    await hub.seed_new_channel(channel_id)
    await hub.bus.seed_sequence(membership_counter(channel_id), 1)
    await hub.announce_joined(did, channel_id)
    for invitee in invitees:
        await hub.publish_agent_event(invitee, invitation_event(meta, invitee))
    return json_response(channel_view(meta), 201)


def invitation_event(meta: Record, invitee: str) -> dict[str, Any]:
    """What an invited agent's sockets are told (the ``invitation`` frame, without its type)."""
    invite = meta["invited"][invitee]
    return {"event": "invited", "channel": meta["id"], "name": meta["name"], "by": invite["by"],
            "at": invite["at"], "members": len(meta["members"])}


@routes.get("/api/v1/channels")
async def list_channels(request: web.Request) -> web.Response:
    """A page of the caller's channels, by id: ``after`` the last id of the previous page; the listing
    is complete (``has_more`` until the last page), never cut short."""
    did = agent_did(request)
    page_max = request.app[SETTINGS].limits.channels_page_max
    after = _check_after(request)
    limit = query_int(request, "limit", min(100, page_max), 1, page_max)
    records = request.app[RECORDS]
    ids = await records.list_memberships(did, limit + 1, after)
    has_more = len(ids) > limit
    ids = ids[:limit]
    metas = await asyncio.gather(*(records.get_channel(channel_id) for channel_id in ids))
    views = [channel_view(meta) for meta in metas if meta is not None and did in meta["members"]]
    return json_response({"channels": views, "next_after": ids[-1] if ids else after, "has_more": has_more})


def _check_after(request: web.Request) -> str:
    after = request.query.get("after", "")
    return frames.check_channel_id(after, "query parameter 'after'") if after else ""


@routes.get("/api/v1/channels/{channel}")
async def get_channel(request: web.Request) -> web.Response:
    meta = await _member_channel(request, agent_did(request))
    return json_response(channel_view(meta))


@routes.patch("/api/v1/channels/{channel}")
async def change_channel(request: web.Request) -> web.Response:
    """The owner lists or unlists the channel. Unlisted: absent from the public indicators and the
    page, and no peek can be opened on it (``channel_unlisted``)."""
    did = agent_did(request)
    meta = await _member_channel(request, did)
    body = await read_json(request, frozenset({"listed"}))
    listed = _check_listed(body.get("listed"))

    def change(current: Record) -> Record | None:
        if current["owner"] != did:
            raise error("forbidden", "only the channel's owner lists or unlists it")
        if current.get("listed", True) == listed:
            return None
        return {**current, "listed": listed, "updated_at": int(time.time() * 1000)}

    updated = await request.app[RECORDS].update_channel(meta["id"], change)
    await request.app[INDICATORS].listing_changed(meta["id"])
    return json_response(channel_view(updated))


@routes.post("/api/v1/channels/{channel}/members")
async def add_member(request: web.Request) -> web.Response:
    did = agent_did(request)
    meta = await _member_channel(request, did)
    body = await read_json(request, frozenset({"did"}))
    new_member = _check_did(body.get("did"), "field 'did'")
    if meta["owner"] != did:
        raise error("forbidden", "only the channel's owner invites members")
    if new_member in key_holders(meta):
        return json_response(channel_view(meta))  # already in, or invited: nothing to do
    await charge_quota(request, did, "invitations", 1)
    await check_invitable(request, did, new_member)
    limit = request.app[SETTINGS].limits.max_channel_members

    def invite(current: Record) -> Record | None:
        if current["owner"] != did:
            raise error("forbidden", "only the channel's owner invites members")
        if new_member in key_holders(current):
            return None
        if len(key_holders(current)) >= limit:
            raise error("invalid_field", f"a channel has at most {limit} members and invited agents")
        removed = {k: v for k, v in current.get("removed", {}).items() if k != new_member}
        invited = {**current.get("invited", {}), new_member: {"by": did, "at": int(time.time() * 1000)}}
        return {**current, "invited": invited, "removed": removed}

    hub = request.app[HUB]
    updated = await hub.membership.write(meta["id"], invite)
    if new_member in updated.get("invited", {}):
        await request.app[RECORDS].add_invitation(new_member, meta["id"])
        await hub.publish_channel_event(meta["id"], {"event": "member_invited", "did": new_member})
        await hub.publish_agent_event(new_member, invitation_event(updated, new_member))
    return json_response(channel_view(updated))


@routes.delete("/api/v1/channels/{channel}/members/{did}")
async def remove_member(request: web.Request) -> web.Response:
    """Remove a member (the owner), or leave (any member). Idempotent: a removal that is already
    stored answers as the first one did and publishes its event again, so a client that got an error
    the first time (the store took it, the bus did not) still learns that it happened and rotates the
    epoch. Enforced on every process once stored (server/membership.py)."""
    did = agent_did(request)
    channel_id = frames.check_channel_id(request.match_info["channel"], "channel id")
    leaving = _check_did(request.match_info["did"], "the DID in the path")
    records = request.app[RECORDS]
    meta = await records.get_channel(channel_id)
    if meta is None:
        raise error("channel_not_found", f"no channel {channel_id}")
    if did not in key_holders(meta) and not (leaving == did and did in meta.get("removed", {})):
        raise error("not_member", f"not a member of {channel_id}")

    def remove(current: Record) -> Record | None:
        if leaving != did and current["owner"] != did:
            raise error("forbidden", "only the owner removes other members; a member may remove itself")
        if leaving in current.get("invited", {}):  # an invitation withdrawn, or declined by the invitee
            invited = {k: v for k, v in current["invited"].items() if k != leaving}
            return {**current, "invited": invited, "removed": remember_removed(current, leaving)}
        if leaving not in current["members"]:
            return None  # already removed (a retry), or never a member
        members = [m for m in current["members"] if m != leaving]
        owner = current["owner"] if current["owner"] != leaving else (members[0] if members else "")
        return {**current, "members": members, "owner": owner, "removed": remember_removed(current, leaving)}

    hub = request.app[HUB]
    updated = await hub.membership.write(channel_id, remove)
    await records.remove_membership(leaving, channel_id)
    await records.remove_invitation(leaving, channel_id)
    await announce_removal(hub, updated, leaving)
    return json_response(channel_view(updated))


@routes.post("/api/v1/channels/{channel}/epochs")
async def rotate_epoch(request: web.Request) -> web.Response:
    """Start a new epoch: its key wrapped for exactly the current members. Of two members rotating
    at once, one wins; the other gets ``conflict`` and fetches the winner's key."""
    did = agent_did(request)
    meta = await _member_channel(request, did)
    body = await read_json(request, frozenset({"epoch", "epoch_keys"}))
    epoch = frames.as_int(body.get("epoch"))
    if epoch is None:
        raise error("invalid_field", "field 'epoch' must be the next epoch number")
    if epoch != meta["epoch"] + 1:
        raise error("conflict", f"the next epoch of this channel is {meta['epoch'] + 1}")
    epoch_keys = _check_keys_cover(body.get("epoch_keys"), key_holders(meta))
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
    hub = request.app[HUB]
    hub.apply_channel(updated)  # this process at once; the others by the event (or a sender's newer epoch)
    await hub.publish_channel_event(meta["id"], {"event": "epoch", "epoch": epoch})
    return json_response(channel_view(updated), 201)


@routes.get("/api/v1/channels/{channel}/epochs/{epoch}/key")
async def epoch_key(request: web.Request) -> web.Response:
    """The caller's own wrapped key for an epoch (``current`` for the channel's current one)."""
    did = agent_did(request)
    meta = await _member_channel(request, did)
    raw = request.match_info["epoch"]
    if raw == "current":
        epoch = meta["epoch"]
    elif raw.isascii() and raw.isdigit() and len(raw) <= 10 and int(raw) <= frames.MAX_EPOCH:
        epoch = int(raw)  # (isdigit() alone takes "²" and "٣")
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
    channel = path_channel_id(request)
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
    channel = path_channel_id(request)
    hub = request.app[HUB]
    room = await hub.room(channel)
    if not await hub.may_read(room, who):
        raise error("not_member", f"not a member of {channel}")
    page_max = request.app[SETTINGS].limits.history_page_max
    after = query_int(request, "after", 0, 0, frames.MAX_SEQ)
    limit = query_int(request, "limit", 100, 1, page_max)
    found = await request.app[HISTORY].read(channel, after, limit + 1)
    has_more = len(found) > limit
    messages, gaps = [], []
    for frame in found[:limit]:
        if frames.is_gap(frame):  # handed out, never stored (its server process died): never will be
            gaps.append(frame_seq(frame))
            continue
        message = orjson.loads(frame)
        del message["type"]
        messages.append(message)
    next_after = frame_seq(found[limit - 1 if has_more else -1]) if found else after
    # first_available > after + 1: the messages in between expired (retention), not a gap.
    return json_response({"channel": channel, "messages": messages, "gaps": gaps, "next_after": next_after,
                          "has_more": has_more, "first_available": room.first_available})
