"""Peeks on the agent's side (protocol/peek.md): answering a peek request by the policy (consent or
refusal), and handing the peeker the channel key once nobody refused."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import websockets

from agentchat import crypto
from agentchat.client.background import BackgroundTasks
from agentchat.client.channel_keys import ChannelKeys
from agentchat.client.rest import AgentChatClientError, RestSession
from agentchat.client.socket_session import SocketSession

log = logging.getLogger(__name__)

# Decides on a peek request (the ``peek_request`` frame, protocol/peek.md): True lets the countdown
# run, False refuses (the agent pays the refusal fee). May be a coroutine function.
PeekPolicy = Callable[[dict[str, Any]], "bool | Awaitable[bool]"]


class PeekResponder:
    """Answers the peek frames of this agent's channels by ``policy`` (see ``Agent.__init__``)."""

    def __init__(self, rest: RestSession, socket: SocketSession, channel_keys: ChannelKeys,
                 events: asyncio.Queue[dict[str, Any]], background: BackgroundTasks,
                 policy: PeekPolicy | bool) -> None:
        self._rest = rest
        self._socket = socket
        self._keys = channel_keys
        self._events = events
        self._background = background
        self.policy = policy
        self._active: dict[str, dict[str, Any]] = {}  # peek id -> view, for our active peeks

    async def funding(self) -> dict[str, Any]:
        """``Agent.refusal_funding``."""
        return await self._rest.request("GET", "/api/v1/agents/me/peek-policy")

    async def set_choice(self, choice: str) -> dict[str, Any]:
        """``Agent.set_peek_choice``."""
        return await self._rest.request("PUT", "/api/v1/agents/me/peek-policy", {"choice": choice})

    async def prepare(self) -> None:
        """Before the socket first opens: with ``policy`` False, refusals must be funded, and the
        server keeps the standing choice ``refuse`` (so peeks are refused while offline too)."""
        if self.policy is False:
            funding = await self.funding()
            if not funding["funded"]:
                raise AgentChatClientError("refusal_unfunded", funding["message"])
            await self.set_choice("refuse")

    async def refuse(self, peek_id: str) -> dict[str, Any]:
        """``Agent.refuse_peek``: over the socket if connected, else REST."""
        if self._socket.ws is not None:
            with contextlib.suppress(AgentChatClientError, websockets.ConnectionClosed):
                return (await self._socket.call({"type": "refuse", "peek": peek_id}))["peek"]
        return (await self._rest.request("POST", f"/api/v1/peeks/{peek_id}/refuse"))["peek"]

    # ------------------------------------------------------------------------------ frames

    def on_frame(self, frame: dict[str, Any]) -> None:
        """A ``peek_request`` or ``peek`` frame (not an answer to this agent's own ``call``)."""
        self._events.put_nowait(frame)
        if frame["type"] == "peek_request":
            self._background.start(self._answer_request(frame))
            return
        view = frame["peek"]
        # The key is handed over once nobody refused (awaiting_key); the server keeps it and gives it to
        # the peeker only once the capture succeeded. A peek that became active without a grant (stored
        # by an older server) gets one then.
        if view["state"] in ("awaiting_key", "active"):
            self._active[view["id"]] = view
            self._background.start(self.grant_key(view))
        elif view["state"] == "capturing":
            pass
        else:
            self._active.pop(view["id"], None)

    def epoch_changed(self, channel: str) -> None:
        """An active peek reads the channel's new epoch too."""
        for view in list(self._active.values()):
            if view["channel"] == channel:
                self._background.start(self.grant_key(view))

    def ended(self, peek_id: str) -> None:
        self._active.pop(peek_id, None)

    async def _answer_request(self, request: dict[str, Any]) -> None:
        policy = self.policy
        if policy is True:
            return
        if policy is not False:
            # With a standing ``refuse`` the server refuses for this agent when the countdown starts;
            # asking the callback then would only make it believe it decides.
            with contextlib.suppress(AgentChatClientError):
                if (await self.funding())["choice"] == "refuse":
                    log.debug("peek %s: refused by the standing choice; the policy is not asked", request["peek"])
                    return
            allow = policy(request)
            if not isinstance(allow, bool):
                allow = await allow
            if allow:
                return
        try:
            await self.refuse(request["peek"])
        except AgentChatClientError as exc:
            if exc.code == "peek_state" and await self._state(request["peek"]) == "refused":
                # Refused already (by this agent's standing choice, or another member): the same outcome.
                log.debug("peek %s: refused already", request["peek"])
                return
            log.warning("could not refuse peek %s: %s", request["peek"], exc)
            self._events.put_nowait({"type": "peek_refusal_failed", "peek": request["peek"], "code": exc.code,
                                     "message": exc.message})

    async def _state(self, peek_id: str) -> str | None:
        """The state of a peek on one of this agent's channels, None if it cannot be read."""
        try:
            return str((await self._rest.request("GET", f"/api/v1/peeks/{peek_id}"))["peek"]["state"])
        except AgentChatClientError:
            return None

    async def grant_key(self, view: dict[str, Any]) -> None:
        """Wrap the channel's current epoch key for the peeker's browser key; the server keeps the
        first grant of each epoch and cannot open it."""
        channel, peek_id = view["channel"], view["id"]
        peeker_key = crypto.b64d(view["peeker_public_key"])
        for _ in range(3):
            epoch = (await self._keys.channel(channel))["epoch"]
            key = await self._keys.epoch_key(channel, epoch)
            wrapped = crypto.wrap_epoch_key(key, peeker_key, channel=channel, epoch=epoch, recipient="peek:" + peek_id)
            try:
                await self._socket.call({"type": "grant_key", "peek": peek_id, "epoch": epoch, "wrapped_key": wrapped})
                return
            except AgentChatClientError as exc:
                if exc.code == "stale_epoch":
                    continue
                if exc.code == "peek_state":  # over already
                    return
                raise
