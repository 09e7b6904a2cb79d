"""The close handshake of ``core.rfc6455.ServerConnection`` with plain values: events in, frames out."""

from __future__ import annotations

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
