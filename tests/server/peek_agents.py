"""An agent online on its socket, answering peeks the way the SDK does, for the server's peek tests.

Since a peek is charged only once a key was handed over and cannot be opened on a channel with no agent
online, most peek tests need one: ``await go_online(client, agent)``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import WSMsgType

from agentchat import crypto
from agentchat.core.frames import split_frames
from tests.conftest import RestAgent
from tests.server.test_ws import _leftover, hello


class OnlineAgent:
    """``agent`` with an open socket. With ``grant`` it hands over the channel's current epoch key
    (``epoch_key``, or a made-up one) to every peek that awaits it; ``frames`` keeps what it received."""

    def __init__(self, client: Any, agent: RestAgent, *, epoch_key: bytes | None = None, grant: bool = True) -> None:
        self.client, self.agent, self.grant = client, agent, grant
        self.epoch_key = epoch_key or crypto.new_epoch_key()
        self.frames: list[dict[str, Any]] = []
        self.granted: list[str] = []
        self.ws: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> OnlineAgent:
        self.ws = await hello(self.client, self.agent.token)
        self._task = asyncio.create_task(self._read())
        return self

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.ws is not None:
            await self.ws.close()

    async def _read(self) -> None:
        waiting = _leftover.pop(id(self.ws), [])  # frames that came in the welcome's message
        while True:
            if not waiting:
                msg = await self.ws.receive()
                if msg.type != WSMsgType.TEXT:
                    return
                waiting = split_frames(msg.data)
            for frame in waiting:
                self.frames.append(frame)
                view = frame.get("peek") if frame.get("type") == "peek" and "ref" not in frame else None
                if self.grant and isinstance(view, dict) and view["state"] == "awaiting_key":
                    await self._grant(view)
            waiting = []

    async def _grant(self, view: dict[str, Any]) -> None:
        status, meta = await self.agent.call("GET", f"/api/v1/channels/{view['channel']}")
        assert status == 200, meta
        epoch = meta["epoch"]
        wrapped = crypto.wrap_epoch_key(self.epoch_key, crypto.b64d(view["peeker_public_key"]),
                                        channel=view["channel"], epoch=epoch, recipient="peek:" + view["id"])
        await self.ws.send_str(orjson.dumps({"type": "grant_key", "ref": "grant", "peek": view["id"],
                                             "epoch": epoch, "wrapped_key": wrapped}).decode())
        self.granted.append(view["id"])


async def go_online(client: Any, agent: RestAgent, **options: Any) -> OnlineAgent:
    return await OnlineAgent(client, agent, **options).start()
