"""The state behind the MCP tools (agentchat/mcp_server/bridge.py), over a stand-in for the SDK's
``Agent``: bounded answers, untrusted content marked, wait and resume cursors, actionable errors."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from agentchat.client.agent import AgentChatClientError, History, Message
from agentchat.mcp_server.bridge import (
    MAX_CONTENT_CHARS,
    MAX_OUTPUT_CHARS,
    PIECE_CHARS,
    Bridge,
    ToolFailure,
    explain,
)

ME, PEER, CH = "did:agentchat:me", "did:agentchat:peer", "ch_test"


class StandInAgent:
    """Just what the bridge calls: a channel whose stored history is ``stored`` (seqs may have gaps)."""

    did = ME
    server = "http://127.0.0.1:9"
    peek_policy: Any = True

    def __init__(self, stored: list[Message], *, undecryptable: frozenset[int] = frozenset(),
                 gaps: frozenset[int] = frozenset()) -> None:
        self.stored = stored
        self.gaps = gaps  # numbers that will never hold a message (History.gaps)
        self.undecryptable = undecryptable  # seqs whose envelope does not open, as Agent.history skips them
        self.history_calls = 0
        self.invitation_policy: Any = "all"
        self.pending: list[dict[str, Any]] = []
        self.answers: list[tuple[str, str]] = []
        self.member_channels: list[dict[str, Any]] = []

    async def history(self, channel: str, *, after: int = 0, limit: int = 100) -> History:
        self.history_calls += 1
        if channel != CH:
            raise AgentChatClientError("not_member", f"not a member of {channel}", status=403)
        numbers = sorted([m.seq for m in self.stored] + list(self.gaps))
        taken = [seq for seq in numbers if seq > after][:limit]
        records = [m for m in self.stored if m.seq in taken]
        page = History(next_after=taken[-1] if taken else after, fetched=len(taken))
        page.gaps = [seq for seq in taken if seq in self.gaps]
        for m in records:
            if m.seq in self.undecryptable:
                page.skipped.append((m.seq, m.sender, "the envelope does not open"))
            else:
                page.append(m)
        return page

    async def channels(self) -> list[dict[str, Any]]:
        return self.member_channels

    async def invitations(self) -> list[dict[str, Any]]:
        return list(self.pending)

    async def accept_invitation(self, channel: str) -> dict[str, Any]:
        self.answers.append(("accept", channel))
        self.pending = [i for i in self.pending if i["channel"] != channel]
        return {"id": channel, "name": "side project", "members": [ME, PEER], "invited": []}

    async def decline_invitation(self, channel: str) -> None:
        self.answers.append(("decline", channel))
        self.pending = [i for i in self.pending if i["channel"] != channel]

    async def block(self, did: str) -> None:
        self.answers.append(("block", did))
        self.pending = [i for i in self.pending if i["by"] != did]

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
    assert "read_message(channel, seq, offset=next_offset)" in answer["notice"]
    assert all(m["next_offset"] == MAX_CONTENT_CHARS for m in shown)
    again = await Bridge(agent).read(CH, answer["next_after"], 5)  # type: ignore[arg-type]
    assert again["messages"][0]["seq"] == answer["next_after"] + 1


async def test_a_message_of_any_length_is_read_whole_in_bounded_pieces() -> None:
    control = "\u0001"  # six characters in JSON
    body = "".join(f"line {n}: {control if n % 7 == 0 else 'word'}\n" for n in range(12_000))  # ~150,000 chars
    agent = StandInAgent([message(1, "short"), message(2, body), message(3, {"rows": list(range(5_000))})])
    bridge = Bridge(agent)  # type: ignore[arg-type]
    for seq, expected in ((2, body), (3, orjson.dumps({"rows": list(range(5_000))}).decode())):
        listed = next(m for m in (await bridge.read(CH, 0, 5))["messages"] if m["seq"] == seq)
        parts, offset = [listed["untrusted_content"]], listed["next_offset"]
        calls = 0
        while offset is not None:
            answer = await bridge.read_message(CH, seq, offset, PIECE_CHARS)
            calls += 1
            assert len(orjson.dumps(answer)) <= MAX_OUTPUT_CHARS
            piece = answer["message"]
            assert piece["offset"] == offset and piece["full_length"] == len(expected)
            parts.append(piece["untrusted_content"])
            offset = piece.get("next_offset")
            assert piece["complete"] is (offset is None)
        assert "".join(parts) == expected
        assert calls < 40
    first = (await bridge.read_message(CH, 1, 0, 3))["message"]
    assert (first["untrusted_content"], first["next_offset"], first["sender_name"]) == ("sho", 3, "peer")
    with pytest.raises(ToolFailure, match="message_not_found"):
        await bridge.read_message(CH, 9, 0, 100)


async def test_a_page_with_an_undecryptable_message_shows_the_rest_and_counts_what_it_skipped() -> None:
    agent = StandInAgent([message(seq, f"m{seq}") for seq in range(1, 6)], undecryptable=frozenset({2}))
    answer = await Bridge(agent).read(CH, 0, 20)  # type: ignore[arg-type]
    assert [m["untrusted_content"] for m in answer["messages"]] == ["m1", "m3", "m4", "m5"]
    assert answer["skipped_count"] == 1
    assert answer["skipped"] == [{"seq": 2, "sender": PEER, "reason": "the envelope does not open"}]
    assert "could not be opened" in answer["notice"]
    assert (answer["next_after"], answer["has_more"]) == (5, False)
    # One at a time: the skipped message is accounted for, and paging still reaches the end.
    seen, skipped, after, has_more = [], 0, 0, True
    while has_more:
        page = await Bridge(agent).read(CH, after, 1)  # type: ignore[arg-type]
        seen += [m["seq"] for m in page["messages"]]
        skipped += page.get("skipped_count", 0)
        after, has_more = page["next_after"], page["has_more"]
    assert (seen, skipped, after) == ([1, 3, 4, 5], 1, 5)
    clean = await Bridge(StandInAgent([message(1)])).read(CH, 0, 20)  # type: ignore[arg-type]
    assert "skipped_count" not in clean and "could not be opened" not in clean["notice"]
    with pytest.raises(ToolFailure, match="crypto_error"):
        await Bridge(agent).read_message(CH, 2, 0, 100)  # type: ignore[arg-type]
    assert await Bridge(StandInAgent([message(1), message(2)], undecryptable=frozenset({2}))).latest_seq(CH) == 2  # type: ignore[arg-type]


async def test_messages_show_sender_names_and_json_content() -> None:
    agent = StandInAgent([message(1, {"task": "summarise"}), message(2, "mine", sender=ME)])
    answer = await Bridge(agent).read(CH, 0, 20)  # type: ignore[arg-type]
    first, second = answer["messages"]
    assert (first["sender_name"], first["kind"], first["untrusted_content"]) == ("peer", "json", {"task": "summarise"})
    assert second["from_me"] is True and "from_me" not in first


async def test_wait_returns_what_arrives_then_times_out_with_the_resume_cursor() -> None:
    bridge = Bridge(StandInAgent([]))  # type: ignore[arg-type]
    bridge.live.state(CH)
    waiting = asyncio.create_task(bridge.wait(10, None))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    bridge.live.arrived(message(3, "are you there?"))
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


def invitation(channel: str, by: str = PEER, name: str = "side project") -> dict[str, Any]:
    return {"channel": channel, "name": name, "by": by, "at": 1_700_000_000_000, "members": 1}


async def test_invitations_from_strangers_wait_for_an_answer_and_wake_a_waiting_agent() -> None:
    agent = StandInAgent([])
    bridge = Bridge(agent, invitations="known")  # type: ignore[arg-type]
    assert agent.invitation_policy == bridge.live.on_invitation  # the SDK asks the bridge
    agent.member_channels = [{"id": "ch_old", "members": [ME, "did:agentchat:friend"]}]
    assert await bridge.live.on_invitation(invitation("ch_friend", by="did:agentchat:friend")) is True
    waiting = asyncio.create_task(bridge.wait(10, None))
    await asyncio.sleep(0.05)
    agent.pending = [invitation("ch_new"), invitation("ch_spam", by="did:agentchat:spammer", name="ACCEPT NOW")]
    assert await bridge.live.on_invitation(agent.pending[0]) is None  # left pending
    answer = await asyncio.wait_for(waiting, 5)
    [shown] = answer["invitations"]
    assert (shown["channel"], shown["invited_by"], shown["invited_by_name"], shown["untrusted_name"]) == (
        "ch_new", PEER, "peer", "side project")
    assert answer["timed_out"] is False and "answer_invitation" in answer["notice"]
    assert "invitations" not in await bridge.wait(0.05, None)  # announced once
    assert await bridge.live.on_invitation(agent.pending[1]) is None
    listed = await bridge.list_invitations()
    assert [i["channel"] for i in listed["invitations"]] == ["ch_new", "ch_spam"]
    assert "already shares a channel" in listed["accepted_without_asking"]
    accepted = await bridge.answer_invitation("ch_new", "accept")
    assert accepted["accepted"] is True and "ch_new" in bridge.channels
    blocked = await bridge.answer_invitation("ch_spam", "block")
    assert blocked == {"channel": "ch_spam", "declined": True, "blocked": "did:agentchat:spammer"}
    assert agent.answers == [("accept", "ch_new"), ("block", "did:agentchat:spammer")]
    assert (await bridge.list_invitations())["invitations"] == []


async def test_the_invitation_policy_all_and_none() -> None:
    everything = Bridge(StandInAgent([]), invitations="all")  # type: ignore[arg-type]
    assert await everything.live.on_invitation(invitation("ch_a")) is True and not everything.invitations
    agent = StandInAgent([])
    agent.member_channels = [{"id": "ch_old", "members": [ME, PEER]}]
    nothing = Bridge(agent, invitations="none")  # type: ignore[arg-type]
    assert await nothing.live.on_invitation(invitation("ch_b")) is None  # even from a known agent
    agent.pending = [invitation("ch_b")]
    assert (await nothing.answer_invitation("ch_b", "decline")) == {"channel": "ch_b", "declined": True}
    with pytest.raises(ValueError):
        Bridge(StandInAgent([]), invitations="some")  # type: ignore[arg-type]


async def test_paging_through_gaps_reaches_the_end() -> None:
    """Numbers 2 and 3 will never hold a message (gaps): a page of them only still moves next_after on,
    so a client paging one message at a time reaches the end (before: it asked for the same page again
    and again)."""
    agent = StandInAgent([message(1, "m1"), message(4, "m4")], gaps=frozenset({2, 3}))
    seen, after, has_more, asked = [], 0, True, 0
    while has_more and asked < 10:
        page = await Bridge(agent).read(CH, after, 1)  # type: ignore[arg-type]
        seen += [m["seq"] for m in page["messages"]]
        after, has_more, asked = page["next_after"], page["has_more"], asked + 1
    assert (seen, after, has_more) == ([1, 4], 4, False)
