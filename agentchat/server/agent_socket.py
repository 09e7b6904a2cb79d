"""``/api/v1/ws``: an agent's or a peeker's socket (``AgentSocket``, on ``server/connections.py``).

The first frame must be ``hello`` with a token (never in the URL). After ``welcome`` the socket gets
live frames for every channel the token may read, catching up first on channels named in ``resume``.
A bad frame gets an ``error`` frame (with the frame's ``ref``) and the socket stays open; only a bad
hello, a flood, or a full queue closes it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from agentchat.core import frames, rfc6455
from agentchat.core.frames import CLOSE_AUTH
from agentchat.core.rfc6455 import CLOSE_GOING_AWAY, CLOSE_POLICY, text_frame
from agentchat.core.ratelimit import TokenBucket
from agentchat.errors import AgentChatError, error
from agentchat.server.hub import Hub
from agentchat.server.appkeys import HUB, INDICATORS, METRICS, OPENING, PEEKS, RECORDS, SESSIONS, SETTINGS, TOKENS
from agentchat.server.session import Session, SessionSocket
from agentchat.server.tokens import Principal
from agentchat.server.connections import upgrade_within_aiohttp

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 10.0
# A socket that has sent nothing for a while gets a WebSocket ping, and is dropped if it still sends
# nothing (the timings and the decision: ``core/rfc6455.py``, ``ServerConnection.tick``). One task
# ticks every socket each HEARTBEAT_TICK seconds, so an idle socket holds no timer of its own
# (aiohttp's per-socket heartbeat keeps one or two, ~1 KB).
HEARTBEAT_TICK = 5.0
# Sessions visited between two yields to the event loop during a heartbeat pass.
HEARTBEAT_BATCH = 2000
# Frames this far over the limit are cut off by the WebSocket layer (close 1009) instead of being
# read and answered with a too_large error. Before the hello is accepted the cut is at the limit
# itself: an unauthenticated socket buffers at most one max_frame_bytes message (in at most
# FrameParser.MAX_FRAGMENTS fragments) until the hello timeout.
HARD_FRAME_FACTOR = 4


@functools.cache
def _hard_frame_bytes(max_frame_bytes: int) -> int:
    # One int object shared by every socket of a server, not one of 32 bytes per socket.
    return max_frame_bytes * HARD_FRAME_FACTOR


class AgentSocket(SessionSocket):
    """One agent's or peeker's socket, from ``hello`` to close.

    Between frames it holds no task and no coroutine: each frame is handled as it is read, and only
    a frame whose handling must wait (a bus round trip, a store read) becomes a task, with the frames
    behind it waiting their turn. The hello, the channel list and the welcome live in ``_open`` and
    are gone once it returns; the frame-rate bucket is made with the first frame after it; liveness is
    the heartbeat task's job."""

    __slots__ = ("app", "_hello_timer", "_opening", "_bucket", "_refused_in_a_row")

    def __init__(self, app: web.Application) -> None:
        super().__init__(app[SETTINGS].limits.max_frame_bytes)  # raised once the hello is accepted
        self.app = app
        self._hello_timer: asyncio.TimerHandle | None = None
        self._opening = False
        self._bucket: TokenBucket | None = None  # made with the first frame: it starts full either way
        self._refused_in_a_row = 0  # frames refused for rate since the last accepted one

    def opened(self) -> None:
        self.app[OPENING].add(self)  # until welcomed or gone
        self._hello_timer = asyncio.get_running_loop().call_later(HELLO_TIMEOUT, self._no_hello)

    def _no_hello(self) -> None:
        self._hello_timer = None
        self._refuse(error("auth_required", "send a hello frame with a token first"))

    def _refuse(self, exc: AgentChatError) -> None:
        if self.transport is not None and not self.closing:
            self.transport.write(text_frame(frames.error_frame(exc.to_wire(), None)))
        self.close(CLOSE_AUTH, exc.code)

    def lost(self) -> None:
        self.app[OPENING].discard(self)
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        if self.session is not None and not self._opening:  # else _open finds it lost and cleans up
            asyncio.get_running_loop().create_task(_close(self.session, self.app))

    async def message_received(self, data: bytes) -> None:
        session = self.session
        if session is None:
            if not self._opening:
                await self._hello(data)
            return
        app = self.app
        limits = app[SETTINGS].limits
        app[METRICS].frames_in += 1
        ref = None
        try:
            now = time.monotonic()
            bucket = self._bucket
            if bucket is None:
                bucket = self._bucket = TokenBucket(limits.frames_per_second, limits.frames_per_second * 2, now)
            if not bucket.take(now):
                self._refused_in_a_row += 1
                raise error("rate_limited", f"more than {limits.frames_per_second} frames per second")
            self._refused_in_a_row = 0
            frame = frames.decode_client_frame(data, max_bytes=limits.max_frame_bytes,
                                               max_ciphertext_bytes=limits.max_ciphertext_bytes)
            ref = frame.ref
            principal = session.principal
            if type(frame) is frames.Send:  # the common case, without a coroutine of its own
                if not principal.is_agent:
                    raise error("forbidden", "a peek token can read, not send")
                await app[HUB].send(principal.subject, frame.channel, frame.client_id, frame.envelope,
                                    session, frames.ack_prefix(frame.channel, frame.client_id, ref))
            elif isinstance(frame, (frames.Refuse, frames.GrantKey)):  # peeks: server/peeks.py
                session.push(await app[PEEKS].on_frame(frame, principal))
            elif isinstance(frame, frames.WatchIndicators):  # public indicators: server/indicators.py
                session.push(await app[INDICATORS].watch(session, frame.channels, ref))
            else:
                await _dispatch(frame, session, app[HUB], principal)
        except AgentChatError as exc:
            app[METRICS].errors_sent += 1
            session.push(frames.error_frame(exc.to_wire(), ref or _guess_ref(data)))
            # A client that keeps sending through a second of refusals is not listening: cut it off.
            if self._refused_in_a_row > limits.frames_per_second:
                session.close_soon(CLOSE_POLICY, "rate_limited", flush=True)

    async def _hello(self, data: bytes) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        limits = self.app[SETTINGS].limits
        try:
            frame = frames.decode_client_frame(data, max_bytes=limits.max_frame_bytes,
                                               max_ciphertext_bytes=limits.max_ciphertext_bytes)
            if not isinstance(frame, frames.Hello):
                raise error("auth_required", "the first frame must be hello with a token")
            principal = self.app[TOKENS].verify(frame.token)
        except AgentChatError as exc:
            self._refuse(exc)
            return
        self._opening = True
        try:
            await self._open(principal, frame)
        finally:
            self._opening = False
        if self.session is not None and self.closing and not self.session.closed:
            await _close(self.session, self.app)  # lost while opening

    async def _open(self, principal: Principal, hello: frames.Hello) -> None:
        """The session: registered, subscribed, welcomed and caught up."""
        app = self.app
        limits = app[SETTINGS].limits
        hub = app[HUB]
        session = self.session = Session(self, principal, limits.send_queue_max, app[METRICS])
        self.limit_messages(_hard_frame_bytes(limits.max_frame_bytes))
        await hub.register_session(session)
        app[SESSIONS].add(session)
        try:
            channels = await _readable_channels(app, principal)
            # Subscribe first, welcome second: once the client has the welcome, every message sent from
            # then on reaches it. Catch-up on resumed channels follows the welcome.
            await _attach_all(hub, session, channels, hello.resume)
            # Every channel, however many: the welcome names the first page, ``channels`` frames the
            # rest (``more`` until the last), so no channel is ever left out of a session.
            page = limits.channels_page_max

            def live_after(listed: list[str]) -> dict[str, int]:
                # Where live delivery starts for channels not resumed: a reconnect resumes from there.
                return {channel: session.cursors[channel].last for channel in listed
                        if channel not in hello.resume and channel in session.cursors}

            session.push(frames.encode({"type": "welcome", "ref": hello.ref, "subject": principal.subject,
                                        "scope": principal.scope, "channels": channels[:page],
                                        "live_after": live_after(channels[:page]),
                                        "more": len(channels) > page,
                                        "limits": {"max_frame_bytes": limits.max_frame_bytes,
                                                   "max_ciphertext_bytes": limits.max_ciphertext_bytes,
                                                   "frames_per_second": limits.frames_per_second}}))
            for start in range(page, len(channels), page):
                session.push(frames.encode({"type": "channels", **({"ref": hello.ref} if hello.ref else {}),
                                            "channels": channels[start:start + page],
                                            "live_after": live_after(channels[start:start + page]),
                                            "more": start + page < len(channels)}))
            for channel in sorted(hello.resume.keys() - set(channels)):
                session.push(frames.error_frame(error("not_member", f"cannot resume {channel}: not a member").to_wire()))
            for channel in channels:
                if channel in hello.resume:
                    await hub.catch_up(session, channel)
            await app[PEEKS].session_opened(session, hello.resume)
        except BaseException:
            await _close(session, app)
            raise
        self.keep_alive()  # from now on the heartbeat watches this socket
        app[OPENING].discard(self)


async def websocket(request: web.Request) -> web.StreamResponse:
    """``/api/v1/ws`` when the upgrade reaches aiohttp: a keep-alive connection that served HTTP
    requests first, or a request that is not a valid upgrade (``bad_upgrade``). Fresh connections
    are served by ``AgentSocket`` straight from the listening socket (``server/connections.py``)."""
    return await upgrade_within_aiohttp(request, AgentSocket(request.app))


async def _close(session: Session, app: web.Application) -> None:
    if session.closed and session not in app[SESSIONS]:
        return
    app[PEEKS].session_closed(session)
    app[INDICATORS].unwatch(session)
    app[SESSIONS].discard(session)
    await app[HUB].unregister_session(session)
    await session.aclose()


async def _readable_channels(app: web.Application, principal: Principal) -> list[str]:
    if principal.is_agent:
        return await app[RECORDS].all_memberships(principal.subject)
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


async def _dispatch(frame: frames.ClientFrame, session: Session, hub: Hub, principal: Principal) -> None:
    if isinstance(frame, frames.Ping):
        session.push(frames.encode({"type": "pong", "ref": frame.ref, "ts": int(time.time() * 1000)}))
    elif isinstance(frame, frames.Resume):
        for channel, after in frame.resume.items():
            try:
                await hub.attach(session, channel, after)
            except AgentChatError as exc:
                # As in hello's resume: a channel the principal cannot read is not_member, whether or
                # not it exists (an outsider learns nothing about which ids are taken).
                if exc.code != "channel_not_found":
                    raise
                raise error("not_member", f"cannot resume {channel}: not a member") from None
    elif isinstance(frame, frames.Hello):
        raise error("invalid_field", "hello was already received on this socket")
    else:
        raise error("unknown_frame", f"{type(frame).__name__.lower()} frames are not available on this server yet")


async def heartbeat_ctx(app: web.Application) -> AsyncIterator[None]:
    """The one heartbeat of every socket served here (see ``HEARTBEAT_TICK``)."""
    task = asyncio.create_task(_heartbeat(app[SESSIONS]), name="ws-heartbeat")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _heartbeat(sessions: set[Session]) -> None:
    while True:
        await asyncio.sleep(HEARTBEAT_TICK)
        ping_at, drop_at = rfc6455.heartbeat_ticks(HEARTBEAT_TICK)
        watched = list(sessions)
        for start in range(0, len(watched), HEARTBEAT_BATCH):
            if start:
                await asyncio.sleep(0)  # a long pass does not hold up deliveries
            for session in watched[start:start + HEARTBEAT_BATCH]:
                session.heartbeat(ping_at, drop_at)


async def close_all_sessions(app: web.Application) -> None:
    """On shutdown: queued frames go out, then every socket is closed with 1001 going away."""
    for socket in list(app[OPENING]):  # not welcomed yet: nothing of theirs is queued
        socket.close(CLOSE_GOING_AWAY, "shutting_down")
    sessions = list(app[SESSIONS])
    await asyncio.gather(*(session.flush_and_stop() for session in sessions), return_exceptions=True)
    await asyncio.gather(*(session.aclose(CLOSE_GOING_AWAY, "shutting_down") for session in sessions),
                         return_exceptions=True)
