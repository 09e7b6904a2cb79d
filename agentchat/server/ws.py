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
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import WSMsgType, web

from agentchat.core import frames
from agentchat.core.ratelimit import TokenBucket
from agentchat.errors import AgentChatError, error
from agentchat.server.http import answers_own_errors
from agentchat.server.hub import Hub
from agentchat.server.keys import HUB, INDICATORS, METRICS, PEEKS, RECORDS, SESSIONS, SETTINGS, TOKENS
from agentchat.server.session import CLOSE_AUTH, CLOSE_GOING_AWAY, CLOSE_POLICY, Session
from agentchat.server.tokens import Principal

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 10.0
# A socket that has sent nothing for HEARTBEAT_SECONDS gets a WebSocket ping; if it still sends nothing
# for PONG_WAIT_SECONDS it is dropped. One task looks at every socket each HEARTBEAT_TICK seconds, so
# an idle socket holds no timer of its own (aiohttp's per-socket heartbeat keeps one or two, ~1 KB).
HEARTBEAT_SECONDS = 30.0
PONG_WAIT_SECONDS = 15.0
HEARTBEAT_TICK = 5.0
# Sessions visited between two yields to the event loop during a heartbeat pass.
HEARTBEAT_BATCH = 2000
# Frames this far over the limit are cut off by the WebSocket layer (close 1009) instead of being
# read and answered with a too_large error.
HARD_FRAME_FACTOR = 4


@answers_own_errors
async def websocket(request: web.Request) -> web.WebSocketResponse:
    """One client socket, from ``hello`` to close.

    An idle socket's coroutine (the one that stays alive) waits in ``ws.receive()`` holding only what
    the next frame needs: the hello, the channel list and the welcome live in ``_open`` and are gone
    once it returns, the frame-rate bucket is made with the first frame, and liveness is the heartbeat
    task's job."""
    app = request.app
    ws = web.WebSocketResponse(
        autoping=False, max_msg_size=app[SETTINGS].limits.max_frame_bytes * HARD_FRAME_FACTOR,
        compress=False, decode_text=False,
    )
    await ws.prepare(request)
    session = await _open(ws, request)
    if session is None:
        return ws
    limits = app[SETTINGS].limits
    hub = app[HUB]
    metrics = app[METRICS]
    principal = session.principal
    is_agent, subject = principal.is_agent, principal.subject
    bucket: TokenBucket | None = None  # made with the first frame: it starts full either way
    refused_in_a_row = 0  # frames refused for rate since the last accepted one
    try:
        while True:
            msg = await ws.receive()
            session.silent_ticks = 0
            kind = msg.type
            if kind is not WSMsgType.TEXT and kind is not WSMsgType.BINARY:
                if kind is WSMsgType.PING:
                    await ws.pong(msg.data)
                    continue
                if kind is WSMsgType.PONG:
                    continue
                break
            metrics.frames_in += 1
            ref = None
            try:
                now = time.monotonic()
                if bucket is None:
                    bucket = TokenBucket(limits.frames_per_second, limits.frames_per_second * 2, now)
                if not bucket.take(now):
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
                    session.push(await app[PEEKS].on_frame(frame, principal))
                elif isinstance(frame, frames.WatchIndicators):  # public indicators: server/indicators.py
                    session.push(await app[INDICATORS].watch(session, frame.channels, ref))
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
    finally:
        await _close(session, app)
    return ws


async def _open(ws: web.WebSocketResponse, request: web.Request) -> Session | None:
    """Hello, then the session: registered, subscribed, welcomed and caught up; None if refused."""
    principal, hello = await _hello(ws, request)
    if principal is None or hello is None:
        return None
    app = request.app
    limits = app[SETTINGS].limits
    hub = app[HUB]
    session = Session(ws, principal, limits.send_queue_max, app[METRICS], request.transport)
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
    except BaseException:
        await _close(session, app)
        raise
    session.silent_ticks = 0  # from now on the heartbeat watches this socket
    return session


async def _close(session: Session, app: web.Application) -> None:
    app[PEEKS].session_closed(session)
    app[INDICATORS].unwatch(session)
    app[SESSIONS].discard(session)
    await app[HUB].unregister_session(session)
    await session.aclose()


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


async def heartbeat_ctx(app: web.Application) -> AsyncIterator[None]:
    """The one heartbeat of every socket served here (see ``HEARTBEAT_SECONDS``)."""
    task = asyncio.create_task(_heartbeat(app[SESSIONS]), name="ws-heartbeat")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _heartbeat(sessions: set[Session]) -> None:
    while True:
        await asyncio.sleep(HEARTBEAT_TICK)
        ping_at = round(HEARTBEAT_SECONDS / HEARTBEAT_TICK) + 1  # silent for at least HEARTBEAT_SECONDS
        drop_at = ping_at + round(PONG_WAIT_SECONDS / HEARTBEAT_TICK)
        watched = list(sessions)
        for start in range(0, len(watched), HEARTBEAT_BATCH):
            if start:
                await asyncio.sleep(0)  # a long pass does not hold up deliveries
            for session in watched[start:start + HEARTBEAT_BATCH]:
                session.heartbeat(ping_at, drop_at)


async def close_all_sessions(app: web.Application) -> None:
    """On shutdown: queued frames go out, then every socket is closed with 1001 going away."""
    sessions = list(app[SESSIONS])
    await asyncio.gather(*(session.flush_and_stop() for session in sessions), return_exceptions=True)
    await asyncio.gather(*(session.aclose(CLOSE_GOING_AWAY, "shutting_down") for session in sessions),
                         return_exceptions=True)
