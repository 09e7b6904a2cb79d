"""A TCP proxy that tests put between a server and a backend to make the backend fail on demand."""

from __future__ import annotations

import asyncio
import contextlib
import threading


class FaultProxy:
    """Forwards 127.0.0.1:<port> to ``target``. ``mode``: ``pass`` forwards; ``refuse`` drops every
    connection (new and open ones); ``stall`` accepts and forwards nothing (a backend that hangs).

    It runs its own event loop in a thread, so it keeps forwarding while the test blocks (for example
    while it waits for a server process to start)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.mode = "pass"
        self.port = 0
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)

    def start(self) -> FaultProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        return self

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def set_mode(self, mode: str) -> None:
        assert mode in ("pass", "refuse", "stall")

        def apply() -> None:
            self.mode = mode
            if mode == "refuse":
                for writer in list(self._open):
                    writer.close()

        self._loop.call_soon_threadsafe(apply)

    def close(self) -> None:
        async def shut() -> None:
            if self._server is not None:
                self._server.close()
                for writer in list(self._open):
                    writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._server.wait_closed(), 2)

        asyncio.run_coroutine_threadsafe(shut(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "refuse":
            writer.close()
            return
        self._open.add(writer)
        try:
            if self.mode == "stall":
                while self.mode == "stall":
                    await asyncio.sleep(0.05)
                return  # drop a stalled connection once the fault ends; the client reconnects
            up_reader, up_writer = await asyncio.open_connection(*self.target)
            self._open.add(up_writer)
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except OSError:
            pass
        finally:
            self._open.discard(writer)
            writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data or self.mode != "pass":
                    break
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            self._open.discard(writer)
            writer.close()
