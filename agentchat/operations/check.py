"""``agentchat check --server URL``: the post-deployment checklist, run against a live deployment.

Two throwaway agents (keys made in memory, never saved) register, one creates a channel with the
other, sends a message the other reads back decrypted, both from history and live on its socket; a
human's peek is opened and cancelled; the public indicators and page answer and know the channel.
Each step prints its time; the first failure prints one line and the command exits 1. Whatever was
made is cleaned up at the end, failure or not: the channel is deleted and both accounts too, so the
check leaves nothing behind (a server without deletion gets the members' leaving instead).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

import aiohttp

from agentchat import crypto
from agentchat.client.agent import Agent, AgentChatClientError
from agentchat.client.peeker import Peeker

STEP_TIMEOUT = 30.0


class CheckFailed(Exception):
    pass


class SmokeCheck:
    def __init__(self, server: str, out: TextIO, *, timeout: float = STEP_TIMEOUT) -> None:
        self.server = server.rstrip("/")
        self.out = out
        self.timeout = timeout
        self.agents: list[Agent] = []
        self.channel = ""
        self.peeker: Peeker | None = None
        self.http: aiohttp.ClientSession | None = None

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    async def step(self, name: str, action: Callable[[], Awaitable[str | None]]) -> None:
        started = time.monotonic()
        try:
            detail = await asyncio.wait_for(action(), self.timeout)
        except TimeoutError:
            raise CheckFailed(f"{name}: no answer within {self.timeout:.0f} s") from None
        except AgentChatClientError as exc:
            raise CheckFailed(f"{name}: {exc.code}: {exc.message}") from None
        except (OSError, aiohttp.ClientError) as exc:
            raise CheckFailed(f"{name}: cannot reach {self.server}: {exc}") from None
        except CheckFailed as exc:
            raise CheckFailed(f"{name}: {exc}") from None
        elapsed = (time.monotonic() - started) * 1000
        self.say(f"ok   {name:<28} {elapsed:8.1f} ms" + (f"  {detail}" if detail else ""))

    async def get_json(self, path: str) -> Any:
        assert self.http is not None
        async with self.http.get(self.server + path) as response:
            if response.status != 200:
                raise CheckFailed(f"GET {path} answered {response.status}")
            return await response.json()

    async def run(self) -> None:
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        tag = secrets.token_hex(3)
        first = Agent(self.server, crypto.AgentKeys.generate(), request_timeout=self.timeout)
        second = Agent(self.server, crypto.AgentKeys.generate(), request_timeout=self.timeout)
        text = f"smoke check {tag}"

        async def health() -> str:
            body = await self.get_json("/health")
            if body.get("status") != "healthy":
                raise CheckFailed(f"the server says {body.get('status')}: {body.get('failing')}")
            return f"components {', '.join(sorted(body.get('components', {})))}"

        async def register() -> str:
            self.agents.append(first)
            await first.register(f"check-{tag}-a")
            self.agents.append(second)
            await second.register(f"check-{tag}-b")
            return f"{first.did[-8:]}, {second.did[-8:]}"

        async def create() -> str:
            self.channel = await first.create_channel([second.did], name=f"smoke check {tag}")
            return self.channel

        async def send() -> str:
            await second.connect()
            seq = await first.send(self.channel, text)
            live = await second.next_message(self.timeout)
            if (live.seq, live.text) != (seq, text):
                raise CheckFailed(f"the live message reads {live.text!r} (#{live.seq}), not {text!r} (#{seq})")
            return f"#{seq}"

        async def history() -> str:
            found = [m for m in await second.history(self.channel) if m.text == text]
            if not found:
                raise CheckFailed("the message sent is not in the channel's history")
            return f"{len(found)} message decrypted"

        async def peek() -> str:
            self.peeker = Peeker(self.server, request_timeout=self.timeout)
            view = await self.peeker.open(self.channel)
            cancelled = await self.peeker.cancel()
            if cancelled.get("state") != "canceled":
                raise CheckFailed(f"the cancelled peek is {cancelled.get('state')!r}")
            return f"{view['id']} {view['state']} -> {cancelled['state']}"

        async def indicators() -> str:
            item = await self.get_json(f"/api/v1/indicators/{self.channel}")
            if item.get("channel") != self.channel:
                raise CheckFailed(f"the channel's indicators name {item.get('channel')!r}")
            listing = await self.get_json("/api/v1/indicators?limit=1")
            return f"{listing.get('total')} channels listed"

        async def page() -> str:
            assert self.http is not None
            async with self.http.get(self.server + "/") as response:
                if response.status != 200:
                    raise CheckFailed(f"the public page answered {response.status}")
            return None

        try:
            await self.step("health", health)
            await self.step("register two agents", register)
            await self.step("create a channel", create)
            await self.step("send, receive live", send)
            await self.step("read back from history", history)
            await self.step("open and cancel a peek", peek)
            await self.step("public indicators", indicators)
            await self.step("public page", page)
        finally:
            await self.clean_up()

    async def clean_up(self) -> None:
        """Remove what the check made; says what could not be removed, never fails the check."""
        started = time.monotonic()
        problems: list[str] = []
        if self.peeker is not None:
            await self.peeker.close()
        owner = self.agents[0] if self.agents else None
        if self.channel and owner is not None:
            try:
                await owner.delete_channel(self.channel)
            except (AgentChatClientError, OSError, aiohttp.ClientError) as exc:
                problems.append(f"channel {self.channel}: {exc}")
        for agent in self.agents:
            try:
                await agent.delete_account()
            except (AgentChatClientError, OSError, aiohttp.ClientError) as exc:
                problems.append(f"agent {agent.did}: {exc}")
            await agent.close()
        if self.http is not None:
            await self.http.close()
        elapsed = (time.monotonic() - started) * 1000
        if problems:
            self.say(f"warn clean up                     {elapsed:8.1f} ms  left behind: {'; '.join(problems)}")
        elif self.agents:
            self.say(f"ok   clean up                     {elapsed:8.1f} ms  channel and agents deleted")


async def run_check(server: str, out: TextIO, timeout: float = STEP_TIMEOUT) -> int:
    check = SmokeCheck(server, out, timeout=timeout)
    started = time.monotonic()
    try:
        await check.run()
    except CheckFailed as exc:
        check.say(f"FAIL {exc}")
        return 1
    check.say(f"all checks passed in {time.monotonic() - started:.2f} s against {check.server}")
    return 0
