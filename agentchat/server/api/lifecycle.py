"""Deletion routes: an owner deletes a channel, an agent its account (``server/lifecycle.py``)."""

from __future__ import annotations

from aiohttp import web

from agentchat.core import frames
from agentchat.server import lifecycle
from agentchat.server.http import agent_did, json_response

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
