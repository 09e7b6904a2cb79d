"""The WebSocket layer of ``server/connections.py`` over real sockets.

Fresh connections are upgraded by ``FrontProtocol`` straight from the listening socket; an upgrade on
a keep-alive connection that served HTTP first is answered through aiohttp (``upgrade_within_aiohttp``).
Raw-byte tests write client frames with the ``websockets`` serializer and read server frames by hand.
Write-side flow control is tested here on raw sockets that stop reading (the transport paused for
writing, then drained; a queue over ``send_queue_max`` closed with 4008). Covered elsewhere and not
repeated here: slow consumers seen through aiohttp's client and flooding sockets (``test_ws.py``, served
by ``AgentChatTestServer``), the public indicators socket (``test_indicators.py``).
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import socket
from pathlib import Path
from typing import Any

import orjson
import pytest
import websockets
from websockets.frames import Close, Frame, Opcode

from agentchat.config import load_settings
from agentchat.core.frames import split_frames
from agentchat.core.rfc6455 import accept_key
from agentchat.server import connections as websocket_module
from agentchat.server import agent_socket as ws_module
from agentchat.server.app import build_app
from agentchat.server.appkeys import HUB, SESSIONS
from agentchat.server.session import Session
from tests.conftest import RestAgent
from tests.server.test_rest import create_channel, envelope
from tests.services import redis_server  # noqa: F401  (fixture)

TIMEOUT = 5.0


# ------------------------------------------------------------------------------ raw connections


class RawConnection:
    """One TCP connection to the test server, spoken to byte by byte."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.frames: list[dict[str, Any]] = []  # text frames read but not yet asked for

    @classmethod
    async def open(cls, client: Any) -> RawConnection:
        reader, writer = await asyncio.open_connection(client.host, client.port)
        return cls(reader, writer)

    def close(self) -> None:
        self.writer.close()

    # -- HTTP

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        """The next HTTP response: status, headers (lower-case names) and body."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        status = int(status_line.split(" ")[1])
        if status == 101:
            return status, headers, b""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int((await asyncio.wait_for(self.reader.readuntil(b"\r\n"), TIMEOUT)).strip(), 16)
                chunk = await asyncio.wait_for(self.reader.readexactly(size + 2), TIMEOUT)
                if not size:
                    break
                body += chunk[:-2]
        else:
            body = await asyncio.wait_for(self.reader.readexactly(int(headers.get("content-length", "0"))), TIMEOUT)
        return status, headers, body

    async def upgrade(self, path: str = "/api/v1/ws", **extra: str) -> tuple[int, dict[str, str], bytes]:
        """Send an upgrade request (headers in ``extra`` replace the usual ones) and read the answer;
        a 101's ``Sec-WebSocket-Accept`` is checked."""
        key = base64.b64encode(os.urandom(16)).decode()
        self.writer.write(upgrade_request(path, key, **extra))
        answer = await self.response()
        if answer[0] == 101:
            assert answer[1]["sec-websocket-accept"] == accept_key(key)
            assert answer[1]["upgrade"].lower() == "websocket"
        return answer

    # -- WebSocket

    def send_frame(self, opcode: Opcode, data: bytes) -> None:
        self.writer.write(Frame(opcode, data).serialize(mask=True))

    def send_json(self, frame: dict[str, Any]) -> None:
        self.send_frame(Opcode.TEXT, orjson.dumps(frame))

    def send_close(self, code: int, reason: str = "") -> None:
        self.send_frame(Opcode.CLOSE, Close(code, reason).serialize())

    async def read_frame(self) -> tuple[int, bytes]:
        """The next server frame, as (opcode, payload); server frames are never masked."""
        first, second = await asyncio.wait_for(self.reader.readexactly(2), TIMEOUT)
        assert not second & 0x80, "server frames are not masked"
        assert first & 0x80, "the server sends no fragmented messages"
        length = second & 0x7F
        if length == 126:
            length = int.from_bytes(await asyncio.wait_for(self.reader.readexactly(2), TIMEOUT), "big")
        elif length == 127:
            length = int.from_bytes(await asyncio.wait_for(self.reader.readexactly(8), TIMEOUT), "big")
        payload = await asyncio.wait_for(self.reader.readexactly(length), TIMEOUT) if length else b""
        return first & 0x0F, payload

    async def next_json(self, skip: str | None = None) -> dict[str, Any]:
        """The next frame of the protocol (one text message may carry several), frames of type
        ``skip`` left out."""
        while True:
            while not self.frames:
                opcode, payload = await self.read_frame()
                assert opcode == Opcode.TEXT, (opcode, payload)
                self.frames.extend(split_frames(payload))
            frame = self.frames.pop(0)
            if frame["type"] != skip:
                return frame

    async def close_frame(self) -> tuple[int, str]:
        """Read up to the server's close frame (text frames before it are kept); its code and reason."""
        while True:
            opcode, payload = await self.read_frame()
            if opcode == Opcode.TEXT:
                self.frames.extend(split_frames(payload))
                continue
            assert opcode == Opcode.CLOSE, (opcode, payload)
            close = Close.parse(payload)
            return close.code, close.reason

    async def at_eof(self) -> bool:
        """True once the server has closed the TCP connection (nothing more arrives)."""
        try:
            rest = await asyncio.wait_for(self.reader.read(), TIMEOUT)
        except ConnectionResetError:
            return True
        assert rest == b"", rest
        return True


def upgrade_request(path: str, key: str, method: str = "GET", **extra: str) -> bytes:
    headers = {"Host": "localhost", "Upgrade": "websocket", "Connection": "Upgrade",
               "Sec-WebSocket-Key": key, "Sec-WebSocket-Version": "13"}
    headers.update({name.replace("_", "-"): value for name, value in extra.items()})
    lines = [f"{method} {path} HTTP/1.1"] + [f"{name}: {value}" for name, value in headers.items() if value]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def get_request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()


async def raw_socket(client: Any, token: str | None = None) -> RawConnection:
    """A fresh connection upgraded to /api/v1/ws, welcomed if a token is given."""
    conn = await RawConnection.open(client)
    status, _, _ = await conn.upgrade()
    assert status == 101
    if token is not None:
        conn.send_json({"type": "hello", "ref": "h", "token": token})
        welcome = await conn.next_json()
        assert welcome["type"] == "welcome", welcome
    return conn


def send_frame(agent: RestAgent, channel: str, key: bytes, i: int) -> dict[str, Any]:
    return {"type": "send", "ref": f"r{i}", "channel": channel, "client_id": f"m{i}",
            "envelope": envelope(agent, channel, key, f"message {i}", f"m{i}")}


# ------------------------------------------------------------------------------ websockets clients


def ws_url(client: Any, path: str = "/api/v1/ws") -> str:
    return f"ws://{client.host}:{client.port}{path}"


async def ws_next(ws: Any, pending: list[dict[str, Any]]) -> dict[str, Any]:
    while not pending:
        pending.extend(split_frames(await asyncio.wait_for(ws.recv(), TIMEOUT)))
    return pending.pop(0)


async def ws_hello(client: Any, token: str) -> tuple[Any, list[dict[str, Any]]]:
    ws = await websockets.connect(ws_url(client), open_timeout=TIMEOUT)
    await ws.send(orjson.dumps({"type": "hello", "ref": "h", "token": token}).decode())
    pending: list[dict[str, Any]] = []
    welcome = await ws_next(ws, pending)
    assert welcome["type"] == "welcome" and welcome["ref"] == "h", welcome
    return ws, pending


# ------------------------------------------------------------------------------ upgrades


async def test_fresh_connection_is_welcomed_and_a_send_is_acked_and_delivered(client, make_agent) -> None:
    alice, bob = await make_agent("alice"), await make_agent("bob")
    channel, key = await create_channel(alice, [bob])
    ws_alice, from_alice = await ws_hello(client, alice.token)
    ws_bob, from_bob = await ws_hello(client, bob.token)
    try:
        await ws_alice.send(orjson.dumps(send_frame(alice, channel, key, 1)).decode())
        ack = await ws_next(ws_alice, from_alice)
        while ack["type"] == "message":  # her own message comes back to her too, before or after the ack
            ack = await ws_next(ws_alice, from_alice)
        assert (ack["type"], ack["ref"], ack["client_id"], ack["channel"]) == ("ack", "r1", "m1", channel)
        message = await ws_next(ws_bob, from_bob)
        assert (message["type"], message["channel"], message["seq"]) == ("message", channel, ack["seq"])
        assert message["sender"] == alice.did
    finally:
        await ws_alice.close()
        await ws_bob.close()


async def test_upgrade_on_a_keep_alive_connection_after_an_http_request(client, make_agent) -> None:
    alice, bob = await make_agent("alice"), await make_agent("bob")
    channel, key = await create_channel(alice, [bob])
    conn = await RawConnection.open(client)
    try:
        conn.writer.write(get_request("/health"))
        status, headers, body = await conn.response()
        assert status == 200 and orjson.loads(body)["status"] == "healthy"
        assert headers.get("connection", "").lower() != "close"
        status, _, _ = await conn.upgrade()  # the same connection: aiohttp answers this one
        assert status == 101
        conn.send_json({"type": "hello", "ref": "h", "token": alice.token})
        welcome = await conn.next_json()
        assert (welcome["type"], welcome["subject"], welcome["channels"]) == ("welcome", alice.did, [channel])
        ws_bob, from_bob = await ws_hello(client, bob.token)
        conn.send_json(send_frame(alice, channel, key, 1))
        ack = await conn.next_json(skip="message")
        assert (ack["type"], ack["ref"]) == ("ack", "r1")
        assert (await ws_next(ws_bob, from_bob))["seq"] == ack["seq"]
        await ws_bob.close()
        conn.send_frame(Opcode.PING, b"still here")
        assert await conn.read_frame() == (Opcode.PONG, b"still here")
        conn.send_close(1000)
        assert await conn.close_frame() == (1000, "")
        assert await conn.at_eof()
    finally:
        conn.close()


async def test_route_without_upgrade_headers_is_a_bad_upgrade(client) -> None:
    response = await client.get("/api/v1/ws")
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "bad_upgrade"


@pytest.mark.parametrize("headers", [
    {"Sec_WebSocket_Version": "8"},
    {"Upgrade": "", "Connection": "", "Sec_WebSocket_Key": "", "Sec_WebSocket_Version": ""},
], ids=["version-8", "no-upgrade-headers"])
async def test_bad_upgrade_on_a_raw_connection_is_a_400(client, headers: dict[str, str]) -> None:
    conn = await RawConnection.open(client)
    try:
        status, _, body = await conn.upgrade(**headers)
        assert status == 400 and orjson.loads(body)["error"]["code"] == "bad_upgrade"
    finally:
        conn.close()


async def test_public_indicators_socket_without_upgrade_headers_is_a_bad_upgrade(client) -> None:
    response = await client.get("/api/v1/indicators/ws")
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "bad_upgrade"


async def test_post_to_the_socket_route_is_not_upgraded(client) -> None:
    conn = await RawConnection.open(client)
    try:
        status, _, _ = await conn.upgrade(method="POST", Content_Length="0")
        assert status != 101 and status >= 400
    finally:
        conn.close()


async def test_http_routes_work_through_the_front_including_pipelined_requests(client) -> None:
    response = await client.get("/health")
    assert response.status == 200
    response = await client.get("/api/v1/no-such-route")
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "not_found"
    conn = await RawConnection.open(client)
    try:
        conn.writer.write(get_request("/health") + get_request("/api/v1/no-such-route") + get_request("/health"))
        answers = [await conn.response() for _ in range(3)]
        assert [status for status, _, _ in answers] == [200, 404, 200]
        assert orjson.loads(answers[1][2])["error"]["code"] == "not_found"
        conn.writer.write(get_request("/health"))  # still open for more
        assert (await conn.response())[0] == 200
    finally:
        conn.close()


# ------------------------------------------------------------------------------ protocol violations


@pytest.mark.parametrize("welcomed", [False, True], ids=["before-hello", "after-welcome"])
async def test_unmasked_frame_fails_the_connection_with_1002(client, make_agent, welcomed: bool) -> None:
    token = (await make_agent("alice")).token if welcomed else None
    conn = await raw_socket(client, token)
    try:
        conn.writer.write(Frame(Opcode.TEXT, b'{"type":"ping"}').serialize(mask=False))
        code, _ = await conn.close_frame()
        assert code == 1002
        assert await conn.at_eof()
    finally:
        conn.close()


async def test_frame_announcing_more_than_the_hard_limit_gets_1009(client, make_agent) -> None:
    conn = await raw_socket(client, (await make_agent("alice")).token)
    limit = load_settings(env={}).limits.max_frame_bytes * ws_module.HARD_FRAME_FACTOR
    try:
        # only the header and the mask: the server must not wait for the payload
        conn.writer.write(b"\x81\xff" + (limit + 1).to_bytes(8, "big") + os.urandom(4))
        code, _ = await conn.close_frame()
        assert code == 1009
        assert await conn.at_eof()
    finally:
        conn.close()


async def test_reserved_bit_fails_the_connection_with_1002(client) -> None:
    conn = await raw_socket(client)
    try:
        frame = bytearray(Frame(Opcode.TEXT, b'{"type":"ping"}').serialize(mask=True))
        frame[0] |= 0x40  # RSV1: no extension was negotiated
        conn.writer.write(bytes(frame))
        code, _ = await conn.close_frame()
        assert code == 1002
        assert await conn.at_eof()
    finally:
        conn.close()


@pytest.mark.parametrize("fragmented", [False, True], ids=["whole", "fragmented"])
async def test_text_message_that_is_not_utf8_fails_the_connection_with_1007(client, make_agent,
                                                                           fragmented: bool) -> None:
    conn = await raw_socket(client, (await make_agent("alice")).token)
    try:
        bad = b'{"type":"ping","ref":"\xc3\x28"}'  # 0xC3 starts a 2-byte character, 0x28 cannot end it
        if fragmented:
            conn.writer.write(Frame(Opcode.TEXT, bad[:21], fin=False).serialize(mask=True)
                              + Frame(Opcode.CONT, bad[21:]).serialize(mask=True))
        else:
            conn.send_frame(Opcode.TEXT, bad)
        code, _ = await conn.close_frame()
        assert code == 1007
        assert conn.frames == []  # no error frame: the connection failed
        assert await conn.at_eof()
    finally:
        conn.close()


async def test_fragmented_text_with_a_character_split_between_fragments_is_read(client, make_agent) -> None:
    conn = await raw_socket(client, (await make_agent("alice")).token)
    try:
        data = '{"type":"ping","ref":"é€𝄞"}'.encode()
        cut = data.index("€".encode()) + 1  # inside the 3-byte character
        conn.writer.write(Frame(Opcode.TEXT, data[:cut], fin=False).serialize(mask=True)
                          + Frame(Opcode.CONT, data[cut:]).serialize(mask=True))
        pong = await conn.next_json()
        assert (pong["type"], pong["ref"]) == ("pong", "é€𝄞")
    finally:
        conn.close()


async def test_a_message_read_together_with_a_violation_is_handled_before_the_connection_fails(
        client, make_agent) -> None:
    conn = await raw_socket(client, (await make_agent("alice")).token)
    try:
        conn.writer.write(Frame(Opcode.TEXT, b'{"type":"ping","ref":"first"}').serialize(mask=True)
                          + Frame(Opcode.TEXT, b'{"type":"ping"}').serialize(mask=False))  # unmasked
        code, _ = await conn.close_frame()
        assert code == 1002
        assert [(f["type"], f.get("ref")) for f in conn.frames] == [("pong", "first")]
        assert await conn.at_eof()
    finally:
        conn.close()


async def test_a_message_in_too_many_fragments_gets_1009(client, make_agent) -> None:
    conn = await raw_socket(client, (await make_agent("alice")).token)
    try:
        empty = Frame(Opcode.CONT, b"", fin=False).serialize(mask=True)
        conn.writer.write(Frame(Opcode.TEXT, b"{", fin=False).serialize(mask=True)
                          + empty * websocket_module.codec.FrameParser.MAX_FRAGMENTS)
        code, _ = await conn.close_frame()
        assert code == 1009
        assert await conn.at_eof()
    finally:
        conn.close()


async def test_before_hello_a_socket_may_not_send_more_than_one_frame_limit(client, make_agent) -> None:
    """An unauthenticated socket buffers at most max_frame_bytes: a bigger message is cut off from its
    header; once welcomed, the same size is read (and answered with too_large)."""
    limit = load_settings(env={}).limits.max_frame_bytes
    header = b"\x81\xff" + (limit + 1).to_bytes(8, "big") + os.urandom(4)
    conn = await raw_socket(client)
    try:
        conn.writer.write(header)
        code, _ = await conn.close_frame()
        assert code == 1009
        assert await conn.at_eof()
    finally:
        conn.close()
    conn = await raw_socket(client, (await make_agent("alice")).token)
    try:
        conn.send_frame(Opcode.TEXT, b'{"type":"ping","ref":"' + b"x" * limit + b'"}')
        assert (await conn.next_json())["code"] == "too_large"
    finally:
        conn.close()


# ------------------------------------------------------------------------------ close handshake, pings


async def test_client_close_is_answered_with_1000_and_the_tcp_close(client, make_agent) -> None:
    conn = await raw_socket(client, (await make_agent("alice")).token)
    try:
        conn.send_close(1000, "bye")
        assert (await conn.close_frame())[0] == 1000
        assert await conn.at_eof()
    finally:
        conn.close()


async def test_bad_hello_gets_an_error_then_close_4001_with_the_code(client) -> None:
    conn = await raw_socket(client)
    try:
        conn.send_json({"type": "hello", "ref": "h", "token": "nonsense"})
        code, reason = await conn.close_frame()
        assert [f.get("code") for f in conn.frames] == ["token_invalid"]
        assert (code, reason) == (4001, "token_invalid")
        conn.send_close(code)  # the server started the handshake: it closes once answered
        assert await conn.at_eof()
    finally:
        conn.close()


async def test_ping_is_answered_with_a_pong_of_the_same_payload(client, make_agent) -> None:
    conn = await raw_socket(client)  # before the hello too
    try:
        conn.send_frame(Opcode.PING, b"before")
        assert await conn.read_frame() == (Opcode.PONG, b"before")
        conn.send_json({"type": "hello", "token": (await make_agent("alice")).token})
        assert (await conn.next_json())["type"] == "welcome"
        payload = secrets.token_bytes(125)
        conn.send_frame(Opcode.PING, payload)
        assert await conn.read_frame() == (Opcode.PONG, payload)
    finally:
        conn.close()


async def test_no_hello_in_time_gets_auth_required_and_close_4001(client, monkeypatch) -> None:
    monkeypatch.setattr(ws_module, "HELLO_TIMEOUT", 0.2)
    conn = await raw_socket(client)
    try:
        code, reason = await conn.close_frame()
        assert [(f["type"], f["code"]) for f in conn.frames] == [("error", "auth_required")]
        assert (code, reason) == (4001, "auth_required")
        conn.send_close(code)
        assert await conn.at_eof()
    finally:
        conn.close()


# ------------------------------------------------------------------------------ pipelined frames


async def pipelined_sends_are_acked_in_order(client: Any) -> None:
    alice, bob = await RestAgent(client, "alice").register(), await RestAgent(client, "bob").register()
    channel, key = await create_channel(alice, [bob])
    conn = await raw_socket(client, alice.token)
    bob_conn = await raw_socket(client, bob.token)
    try:
        conn.writer.write(b"".join(Frame(Opcode.TEXT, orjson.dumps(send_frame(alice, channel, key, i)))
                                   .serialize(mask=True) for i in range(50)))
        acks = [await conn.next_json(skip="message") for _ in range(50)]
        assert [(a["type"], a["ref"]) for a in acks] == [("ack", f"r{i}") for i in range(50)]
        seqs = [a["seq"] for a in acks]
        assert seqs == sorted(set(seqs))
        delivered = [await bob_conn.next_json() for _ in range(50)]
        assert [m["seq"] for m in delivered] == seqs
        # the socket still answers after the run
        conn.send_json({"type": "ping", "ref": "after"})
        assert (await conn.next_json(skip="message"))["ref"] == "after"
    finally:
        conn.close()
        bob_conn.close()


async def test_frames_pipelined_in_one_write_are_acked_in_order(client) -> None:
    await pipelined_sends_are_acked_in_order(client)


async def test_frames_pipelined_in_one_write_wait_their_turn_behind_a_redis_round_trip(
        aiohttp_client, tmp_path: Path, redis_server) -> None:  # noqa: F811
    settings = load_settings(env={}, store=f"file://{tmp_path}/data", token_secret="t" * 40,
                             bus=f"{redis_server.url}?namespace=wslayer{secrets.token_hex(4)}")
    await pipelined_sends_are_acked_in_order(await aiohttp_client(build_app(settings)))


# ------------------------------------------------------------------------------ shutdown


@pytest.mark.parametrize("road", ["fresh", "after-http"])
async def test_sockets_get_1001_when_the_server_shuts_down(aiohttp_client, tmp_path: Path, road: str) -> None:
    settings = load_settings(env={}, store=f"file://{tmp_path}/data", token_secret="t" * 40)
    client = await aiohttp_client(build_app(settings))
    alice = await RestAgent(client, "alice").register()
    conn = await RawConnection.open(client)
    try:
        if road == "after-http":
            conn.writer.write(get_request("/health"))
            assert (await conn.response())[0] == 200
        assert (await conn.upgrade())[0] == 101
        conn.send_json({"type": "hello", "token": alice.token})
        assert (await conn.next_json())["type"] == "welcome"
        shutdown = asyncio.create_task(client.server.close())
        code, reason = await conn.close_frame()
        assert (code, reason) == (1001, "shutting_down")
        conn.send_close(1001)
        assert await conn.at_eof()
        await asyncio.wait_for(shutdown, TIMEOUT)
    finally:
        conn.close()


async def test_a_socket_still_waiting_for_hello_gets_1001_when_the_server_shuts_down(client) -> None:
    conn = await RawConnection.open(client)
    try:
        assert (await conn.upgrade())[0] == 101
        shutdown = asyncio.create_task(client.server.close())
        assert await conn.close_frame() == (1001, "shutting_down")
        conn.send_close(1001)
        assert await conn.at_eof()
        await asyncio.wait_for(shutdown, TIMEOUT)
    finally:
        conn.close()


# ------------------------------------------------------------------------------ write-side flow control


async def stalled_socket(client: Any, agent: RestAgent, buffer: int = 4096) -> tuple[RawConnection, Session]:
    """A fresh connection upgraded to /api/v1/ws and welcomed, and the server's session for it. Both
    ends hold little of what the client does not read (a small receive buffer and stream buffer on the
    client's socket, a small send buffer on the server's, so that kernel autotuning does not decide how
    much fits): once the client stops reading, the server's side backs up after a few KB."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)  # before connecting: sets the window
    sock.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (client.host, client.port)), TIMEOUT)
    except BaseException:
        sock.close()
        raise
    reader, writer = await asyncio.open_connection(sock=sock, limit=buffer)
    conn = RawConnection(reader, writer)
    status, _, _ = await conn.upgrade()
    assert status == 101
    conn.send_json({"type": "hello", "ref": "h", "token": agent.token})
    welcome = await conn.next_json()
    assert welcome["type"] == "welcome", welcome
    sessions = [s for s in client.server.app[SESSIONS] if s.principal.subject == agent.did]
    assert len(sessions) == 1, sessions
    server_transport = sessions[0].connection.transport
    assert server_transport is not None
    server_transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
    return conn, sessions[0]


async def until(predicate: Any, what: str) -> None:
    """Poll ``predicate`` with short sleeps until it holds (at most ``TIMEOUT``)."""
    for _ in range(int(TIMEOUT / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")


def large_send(agent: RestAgent, channel: str, key: bytes, i: int, size: int = 8_000) -> bytes:
    """A masked send frame carrying a message of ``size`` bytes."""
    text = f"message {i} ".ljust(size, "x")
    frame = {"type": "send", "ref": f"r{i}", "channel": channel, "client_id": f"m{i}",
             "envelope": envelope(agent, channel, key, text, f"m{i}")}
    return Frame(Opcode.TEXT, orjson.dumps(frame)).serialize(mask=True)


async def test_a_reader_that_pauses_then_resumes_gets_every_message_in_order(client, make_agent,
                                                                            monkeypatch) -> None:
    monkeypatch.setattr(websocket_module, "WRITE_BUFFER_HIGH", 4096)  # read when each connection is made
    alice, bob = await make_agent("alice"), await make_agent("bob")
    channel, key = await create_channel(alice, [bob])
    bob_conn, bob_session = await stalled_socket(client, bob)  # reads nothing more until told
    bob_socket = bob_session.connection
    alice_conn = await raw_socket(client, alice.token)
    count = 300
    try:
        assert not bob_socket.write_paused
        alice_conn.writer.write(b"".join(large_send(alice, channel, key, i) for i in range(count)))
        acks = [await alice_conn.next_json(skip="message") for _ in range(count)]
        assert [(a["type"], a["ref"]) for a in acks] == [("ack", f"r{i}") for i in range(count)]
        seqs = [a["seq"] for a in acks]
        assert seqs == list(range(1, count + 1))
        # ~2.5 MB for bob, who reads nothing: his side of the connection is paused for writing
        await until(lambda: bob_socket.write_paused, "bob's connection paused for writing")
        assert not bob_socket.closing and not bob_session.closed
        delivered = [await bob_conn.next_json() for _ in range(count)]  # bob reads again
        assert [(m["type"], m["channel"], m["seq"]) for m in delivered] == [("message", channel, s) for s in seqs]
        assert [m["client_id"] for m in delivered] == [f"m{i}" for i in range(count)]
        # nothing after the last one but the answer to a ping (no duplicate), and writing resumed
        bob_conn.send_json({"type": "ping", "ref": "after"})
        pong = await bob_conn.next_json()
        assert (pong["type"], pong["ref"]) == ("pong", "after")
        assert not bob_socket.write_paused and bob_socket.out is not None
    finally:
        alice_conn.close()
        bob_conn.close()


async def test_a_reader_that_never_reads_is_closed_4008_and_the_others_keep_getting_messages(
        aiohttp_client, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(websocket_module, "WRITE_BUFFER_HIGH", 4096)
    settings = load_settings(env={}, store=f"file://{tmp_path}/data", token_secret="t" * 40, send_queue_max=50)
    client = await aiohttp_client(build_app(settings))
    alice = await RestAgent(client, "alice").register()
    slow = await RestAgent(client, "slow").register()
    fast = await RestAgent(client, "fast").register()
    channel, key = await create_channel(alice, [slow, fast])
    slow_conn, slow_session = await stalled_socket(client, slow)  # never reads until it is closed
    fast_conn = await raw_socket(client, fast.token)
    alice_conn = await raw_socket(client, alice.token)
    seqs: list[int] = []

    async def send_batch(first: int, size: int = 10) -> None:
        # few enough at a time that alice's and fast's own queues (acks, messages) stay under 50
        alice_conn.writer.write(b"".join(large_send(alice, channel, key, i) for i in range(first, first + size)))
        acks = [await alice_conn.next_json(skip="message") for _ in range(size)]
        assert [(a["type"], a["ref"]) for a in acks] == [("ack", f"r{i}") for i in range(first, first + size)]
        delivered = [await fast_conn.next_json() for _ in range(size)]  # fast reads every one
        assert [(m["type"], m["seq"]) for m in delivered] == [("message", a["seq"]) for a in acks]
        seqs.extend(a["seq"] for a in acks)

    try:
        while not slow_session.closed and len(seqs) < 1000:
            await send_batch(len(seqs))
        assert slow_session.closed, "the reader that never reads was not closed"
        assert not fast_conn.writer.is_closing()
        for _ in range(3):  # the others keep getting messages
            await send_batch(len(seqs))
        assert seqs == list(range(1, len(seqs) + 1))
        # what was written before the close reaches the slow reader in order, then the close frame
        code, reason = await slow_conn.close_frame()
        assert (code, reason) == (4008, "slow_consumer")
        got = [f["seq"] for f in slow_conn.frames if f["type"] == "message"]
        assert got == seqs[:len(got)]
        slow_conn.send_close(code)
        assert await slow_conn.at_eof()
        await until(lambda: slow_session not in client.server.app[SESSIONS], "the slow session forgotten")
        fast_conn.send_json({"type": "ping", "ref": "after"})
        assert (await fast_conn.next_json())["ref"] == "after"
    finally:
        alice_conn.close()
        slow_conn.close()
        fast_conn.close()


@pytest.mark.parametrize("request_bytes", [
    b"GET /health?" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # a URL over aiohttp's 8 KB line
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Nul: a\x00b\r\n\r\n",
], ids=["long-url", "nul-in-header"])
async def test_a_request_the_http_parser_refuses_gets_the_error_object_and_one_log_line(
        client, caplog, request_bytes: bytes) -> None:
    conn = await RawConnection.open(client)
    try:
        with caplog.at_level("DEBUG"):
            conn.writer.write(request_bytes)
            status, headers, body = await conn.response()
        assert status == 400
        assert headers["content-type"].startswith("application/json")
        assert orjson.loads(body)["error"]["code"] == "bad_request"
    finally:
        conn.close()
    records = [r for r in caplog.records if "bad HTTP request" in r.getMessage()]
    assert len(records) == 1 and records[0].exc_info is None and "\n" not in records[0].getMessage()
    assert not any(r.exc_info for r in caplog.records)


async def test_resume_of_a_channel_that_does_not_exist_is_not_member_like_one_of_someone_else(
        client, make_agent) -> None:
    alice, bob = await make_agent("alice"), await make_agent("bob")
    theirs, _ = await create_channel(bob, [])
    conn = await raw_socket(client, alice.token)
    try:
        for channel in ("ch_" + "n" * 22, theirs):
            conn.send_json({"type": "resume", "ref": channel, "resume": {channel: 0}})
            answer = await conn.next_json()
            assert (answer["type"], answer["code"], answer["ref"]) == ("error", "not_member", channel)
    finally:
        conn.close()


async def test_a_burst_of_sends_on_one_socket_shares_redis_round_trips(
        aiohttp_client, tmp_path: Path, redis_server) -> None:  # noqa: F811
    """Fifty sends in one write go to Redis together, not one round trip after another (a send already
    queued for the bus in its place lets the socket's next frame through), and keep their order."""
    settings = load_settings(env={}, store=f"file://{tmp_path}/data", token_secret="t" * 40,
                             bus=f"{redis_server.url}?namespace=wslayer{secrets.token_hex(4)}")
    client = await aiohttp_client(build_app(settings))
    bus = client.app[HUB].bus
    rounds = 0
    send_round = bus._send_round

    async def counted(batches: Any) -> None:
        nonlocal rounds
        rounds += 1
        await send_round(batches)

    bus._send_round = counted
    await pipelined_sends_are_acked_in_order(client)
    assert rounds <= 10, f"{rounds} bus round trips for 50 sends of one socket"
