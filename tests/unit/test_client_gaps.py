"""The SDK's side of gaps (protocol/frames.md, "Gaps"): a number that will never hold a message."""

from __future__ import annotations

import asyncio
from typing import Any

from agentchat.client.background import BackgroundTasks
from agentchat.client.socket_session import SocketSession


def message(seq: int, client_id: str, channel: str = "ch_1") -> dict[str, Any]:
    return {"type": "message", "seq": seq, "channel": channel, "sender": "did:bob", "client_id": client_id}


def gap(seq: int, channel: str = "ch_1") -> dict[str, Any]:
    return {"type": "gap", "seq": seq, "channel": channel, "ts": 1}


async def session() -> SocketSession:
    async def open_message(frame: dict[str, Any]) -> Any:
        return frame  # decrypting is not what is tested here

    return SocketSession(None, did="did:me", include_own=False,  # type: ignore[arg-type]
                         open_message=open_message, events=asyncio.Queue(), background=BackgroundTasks(),
                         on_welcome=lambda: None)


def drain(queue: asyncio.Queue[Any]) -> list[Any]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


async def test_a_message_got_live_then_declared_a_gap_is_retracted_and_its_resend_delivered() -> None:
    s = await session()
    for frame in (message(4, "a"), message(5, "b"), message(6, "c"), gap(5), gap(5), message(7, "b")):
        await s._dispatch(None, frame)  # type: ignore[arg-type]
    assert [m["seq"] for m in drain(s.inbox)] == [4, 5, 6, 7]  # 7 is b's lasting number, not a repeat
    assert drain(s.events) == [{"type": "gap", "channel": "ch_1", "seq": 5, "retracted": True,
                                "sender": "did:bob", "client_id": "b"}]  # told once, though sent twice


async def test_a_gap_in_a_catch_up_moves_the_resume_position_and_is_never_waited_for() -> None:
    s = await session()
    s.last_seq["ch_1"] = 3
    for frame in (gap(4), message(5, "e")):
        await s._dispatch(None, frame)  # type: ignore[arg-type]
    assert s.last_seq["ch_1"] == 5
    assert [m["seq"] for m in drain(s.inbox)] == [5]
    assert drain(s.events) == [{"type": "gap", "channel": "ch_1", "seq": 4, "retracted": False}]
    await s._dispatch(None, gap(2))  # type: ignore[arg-type]  # live, after later numbers
    assert s.last_seq["ch_1"] == 5
