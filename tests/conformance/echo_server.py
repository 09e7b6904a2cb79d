"""A test-only WebSocket echo route on AgentChat's own WebSocket layer, for the Autobahn|Testsuite.

``python -m tests.conformance.echo_server PORT`` serves ``ws://127.0.0.1:PORT/``: every text or binary
message comes back as it was sent, through the same ``FrontProtocol``, ``WebSocketConnection`` and
``FrameParser`` that serve ``/api/v1/ws``. Only the limits differ: the suite's 9.* cases send messages
of up to 16 MiB in up to 65,536 fragments, far over what a real route reads (those keep theirs).
It is never part of the product: it lives with the tests and is started by them.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any

from aiohttp import web

from agentchat.core import rfc6455 as codec
from agentchat.server.connections import WEBSOCKET_ROUTES, AgentChatRunner, WebSocketConnection

# The suite's largest message is 16 MiB; its most fragmented one 65,536 frames (9.3.1, 9.4.1).
MAX_MESSAGE_BYTES = 17 * 1024 * 1024


class EchoParser(codec.FrameParser):
    __slots__ = ()
    MAX_FRAGMENTS = 1 << 17


class EchoSocket(WebSocketConnection):
    __slots__ = ()
    parser_class = EchoParser

    def __init__(self, app: web.Application) -> None:
        super().__init__(MAX_MESSAGE_BYTES)

    async def message_received(self, data: bytes) -> None:
        self._echo(codec.text_frame(data))

    def binary_received(self, data: bytes) -> Coroutine[Any, Any, None]:
        return self._echo_binary(data)

    async def _echo_binary(self, data: bytes) -> None:
        self._echo(codec.binary_frame(data))

    def _echo(self, frame: bytes) -> None:
        # Not through ``out``: that is None while the write buffer is over its mark, and an echo
        # must not drop anything; the transport buffers it.
        if not self.closing and self.transport is not None:
            self.transport.write(frame)


async def serve(port: int) -> None:
    app = web.Application()
    app[WEBSOCKET_ROUTES] = {"/": EchoSocket}
    runner = AgentChatRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"echo serving on ws://127.0.0.1:{port}/", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    try:
        asyncio.run(serve(int(sys.argv[1])))
    except KeyboardInterrupt:
        pass
