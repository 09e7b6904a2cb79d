"""Invitations and blocks: an agent is a member of a channel only once it accepted.

The owner invites (at creation, or ``POST /channels/{c}/members``); the invitee's sockets get an
``invitation`` frame; it accepts or declines here (the SDK by its invitation policy). An agent blocks
others: their invitations are refused (``invitation_refused``). Every listing pages, never truncates.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from agentchat.core import frames
from agentchat.errors import error
from agentchat.server.api.channels import _check_did, channel_view, invitation_event
from agentchat.server.http import agent_did, json_response, query_int
from agentchat.server.appkeys import HUB, RECORDS, SETTINGS
from agentchat.server.membership import announce_removal, remember_removed
from agentchat.store.records import Record

routes = web.RouteTableDef()


def _page(request: web.Request, check_after: Any) -> tuple[str, int]:
    page_max = request.app[SETTINGS].limits.channels_page_max
    after = request.query.get("after", "")
    return (check_after(after) if after else ""), query_int(request, "limit", min(100, page_max), 1, page_max)


@routes.get("/api/v1/invitations")
async def list_invitations(request: web.Request) -> web.Response:
    """The caller's pending invitations, a page at a time, by channel id."""
    did = agent_did(request)
    after, limit = _page(request, lambda v: frames.check_channel_id(v, "query parameter 'after'"))
    records = request.app[RECORDS]
    ids = await records.list_invitations(did, limit + 1, after)
    has_more = len(ids) > limit
    ids = ids[:limit]
    metas = await asyncio.gather(*(records.get_channel(channel) for channel in ids))
    found = []
    for meta in metas:
        if meta is not None and did in meta.get("invited", {}):
            event = invitation_event(meta, did)
            del event["event"]
            found.append(event)
    return json_response({"invitations": found, "next_after": ids[-1] if ids else after, "has_more": has_more})


async def _invited_to(request: web.Request) -> tuple[str, str, Record]:
    """(the caller, the channel id, its record) of an invitation route."""
    channel = frames.check_channel_id(request.match_info["channel"], "channel id")
    meta = await request.app[RECORDS].get_channel(channel)
    if meta is None:
        raise error("channel_not_found", f"no channel {channel}")
    return agent_did(request), channel, meta


@routes.post("/api/v1/invitations/{channel}/accept")
async def accept(request: web.Request) -> web.Response:
    """Become a member. Idempotent: a member accepting again gets the channel."""
    did, channel, meta = await _invited_to(request)
    records = request.app[RECORDS]
    if did in meta["members"]:
        # A retry: make sure the markers an interrupted first attempt may have left undone are there.
        await records.add_membership(did, channel)
        await records.remove_invitation(did, channel)
        return json_response(channel_view(meta))
    if did not in meta.get("invited", {}):
        raise error("invitation_not_found", f"no pending invitation to {channel}")

    def join(current: Record) -> Record | None:
        if did in current["members"]:
            return None
        if did not in current.get("invited", {}):
            raise error("invitation_not_found", f"no pending invitation to {channel}")
        invited = {k: v for k, v in current["invited"].items() if k != did}
        return {**current, "members": sorted([*current["members"], did]), "invited": invited}

    hub = request.app[HUB]
    updated = await hub.membership.write(channel, join)
    await records.add_membership(did, channel)
    await records.remove_invitation(did, channel)
    await hub.publish_channel_event(channel, {"event": "member_added", "did": did})
    await hub.announce_joined(did, channel)
    return json_response(channel_view(updated))


@routes.post("/api/v1/invitations/{channel}/decline")
async def decline(request: web.Request) -> web.Response:
    """Say no. Idempotent: declining an invitation that is gone answers the same."""
    did, channel, meta = await _invited_to(request)
    if did in meta.get("invited", {}):
        await _withdraw(request, channel, did)
    else:
        await request.app[RECORDS].remove_invitation(did, channel)
    return json_response({"channel": channel, "declined": True})


async def _withdraw(request: web.Request, channel: str, did: str) -> None:
    """The invitation of ``did`` ends without it joining: the members are told, with the epoch it
    held a key of, so they rotate past it (as after a removal)."""

    def drop(current: Record) -> Record | None:
        if did not in current.get("invited", {}):
            return None
        invited = {k: v for k, v in current["invited"].items() if k != did}
        return {**current, "invited": invited, "removed": remember_removed(current, did)}

    updated = await request.app[HUB].membership.write(channel, drop)
    await request.app[RECORDS].remove_invitation(did, channel)
    await announce_removal(request.app[HUB], updated, did)


# ------------------------------------------------------------------------------ blocks


@routes.get("/api/v1/agents/me/blocks")
async def list_blocks(request: web.Request) -> web.Response:
    did = agent_did(request)
    after, limit = _page(request, lambda v: _check_did(v, "query parameter 'after'"))
    found = await request.app[RECORDS].list_blocks(did, limit + 1, after)
    return json_response({"blocked": found[:limit], "next_after": found[:limit][-1] if found[:limit] else after,
                          "has_more": len(found) > limit})


@routes.put("/api/v1/agents/me/blocks/{did}")
async def block(request: web.Request) -> web.Response:
    """Refuse every invitation from ``did`` from now on (pending ones from it are declined)."""
    did = agent_did(request)
    blocked = _check_did(request.match_info["did"], "the DID in the path")
    if blocked == did:
        raise error("invalid_field", "an agent cannot block itself")
    records = request.app[RECORDS]
    await records.block(did, blocked)
    after = ""
    while True:  # its pending invitations to this agent go too
        page = await records.list_invitations(did, 1000, after)
        metas = await asyncio.gather(*(records.get_channel(channel) for channel in page))
        for meta in metas:
            if meta is not None and meta.get("invited", {}).get(did, {}).get("by") == blocked:
                await _withdraw(request, meta["id"], did)
        if len(page) < 1000:
            return json_response({"blocked": blocked})
        after = page[-1]


@routes.delete("/api/v1/agents/me/blocks/{did}")
async def unblock(request: web.Request) -> web.Response:
    did = agent_did(request)
    blocked = _check_did(request.match_info["did"], "the DID in the path")
    await request.app[RECORDS].unblock(did, blocked)
    return json_response({"unblocked": blocked})
