"""Property-based fuzzing of what reads untrusted bytes: the WebSocket frame parser, the JSON frame
decoder and the envelope check. Whatever comes in, nothing escapes but the protocol's own errors
(``ProtocolViolation``, ``AgentChatError``), and a valid byte stream parses to the same frames however
it is split into reads."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.frames import Close, Frame, Opcode

from agentchat.core import frames
from agentchat.core import rfc6455 as ws
from agentchat.errors import AgentChatError

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _feed_in_pieces(parser: ws.FrameParser, data: bytes, cuts: list[int]) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    last = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        out += parser.feed(data[last:cut])
        last = cut
    return out


# -- the frame parser ----------------------------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=4096).map(lambda b: b[:1] + bytes([b[1] | 0x80]) + b[2:] if len(b) > 1 else b), cuts=st.lists(st.integers(0, 4096), max_size=20),
       limit=st.sampled_from([0, 1, 125, 1000, 1 << 20]))
def test_any_bytes_give_frames_or_a_protocol_violation(data: bytes, cuts: list[int], limit: int) -> None:
    parser = ws.FrameParser(limit)
    try:
        messages = _feed_in_pieces(parser, data, [c for c in cuts if c <= len(data)])
    except ws.ProtocolViolation as exc:
        assert exc.close_code in (1002, 1007, 1009)
        return
    for opcode, payload in messages:
        assert opcode in (ws.OP_TEXT, ws.OP_BINARY, ws.OP_PING, ws.OP_PONG, ws.OP_CLOSE)
        assert isinstance(payload, bytes)
        if opcode == ws.OP_TEXT:
            payload.decode("utf-8")  # a text message that is not UTF-8 never gets through


@FUZZ
@given(header=st.binary(min_size=2, max_size=14), tail=st.binary(max_size=64))
def test_masked_headers_of_any_length_give_frames_or_a_protocol_violation(header: bytes, tail: bytes) -> None:
    data = bytes([header[0], header[1] | 0x80]) + header[2:] + tail  # masked: the parser looks further
    try:
        ws.FrameParser(1 << 16).feed(data)
    except ws.ProtocolViolation:
        pass


_text = st.text(max_size=300).map(lambda s: s.encode("utf-8"))
_message = st.one_of(
    st.tuples(st.just(Opcode.TEXT), st.lists(_text, min_size=1, max_size=5)),
    st.tuples(st.just(Opcode.BINARY), st.lists(st.binary(max_size=300), min_size=1, max_size=5)),
)
_control = st.one_of(
    st.tuples(st.just(Opcode.PING), st.binary(max_size=125)),
    st.tuples(st.just(Opcode.PONG), st.binary(max_size=125)),
)


@st.composite
def _stream(draw: Any) -> tuple[bytes, list[tuple[int, bytes]]]:
    """Valid client bytes (messages, fragmented or not, with control frames between fragments, and a
    close at the end) and the frames the parser must give for them."""
    wire: list[bytes] = []
    expected: list[tuple[int, bytes]] = []
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            opcode, payload = draw(_control)
            wire.append(Frame(opcode, payload).serialize(mask=True))
            expected.append((int(opcode), payload))
            continue
        opcode, parts = draw(_message)
        whole = b"".join(parts)
        if opcode == Opcode.TEXT:  # fragments may cut a character; the message stays whole text
            cuts = sorted(draw(st.lists(st.integers(0, len(whole)), max_size=4)))
            parts = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)])]
        for index, part in enumerate(parts):
            wire.append(Frame(opcode if index == 0 else Opcode.CONT, part, fin=index == len(parts) - 1).serialize(mask=True))
            if index < len(parts) - 1 and draw(st.booleans()):
                opcode_c, payload_c = draw(_control)
                wire.append(Frame(opcode_c, payload_c).serialize(mask=True))
                expected.append((int(opcode_c), payload_c))
        expected.append((int(opcode), whole))
    close = Close(1000, draw(st.text(max_size=20))).serialize()
    wire.append(Frame(Opcode.CLOSE, close).serialize(mask=True))
    expected.append((ws.OP_CLOSE, close))
    return b"".join(wire), expected


@FUZZ
@given(stream=_stream(), cuts=st.lists(st.integers(0, 1 << 16), max_size=40))
def test_any_split_of_a_valid_stream_gives_the_same_frames(stream: tuple[bytes, list[tuple[int, bytes]]],
                                                           cuts: list[int]) -> None:
    data, expected = stream
    assert ws.FrameParser(1 << 20).feed(data) == expected
    assert _feed_in_pieces(ws.FrameParser(1 << 20), data, [c % (len(data) + 1) for c in cuts]) == expected
    byte_by_byte = ws.FrameParser(1 << 20)
    assert [f for i in range(len(data)) for f in byte_by_byte.feed(data[i:i + 1])] == expected


# -- the JSON frame decoder and the envelope check ---------------------------------------------------------


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=25,
)
_field_names = st.sampled_from(["type", "ref", "token", "resume", "channel", "client_id", "envelope", "epoch",
                                "nonce", "ciphertext", "signature", "peek", "wrapped_key", "channels"])
_frame_like = st.dictionaries(_field_names, _json, max_size=6).map(
    lambda d: d if "type" in d else {**d, "type": None})
_types = st.sampled_from(["hello", "send", "resume", "ping", "refuse", "grant_key", "watch_indicators", "nope"])


def _decode(raw: bytes) -> None:
    try:
        frames.decode_client_frame(raw, max_bytes=4096, max_ciphertext_bytes=1024)
    except AgentChatError:
        pass


@FUZZ
@given(raw=st.binary(max_size=600))
def test_any_bytes_decode_to_a_frame_or_a_protocol_error(raw: bytes) -> None:
    _decode(raw)


@FUZZ
@given(frame=_frame_like, kind=_types)
def test_any_json_object_decodes_to_a_frame_or_a_protocol_error(frame: dict[str, Any], kind: str) -> None:
    frame["type"] = kind if frame["type"] is None else frame["type"]
    try:
        raw = orjson.dumps(frame)
    except (TypeError, orjson.JSONEncodeError):  # integers orjson cannot write
        return
    _decode(raw)


_b64 = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-", max_size=100)
_envelope = st.fixed_dictionaries({}, optional={
    "epoch": st.one_of(st.integers(-5, 2**40), st.floats(allow_nan=False), st.booleans(), st.text(max_size=3)),
    "nonce": st.one_of(_b64, st.text(max_size=20), st.integers()),
    "ciphertext": st.one_of(_b64, st.text(max_size=40)),
    "signature": st.one_of(_b64, st.text(max_size=90)),
    "extra": _json,
})


@FUZZ
@given(env=st.one_of(_envelope, _json))
def test_the_envelope_check_accepts_or_raises_a_protocol_error_and_its_two_paths_agree(env: Any) -> None:
    fast = frames._envelope_is_valid(env, frames.b64url_len(1024 + frames.GCM_TAG_BYTES))
    try:
        checked = frames.check_envelope(env, 1024)
    except AgentChatError:
        assert not fast
        return
    assert type(checked["epoch"]) is int


@FUZZ
@given(parts=st.lists(st.binary(max_size=40), min_size=1, max_size=4), cuts=st.lists(st.integers(0, 400), max_size=8))
def test_a_text_message_of_any_bytes_is_read_whole_if_utf8_and_fails_with_1007_if_not(parts: list[bytes],
                                                                                     cuts: list[int]) -> None:
    data = b"".join(Frame(Opcode.TEXT if i == 0 else Opcode.CONT, part, fin=i == len(parts) - 1).serialize(mask=True)
                    for i, part in enumerate(parts))
    whole = b"".join(parts)
    try:
        whole.decode("utf-8")
    except UnicodeDecodeError:
        valid = False
    else:
        valid = True
    try:
        messages = _feed_in_pieces(ws.FrameParser(1 << 20), data, [c % (len(data) + 1) for c in cuts])
    except ws.ProtocolViolation as exc:
        assert not valid and exc.close_code == 1007
    else:
        assert valid and messages == [(ws.OP_TEXT, whole)]
