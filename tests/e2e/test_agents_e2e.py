"""End to end, as users would: a real server process, the CLI and SDK agents, restarts and crashes,
and the store searched for plaintext afterwards."""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path

import pytest

from agentchat import crypto
from agentchat.client import Agent
from tests.e2e.processes import ServerProcess, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path: Path):
    process = ServerProcess(store=f"file://{tmp_path}/data", log_path=tmp_path / "server.log").start()
    yield process
    process.close()


def assert_no_plaintext(root: Path, secrets_said: list[str]) -> None:
    """Nothing an agent wrote may be found anywhere the server keeps data."""
    assert secrets_said
    checked = 0
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            checked += 1
            for text in secrets_said:
                assert text.encode() not in data, f"plaintext {text!r} found in {path}"
    assert checked > 0


def test_cli_two_agents_talk_and_nothing_readable_is_stored(server: ServerProcess, tmp_path: Path) -> None:
    alice_key, bob_key = tmp_path / "alice.key", tmp_path / "bob.key"
    alice_did = run_cli("keygen", server=server.url, key=alice_key).stdout.strip()
    bob_did = run_cli("keygen", server=server.url, key=bob_key).stdout.strip()
    assert alice_did.startswith("did:agentchat:") and oct(alice_key.stat().st_mode & 0o777) == "0o600"
    assert run_cli("whoami", server=server.url, key=bob_key).stdout.strip() == bob_did
    assert run_cli("register", "alice", server=server.url, key=alice_key).stdout.strip() == alice_did
    assert run_cli("register", "bob", server=server.url, key=bob_key).returncode == 0
    created = run_cli("channel", "create", "--member", bob_did, "--name", "pair", server=server.url, key=alice_key)
    assert created.returncode == 0, created.stderr
    channel = created.stdout.strip()
    secret = "the-eagle-lands-" + secrets.token_hex(4)
    sent = run_cli("send", channel, secret, server=server.url, key=alice_key)
    assert sent.returncode == 0, sent.stderr
    seq = int(sent.stdout)
    history = run_cli("history", channel, server=server.url, key=bob_key)
    assert history.returncode == 0, history.stderr
    assert f"#{seq}] alice (…{alice_did[-6:]}): {secret}" in history.stdout
    listing = run_cli("channel", "list", server=server.url, key=bob_key)
    assert channel in listing.stdout
    outsider = tmp_path / "eve.key"
    run_cli("keygen", server=server.url, key=outsider)
    run_cli("register", "eve", server=server.url, key=outsider)
    denied = run_cli("history", channel, server=server.url, key=outsider)
    assert denied.returncode == 1 and "not a member" in denied.stderr
    assert_no_plaintext(tmp_path / "data", [secret])


async def test_sdk_agents_survive_restart_and_crash_without_losing_acked_messages(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = ServerProcess(store=f"file://{data}", log_path=tmp_path / "server.log").start()
    said: list[str] = []
    alice = Agent(server.url, crypto.AgentKeys.generate())
    bob = Agent(server.url, crypto.AgentKeys.generate())
    try:
        await alice.register("alice")
        await bob.register("bob")
        channel = await alice.create_channel([bob.did])
        await alice.connect()
        await bob.connect()

        async def say(n: int) -> list[int]:
            seqs = []
            for _ in range(n):
                text = "msg-" + secrets.token_hex(6)
                said.append(text)
                seqs.append(await alice.send(channel, text))
            return seqs

        acked = await say(20)
        got = [await bob.next_message(10) for _ in range(20)]
        assert [m.seq for m in got] == acked

        # graceful restart: both SDKs reconnect by themselves and carry on
        assert server.stop() == 0
        server.start()
        before = acked[-1]
        acked += await say(10)
        assert acked[-10] == before + 1, "after a clean stop the numbers simply go on"
        got = [await bob.next_message(15) for _ in range(10)]
        assert [m.seq for m in got] == acked[-10:]

        # bob drops off; alice keeps talking; the server crashes (kill -9) right after the acks
        await bob.close()
        acked += await say(15)
        server.kill()
        server.start()
        after_crash = await alice.send(channel, "after the crash")
        said.append("after the crash")
        assert after_crash > acked[-1] + 1, "after a crash, numbers that may have been handed out are skipped"
        acked.append(after_crash)
        bob_again = Agent(server.url, bob.keys)
        history = await bob_again.history(channel, after=0, limit=500)
        assert [m.seq for m in history] == acked, "every acknowledged message is in history after a crash"
        assert [m.text for m in history] == said
        await bob_again.close()
    finally:
        await alice.close()
        await bob.close()
        server.close()
    assert_no_plaintext(data, said)


async def test_resume_over_a_fresh_sdk_session_gets_exactly_what_was_missed(server: ServerProcess) -> None:
    alice = Agent(server.url, crypto.AgentKeys.generate())
    bob = Agent(server.url, crypto.AgentKeys.generate())
    try:
        await alice.register("alice")
        await bob.register("bob")
        channel = await alice.create_channel([bob.did])
        await bob.connect()
        first = await alice.send(channel, "before")
        heard = await bob.next_message(10)
        assert heard.seq == first
        assert heard.sender_name == "alice" and heard.sender_label == f"alice (…{alice.did[-6:]})"
        last_seen = bob.last_seq
        await bob.close()
        missed = [await alice.send(channel, f"missed {i}") for i in range(5)]
        bob2 = Agent(server.url, bob.keys)
        bob2._last_seq.update(last_seen)  # a client that persisted its position resumes from it
        await bob2.connect()
        got = [await bob2.next_message(10) for _ in range(5)]
        assert [m.seq for m in got] == missed
        live = await alice.send(channel, "live")
        assert (await bob2.next_message(10)).seq == live
        with pytest.raises(asyncio.TimeoutError):
            await bob2.next_message(0.5)
        await bob2.close()
    finally:
        await alice.close()
        await bob.close()


async def test_the_first_calls_after_a_server_restart_go_through(tmp_path: Path) -> None:
    """The server restarts while an agent is idle: the keep-alive connection in the agent's pool is
    dead. A read, and a message sent over REST with its client id, go through on a fresh connection
    instead of failing with ServerDisconnectedError."""
    server = ServerProcess(store=f"file://{tmp_path}/data", log_path=tmp_path / "server.log").start()
    try:
        async with Agent(server.url, crypto.AgentKeys.generate()) as alice:
            await alice.register("alice")
            channel = await alice.create_channel([], name="kept")
            # stop() and start() block this event loop, as a busy agent's loop would be: the pooled
            # connection's end is noticed only when the next request uses it.
            assert server.stop() == 0
            server.start()
            assert (await alice.channel(channel))["name"] == "kept"
            assert server.stop() == 0
            server.start()
            seq = await alice.send(channel, "said after two restarts")
            assert [(m.seq, m.text) for m in await alice.history(channel)] == [(seq, "said after two restarts")]
    finally:
        server.close()


def test_serve_rejects_bad_settings(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "agentchat", "serve", "--bus", "kafka://x"],
                            capture_output=True, text=True, timeout=30, env={**os.environ})
    assert result.returncode == 2 and "bus" in result.stderr

