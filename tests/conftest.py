"""Fixtures shared by the server and end-to-end tests."""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from agentchat import crypto
from agentchat.client import Agent
from agentchat.config import Settings, load_settings
from agentchat.server.app import build_app
from agentchat.server.connections import AgentChatRunner

REPO = Path(__file__).resolve().parents[1]

# Tests press Ctrl-C (send SIGINT) in the CLI and server processes they start. A suite started as a
# background job of a non-interactive shell inherits SIGINT ignored, and so would those processes (a
# program started that way keeps ignoring it): give them a terminal's default instead.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(env={}, store=f"file://{tmp_path}/data", token_secret="t" * 40)


class AgentChatTestServer(TestServer):
    """The application served the way ``agentchat serve`` serves it: WebSocket routes straight from
    the listening socket (``server/connections.py``), everything else through aiohttp."""

    async def _make_runner(self, **kwargs: Any) -> AgentChatRunner:
        return AgentChatRunner(self.app, **kwargs)


@pytest.fixture
def aiohttp_client(aiohttp_client: Any) -> Any:
    """pytest-aiohttp's ``aiohttp_client``, serving applications through ``AgentChatTestServer``."""

    async def serve(app_or_server: Any, **kwargs: Any) -> TestClient:
        if isinstance(app_or_server, web.Application):
            app_or_server = AgentChatTestServer(app_or_server)
        # A connection per request, as the SDK and browsers open a fresh one per socket: a WebSocket
        # then comes as its connection's first request and takes the road production traffic takes
        # (the listening socket's own upgrade, server/connections.py), not the keep-alive fallback
        # through aiohttp (covered on its own in tests/server/websocket/).
        kwargs.setdefault("connector", aiohttp.TCPConnector(force_close=True))
        return await aiohttp_client(app_or_server, **kwargs)

    return serve


@pytest.fixture
async def client(aiohttp_client: Any, settings: Settings) -> TestClient:
    return await aiohttp_client(build_app(settings))


class RestAgent:
    """An agent driven by hand over REST, for tests of exact requests and answers."""

    def __init__(self, client: TestClient, name: str) -> None:
        self.client = client
        self.name = name
        self.keys = crypto.AgentKeys.generate()
        self.did = self.keys.did
        self.token = ""

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def registration(self, name: str | None = None, timestamp: int | None = None) -> dict[str, Any]:
        name = name or self.name
        timestamp = timestamp or int(time.time() * 1000)
        message = crypto.registration_message(name, self.keys.public, timestamp)
        return {"name": name, "keys": self.keys.public.to_wire(), "timestamp": timestamp,
                "signature": crypto.b64e(self.keys.sign(message))}

    async def register(self) -> RestAgent:
        response = await self.client.post("/api/v1/agents/register", json=self.registration())
        assert response.status == 201, await response.text()
        self.token = (await response.json())["token"]
        return self

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        response = await self.client.request(method, path, headers=self.auth, **kwargs)
        return response.status, await response.json()


@pytest.fixture
def make_agent(client: TestClient):
    async def make(name: str = "agent") -> RestAgent:
        return await RestAgent(client, name).register()
    return make


@pytest.fixture
async def sdk_agents(client: TestClient) -> AsyncIterator[Any]:
    """Factory of registered SDK agents talking to the test server; closed at the end."""
    made: list[Agent] = []

    async def make(name: str = "agent") -> Agent:
        agent = Agent(str(client.make_url("")).rstrip("/"), crypto.AgentKeys.generate())
        await agent.register(name)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        await agent.close()
