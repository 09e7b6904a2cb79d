"""What one client address may hold open: WebSockets up to a cap (behind trusted proxies, counted by
the forwarded address), and an idle HTTP keep-alive connection only ``KEEPALIVE_TIMEOUT``."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agentchat.config import load_settings
from agentchat.server import connections
from agentchat.server.app import build_app


def _settings(tmp_path: Path, **overrides: Any) -> Any:
    return load_settings(env={}, store=f"file://{tmp_path}/data", token_secret="t" * 40, **overrides)


async def _refused(client: Any, path: str, **kwargs: Any) -> int:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(path, **kwargs)
    return refused.value.status


@pytest.mark.parametrize("path", ["/api/v1/ws", "/api/v1/indicators/ws"])
async def test_sockets_per_address_are_capped_and_a_closed_one_frees_its_place(
        aiohttp_client: Any, tmp_path: Path, path: str) -> None:
    client = await aiohttp_client(build_app(_settings(tmp_path, max_connections_per_address=3)))
    sockets = [await client.ws_connect(path) for _ in range(3)]
    assert await _refused(client, path) == 429
    response = await client.get(path, headers={"Connection": "Upgrade", "Upgrade": "websocket",
                                               "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    refusal = (await response.json())["error"]
    assert (response.status, refusal["code"]) == (429, "rate_limited") and "open sockets" in refusal["message"]
    await sockets.pop().close()
    for _ in range(50):  # the server sees the close a moment later
        try:
            sockets.append(await client.ws_connect(path))
            break
        except aiohttp.WSServerHandshakeError:
            await asyncio.sleep(0.05)
    assert len(sockets) == 3
    for socket in sockets:
        await socket.close()


async def test_behind_a_trusted_proxy_the_forwarded_address_is_counted(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(build_app(_settings(tmp_path, max_connections_per_address=2, trusted_proxies=1)))

    def via(address: str) -> dict[str, Any]:
        return {"headers": {"X-Forwarded-For": f"203.0.113.9, {address}"}}

    sockets = [await client.ws_connect("/api/v1/ws", **via("198.51.100.1")) for _ in range(2)]
    sockets += [await client.ws_connect("/api/v1/ws", **via("198.51.100.2")) for _ in range(2)]
    assert await _refused(client, "/api/v1/ws", **via("198.51.100.1")) == 429
    for socket in sockets:
        await socket.close()


async def test_no_cap_when_set_to_zero(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(build_app(_settings(tmp_path, max_connections_per_address=0)))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        sockets = [await session.ws_connect(client.make_url("/api/v1/ws")) for _ in range(270)]
        assert all(not socket.closed for socket in sockets)  # past the default of 256
        for socket in sockets:
            await socket.close()


async def test_an_idle_keep_alive_connection_is_closed(aiohttp_client: Any, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert connections.KEEPALIVE_TIMEOUT == 75.0  # aiohttp alone would keep it about an hour
    monkeypatch.setattr(connections, "KEEPALIVE_TIMEOUT", 0.5)  # the same path, quickly
    client = await aiohttp_client(build_app(_settings(tmp_path)))
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        await reader.readexactly(length)
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the server, not by this test
    finally:
        writer.close()


async def test_the_sockets_of_one_address_share_one_count_and_nothing_is_counted_without_a_cap(
        aiohttp_client: Any, tmp_path: Path) -> None:
    """Each open socket holds a reference to its address's one count, not a copy of the address (an
    idle socket's bytes are the server's memory per session); with no cap nothing is counted."""
    capped = await aiohttp_client(build_app(_settings(tmp_path / "capped", max_connections_per_address=5)))
    limit = capped.app[connections.ADDRESS_LIMIT]
    sockets = [await capped.ws_connect("/api/v1/ws") for _ in range(3)]
    assert [(address, count.open) for address, count in limit.open.items()] == [("127.0.0.1", 3)]
    for socket in sockets:
        await socket.close()
    for _ in range(100):  # the server sees the closes a moment later
        if not limit.open:
            break
        await asyncio.sleep(0.05)
    assert limit.open == {}

    uncapped = await aiohttp_client(build_app(_settings(tmp_path / "uncapped", max_connections_per_address=0)))
    sockets = [await uncapped.ws_connect("/api/v1/ws") for _ in range(3)]
    assert uncapped.app[connections.ADDRESS_LIMIT].open == {}
    for socket in sockets:
        await socket.close()
