"""A lean WebSocket client for the idle and connect-storm workloads: open, authenticate, hold.

A general client costs about half a millisecond of CPU per handshake (URL parsing, header objects,
timers), which caps a connect storm at the generator rather than the server. This one is an
``asyncio.Protocol`` that writes one fixed upgrade request, checks the ``101``, sends the first frame
(AgentChat ``hello`` / relay room / Socket.IO connect and ``join``), and is *ready* when the server
says so (``welcome`` / ``joined`` / the join ack). It then only answers pings (WebSocket ``ping`` ->
``pong``, Socket.IO ``2`` -> ``3``) so the server keeps it. Client frames use the all-zero masking
key, which RFC 6455 allows, so masking costs nothing.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import time
from typing import Any
from urllib.parse import urlsplit

OP_TEXT, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x8, 0x9, 0xA
ZERO_MASK = b"\x00\x00\x00\x00"


def client_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """One final, masked (zero key) client frame."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + ZERO_MASK + payload


def parse_frames(buffer: bytearray) -> list[tuple[int, bytes]]:
    """Complete server frames at the front of ``buffer`` as (opcode, payload), removed from it.
    Server frames are unmasked; fragments are returned as they come (these sessions read only short
    control answers)."""
    frames = []
    while len(buffer) >= 2:
        opcode = buffer[0] & 0x0F
        length = buffer[1] & 0x7F
        at = 2
        if length == 126:
            if len(buffer) < 4:
                break
            length = struct.unpack_from("!H", buffer, 2)[0]
            at = 4
        elif length == 127:
            if len(buffer) < 10:
                break
            length = struct.unpack_from("!Q", buffer, 2)[0]
            at = 10
        if len(buffer) < at + length:
            break
        frames.append((opcode, bytes(buffer[at:at + length])))
        del buffer[:at + length]
    return frames


def upgrade_request(url: str) -> bytes:
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()


class Session(asyncio.Protocol):
    """One held session; ``ready`` resolves once the server accepted it (or fails with the reason)."""

    def __init__(self, protocol: str, request: bytes, spec: dict[str, Any]) -> None:
        self.protocol = protocol
        self.request = request
        self.spec = spec
        self.ready: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.started = time.perf_counter()
        self.transport: asyncio.Transport | None = None
        self.upgraded = False
        self.buffer = bytearray()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(f"connection lost: {exc!r}")

    def _fail(self, reason: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason[:300]))

    def _send(self, payload: bytes, opcode: int = OP_TEXT) -> None:
        assert self.transport is not None
        self.transport.write(client_frame(payload, opcode))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(self.buffer[:self.buffer.find(b"\r\n")])
            if b" 101 " not in status + b" ":
                self._fail(f"upgrade refused: {status.decode(errors='replace')}")
                self.transport.close()  # type: ignore[union-attr]
                return
            del self.buffer[:end + 4]
            self.upgraded = True
            if self.protocol == "agentchat":
                self._send(json.dumps({"type": "hello", "token": self.spec["token"]}).encode())
            elif self.protocol == "ws":
                self._send(self.spec.get("room", "lobby").encode())
        for opcode, payload in parse_frames(self.buffer):
            if opcode == OP_PING:
                self._send(payload, OP_PONG)
            elif opcode == OP_CLOSE:
                self._fail(f"closed by the server: {payload[2:].decode(errors='replace')}")
            elif opcode in (OP_TEXT, 0x2, 0x0):
                self._on_message(payload)

    def _on_message(self, payload: bytes) -> None:
        if self.protocol == "agentchat":
            for line in payload.split(b"\n"):
                if line.startswith(b'{"type":"welcome"'):
                    self._ready()
                elif line.startswith(b'{"type":"error"'):
                    self._fail(line.decode(errors="replace"))
        elif self.protocol == "ws":
            if payload == b"joined":
                self._ready()
        elif payload == b"2":
            self._send(b"3")
        elif payload.startswith(b"0{"):
            self._send(b"40")
        elif payload.startswith(b"40"):
            self._send(b'420["join",' + json.dumps(self.spec.get("room", "lobby")).encode() + b"]")
        elif payload.startswith(b"430"):
            self._ready()
        elif payload.startswith(b"44"):
            self._fail("socket.io connect error: " + payload.decode(errors="replace"))

    def _ready(self) -> None:
        if not self.ready.done():
            self.ready.set_result(time.perf_counter() - self.started)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()


async def open_session(protocol: str, url: str, spec: dict[str, Any], source: str | None,
                       timeout: float = 30.0) -> tuple[Session, float]:
    """Connect (from ``source`` if given), upgrade, authenticate/join; returns the session and the
    seconds from the first SYN to ready."""
    parts = urlsplit(url)
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        if source:
            sock.setsockopt(socket.SOL_IP, getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24), 1)
            sock.bind((source, 0))
        await loop.sock_connect(sock, (parts.hostname or "127.0.0.1", parts.port or 80))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    session = Session(protocol, upgrade_request(url), spec)
    session.started = started
    await loop.create_connection(lambda: session, sock=sock)
    try:
        seconds = await asyncio.wait_for(session.ready, timeout)
    except BaseException:
        session.close()
        raise
    return session, seconds
