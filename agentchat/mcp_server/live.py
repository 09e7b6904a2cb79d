"""What an MCP session keeps while it runs, apart from the tools: the agent's socket followed in the
background (signing in again until the server answers), per channel what arrived live and how far this
session has read, the invitations left pending, and the listeners told of changes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from agentchat.client.agent import Agent, AgentChatClientError, Message

log = logging.getLogger(__name__)

# Messages kept per channel from the live socket for wait_for_messages and the channel resources.
LIVE_BUFFER = 200
# What a request to a server that is down or restarting raises.
UNREACHABLE = (OSError, asyncio.TimeoutError, aiohttp.ClientError)
RETRY_MAX_DELAY = 10.0


@dataclass
class ChannelState:
    live: deque[Message] = field(default_factory=lambda: deque(maxlen=LIVE_BUFFER))
    read_upto: int = 0  # the highest seq this MCP session has returned for the channel
    latest: int = 0  # the highest seq known to exist
    overflowed: bool = False  # unread messages fell out of ``live``: read_messages has them

    def unread(self) -> list[Message]:
        return [m for m in self.live if m.seq > self.read_upto]


class BridgeListener(Protocol):
    """Told what changed, to notify MCP clients (``server.py``: resource subscribers). Called on the
    bridge's task; an exception is logged and does not stop the bridge."""

    async def channel_updated(self, channel: str) -> None:
        """A message was stored in ``channel`` (its history resource changed)."""

    async def channels_changed(self) -> None:
        """This agent joined or left a channel (the list of resources changed)."""


class LiveState:
    def __init__(self, agent: Agent, *, invitations: str) -> None:
        """``invitations``: the bridge's invitation policy ("all", "known" or "none")."""
        self.agent = agent
        self.invitation_policy = invitations
        # The SDK asks its documented policy hook about every invitation (when it arrives, and again
        # at each reconnect while it is pending): the bridge answers, and keeps the ones left pending.
        agent.invitation_policy = self.on_invitation
        self.invitations: dict[str, dict[str, Any]] = {}  # channel -> the invitation, while pending
        self.reported: set[str] = set()  # channels whose invitation a wait has shown already
        self.channels: dict[str, ChannelState] = {}
        self.arrival = asyncio.Event()  # set (and replaced) when a message or an invitation arrives
        self._tasks: list[asyncio.Task[None]] = []
        self._listeners: list[BridgeListener] = []

    def add_listener(self, listener: BridgeListener) -> None:
        self._listeners.append(listener)

    # ---------------------------------------------------------------------------- lifecycle

    async def start(self, sign_in: Callable[[], Awaitable[None]]) -> None:
        """Sign in (``sign_in``: log in, or register on the first run), open the socket and follow it.
        If the server cannot be reached, keep trying in the background and serve meanwhile: the tools
        answer ``unreachable`` until it is back. Other errors (a key the server does not know) raise."""
        try:
            await self._bring_up(sign_in)
        except UNREACHABLE as exc:
            log.warning("%s cannot be reached (%r); trying again in the background", self.agent.server, exc)
            self._tasks.append(asyncio.create_task(self._retry(sign_in), name="mcp-bring-up"))

    async def _bring_up(self, sign_in: Callable[[], Awaitable[None]]) -> None:
        await sign_in()
        await self.agent.connect()
        for channel in await self.agent.channels():
            self.state(channel["id"])
        self._tasks += [asyncio.create_task(self._pump(), name="mcp-messages"),
                        asyncio.create_task(self._watch_events(), name="mcp-events")]

    async def _retry(self, sign_in: Callable[[], Awaitable[None]]) -> None:
        delay = 0.5
        while True:
            await asyncio.sleep(delay)
            try:
                await self._bring_up(sign_in)
                log.warning("%s reached: signed in and listening", self.agent.server)
                return
            except UNREACHABLE:
                delay = min(delay * 2, RETRY_MAX_DELAY)
            except Exception:
                log.exception("cannot sign in to %s; the tools will fail", self.agent.server)
                return

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def state(self, channel: str) -> ChannelState:
        state = self.channels.get(channel)
        if state is None:
            state = self.channels[channel] = ChannelState()
        return state

    async def _pump(self) -> None:
        while True:
            try:
                async for message in self.agent.messages():
                    self.arrived(message)
                    await self.updated(message.channel)
            except AgentChatClientError as exc:
                log.warning("socket: %s", exc)
                await asyncio.sleep(1)

    def arrived(self, message: Message) -> None:
        state = self.state(message.channel)
        if len(state.live) == state.live.maxlen and state.live[0].seq > state.read_upto:
            state.overflowed = True
        state.live.append(message)
        state.latest = max(state.latest, message.seq)
        self.wake()

    def wake(self) -> None:
        self.arrival.set()
        self.arrival = asyncio.Event()

    async def on_invitation(self, invitation: dict[str, Any]) -> bool | None:
        """The SDK's invitation policy: True accepts; None leaves it pending for the LLM to answer."""
        if self.invitation_policy == "all":
            return True
        if self.invitation_policy == "known" and any(
                invitation["by"] in channel["members"] for channel in await self.agent.channels()):
            return True  # an agent this one already talks with: it can reach it anyway
        channel = invitation["channel"]
        if channel not in self.invitations:
            self.invitations[channel] = invitation
            self.wake()
        return None

    async def updated(self, channel: str) -> None:
        for listener in self._listeners:
            try:
                await listener.channel_updated(channel)
            except Exception as exc:  # a client gone away must not stop the pump
                log.info("resource update for %s not sent: %r", channel, exc)

    async def _watch_events(self) -> None:
        while True:
            event = await self.agent.events.get()
            if event.get("type") != "channel" or event.get("event") not in ("added", "removed", "deleted"):
                continue
            if event["event"] == "added":
                self.state(event["channel"])
                self.invitations.pop(event["channel"], None)  # accepted (here, or by another client)
                self.reported.discard(event["channel"])
            else:
                self.channels.pop(event["channel"], None)
            for listener in self._listeners:
                try:
                    await listener.channels_changed()
                except Exception as exc:
                    log.info("resource list change not sent: %r", exc)

    def unread(self, channel: str | None) -> list[Message]:
        if channel is not None:
            return self.state(channel).unread()
        return [m for c in sorted(self.channels) for m in self.channels[c].unread()]
