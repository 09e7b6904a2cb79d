"""``/api/v1/ws``: the only place that awaits a client socket.

The first frame must be ``hello`` with a token (never in the URL). After ``welcome`` the socket gets
live frames for every channel the token may read, catching up first on channels named in ``resume``.
A bad frame gets an ``error`` frame (with the frame's ``ref``) and the socket stays open; only a bad
hello, a flood, or a full queue closes it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import WSMsgType, web

from agentchat.core import frames
from agentchat.core.ratelimit import TokenBucket
from agentchat.errors import AgentChatError, error
from agentchat.server.hub import Hub
from agentchat.server.keys import HUB, INDICATORS, METRICS, PEEKS, RECORDS, SESSIONS, SETTINGS, TOKENS
from agentchat.server.session import CLOSE_AUTH, CLOSE_GOING_AWAY, CLOSE_POLICY, Session
from agentchat.server.tokens import Principal

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 10.0
HEARTBEAT_SECONDS = 30.0
# Frames this far over the limit are cut off by the WebSocket layer (close 1009) instead of being
# read and answered with a too_large error.
HARD_FRAME_FACTOR = 4


async def websocket(request: web.Request) -> web.WebSocketResponse:
    app = request.app
    limits = app[SETTINGS].limits
    ws = web.WebSocketResponse(
        heartbeat=HEARTBEAT_SECONDS, max_msg_size=limits.max_frame_bytes * HARD_FRAME_FACTOR,
        compress=False, decode_text=False,
    )
    await ws.prepare(request)
    principal, hello = await _hello(ws, request)
    if principal is None or hello is None:
        return ws
    hub = app[HUB]
    metrics = app[METRICS]
    session = Session(ws, principal, limits.send_queue_max, metrics, request.transport)
    await hub.register_session(session)
    app[SESSIONS].add(session)
    try:
        channels = await _readable_channels(request, principal)
        # Subscribe first, welcome second: once the client has the welcome, every message sent from
        # then on reaches it. Catch-up on resumed channels follows the welcome.
        await _attach_all(hub, session, channels, hello.resume)
        session.push(frames.encode({"type": "welcome", "ref": hello.ref, "subject": principal.subject,
                                    "scope": principal.scope, "channels": channels,
                                    "limits": {"max_frame_bytes": limits.max_frame_bytes,
                                               "max_ciphertext_bytes": limits.max_ciphertext_bytes,
                                               "frames_per_second": limits.frames_per_second}}))
        for channel in sorted(hello.resume.keys() - set(channels)):
            session.push(frames.error_frame(error("not_member", f"cannot resume {channel}: not a member").to_wire()))
        for channel in channels:
            if channel in hello.resume:
                await hub.catch_up(session, channel)
        await app[PEEKS].session_opened(session, hello.resume)
        await _serve(ws, session, hub, request)
    finally:
        app[PEEKS].session_closed(session)
        app[INDICATORS].unwatch(session)
        app[SESSIONS].discard(session)
        await hub.unregister_session(session)
        await session.aclose()
    return ws


async def _hello(ws: web.WebSocketResponse, request: web.Request) -> tuple[Principal | None, frames.Hello | None]:
    limits = request.app[SETTINGS].limits
    try:
        msg = await asyncio.wait_for(ws.receive(), HELLO_TIMEOUT)
    except asyncio.TimeoutError:
        await _refuse(ws, error("auth_required", "send a hello frame with a token first"), None)
        return None, None
    if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
        return None, None
    try:
        frame = frames.decode_client_frame(msg.data, max_bytes=limits.max_frame_bytes,
                                           max_ciphertext_bytes=limits.max_ciphertext_bytes)
        if not isinstance(frame, frames.Hello):
            raise error("auth_required", "the first frame must be hello with a token")
        return request.app[TOKENS].verify(frame.token), frame
    except AgentChatError as exc:
        await _refuse(ws, exc, None)
        return None, None


async def _refuse(ws: web.WebSocketResponse, exc: AgentChatError, ref: str | None) -> None:
    await ws.send_frame(frames.error_frame(exc.to_wire(), ref), WSMsgType.TEXT)
    await ws.close(code=CLOSE_AUTH, message=exc.code.encode())


async def _readable_channels(request: web.Request, principal: Principal) -> list[str]:
    if principal.is_agent:
        return await request.app[RECORDS].list_memberships(
            principal.subject, request.app[SETTINGS].limits.max_channels_per_agent)
    return [principal.channel] if principal.channel else []


async def _attach_all(hub: Hub, session: Session, channels: list[str], resume: dict[str, int]) -> None:
    for channel in channels:
        try:
            await hub.attach(session, channel, resume.get(channel), defer_catch_up=True)
        except AgentChatError as exc:  # e.g. removed between listing and attaching
            log.debug("attach %s failed: %r", channel, exc)


async def _serve(ws: web.WebSocketResponse, session: Session, hub: Hub, request: web.Request) -> None:
    limits = request.app[SETTINGS].limits
    metrics = request.app[METRICS]
    bucket = TokenBucket(limits.frames_per_second, limits.frames_per_second * 2, time.monotonic())
    refused_in_a_row = 0  # frames refused for rate since the last accepted one
    principal = session.principal
    is_agent, subject = principal.is_agent, principal.subject
    async for msg in ws:
        if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
            break
        metrics.frames_in += 1
        ref = None
        try:
            if not bucket.take(time.monotonic()):
                refused_in_a_row += 1
                raise error("rate_limited", f"more than {limits.frames_per_second} frames per second")
            refused_in_a_row = 0
            frame = frames.decode_client_frame(msg.data, max_bytes=limits.max_frame_bytes,
                                               max_ciphertext_bytes=limits.max_ciphertext_bytes)
            ref = frame.ref
            if type(frame) is frames.Send:  # the common case, without a coroutine of its own
                if not is_agent:
                    raise error("forbidden", "a peek token can read, not send")
                await hub.send(subject, frame.channel, frame.client_id, frame.envelope,
                               _acker(session, frames.ack_prefix(frame.channel, frame.client_id, ref)))
            elif isinstance(frame, (frames.Refuse, frames.GrantKey)):  # peeks: server/peeks.py
                session.push(await request.app[PEEKS].on_frame(frame, principal))
            elif isinstance(frame, frames.WatchIndicators):  # public indicators: server/indicators.py
                session.push(await request.app[INDICATORS].watch(session, frame.channels, ref))
            else:
                await _dispatch(frame, session, hub, principal)
        except AgentChatError as exc:
            metrics.errors_sent += 1
            session.push(frames.error_frame(exc.to_wire(), ref or _guess_ref(msg.data)))
            # A client that keeps sending through a second of refusals is not listening: cut it off.
            if refused_in_a_row > limits.frames_per_second:
                session.close_soon(CLOSE_POLICY, "rate_limited")
        if session.closed:
            break


def _guess_ref(data: Any) -> str | None:
    """The ``ref`` of a frame that failed validation, so the client can match the error to it."""
    try:
        frame = frames.parse_json_object(data, 1 << 30)
    except AgentChatError:
        return None
    ref = frame.get("ref")
    return ref if isinstance(ref, str) and len(ref) <= 64 else None


def _acker(session: Session, ack_prefix: bytes) -> Callable[[int], None]:
    """The ``on_ack`` of one send: the ack frame, once the message is stored."""
    def on_ack(seq: int) -> None:
        session.push(b"%s%d}" % (ack_prefix, seq))
    return on_ack


async def _dispatch(frame: frames.ClientFrame, session: Session, hub: Hub, principal: Principal) -> None:
    if isinstance(frame, frames.Ping):
        session.push(frames.encode({"type": "pong", "ref": frame.ref, "ts": int(time.time() * 1000)}))
    elif isinstance(frame, frames.Resume):
        for channel, after in frame.resume.items():
            await hub.attach(session, channel, after)
    elif isinstance(frame, frames.Hello):
        raise error("invalid_field", "hello was already received on this socket")
    else:
        raise error("unknown_frame", f"{type(frame).__name__.lower()} frames are not available on this server yet")


async def close_all_sessions(app: web.Application) -> None:
    """On shutdown: queued frames go out, then every socket is closed with 1001 going away."""
    sessions = list(app[SESSIONS])
    await asyncio.gather(*(session.flush_and_stop() for session in sessions), return_exceptions=True)
    await asyncio.gather(*(session.aclose(CLOSE_GOING_AWAY, "shutting_down") for session in sessions),
                         return_exceptions=True)
