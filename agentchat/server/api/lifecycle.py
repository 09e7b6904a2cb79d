"""Deletion routes (an owner deletes a channel, an agent its account: ``server/lifecycle.py``) and a
channel's retention (``server/retention.py``)."""

from __future__ import annotations

from aiohttp import web

import time
from typing import Any

from agentchat.core import frames
from agentchat.errors import error
from agentchat.server import lifecycle
from agentchat.server.http import agent_did, json_response, read_json
from agentchat.server.appkeys import RECORDS, SETTINGS, STORE
from agentchat.server.retention import check_retention, effective_seconds
from agentchat.store import keys
from agentchat.store.records import Record

routes = web.RouteTableDef()


@routes.delete("/api/v1/channels/{channel}")
async def delete_channel(request: web.Request) -> web.Response:
    channel_id = frames.check_channel_id(request.match_info["channel"], "channel id")
    tombstone = await lifecycle.delete_channel(request.app, channel_id, agent_did(request))
    return json_response(lifecycle.tombstone_view(tombstone))


@routes.delete("/api/v1/agents/me")
async def delete_account(request: web.Request) -> web.Response:
    tombstone = await lifecycle.delete_account(request.app, agent_did(request))
    return json_response(lifecycle.tombstone_view(tombstone))


def retention_view(request: web.Request, meta: Record) -> dict[str, Any]:
    return {"channel": meta["id"], "retention_seconds": meta.get("retention_seconds"),
            "effective_seconds": effective_seconds(request.app[SETTINGS], meta),
            "first_available": meta.get("first_available", 1)}


async def _channel_of_member(request: web.Request) -> Record:
    channel_id = frames.check_channel_id(request.match_info["channel"], "channel id")
    meta = await request.app[RECORDS].get_channel(channel_id)
    if meta is None:
        raise error("channel_not_found", f"no channel {channel_id}")
    if agent_did(request) not in meta["members"]:
        raise error("not_member", f"not a member of {channel_id}")
    return meta


@routes.get("/api/v1/channels/{channel}/retention")
async def get_retention(request: web.Request) -> web.Response:
    return json_response(retention_view(request, await _channel_of_member(request)))


@routes.put("/api/v1/channels/{channel}/retention")
async def set_retention(request: web.Request) -> web.Response:
    did = agent_did(request)
    meta = await _channel_of_member(request)
    body = await read_json(request, frozenset({"retention_seconds"}))
    if "retention_seconds" not in body:
        raise error("invalid_field", "field 'retention_seconds' is required (null: the server's default)")
    seconds = check_retention(request.app[SETTINGS], body["retention_seconds"])

    def change(current: Record) -> Record | None:
        if current["owner"] != did:
            raise error("forbidden", "only the channel's owner sets its retention")
        updated = {key: value for key, value in current.items() if key != "retention_seconds"}
        if seconds is not None:
            updated["retention_seconds"] = seconds
        return {**updated, "updated_at": int(time.time() * 1000)}

    updated = await request.app[RECORDS].update_channel(meta["id"], change)
    store = request.app[STORE]
    if seconds is None:
        await store.delete(keys.retention_index(meta["id"]))
    else:
        await store.put(keys.retention_index(meta["id"]), b"")
    return json_response(retention_view(request, updated))
