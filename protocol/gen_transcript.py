"""Write the annotated session transcript of protocol/README.md ("Writing a client: one session")
from a real run: a server on a free port, two agents driven by hand over REST and WebSocket with only
what the spec describes (no SDK). Long base64url values are cut to their first 10 characters + "…".

    python protocol/gen_transcript.py          # rewrite the transcript in protocol/README.md
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402

from agentchat import crypto  # noqa: E402
from agentchat.config import load_settings  # noqa: E402
from agentchat.server.app import build_app  # noqa: E402
from agentchat.server.connections import AgentChatRunner  # noqa: E402

BEGIN, END = "<!-- transcript:begin -->", "<!-- transcript:end -->"


def _short(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _short(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_short(v) for v in value]
    if (isinstance(value, str) and len(value) > 40 and " " not in value
            and not value.startswith(("did:", "ch_", "pk_"))):
        return value[:10] + "…"
    return value


def _json(value: Any) -> str:
    return json.dumps(_short(value), ensure_ascii=False, separators=(",", ":"))


class Transcript:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def note(self, text: str) -> None:
        self.lines += ["", text, ""]

    def add(self, line: str) -> None:
        self.lines.append(line)


async def main() -> str:
    out = Transcript()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as data:
        app = build_app(load_settings(env={}, store=f"file://{data}", token_secret="transcript-" + "x" * 32))
        runner = AgentChatRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        base = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as http:
                await _session(http, base, out)
        finally:
            await runner.cleanup()
    return "\n".join(["```text", *out.lines[1:], "```"]) if out.lines and out.lines[0] == "" else "\n".join(out.lines)


async def _rest(http: aiohttp.ClientSession, base: str, out: Transcript, method: str, path: str,
                body: Any = None, token: str | None = None) -> Any:
    headers = {"Authorization": "Bearer " + token} if token else {}
    out.add(f"> {method} {path}" + (" (Authorization: Bearer <token>)" if token else ""))
    if body is not None:
        out.add(f"  {_json(body)}")
    async with http.request(method, base + path, json=body, headers=headers) as response:
        answer = await response.json()
        out.add(f"< {response.status} {_json(answer)}")
        assert response.status < 300, answer
        return answer


async def _register(http: aiohttp.ClientSession, base: str, out: Transcript, name: str) -> tuple[crypto.AgentKeys, str]:
    keys = crypto.AgentKeys.generate()
    timestamp = int(time.time() * 1000)
    signature = crypto.b64e(keys.sign(crypto.registration_message(name, keys.public, timestamp)))
    answer = await _rest(http, base, out, "POST", "/api/v1/agents/register", {
        "name": name, "keys": keys.public.to_wire(), "timestamp": timestamp, "signature": signature})
    return keys, answer["token"]


async def _read(ws: aiohttp.ClientWebSocketResponse, out: Transcript, who: str) -> list[dict[str, Any]]:
    """One WebSocket message: every frame in it (newline-separated), each on its own line."""
    message = await asyncio.wait_for(ws.receive(), 5)
    frames = [json.loads(line) for line in message.data.split("\n") if line]
    out.add(f"< [{who}] one WebSocket message, {len(frames)} frame{'s' if len(frames) > 1 else ''}:")
    for frame in frames:
        out.add(f"    {_json(frame)}")
    return frames


async def _read_until(ws: aiohttp.ClientWebSocketResponse, out: Transcript, who: str, kind: str) -> list[dict[str, Any]]:
    """WebSocket messages until one carries a frame of type ``kind``."""
    frames = await _read(ws, out, who)
    while not any(f["type"] == kind for f in frames):
        frames += await _read(ws, out, who)
    return frames


async def _send(ws: aiohttp.ClientWebSocketResponse, out: Transcript, who: str, frame: dict[str, Any]) -> None:
    out.add(f"> [{who}] {_json(frame)}")
    await ws.send_str(json.dumps(frame, separators=(",", ":")))


async def _session(http: aiohttp.ClientSession, base: str, out: Transcript) -> None:
    out.note("# 1. Register (crypto.md section 4): the body is signed with the agent's Ed25519 key; the answer\n"
             "#    carries a session token. alice and bob each register once.")
    alice, _ = await _register(http, base, out, "alice")
    bob, bob_token = await _register(http, base, out, "bob")

    out.note("# 2. Log in later: a one-time challenge, signed (crypto.md section 4).")
    challenge = await _rest(http, base, out, "POST", "/api/v1/auth/challenge", {"did": alice.did})
    signature = crypto.b64e(alice.sign(crypto.login_message(alice.did, challenge["challenge"])))
    login = await _rest(http, base, out, "POST", "/api/v1/auth/login",
                        {"did": alice.did, "challenge": challenge["challenge"], "signature": signature})
    alice_token = login["token"]

    out.note("# 3. alice creates a channel and invites bob: the client picks the id, makes epoch 1's key and\n"
             "#    wraps it for her own X25519 key and bob's (crypto.md section 5). The server never sees the key.")
    channel = "ch_" + secrets.token_urlsafe(16)
    epoch_key = crypto.new_epoch_key()
    wrapped = {agent.did: crypto.wrap_epoch_key(epoch_key, agent.public.encryption_key, channel=channel, epoch=1,
                                                recipient=agent.did) for agent in (alice, bob)}
    await _rest(http, base, out, "POST", "/api/v1/channels", {
        "id": channel, "name": "pair", "members": sorted([alice.did, bob.did]), "epoch_keys": wrapped},
        token=alice_token)
    out.note("# 3b. bob accepts the invitation (a pending invitee reads nothing): now he is a member.")
    await _rest(http, base, out, "POST", f"/api/v1/invitations/{channel}/accept", None, token=bob_token)

    ws_url = base.replace("http", "ws") + "/api/v1/ws"
    out.note("# 4. bob opens the socket: hello with his token first (never in the URL), welcome back\n"
             "#    (frames.md section 4). Then he sends a sealed message (crypto.md section 6) and gets\n"
             "#    its ack with the channel's sequence number (frames.md section 5).")
    async with http.ws_connect(ws_url) as bob_ws:
        await _send(bob_ws, out, "bob", {"type": "hello", "ref": "h1", "token": bob_token})
        await _read(bob_ws, out, "bob")
        plaintext = json.dumps({"kind": "text", "body": "hi alice"}).encode()
        envelope = crypto.seal(epoch_key, plaintext, channel=channel, epoch=1, sender=bob.did, client_id="b-1",
                               signer=bob)
        await _send(bob_ws, out, "bob", {"type": "send", "ref": "s1", "channel": channel, "client_id": "b-1",
                                         "envelope": envelope})
        await _read_until(bob_ws, out, "bob", "ack")  # his own message comes too: he is a member

        out.note("# 5. alice connects with resume {channel: 0} (she has nothing yet). welcome and the catch-up\n"
                 "#    (bob's message, seq 1) usually come in ONE WebSocket message, as here: read every\n"
                 "#    frame of every message, never stop at welcome (frames.md section 4).")
        async with http.ws_connect(ws_url) as alice_ws:
            await _send(alice_ws, out, "alice", {"type": "hello", "ref": "h2", "token": alice_token,
                                                 "resume": {channel: 0}})
            received = await _read_until(alice_ws, out, "alice", "message")
            message = next(f for f in received if f["type"] == "message")
            opened = crypto.open_envelope(message["envelope"], epoch_key, channel=channel, sender=message["sender"],
                                          client_id=message["client_id"], sender_signing_key=bob.public.signing_key)
            out.note(f"#    alice opens the envelope with epoch 1's key: {opened.decode()}")

            out.note("# 6. alice answers: the message goes to every socket of every member, hers included, and\n"
                     "#    the ack (with the same seq) once it is stored.")
            envelope = crypto.seal(epoch_key, json.dumps({"kind": "text", "body": "hello bob"}).encode(),
                                   channel=channel, epoch=1, sender=alice.did, client_id="a-1", signer=alice)
            await _send(alice_ws, out, "alice", {"type": "send", "ref": "s2", "channel": channel, "client_id": "a-1",
                                                 "envelope": envelope})
            await _read_until(alice_ws, out, "alice", "ack")
            await _read(bob_ws, out, "bob")

        out.note("# 7. bob reconnects later and resumes after the last seq he has (2): nothing is missed and\n"
                 "#    nothing comes twice (frames.md section 7). A resume frame does the same on an open\n"
                 "#    socket; naming a channel he cannot read is not_member.")
    async with http.ws_connect(ws_url) as bob_ws:
        await _send(bob_ws, out, "bob", {"type": "hello", "ref": "h3", "token": bob_token, "resume": {channel: 2}})
        await _read(bob_ws, out, "bob")
        await _send(bob_ws, out, "bob", {"type": "resume", "ref": "r1", "resume": {channel: 1}})
        await _read(bob_ws, out, "bob")
        await _send(bob_ws, out, "bob", {"type": "resume", "ref": "r2", "resume": {"ch_" + "x" * 22: 0}})
        await _read(bob_ws, out, "bob")


def render() -> str:
    return asyncio.run(main())


if __name__ == "__main__":
    text = render()
    readme = HERE / "README.md"
    current = readme.read_text(encoding="utf-8")
    start, end = current.index(BEGIN) + len(BEGIN), current.index(END)
    readme.write_text(current[:start] + "\n" + text + "\n" + current[end:], encoding="utf-8")
    print(text)
