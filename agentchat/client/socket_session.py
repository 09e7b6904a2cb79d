"""The agent's socket: connect, reconnect with resume, read and dispatch frames, sends waiting for
their acks, and the inbox of decrypted messages.

Every frame the server sends passes through ``SocketSession._dispatch`` (protocol/frames.md lists
them): the message path (``message``, ``ack``, ``welcome``, errors) is handled here; channel, peek and
invitation frames go to the handler the agent registered for their type; anything else becomes an
event on ``Agent.events``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import websockets
from websockets.asyncio.client import ClientConnection

from agentchat import crypto
from agentchat.client.background import BackgroundTasks
from agentchat.client.messages import Message, new_client_id
from agentchat.client.rest import AgentChatClientError, RestSession
from agentchat.core.backoff import Backoff
from agentchat.core.frames import split_frames
from agentchat.core.rfc6455 import CLOSE_NORMAL

log = logging.getLogger(__name__)

RECONNECT_BASE_DELAY = 0.1
RECONNECT_MAX_DELAY = 5.0
SEEN_CLIENT_IDS = 4096
DUPLICATE_PENDING_RETRY = 1.0  # seconds before a send answered duplicate_pending goes out again
REPLY_TIMEOUT = 30.0  # seconds a frame sent with ``call`` waits for its answer
TOKEN_ERRORS = ("token_invalid", "token_expired", "auth_required")

# Handles one type of frame (registered in ``SocketSession.handlers``); called on the reading task, so
# it must not block: longer work goes to the agent's background tasks.
FrameHandler = Callable[[dict[str, Any]], None]


class SocketSession:
    def __init__(self, rest: RestSession, *, did: str, include_own: bool,
                 open_message: Callable[[dict[str, Any]], Awaitable[Message]],
                 events: asyncio.Queue[dict[str, Any]], background: BackgroundTasks,
                 on_welcome: Callable[[], None]) -> None:
        """``open_message`` decrypts and checks a ``message`` frame; ``on_welcome`` is called each time
        the server welcomes the socket (the first time and after every reconnect)."""
        self._rest = rest
        self._did = did
        self.include_own = include_own
        self._open_message = open_message
        self._on_welcome = on_welcome
        self.events = events
        self._background = background
        self.handlers: dict[str, FrameHandler] = {}
        self.last_seq: dict[str, int] = {}  # channel -> the highest number delivered (resume from here)
        # (channel, sender, client id) of messages delivered -> their number
        self._seen: OrderedDict[tuple[str, str, str], int] = OrderedDict()
        self._gaps: OrderedDict[tuple[str, int], None] = OrderedDict()  # gaps already told
        self.inbox: asyncio.Queue[Message | AgentChatClientError] = asyncio.Queue()
        self._pending: dict[str, tuple[dict[str, Any], asyncio.Future[int]]] = {}  # client id -> send
        self._replies: dict[str, asyncio.Future[dict[str, Any]]] = {}  # ref -> answer to a ``call``
        self.ws: ClientConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self.closing = False
        self.reconnects = 0
        self._lost = False  # the socket dropped and has not been welcomed back yet

    @property
    def started(self) -> bool:
        return self._task is not None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"agent-socket-{self._did[-6:]}")

    async def wait_connected(self, timeout: float) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    async def close(self) -> None:
        self.closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self.ws is not None:
            await self.ws.close()

    def fail_pending(self) -> None:
        for _, future in self._pending.values():
            if not future.done():
                future.set_exception(AgentChatClientError("closed", "the agent was closed"))

    # ------------------------------------------------------------------------------ channels' positions

    def deliver_from_start(self, channel: str) -> None:
        """A channel this agent just joined: delivery starts at its first message."""
        self.last_seq.setdefault(channel, 0)

    def skip_below(self, channel: str, first_available: int) -> None:
        """Numbers below ``first_available`` expired: never ask for them again."""
        self.last_seq[channel] = max(self.last_seq.get(channel, 0), first_available - 1)

    def forget(self, channel: str) -> None:
        self.last_seq.pop(channel, None)

    async def resume(self, channel: str) -> None:
        """Ask for ``channel``'s messages after the last one delivered."""
        ws = self.ws
        if ws is not None:
            with contextlib.suppress(websockets.ConnectionClosed):
                await ws.send(orjson.dumps({"type": "resume", "resume": {channel: self.last_seq.get(channel, 0)}}).decode())

    # ------------------------------------------------------------------------------ sending

    async def send_message(self, channel: str, client_id: str, envelope: dict[str, Any]) -> int:
        """Send a sealed message; returns its number once the server acked it (stored)."""
        frame = {"type": "send", "ref": client_id, "channel": channel, "client_id": client_id, "envelope": envelope}
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending[client_id] = (frame, future)
        try:
            await self._connected.wait()
            ws = self.ws
            if ws is not None:
                with contextlib.suppress(websockets.ConnectionClosed):
                    await ws.send(orjson.dumps(frame).decode())
            # If the socket dropped, the reconnect sends every pending frame again.
            return await future
        finally:
            self._pending.pop(client_id, None)

    async def call(self, frame: dict[str, Any]) -> dict[str, Any]:
        """Send a frame that the server answers with a frame carrying the same ``ref`` (``refuse``,
        ``grant_key``); returns the answer, or raises the error it answered with."""
        ws = self.ws
        if ws is None:
            raise AgentChatClientError("not_connected", "the socket is not connected")
        ref = "pk-" + new_client_id()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[ref] = future
        try:
            await ws.send(orjson.dumps({**frame, "ref": ref}).decode())
            return await asyncio.wait_for(future, REPLY_TIMEOUT)
        finally:
            self._replies.pop(ref, None)

    async def _send_again_later(self, client_id: str) -> None:
        await asyncio.sleep(DUPLICATE_PENDING_RETRY)
        pending, ws = self._pending.get(client_id), self.ws
        if pending is not None and not pending[1].done() and ws is not None:
            with contextlib.suppress(websockets.ConnectionClosed):
                await ws.send(orjson.dumps(pending[0]).decode())

    # ------------------------------------------------------------------------------ the connection

    async def _loop(self) -> None:
        backoff = Backoff(RECONNECT_BASE_DELAY, RECONNECT_MAX_DELAY)
        self._lost = False
        while not self.closing:
            try:
                async with websockets.connect(self._ws_url(), max_size=4 * 1024 * 1024, open_timeout=10) as ws:
                    await ws.send(orjson.dumps({"type": "hello", "token": await self._rest.token(),
                                                "resume": dict(self.last_seq)}).decode())
                    self.ws = ws
                    backoff.reset()
                    async for data in ws:
                        for frame in split_frames(data):
                            await self._dispatch(ws, frame)
                    if ws.close_code is not None and ws.close_code != CLOSE_NORMAL:
                        log.info("socket closed by server: %s %s", ws.close_code, ws.close_reason)
            except asyncio.CancelledError:
                raise
            except AgentChatClientError as exc:
                if exc.code in TOKEN_ERRORS:
                    self._rest.forget_token()
                log.info("socket refused: %s", exc)
            except (OSError, websockets.WebSocketException, asyncio.TimeoutError) as exc:
                log.info("socket lost: %r", exc)
            finally:
                self.ws = None
                if self._connected.is_set() and not self.closing:
                    self._lost = True
                    self.events.put_nowait({"type": "connection", "state": "lost"})
                self._connected.clear()
            if self.closing:
                return
            self.reconnects += 1
            await asyncio.sleep(backoff.next_delay())

    def _ws_url(self) -> str:
        """The socket's address, from the REST side's at each connect (``Agent.server`` may change)."""
        base = self._rest.server.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        return base + "/api/v1/ws"

    async def _dispatch(self, ws: ClientConnection, frame: dict[str, Any]) -> None:
        """Every frame from the server, by its type (protocol/frames.md)."""
        kind = frame.get("type")
        ref = frame.get("ref")
        reply = self._replies.pop(ref, None) if ref and kind in ("peek", "error") else None
        if reply is not None:  # the answer to a ``call``
            if not reply.done():
                if kind == "error":
                    reply.set_exception(_error(frame))
                else:
                    reply.set_result(frame)
            return
        if kind == "message":
            await self._on_message(frame)
        elif kind == "gap":
            self._on_gap(frame)
        elif kind == "ack":
            pending = self._pending.get(frame["client_id"])
            if pending is not None and not pending[1].done():
                pending[1].set_result(int(frame["seq"]))
        elif kind in ("welcome", "channels"):
            await self._on_welcome_frame(ws, frame)
        elif kind == "error":
            self._on_error(frame)
        elif kind in self.handlers:  # channel, peek_request, peek, invitation: the agent's parts
            self.handlers[kind](frame)
        else:
            await self.events.put(frame)

    async def _on_welcome_frame(self, ws: ClientConnection, frame: dict[str, Any]) -> None:
        # A channel seen for the first time resumes, after a reconnect, from where live delivery
        # started: what was said before this agent connected is history, not news.
        live_after = frame.get("live_after") or {}
        for channel in frame.get("channels", []):
            self.last_seq.setdefault(channel, int(live_after.get(channel, 0)))
        if frame["type"] == "channels":
            return
        self._connected.set()
        self._on_welcome()
        if self._lost:
            self._lost = False
            self.events.put_nowait({"type": "connection", "state": "restored"})
        # Sends that were waiting for an ack when the socket dropped go out again with their client
        # ids: the server answers a stored one with its original number.
        for pending_frame, future in list(self._pending.values()):
            if not future.done():
                await ws.send(orjson.dumps(pending_frame).decode())

    def _on_error(self, frame: dict[str, Any]) -> None:
        err = _error(frame)
        ref = frame.get("ref")
        pending = self._pending.get(ref) if ref else None
        if pending is not None:
            if not pending[1].done():
                if err.code == "duplicate_pending":
                    # The first attempt is still being stored. Its ack goes to the socket that sent
                    # it, which may be gone (the socket before a reconnect, or a process that died
                    # holding it): ask again in a moment rather than wait for an ack that may not come.
                    self._background.start(self._send_again_later(ref))
                    return
                pending[1].set_exception(err)
            return
        if err.code in TOKEN_ERRORS:
            raise err
        log.warning("server error: %s", err)

    async def _on_message(self, frame: dict[str, Any]) -> None:
        channel, seq = frame["channel"], int(frame["seq"])
        if seq <= self.last_seq.get(channel, 0):
            return
        self.last_seq[channel] = seq
        identity = (channel, frame["sender"], frame["client_id"])
        if identity in self._seen:  # the same message stored again after a retry
            return
        self._seen[identity] = seq
        if len(self._seen) > SEEN_CLIENT_IDS:
            self._seen.popitem(last=False)
        if frame["sender"] == self._did and not self.include_own:
            return
        try:
            message = await self._open_message(frame)
        except (crypto.CryptoError, ValueError, AgentChatClientError) as exc:
            log.warning("dropping message %s#%d from %s: %s", channel, seq, frame.get("sender"), exc)
            return
        await self.inbox.put(message)

    def _on_gap(self, frame: dict[str, Any]) -> None:
        """Number ``seq`` will never hold a message (its server died before storing it; protocol/
        frames.md, Gaps). Never waited for; told once as a ``gap`` event, with ``retracted``: whether
        this agent got that message live (then its sender's retry, under a new number, is delivered
        rather than dropped as a repeat)."""
        channel, seq = frame["channel"], int(frame["seq"])
        if seq > self.last_seq.get(channel, -1):
            self.last_seq[channel] = seq
        if (channel, seq) in self._gaps:  # live and again in a catch-up: the same fact
            return
        self._gaps[(channel, seq)] = None
        if len(self._gaps) > SEEN_CLIENT_IDS:
            self._gaps.popitem(last=False)
        event: dict[str, Any] = {"type": "gap", "channel": channel, "seq": seq, "retracted": False}
        for identity, seen in self._seen.items():
            if seen == seq and identity[0] == channel:
                del self._seen[identity]
                event.update(retracted=True, sender=identity[1], client_id=identity[2])
                break
        self.events.put_nowait(event)

    async def next_item(self, timeout: float | None = None) -> Message:
        """The next message of the inbox (an error put there is raised)."""
        item = await asyncio.wait_for(self.inbox.get(), timeout)
        if isinstance(item, AgentChatClientError):
            raise item
        return item


def _error(frame: dict[str, Any]) -> AgentChatClientError:
    return AgentChatClientError(frame.get("code", "error"), frame.get("message", ""), bool(frame.get("retryable")))
