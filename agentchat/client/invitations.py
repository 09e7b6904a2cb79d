"""Invitations on the agent's side: nobody is made a member without consent (README, "Invitations").
An invitation is answered by the agent's policy when it arrives, again for those still pending each
time the socket is welcomed, and when a channel request meets ``not_member`` for one not answered yet."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from agentchat.client.background import BackgroundTasks
from agentchat.client.rest import AgentChatClientError, RestSession

# Decides on an invitation (the ``invitation`` frame, protocol/frames.md): True accepts, False
# declines, None leaves it pending (``accept_invitation`` later). May be a coroutine function.
InvitationPolicy = Callable[[dict[str, Any]], "bool | None | Awaitable[bool | None]"]


class InvitationResponder:
    def __init__(self, rest: RestSession, events: asyncio.Queue[dict[str, Any]], background: BackgroundTasks,
                 policy: InvitationPolicy | str) -> None:
        self._rest = rest
        self._events = events
        self._background = background
        self.policy = policy
        self._answers: dict[str, asyncio.Future[bool | None]] = {}  # channel -> the answer under way

    async def pending(self) -> list[dict[str, Any]]:
        """``Agent.invitations``."""
        return await self._rest.all_pages("/api/v1/invitations", "invitations")

    async def accept(self, channel: str) -> dict[str, Any]:
        return await self._rest.request("POST", f"/api/v1/invitations/{channel}/accept")

    async def decline(self, channel: str) -> None:
        await self._rest.request("POST", f"/api/v1/invitations/{channel}/decline")

    def on_frame(self, frame: dict[str, Any]) -> None:
        """An ``invitation`` frame: told to the caller, and answered by the policy."""
        self._events.put_nowait(frame)
        self._background.start(self.answer(frame))

    async def answer_pending(self) -> None:
        for invitation in await self.pending():
            await self.answer(invitation)

    async def accept_if_invited(self, channel: str) -> bool:
        """Answer a pending invitation to ``channel`` by the policy; True if this agent accepted it."""
        answer = self._answers.get(channel)
        if answer is not None:
            return await asyncio.shield(answer) is True
        for invitation in await self.pending():
            if invitation["channel"] == channel:
                return await self.answer(invitation) is True
        return False

    async def answer(self, invitation: dict[str, Any]) -> bool | None:
        """Answer by the policy, once per channel however many times it is asked (the frame, the
        listing at connect, a ``not_member`` answer) while an answer is under way: True if accepted,
        False declined, None left pending."""
        channel = invitation["channel"]
        answer = self._answers.get(channel)
        if answer is None:
            answer = self._answers[channel] = asyncio.ensure_future(self._decide(invitation))
        try:
            return await asyncio.shield(answer)
        finally:
            if answer.done() and self._answers.get(channel) is answer:
                del self._answers[channel]  # a later invitation (after a removal) is asked anew

    async def _decide(self, invitation: dict[str, Any]) -> bool | None:
        channel = invitation["channel"]
        policy = self.policy
        decision: Any
        if policy == "all":
            decision = True
        elif policy == "none":
            decision = None
        elif policy == "known":
            decision = await self._knows(invitation["by"]) or None
        elif callable(policy):
            decision = policy(invitation)
            if not (decision is None or isinstance(decision, bool)):
                decision = await decision
        else:
            raise ValueError(f"unknown invitation policy {policy!r}")
        if decision is None:
            return None
        try:
            if decision:
                await self.accept(channel)
            else:
                await self.decline(channel)
        except AgentChatClientError as exc:
            if exc.code not in ("invitation_not_found", "channel_not_found"):  # withdrawn meanwhile
                raise
            return False
        return bool(decision)

    async def _knows(self, did: str) -> bool:
        channels = await self._rest.all_pages("/api/v1/channels", "channels")
        return any(did in channel["members"] for channel in channels)
