"""Every frame a real server sends matches its schema in protocol/frames/, and the sockets close with the
codes protocol/frames.md documents."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import WSMsgType

from agentchat import crypto
from agentchat.config import load_settings
from agentchat.core.frames import split_frames
from agentchat.server.app import build_app
from tests.conftest import RestAgent
from tests.server.test_rest import create_channel, envelope
from tests.unit.test_protocol import FRAMES, SERVER_FRAME, assert_valid, validator_for

FRAMES_MD = (Path(__file__).resolve().parents[2] / "protocol" / "frames.md").read_text(encoding="utf-8")


class Socket:
    """A client socket whose every received frame is kept, in order, for checking afterwards."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self.messages = 0
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type == WSMsgType.TEXT:
                self.messages += 1
                self.frames.extend(split_frames(msg.data))

    async def send(self, frame: dict[str, Any] | bytes) -> None:
        await self.ws.send_str(frame.decode() if isinstance(frame, bytes) else orjson.dumps(frame).decode())

    async def wait_for(self, match: Callable[[dict[str, Any]], bool], timeout: float = 5.0) -> dict[str, Any]:
        async def poll() -> dict[str, Any]:
            while True:
                for frame in self.frames:
                    if match(frame):
                        return frame
                await asyncio.sleep(0.005)
        return await asyncio.wait_for(poll(), timeout)

    async def closed(self, timeout: float = 5.0) -> int | None:
        await asyncio.wait_for(self.task, timeout)
        return self.ws.close_code


async def open_socket(client: Any, hello: dict[str, Any]) -> Socket:
    socket = Socket(await client.ws_connect("/api/v1/ws"))
    await socket.send(hello)
    return socket


def kind(type_: str, **fields: Any) -> Callable[[dict[str, Any]], bool]:
    return lambda f: f.get("type") == type_ and all(f.get(k) == v for k, v in fields.items())


async def test_every_frame_of_a_session_matches_its_schema(client, make_agent) -> None:
    alice, bob, carol = await make_agent("alice"), await make_agent("bob"), await make_agent("carol")
    channel, key = await create_channel(alice, [bob])
    ws_alice = await open_socket(client, {"type": "hello", "ref": "h", "token": alice.token, "resume": {channel: 0}})
    ws_bob = await open_socket(client, {"type": "hello", "token": bob.token})
    ws_carol = await open_socket(client, {"type": "hello", "token": carol.token, "resume": {channel: 0}})
    await ws_alice.wait_for(kind("welcome", ref="h"))
    await ws_bob.wait_for(kind("welcome", ref=None))
    await ws_carol.wait_for(kind("error", code="not_member"))  # resume of a channel it cannot read

    # send -> message to everyone (sender included) and ack to the sender
    for i in range(3):
        await ws_alice.send({"type": "send", "ref": f"r{i}", "channel": channel, "client_id": f"m{i}",
                             "envelope": envelope(alice, channel, key, f"hello {i}", f"m{i}")})
    await ws_alice.send({"type": "send", "channel": channel, "client_id": "no-ref",
                         "envelope": envelope(alice, channel, key, "no ref", "no-ref")})
    ack = await ws_alice.wait_for(kind("ack", client_id="no-ref"))
    assert "ref" not in ack
    await ws_alice.wait_for(kind("ack", ref="r2"))
    await ws_bob.wait_for(kind("message", client_id="no-ref"))

    # ping, errors with and without ref
    await ws_bob.send({"type": "ping", "ref": "p"})
    await ws_bob.send({"type": "ping"})
    await ws_bob.wait_for(kind("pong", ref="p"))
    await ws_bob.wait_for(kind("pong", ref=None))
    await ws_bob.send(b"{oops")
    await ws_bob.send({"type": "teleport", "ref": "t"})
    await ws_bob.send({"type": "send", "ref": "bad", "channel": channel})
    await ws_bob.wait_for(kind("error", code="bad_json"))
    await ws_bob.wait_for(kind("error", code="unknown_frame", ref="t"))
    await ws_bob.wait_for(kind("error", code="invalid_field", ref="bad"))

    # invitation; channel events: member_invited, added / member_added, epoch, removed / member_removed
    status, _ = await alice.call("POST", f"/api/v1/channels/{channel}/members", json={"did": carol.did})
    assert status == 200
    await ws_carol.wait_for(kind("invitation", channel=channel, by=alice.did))
    await ws_bob.wait_for(kind("channel", event="member_invited", did=carol.did))
    status, _ = await carol.call("POST", f"/api/v1/invitations/{channel}/accept")
    assert status == 200
    await ws_carol.wait_for(kind("channel", event="added", channel=channel))
    await ws_bob.wait_for(kind("channel", event="member_added", did=carol.did))
    key2 = crypto.new_epoch_key()
    wrapped = {a.did: crypto.wrap_epoch_key(key2, a.keys.public.encryption_key, channel=channel, epoch=2,
                                            recipient=a.did) for a in (alice, bob, carol)}
    status, _ = await alice.call("POST", f"/api/v1/channels/{channel}/epochs", json={"epoch": 2, "epoch_keys": wrapped})
    assert status == 201
    await ws_bob.wait_for(kind("channel", event="epoch", epoch=2))
    await ws_alice.send({"type": "send", "ref": "stale", "channel": channel, "client_id": "old",
                         "envelope": envelope(alice, channel, key, "old key", "old")})
    await ws_alice.wait_for(kind("error", code="stale_epoch", ref="stale"))
    status, _ = await alice.call("DELETE", f"/api/v1/channels/{channel}/members/{carol.did}")
    assert status == 200
    await ws_carol.wait_for(kind("channel", event="removed"))
    await ws_bob.wait_for(kind("channel", event="member_removed", did=carol.did))

    # resume frame: catch-up again from a number, in order
    mark = len(ws_bob.frames)
    await ws_bob.send({"type": "resume", "ref": "again", "resume": {channel: 1}})

    async def replayed() -> list[int]:
        while True:
            seqs = [f["seq"] for f in ws_bob.frames[mark:] if f["type"] == "message"]
            if len(seqs) >= 3:
                return seqs
            await asyncio.sleep(0.005)

    assert await asyncio.wait_for(replayed(), 5) == [2, 3, 4]

    sockets = [ws_alice, ws_bob, ws_carol]
    seen_types: set[str] = set()
    seen_events: set[str] = set()
    for socket in sockets:
        for frame in socket.frames:
            assert_valid(SERVER_FRAME, frame)
            assert_valid(validator_for(FRAMES / "server" / f"{frame['type']}.json"), frame)
            seen_types.add(frame["type"])
            if frame["type"] == "channel":
                seen_events.add(frame["event"])
    schemas = {path.stem for path in (FRAMES / "server").glob("*.json")}
    assert seen_types <= schemas, f"frames without a schema in protocol/frames/server/: {seen_types - schemas}"
    assert {"welcome", "message", "ack", "error", "pong", "channel"} <= seen_types
    documented_events = set(json.loads((FRAMES / "server" / "channel.json").read_text())["properties"]["event"]["enum"])
    assert seen_events <= documented_events
    assert {"added", "removed", "member_added", "member_removed", "epoch"} <= seen_events
    for socket in sockets:
        await socket.ws.close()


async def test_refused_hello_closes_with_4001_and_the_error_code(client) -> None:
    for hello, code in (({"type": "ping"}, "auth_required"), ({"type": "hello", "token": "forged"}, "token_invalid"),
                        ({"type": "hello"}, "invalid_field")):
        socket = await open_socket(client, hello)
        assert await socket.closed() == 4001
        assert len(socket.frames) == 1
        assert_valid(SERVER_FRAME, socket.frames[0])
        assert socket.frames[0]["code"] == code
    assert "| 4001 |" in FRAMES_MD


async def test_a_frame_far_over_the_limit_closes_with_1009(aiohttp_client, tmp_path) -> None:
    settings = load_settings(env={}, store=f"file://{tmp_path}/small", token_secret="t" * 40, max_frame_bytes=1024)
    small = await aiohttp_client(build_app(settings))
    agent = await RestAgent(small, "alice").register()
    socket = await open_socket(small, {"type": "hello", "token": agent.token})
    welcome = await socket.wait_for(kind("welcome"))
    assert welcome["limits"]["max_frame_bytes"] == 1024
    await socket.send({"type": "ping", "ref": "x" * 2000})  # over the limit: an error, the socket stays
    error = await socket.wait_for(kind("error"))
    assert error["code"] == "too_large"
    await socket.send({"type": "ping", "ref": "x" * 5000})  # over four times the limit: closed
    assert await socket.closed() == 1009
    assert "| 1009 |" in FRAMES_MD


def test_every_close_code_the_server_uses_is_documented() -> None:
    from agentchat.server import session

    codes = {value for name, value in vars(session).items() if name.startswith("CLOSE_") and isinstance(value, int)}
    assert codes
    for code in codes:
        assert f"| {code} |" in FRAMES_MD, f"close code {code} (agentchat/server/session.py) is not in frames.md"
