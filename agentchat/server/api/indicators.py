"""Public indicators over REST and a public socket (protocol/indicators.md).

No token: anyone may read them, so every route is rate-limited per client address. Agents' and
peekers' sockets (``/api/v1/ws``) may send ``watch_indicators`` too; the public socket
``/api/v1/indicators/ws`` takes nothing else (and ``ping``), so a browser needs no token at all.
"""

from __future__ import annotations

import time

from aiohttp import web

from agentchat.core import frames
from agentchat.core.indicators import SORTS
from agentchat.core.ratelimit import TokenBucket
from agentchat.errors import AgentChatError, error
from agentchat.server.appkeys import INDICATORS, METRICS, SESSIONS, SETTINGS
from agentchat.core.rfc6455 import CLOSE_GOING_AWAY, CLOSE_POLICY
from agentchat.server.http import json_response, path_channel_id, query_int, rate_limit
from agentchat.server.session import Session, SessionSocket
from agentchat.server.tokens import Principal
from agentchat.server.connections import upgrade_within_aiohttp
from agentchat.server.agent_socket import _guess_ref as guess_ref

routes = web.RouteTableDef()

# REST requests one address may make per second to the indicator routes.
REQUESTS_PER_SECOND = 20
# Public sockets one address may open per second.
SOCKETS_PER_SECOND = 5
# Frames a public socket may send per second (bursts of twice this); it only needs a few.
SOCKET_FRAMES_PER_SECOND = 5
SOCKET_MAX_FRAME_BYTES = 64 * 1024
PAGE_MAX = 100
PUBLIC = Principal(scope="public", subject="public")



@routes.get("/api/v1/indicators")
async def list_indicators(request: web.Request) -> web.Response:
    await rate_limit(request, "indicators", REQUESTS_PER_SECOND)
    sort = request.query.get("sort", "active")
    if sort not in SORTS:
        raise error("invalid_field", f"query parameter 'sort' must be one of {', '.join(SORTS)}")
    limit = query_int(request, "limit", 50, 1, PAGE_MAX)
    offset = query_int(request, "offset", 0, 0, 1 << 31)
    items = await request.app[INDICATORS].listing(sort)
    page = items[offset:offset + limit]
    after = offset + len(page)
    return json_response({"channels": [item.to_wire() for item in page], "sort": sort, "offset": offset,
                          "total": len(items), "next_offset": after if after < len(items) else None,
                          "as_of": int(time.time() * 1000)})


class IndicatorsSocket(SessionSocket):
    """A public socket: ``watch_indicators`` in, ``indicators`` frames out (and ``ping``)."""

    __slots__ = ("app", "_bucket", "_refused")

    def __init__(self, app: web.Application) -> None:
        super().__init__(SOCKET_MAX_FRAME_BYTES * 4)
        self.app = app
        self._bucket = TokenBucket(SOCKET_FRAMES_PER_SECOND, SOCKET_FRAMES_PER_SECOND * 2, time.monotonic())
        self._refused = 0  # frames refused in a row for their rate: a flood closes the socket

    def opened(self) -> None:
        session = self.session = Session(self, PUBLIC, self.app[SETTINGS].limits.send_queue_max, self.app[METRICS])
        self.keep_alive()  # the heartbeat of server/agent_socket.py watches it
        self.app[SESSIONS].add(session)

    def lost(self) -> None:
        session = self.session
        if session is not None:
            self.app[INDICATORS].unwatch(session)
            self.app[SESSIONS].discard(session)
            session.close_soon(CLOSE_GOING_AWAY, "")  # nothing is sent: the connection is gone

    async def message_received(self, data: bytes) -> None:
        session = self.session
        assert session is not None
        ref = None
        try:
            if not self._bucket.take(time.monotonic()):
                self._refused += 1
                raise error("rate_limited", f"more than {SOCKET_FRAMES_PER_SECOND} frames per second")
            self._refused = 0
            frame = frames.decode_client_frame(data, max_bytes=SOCKET_MAX_FRAME_BYTES, max_ciphertext_bytes=0)
            ref = frame.ref
            if isinstance(frame, frames.WatchIndicators):
                session.push(await self.app[INDICATORS].watch(session, frame.channels, ref))
            elif isinstance(frame, frames.Ping):
                session.push(frames.encode({"type": "pong", "ref": ref, "ts": int(time.time() * 1000)}))
            else:
                raise error("unknown_frame", "this socket takes watch_indicators and ping only")
        except AgentChatError as exc:
            session.push(frames.error_frame(exc.to_wire(), ref or guess_ref(data)))
            if self._refused > SOCKET_FRAMES_PER_SECOND * 4:
                session.close_soon(CLOSE_POLICY, "rate_limited", flush=True)


@routes.get("/api/v1/indicators/ws")
async def public_socket(request: web.Request) -> web.StreamResponse:
    """Live indicators for anyone: send ``watch_indicators``, get ``indicators`` frames. It goes
    through aiohttp (not straight from the listening socket) for the per-address rate limit."""
    await rate_limit(request, "indicators-ws", SOCKETS_PER_SECOND)
    return await upgrade_within_aiohttp(request, IndicatorsSocket(request.app))


@routes.get("/api/v1/indicators/{channel}")
async def channel_indicators(request: web.Request) -> web.Response:
    await rate_limit(request, "indicators", REQUESTS_PER_SECOND)
    channel = path_channel_id(request)
    item = await request.app[INDICATORS].get(channel)
    return json_response(item.to_wire())


__all__ = ["routes"]
