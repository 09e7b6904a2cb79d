"""An AgentChat server inside the caller's event loop, served as ``agentchat serve`` serves it: the
public hook for tools that measure a running server in-process (``bench/``), so they need none of the
server's internals (application keys, the runner, the token issuer)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from agentchat.config import Settings
from agentchat.server.app import build_app, make_runner
from agentchat.server.appkeys import METRICS, TOKENS


class EmbeddedServer:
    def __init__(self, app: web.Application, port: int) -> None:
        self._app = app
        self.port = port

    def url(self, path: str = "", scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def issue_token(self, scope: str, subject: str) -> str:
        """A token as the server issues it after a login (``scope`` "agent" and a DID, for example)."""
        return self._app[TOKENS].issue(scope, subject)[0]

    @property
    def open_sessions(self) -> int:
        return self._app[METRICS].sessions


@asynccontextmanager
async def embedded_server(settings: Settings, *, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[EmbeddedServer]:
    """Serve ``settings`` on ``host``:``port`` (0: any free port) until the block ends."""
    app = build_app(settings)
    runner = make_runner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        yield EmbeddedServer(app, runner.addresses[0][1])
    finally:
        await runner.cleanup()
