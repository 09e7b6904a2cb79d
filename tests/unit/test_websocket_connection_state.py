"""The close handshake and the keepalive of ``core.rfc6455.ServerConnection`` with plain values: events
in, frames (or what to do) out, no event loop."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentchat.core import rfc6455 as ws


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return code.to_bytes(2, "big") + reason


def test_the_server_closes_once_then_drops_data_and_answers_no_ping() -> None:
    state = ws.ServerConnection(4096)
    assert state.receive_ping(b"hi") == ws.pong_frame(b"hi")
    assert state.send_close(ws.CLOSE_GOING_AWAY, "bye") == ws.close_frame(ws.CLOSE_GOING_AWAY, "bye")
    assert state.close_sent
    assert state.send_close(ws.CLOSE_NORMAL) is None  # one close frame per connection
    assert state.receive_ping(b"hi") is None  # nothing may follow the close frame
    assert state.receive_close(close_payload(ws.CLOSE_NORMAL)) is None  # the peer's answer: nothing to send


@pytest.mark.parametrize(("payload", "answer_code"), [
    (b"", ws.CLOSE_NORMAL),  # no status: answered with 1000, never 1005
    (close_payload(ws.CLOSE_GOING_AWAY, b"leaving"), ws.CLOSE_GOING_AWAY),
    (close_payload(4001), 4001),
])
def test_a_close_the_peer_starts_is_answered_with_its_code(payload: bytes, answer_code: int) -> None:
    state = ws.ServerConnection(4096)
    assert state.receive_close(payload) == ws.close_frame(answer_code)
    assert state.close_sent and state.send_close(ws.CLOSE_NORMAL) is None


@pytest.mark.parametrize(("payload", "code"), [
    (b"\x03", ws.CLOSE_PROTOCOL_ERROR),
    (close_payload(1005), ws.CLOSE_PROTOCOL_ERROR),
    (close_payload(ws.CLOSE_NORMAL, b"\xff"), ws.CLOSE_INVALID_DATA),
])
def test_an_invalid_close_fails_the_connection_with_its_code(payload: bytes, code: int) -> None:
    state = ws.ServerConnection(4096)
    with pytest.raises(ws.ProtocolViolation) as raised:
        state.receive_close(payload)
    assert not state.close_sent
    assert state.fail(raised.value.close_code, raised.value.reason) == ws.close_frame(code, raised.value.reason)
    assert raised.value.close_code == code
    assert state.fail(code, "again") is None


def test_the_state_is_the_parser_so_an_idle_socket_holds_one_object() -> None:
    state = ws.ServerConnection(4096)
    assert isinstance(state, ws.FrameParser) and not hasattr(state, "__dict__")
    assert state.feed(b"\x89\x80" + b"\x00" * 4) == [(ws.OP_PING, b"")]


# -- keepalive: the heartbeat's clock is a tick, given by the caller --------------------------------

WAIT, PING, DROP = ws.Keepalive.WAIT, ws.Keepalive.PING, ws.Keepalive.DROP


def test_a_silent_peer_is_pinged_then_dropped_and_then_left_alone() -> None:
    state = ws.ServerConnection(4096)
    assert [state.tick(2, 4) for _ in range(6)] == [WAIT] * 6  # not watched: before the session opens
    state.watch()
    assert [state.tick(2, 4) for _ in range(6)] == [WAIT, PING, WAIT, DROP, WAIT, WAIT]


def test_any_frame_from_the_peer_restarts_the_count() -> None:
    state = ws.ServerConnection(4096)
    state.watch()
    assert [state.tick(2, 4) for _ in range(3)] == [WAIT, PING, WAIT]
    assert state.feed(b"\x8a\x80" + b"\x00" * 4) == [(ws.OP_PONG, b"")]
    state.heard()  # the adapter's part: once per feed that returned frames
    assert [state.tick(2, 4) for _ in range(4)] == [WAIT, PING, WAIT, DROP]


def test_heard_before_watch_does_not_start_the_watch() -> None:
    state = ws.ServerConnection(4096)
    state.heard()
    assert [state.tick(2, 4) for _ in range(5)] == [WAIT] * 5


def test_no_ping_follows_the_close_frame_but_a_silent_peer_is_still_dropped() -> None:
    state = ws.ServerConnection(4096)
    state.watch()
    assert state.send_close(ws.CLOSE_GOING_AWAY) is not None
    assert [state.tick(2, 4) for _ in range(4)] == [WAIT, WAIT, WAIT, DROP]


def test_the_heartbeat_keeps_the_protocols_timings() -> None:
    """protocol/frames.md: silent 30 s -> a ping; still silent 15 s later -> dropped. With the server's
    5-second tick: the ping at the 7th silent tick (a tick may come just after the peer's last frame,
    so 6 full ticks, 30 s, have passed), the drop 3 ticks (15 s) after it."""
    text = " ".join((Path(__file__).parents[2] / "protocol" / "frames.md").read_text().split())
    assert f"sent nothing for {ws.PING_AFTER_SECONDS:.0f} seconds gets a WebSocket protocol ping" in text
    assert f"(not even the pong) within {ws.PONG_WAIT_SECONDS:.0f} seconds" in text
    assert ws.heartbeat_ticks(5.0) == (7, 10)
    ping_at, drop_at = ws.heartbeat_ticks(0.5)
    assert ((ping_at - 1) * 0.5, (drop_at - ping_at) * 0.5) == (ws.PING_AFTER_SECONDS, ws.PONG_WAIT_SECONDS)

