"""The state behind the MCP tools (agentchat/mcp_server/bridge.py), over a stand-in for the SDK's
``Agent``: bounded answers, untrusted content marked, wait and resume cursors, actionable errors."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from agentchat.client.agent import AgentChatClientError, Message
from agentchat.mcp_server.bridge import MAX_CONTENT_CHARS, MAX_OUTPUT_CHARS, Bridge, ToolFailure, explain

ME, PEER, CH = "did:agentchat:me", "did:agentchat:peer", "ch_test"


class StandInAgent:
    """Just what the bridge calls: a channel whose stored history is ``stored`` (seqs may have gaps)."""

    did = ME
    server = "http://127.0.0.1:9"
    peek_policy: Any = True

    def __init__(self, stored: list[Message]) -> None:
        self.stored = stored
        self.history_calls = 0

    async def history(self, channel: str, *, after: int = 0, limit: int = 100) -> list[Message]:
        self.history_calls += 1
        if channel != CH:
            raise AgentChatClientError("not_member", f"not a member of {channel}", status=403)
        return [m for m in self.stored if m.seq > after][:limit]

    async def profile(self, did: str) -> dict[str, Any]:
        return {"did": did, "name": "peer" if did == PEER else "me"}


def message(seq: int, content: Any = "hi", sender: str = PEER) -> Message:
    return Message(CH, seq, sender, f"c{seq}", 1_700_000_000_000, content,
                   "text" if isinstance(content, str) else "json")


async def test_a_page_of_long_messages_stays_bounded_and_says_where_to_resume() -> None:
    agent = StandInAgent([message(seq, "x" * 5_000) for seq in range(1, 60)])
    answer = await Bridge(agent).read(CH, 0, 50)  # type: ignore[arg-type]
    text = orjson.dumps(answer).decode()
    assert len(text) <= MAX_OUTPUT_CHARS
    assert answer["has_more"] is True
    shown = answer["messages"]
    assert 1 < len(shown) < 50
    assert answer["next_after"] == shown[-1]["seq"]
    assert all(len(m["untrusted_content"]) == MAX_CONTENT_CHARS and m["truncated"] for m in shown)
    assert "never as instructions" in answer["notice"]
    assert "limit=1" in answer["notice"]
    again = await Bridge(agent).read(CH, answer["next_after"], 5)  # type: ignore[arg-type]
    assert again["messages"][0]["seq"] == answer["next_after"] + 1
    alone = await Bridge(agent).read(CH, 6, 1)  # type: ignore[arg-type]
    assert alone["messages"][0]["untrusted_content"] == "x" * 5_000
    assert "truncated" not in alone["messages"][0] and "limit=1" not in alone["notice"]


async def test_messages_show_sender_names_and_json_content() -> None:
    agent = StandInAgent([message(1, {"task": "summarise"}), message(2, "mine", sender=ME)])
    answer = await Bridge(agent).read(CH, 0, 20)  # type: ignore[arg-type]
    first, second = answer["messages"]
    assert (first["sender_name"], first["kind"], first["untrusted_content"]) == ("peer", "json", {"task": "summarise"})
    assert second["from_me"] is True and "from_me" not in first


async def test_wait_returns_what_arrives_then_times_out_with_the_resume_cursor() -> None:
    bridge = Bridge(StandInAgent([]))  # type: ignore[arg-type]
    bridge._state(CH)
    waiting = asyncio.create_task(bridge.wait(10, None))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    bridge._arrived(message(3, "are you there?"))
    answer = await asyncio.wait_for(waiting, 5)
    assert [m["untrusted_content"] for m in answer["messages"]] == ["are you there?"]
    assert answer["resume"] == {CH: 3} and answer["timed_out"] is False
    empty = await bridge.wait(0.05, CH)
    assert empty["messages"] == [] and empty["timed_out"] is True and empty["resume"] == {CH: 3}


async def test_latest_seq_is_found_without_reading_the_whole_history() -> None:
    agent = StandInAgent([message(seq) for seq in range(1, 5_000, 3)])  # 1, 4, ... 4,999
    assert await Bridge(agent).latest_seq(CH) == 4_999  # type: ignore[arg-type]
    assert agent.history_calls < 40
    assert await Bridge(StandInAgent([])).latest_seq(CH) == 0  # type: ignore[arg-type]


def test_errors_carry_the_code_and_what_to_do() -> None:
    failure = explain(AgentChatClientError("not_member", "not a member of ch_x", status=403))
    assert failure.code == "not_member"
    assert str(failure).startswith("not_member: not a member of ch_x. ")
    assert "list_channels" in str(failure)
    assert "wait a few seconds" in str(explain(ConnectionRefusedError()))
    assert "wait a few seconds" in str(explain(AgentChatClientError("rate_limited", "slow down", retryable=True)))
    with pytest.raises(KeyError):
        explain(KeyError("a bug"))


async def test_send_needs_exactly_one_of_text_and_data() -> None:
    bridge = Bridge(StandInAgent([]))  # type: ignore[arg-type]
    for text, data in (("a", {"b": 1}), (None, None)):
        with pytest.raises(ToolFailure, match="invalid_argument"):
            await bridge.send(CH, text, data)
