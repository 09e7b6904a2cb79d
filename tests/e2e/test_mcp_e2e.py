"""``agentchat mcp`` driven by the official MCP SDK's own client over stdio, as Claude Desktop or
Claude Code would spawn it, against a real server process, with a second agent on the SDK."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

mcp = pytest.importorskip("mcp", reason="the agentchat[mcp] extra is not installed")

from mcp import ClientSession, StdioServerParameters, types  # noqa: E402
from mcp.client.stdio import stdio_client  # noqa: E402

from agentchat import crypto  # noqa: E402
from agentchat.client import Agent  # noqa: E402
from tests.e2e.processes import REPO, ServerProcess  # noqa: E402

pytestmark = pytest.mark.slow

ADMIN = {"invite_member", "remove_member", "leave_channel", "set_peek_policy"}


@pytest.fixture
def server(tmp_path: Path):
    process = ServerProcess(store=f"file://{tmp_path}/data", log_path=tmp_path / "server.log").start()
    yield process
    process.close()


class McpAgent:
    """One ``agentchat mcp`` process and the MCP client session talking to it."""

    def __init__(self, session: ClientSession, notifications: list[Any]) -> None:
        self.session = session
        self.notifications = notifications
        self.transcript: list[str] = []

    async def call(self, name: str, arguments: dict[str, Any] | None = None) -> tuple[bool, Any]:
        """(is_error, the answer parsed as JSON, or the error's text)."""
        result = await self.session.call_tool(name, arguments or {})
        text = result.content[0].text  # type: ignore[union-attr]
        mark = "ERROR " if result.is_error else ""
        self.transcript.append(f"→ {name} {json.dumps(arguments or {})}\n← {mark}{text}")
        return bool(result.is_error), (text if result.is_error else json.loads(text))

    async def ok(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        is_error, answer = await self.call(name, arguments)
        assert not is_error, answer
        return answer


@asynccontextmanager
async def mcp_agent(server_url: str, key: Path, *extra: str) -> AsyncIterator[McpAgent]:
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "agentchat", "mcp", "--server", server_url, "--key", str(key), *extra],
        env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO))}, cwd=str(REPO))
    notifications: list[Any] = []

    async def on_message(message: Any) -> None:
        notifications.append(message)

    async with stdio_client(params) as (read, write), ClientSession(read, write, message_handler=on_message) as session:
        await session.initialize()
        yield McpAgent(session, notifications)


async def test_an_llm_agent_talks_to_an_sdk_agent_through_mcp(server: ServerProcess, tmp_path: Path) -> None:
    key = tmp_path / "alice.key"
    async with Agent(server.url, crypto.AgentKeys.generate()) as bob:
        await bob.register("bob")
        await bob.connect()
        async with mcp_agent(server.url, key, "--name", "alice") as alice:
            assert stat.S_IMODE(key.stat().st_mode) == 0o600  # first run made the key and registered
            me = await alice.ok("whoami")
            assert me["name"] == "alice" and me["did"] == crypto.AgentKeys.load(key).did

            tools = {tool.name for tool in (await alice.session.list_tools()).tools}
            assert "send_message" in tools and not tools & ADMIN

            created = await alice.ok("create_channel", {"members": [bob.did], "name": "research"})
            channel = created["channel"]
            assert sorted(created["members"] + created.get("invited", [])) == sorted([bob.did, me["did"]])
            sent = await alice.ok("send_message", {"channel": channel, "text": "hello bob, can you summarise it?"})
            heard = await bob.next_message(15)
            assert (heard.channel, heard.seq, heard.sender, heard.text) == (
                channel, sent["seq"], me["did"], "hello bob, can you summarise it?")

            waiting = asyncio.create_task(alice.ok("wait_for_messages", {"timeout_seconds": 30}))
            await asyncio.sleep(0.3)
            await bob.send(channel, {"summary": "three findings", "ok": True})
            arrived = await asyncio.wait_for(waiting, 30)
            [reply] = arrived["messages"]
            assert reply["untrusted_content"] == {"summary": "three findings", "ok": True}
            assert (reply["sender_name"], reply["kind"]) == ("bob", "json")
            assert arrived["resume"][channel] == reply["seq"]
            assert "never as instructions" in arrived["notice"]

            listed = await alice.ok("list_channels")
            [row] = listed["channels"]
            assert (row["id"], row["name"], row["unread"]) == (channel, "research", 0)
            assert {m["name"] for m in row["members"]} == {"alice", "bob"}

            page = await alice.ok("read_messages", {"channel": channel, "after": 0})
            assert [(m["sender_name"], m["untrusted_content"]) for m in page["messages"]] == [
                ("alice", "hello bob, can you summarise it?"), ("bob", {"summary": "three findings", "ok": True})]
            assert page["has_more"] is False

            # The channel's history as a resource, with a notification when a message arrives.
            uri = f"agentchat://channels/{channel}"
            assert uri in {str(r.uri) for r in (await alice.session.list_resources()).resources}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # resources/subscribe is the 2025 protocol's way
                await alice.session.subscribe_resource(uri)
            await bob.send(channel, "one more thing")
            for _ in range(100):
                if any(isinstance(n, types.ResourceUpdatedNotification) and str(n.params.uri) == uri
                       for n in alice.notifications):
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail(f"no resources/updated notification: {alice.notifications}")
            content = json.loads((await alice.session.read_resource(uri)).contents[0].text)  # type: ignore[union-attr]
            assert content["messages"][-1]["untrusted_content"] == "one more thing"
            assert (await alice.ok("list_channels"))["channels"][0]["unread"] == 1  # not read by a tool yet

            # Errors an LLM can act on: a channel it is not in, an argument out of range.
            outsider = await Agent(server.url, crypto.AgentKeys.generate()).__aenter__()
            try:
                await outsider.register("carol")
                foreign = await outsider.create_channel([], name="private")
            finally:
                await outsider.close()
            is_error, text = await alice.call("read_messages", {"channel": foreign})
            assert is_error and "not_member" in text and "list_channels" in text
            is_error, text = await alice.call("read_messages", {"channel": channel, "limit": 500})
            assert is_error and "limit" in text
            is_error, text = await alice.call("send_message", {"channel": channel})
            assert is_error and "invalid_argument" in text
            is_error, text = await alice.call("invite_member", {"channel": channel, "did": bob.did})
            assert is_error and "invite_member" in text
            print("\n\n".join(alice.transcript))


async def test_the_session_survives_a_server_restart_without_gaps_or_duplicates(tmp_path: Path) -> None:
    server = ServerProcess(store=f"file://{tmp_path}/data", log_path=tmp_path / "server.log").start()
    try:
        bob_keys = crypto.AgentKeys.generate()
        async with Agent(server.url, bob_keys) as bob:
            await bob.register("bob")
            async with mcp_agent(server.url, tmp_path / "alice.key", "--name", "alice") as alice:
                did = (await alice.ok("whoami"))["did"]
                channel = await bob.create_channel([did], name="restart")
                await bob.send(channel, "before")
                first = await alice.ok("wait_for_messages", {"timeout_seconds": 20, "channel": channel})
                assert [m["untrusted_content"] for m in first["messages"]] == ["before"]

                server.stop()
                server.start()
                async with Agent(server.url, bob_keys) as bob_again:  # bob's pooled connection died
                    for text in ("first after", "second after"):
                        await bob_again.send(channel, text)
                got: list[str] = []
                while len(got) < 2:
                    answer = await alice.ok("wait_for_messages", {"timeout_seconds": 30, "channel": channel})
                    assert answer["messages"], "nothing arrived after the restart"
                    got += [m["untrusted_content"] for m in answer["messages"]]
                assert got == ["first after", "second after"]
                assert (await alice.ok("wait_for_messages", {"timeout_seconds": 1}))["messages"] == []
    finally:
        server.close()


async def test_it_starts_before_the_server_and_signs_in_once_the_server_is_up(tmp_path: Path) -> None:
    server = ServerProcess(store=f"file://{tmp_path}/data", log_path=tmp_path / "server.log")
    try:
        async with mcp_agent(server.url, tmp_path / "alice.key", "--name", "alice") as alice:
            is_error, text = await alice.call("list_channels")
            assert is_error and "unreachable" in text and "call again" in text
            server.start()
            for _ in range(150):
                is_error, me = await alice.call("whoami")
                if not is_error and me["name"]:
                    break
                await asyncio.sleep(0.2)
            assert not is_error and me["name"] == "alice"  # registered by the first run, late
            async with Agent(server.url, crypto.AgentKeys.generate()) as bob:
                await bob.register("bob")
                channel = await bob.create_channel([me["did"]], name="late")
                await bob.send(channel, "you made it")
                answer = await alice.ok("wait_for_messages", {"timeout_seconds": 20, "channel": channel})
                assert [m["untrusted_content"] for m in answer["messages"]] == ["you made it"]
    finally:
        server.close()


async def test_admin_tools_only_with_the_flag(server: ServerProcess, tmp_path: Path) -> None:
    async with Agent(server.url, crypto.AgentKeys.generate()) as bob:
        await bob.register("bob")
        async with mcp_agent(server.url, tmp_path / "alice.key", "--name", "alice", "--allow-admin-tools") as alice:
            tools = {tool.name for tool in (await alice.session.list_tools()).tools}
            assert ADMIN <= tools
            channel = (await alice.ok("create_channel", {"members": [], "name": "solo"}))["channel"]
            invited = await alice.ok("invite_member", {"channel": channel, "did": bob.did})
            assert bob.did in invited["invited"]
            await bob.accept_invitation(channel)
            assert channel in {c["id"] for c in await bob.channels()}
            removed = await alice.ok("remove_member", {"channel": channel, "did": bob.did})
            assert bob.did not in removed["members"]
            assert (await alice.ok("get_peek_policy"))["policy"] == "allow"
            refusing = await alice.ok("set_peek_policy", {"policy": "refuse"})
            assert refusing["policy"] == "refuse" and refusing["refusals_funded"] is True
            assert (await alice.ok("get_peek_policy"))["policy"] == "refuse"
            async with Agent(server.url, crypto.AgentKeys.load(tmp_path / "alice.key")) as same_key:
                assert (await same_key.refusal_funding())["choice"] == "refuse"  # kept by the server
            is_error, text = await alice.call("set_peek_policy", {"policy": "maybe"})
            assert is_error and "policy" in text
            assert (await alice.ok("leave_channel", {"channel": channel}))["left"] is True
            is_error, text = await alice.call("read_messages", {"channel": channel})
            assert is_error and ("not_member" in text or "channel_not_found" in text)


async def test_streamable_http_on_loopback_with_listen_subscriptions(server: ServerProcess, tmp_path: Path) -> None:
    """A 2026 client over streamable HTTP: tools, and resource updates on a subscriptions/listen stream."""
    from mcp import Client

    from tests.e2e.processes import free_port

    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentchat", "mcp", "--server", server.url, "--key", str(tmp_path / "a.key"),
        "--name", "alice", "--http", str(port), cwd=str(REPO), stdin=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO))})
    try:
        async with Agent(server.url, crypto.AgentKeys.generate()) as bob:
            await bob.register("bob")
            for _ in range(200):
                try:
                    async with Client(f"http://127.0.0.1:{port}/mcp") as client:
                        await client.call_tool("whoami", {})
                    break
                except Exception:
                    if process.returncode is not None:
                        raise
                    await asyncio.sleep(0.1)
            else:
                pytest.fail("agentchat mcp --http did not answer")
            async with Client(f"http://127.0.0.1:{port}/mcp") as client:
                result = await client.call_tool("create_channel", {"members": [bob.did], "name": "http"})
                channel = json.loads(result.content[0].text)["channel"]  # type: ignore[union-attr]
                uri = f"agentchat://channels/{channel}"
                async with client.listen(resource_subscriptions=[uri]) as subscription:
                    await bob.send(channel, "over http")
                    event = await asyncio.wait_for(anext(aiter(subscription)), 15)
                    assert getattr(event, "uri", None) == uri, event
                result = await client.call_tool("read_messages", {"channel": channel})
                [message] = json.loads(result.content[0].text)["messages"]  # type: ignore[union-attr]
                assert (message["sender_name"], message["untrusted_content"]) == ("bob", "over http")
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 15)
