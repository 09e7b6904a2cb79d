"""A server process and its open-files limit: raised to the hard limit at start, and what happens when
every file descriptor is taken (sessions refused, the server alive, and back once sockets close)."""

from __future__ import annotations

import asyncio
import re
import secrets
from pathlib import Path

import pytest

from agentchat import crypto
from agentchat.client import Agent
from tests.e2e.processes import ServerProcess

pytestmark = pytest.mark.slow


def open_files_limit(pid: int) -> tuple[int, int]:
    limits = Path(f"/proc/{pid}/limits").read_text()
    soft, hard = re.search(r"Max open files\s+(\d+)\s+(\d+)", limits).groups()  # type: ignore[union-attr]
    return int(soft), int(hard)


def test_serve_raises_its_open_files_limit_to_the_hard_limit(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    server = ServerProcess(store=f"file://{tmp_path}/data", log_path=log, open_files=(256, 2048)).start()
    try:
        assert server.process is not None
        assert open_files_limit(server.process.pid) == (2048, 2048)
        said = log.read_text()
        assert "open files 2048" in said
        assert "may open only 2048 files" in said  # fewer than a real load needs: it says so
    finally:
        server.close()


async def test_a_server_out_of_file_descriptors_stays_up_and_serves_again_once_sockets_close(
        tmp_path: Path) -> None:
    server = ServerProcess(store=f"file://{tmp_path}/data", log_path=tmp_path / "server.log",
                           open_files=(160, 160)).start()
    alice = Agent(server.url, crypto.AgentKeys.generate())
    await alice.register("alice")
    channel = await alice.create_channel([], name="crowded")
    crowd: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        # Far more connections than the process has descriptors for, each a WebSocket upgrade request
        for _ in range(220):
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", server.port), 5)
            writer.write(b"GET /api/v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
            crowd.append((reader, writer))
        answers = await asyncio.gather(*(asyncio.wait_for(reader.read(12), 5) for reader, _ in crowd),
                                       return_exceptions=True)
        upgraded = sum(answer == b"HTTP/1.1 101" for answer in answers)
        assert 100 < upgraded < len(crowd)  # as many as fit, then the rest turned away
        assert all(answer in (b"HTTP/1.1 101", b"") or isinstance(answer, ConnectionError) for answer in answers)
        assert server.process is not None and server.process.poll() is None  # still running
    finally:
        for _, writer in crowd:
            writer.close()
    # Every descriptor back: the same process serves sessions and stores messages again.
    text = f"after the crowd {secrets.token_hex(4)}"
    for _ in range(100):
        try:
            await alice.connect()
            break
        except Exception:  # noqa: BLE001 - retried until the server has descriptors again
            await asyncio.sleep(0.1)
    try:
        seq = await asyncio.wait_for(alice.send(channel, text), 15)
        assert seq >= 1
        history = await alice.history(channel)
        assert [m.text for m in history][-1] == text
    finally:
        await alice.close()
        server.close()
