"""The RFC 6455 codec, without an event loop: handshake checks, server frames out, client frames in.

Frames are cross-checked with the ``websockets`` package: its client serializer builds what the
parser reads, and its parser reads what the server writes."""

from __future__ import annotations

import base64
import os
import random

import pytest
from websockets.frames import Close, Frame, Opcode
from websockets.streams import StreamReader

from agentchat.core import rfc6455 as ws

MASK = b"\x37\xfa\x21\x3d"
SAMPLE_KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3
SAMPLE_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
UPGRADE_HEADERS = {
    "upgrade": "websocket",
    "connection": "Upgrade",
    "sec-websocket-version": "13",
    "sec-websocket-key": SAMPLE_KEY,
}


def client_frame(opcode: Opcode, data: bytes, fin: bool = True) -> bytes:
    """A masked client frame, as the websockets package writes it."""
    return Frame(opcode, data, fin).serialize(mask=True)


def raw_frame(first: int, payload: bytes = b"", *, masked: bool = True, length: int | None = None) -> bytes:
    """A client frame built by hand, for frames that no correct client writes."""
    size = len(payload) if length is None else length
    if size < 126:
        header = bytes((first, (0x80 if masked else 0) | size))
    elif size < 65536:
        header = bytes((first, (0x80 if masked else 0) | 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((first, (0x80 if masked else 0) | 127)) + size.to_bytes(8, "big")
    if not masked:
        return header + payload
    return header + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))


def feed_in_pieces(data: bytes, cuts: list[int], max_message_bytes: int = 1 << 20) -> list[tuple[int, bytes]]:
    parser = ws.FrameParser(max_message_bytes)
    out: list[tuple[int, bytes]] = []
    bounds = [0, *cuts, len(data)]
    for start, stop in zip(bounds, bounds[1:]):
        out += parser.feed(data[start:stop])
    return out


def violation(data: bytes, max_message_bytes: int = 1 << 20) -> ws.ProtocolViolation:
    parser = ws.FrameParser(max_message_bytes)
    with pytest.raises(ws.ProtocolViolation) as err:
        parser.feed(data)
    return err.value


def parse_server_frame(data: bytes) -> Frame:
    """The websockets client's reading of one whole server frame, which must use every byte."""
    reader = StreamReader()
    reader.feed_data(data)
    parser = Frame.parse(reader.read_exact, mask=False, max_size=None, extensions=None)
    try:
        next(parser)
    except StopIteration as done:
        assert reader.buffer == b"", "bytes left after the frame"
        frame: Frame = done.value
        return frame
    raise AssertionError("the frame is incomplete")


# -- opening handshake -------------------------------------------------------------------------------


def test_accept_key_matches_the_rfc_example() -> None:
    assert ws.accept_key(SAMPLE_KEY) == SAMPLE_ACCEPT


def test_valid_upgrade_returns_the_accept_value() -> None:
    assert ws.check_upgrade("GET", UPGRADE_HEADERS) == SAMPLE_ACCEPT


def test_accept_value_for_a_random_key_matches_websockets() -> None:
    from websockets.utils import accept_key as websockets_accept_key

    key = base64.b64encode(os.urandom(16)).decode()
    assert ws.check_upgrade("GET", {**UPGRADE_HEADERS, "sec-websocket-key": key}) == websockets_accept_key(key)


@pytest.mark.parametrize("connection", [
    "Upgrade", "upgrade", "keep-alive, Upgrade", "Keep-Alive,UPGRADE", " upgrade , close",
])
def test_connection_header_with_an_upgrade_token_is_accepted(connection: str) -> None:
    assert ws.check_upgrade("GET", {**UPGRADE_HEADERS, "connection": connection}) == SAMPLE_ACCEPT


@pytest.mark.parametrize("upgrade", ["WebSocket", "websocket", "h2c, websocket"])
def test_upgrade_header_is_matched_case_insensitively(upgrade: str) -> None:
    assert ws.check_upgrade("GET", {**UPGRADE_HEADERS, "upgrade": upgrade}) == SAMPLE_ACCEPT


def refusal(method: str, headers: dict[str, str]) -> int:
    with pytest.raises(ws.UpgradeRefused) as err:
        ws.check_upgrade(method, headers)
    assert err.value.reason
    return err.value.status


def without(name: str) -> dict[str, str]:
    return {k: v for k, v in UPGRADE_HEADERS.items() if k != name}


@pytest.mark.parametrize("method", ["POST", "PUT", "HEAD"])
def test_upgrade_with_another_method_is_refused_with_400(method: str) -> None:
    assert refusal(method, UPGRADE_HEADERS) == 400


@pytest.mark.parametrize("headers", [
    without("upgrade"),
    {**UPGRADE_HEADERS, "upgrade": "h2c"},
    {**UPGRADE_HEADERS, "upgrade": "websockets"},
    {**UPGRADE_HEADERS, "upgrade": ""},
])
def test_missing_or_other_upgrade_is_refused_with_426(headers: dict[str, str]) -> None:
    assert refusal("GET", headers) == 426


@pytest.mark.parametrize("headers", [
    without("connection"),
    {**UPGRADE_HEADERS, "connection": "keep-alive"},
    {**UPGRADE_HEADERS, "connection": "upgraded"},
    {**UPGRADE_HEADERS, "connection": ""},
])
def test_connection_without_an_upgrade_token_is_refused_with_400(headers: dict[str, str]) -> None:
    assert refusal("GET", headers) == 400


@pytest.mark.parametrize("headers", [
    without("sec-websocket-version"),
    {**UPGRADE_HEADERS, "sec-websocket-version": "8"},
    {**UPGRADE_HEADERS, "sec-websocket-version": "14"},
    {**UPGRADE_HEADERS, "sec-websocket-version": ""},
])
def test_version_other_than_13_is_refused_with_426(headers: dict[str, str]) -> None:
    assert refusal("GET", headers) == 426


@pytest.mark.parametrize("headers", [
    without("sec-websocket-key"),
    {**UPGRADE_HEADERS, "sec-websocket-key": ""},
    {**UPGRADE_HEADERS, "sec-websocket-key": "not base64 at all!"},
    {**UPGRADE_HEADERS, "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ"},  # padding missing
    {**UPGRADE_HEADERS, "sec-websocket-key": "é" * 24},
    {**UPGRADE_HEADERS, "sec-websocket-key": base64.b64encode(b"x" * 15).decode()},
    {**UPGRADE_HEADERS, "sec-websocket-key": base64.b64encode(b"x" * 17).decode()},
])
def test_key_missing_malformed_or_not_16_bytes_is_refused_with_400(headers: dict[str, str]) -> None:
    assert refusal("GET", headers) == 400


def test_switching_protocols_is_a_complete_101_response() -> None:
    response = ws.switching_protocols(SAMPLE_ACCEPT)
    assert response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert response.endswith(b"\r\n\r\n")
    lines = response[:-4].split(b"\r\n")[1:]
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(b":") for line in lines)}
    assert headers == {
        b"upgrade": b"websocket",
        b"connection": b"Upgrade",
        b"sec-websocket-accept": SAMPLE_ACCEPT.encode(),
    }


# -- client frames in, cross-checked with the websockets serializer -----------------------------------


def _random_text(size: int) -> bytes:
    """``size`` bytes of valid UTF-8 (text messages must be), 1- to 4-byte characters mixed."""
    rng = random.Random(size)
    out = bytearray()
    while len(out) < size:
        char = chr(rng.choice((rng.randrange(0x20, 0x7F), rng.randrange(0xA0, 0xD800),
                               rng.randrange(0x10000, 0x110000)))).encode()
        out += char if len(out) + len(char) <= size else b"a" * (size - len(out))
    return bytes(out)


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 200_000])
def test_text_frame_of_every_length_class_is_read(size: int) -> None:
    data = _random_text(size)
    parser = ws.FrameParser(1 << 20)
    assert parser.feed(client_frame(Opcode.TEXT, data)) == [(ws.OP_TEXT, data)]


def test_binary_frame_is_read_as_binary() -> None:
    data = bytes(range(256)) * 3
    assert ws.FrameParser(4096).feed(client_frame(Opcode.BINARY, data)) == [(ws.OP_BINARY, data)]


def test_control_frames_are_returned_with_their_payload() -> None:
    stream = (client_frame(Opcode.PING, b"are you there")
              + client_frame(Opcode.PONG, b"")
              + client_frame(Opcode.CLOSE, Close(1000, "bye").serialize()))
    assert ws.FrameParser(4096).feed(stream) == [
        (ws.OP_PING, b"are you there"),
        (ws.OP_PONG, b""),
        (ws.OP_CLOSE, b"\x03\xe8bye"),
    ]


def test_several_messages_in_one_chunk_come_out_in_order() -> None:
    stream = b"".join(client_frame(Opcode.TEXT, f"message {i}".encode()) for i in range(50))
    assert ws.FrameParser(4096).feed(stream) == [(ws.OP_TEXT, f"message {i}".encode()) for i in range(50)]


def fragmented_stream() -> tuple[bytes, list[tuple[int, bytes]]]:
    """A text message in four fragments with pings between them, then a binary message and a close."""
    parts = [b"first part, ", b"", b"x" * 300, b" and the end"]
    stream = (client_frame(Opcode.TEXT, parts[0], fin=False)
              + client_frame(Opcode.PING, b"p1")
              + client_frame(Opcode.CONT, parts[1], fin=False)
              + client_frame(Opcode.CONT, parts[2], fin=False)
              + client_frame(Opcode.PING, b"p2")
              + client_frame(Opcode.PONG, b"p3")
              + client_frame(Opcode.CONT, parts[3], fin=True)
              + client_frame(Opcode.BINARY, b"\x00\xff" * 70_000)
              + client_frame(Opcode.BINARY, b"a", fin=False)
              + client_frame(Opcode.CONT, b"b", fin=True)
              + client_frame(Opcode.CLOSE, Close(1001, "going").serialize()))
    expected = [
        (ws.OP_PING, b"p1"),
        (ws.OP_PING, b"p2"),
        (ws.OP_PONG, b"p3"),
        (ws.OP_TEXT, b"".join(parts)),
        (ws.OP_BINARY, b"\x00\xff" * 70_000),
        (ws.OP_BINARY, b"ab"),
        (ws.OP_CLOSE, b"\x03\xe9going"),
    ]
    return stream, expected


def test_fragmented_message_is_reassembled_and_control_frames_between_fragments_come_first() -> None:
    stream, expected = fragmented_stream()
    assert ws.FrameParser(1 << 20).feed(stream) == expected


def test_same_stream_one_byte_at_a_time_gives_the_same_output() -> None:
    stream, expected = fragmented_stream()
    assert feed_in_pieces(stream, list(range(1, len(stream)))) == expected


@pytest.mark.parametrize("seed", range(20))
def test_same_stream_in_random_splits_gives_the_same_output(seed: int) -> None:
    stream, expected = fragmented_stream()
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(1, 60)))
    assert feed_in_pieces(stream, cuts) == expected


@pytest.mark.parametrize("seed", range(5))
def test_splits_inside_headers_of_every_length_class(seed: int) -> None:
    sizes = [0, 5, 125, 126, 300, 65535, 65536, 70_000]
    frames = [client_frame(Opcode.TEXT, bytes([n % 128]) * n) for n in sizes]
    stream = b"".join(frames)
    rng = random.Random(seed)
    # One cut inside every frame's header (the first 14 bytes), plus random cuts elsewhere.
    cuts, offset = set(), 0
    for frame in frames:
        cuts.add(offset + rng.randint(1, min(13, len(frame) - 1)))
        offset += len(frame)
    cuts |= set(rng.sample(range(1, len(stream)), 40))
    assert feed_in_pieces(stream, sorted(cuts)) == [(ws.OP_TEXT, bytes([n % 128]) * n) for n in sizes]


def test_header_in_one_chunk_then_payload_in_several_chunks_loses_nothing() -> None:
    data = random.Random(7).randbytes(100_000)
    frame = client_frame(Opcode.BINARY, data)
    header_size = 2 + 8 + 4
    parser = ws.FrameParser(1 << 20)
    assert parser.feed(frame[:header_size]) == []
    payload = frame[header_size:]
    step = 9_999
    for start in range(0, len(payload) - step, step):
        assert parser.feed(payload[start:start + step]) == []
    last = (len(payload) - 1) // step * step
    assert parser.feed(payload[last:] + client_frame(Opcode.TEXT, b"next")) == [
        (ws.OP_BINARY, data),
        (ws.OP_TEXT, b"next"),
    ]


def test_tiny_frame_with_its_header_split_over_two_feeds_comes_out_on_the_second() -> None:
    frame = client_frame(Opcode.TEXT, b"hi")
    parser = ws.FrameParser(4096)
    assert parser.feed(frame[:1]) == []
    assert parser.feed(frame[1:]) == [(ws.OP_TEXT, b"hi")]


def test_frame_missing_only_its_last_byte_waits_for_it() -> None:
    frame = client_frame(Opcode.TEXT, b"hello")
    parser = ws.FrameParser(4096)
    assert parser.feed(frame[:-1]) == []
    assert parser.feed(b"") == []
    assert parser.feed(frame[-1:]) == [(ws.OP_TEXT, b"hello")]


def test_empty_frame_waits_for_its_mask() -> None:
    frame = client_frame(Opcode.PING, b"")
    parser = ws.FrameParser(4096)
    assert parser.feed(frame[:2]) == []
    assert parser.feed(frame[2:5]) == []
    assert parser.feed(frame[5:]) == [(ws.OP_PING, b"")]


def test_message_exactly_at_the_limit_is_accepted() -> None:
    parser = ws.FrameParser(100)
    assert parser.feed(client_frame(Opcode.TEXT, b"a" * 100)) == [(ws.OP_TEXT, b"a" * 100)]
    assert parser.feed(client_frame(Opcode.TEXT, b"b" * 60, fin=False)
                       + client_frame(Opcode.CONT, b"c" * 40)) == [(ws.OP_TEXT, b"b" * 60 + b"c" * 40)]


def test_the_limit_counts_each_message_afresh() -> None:
    parser = ws.FrameParser(100)
    for _ in range(5):
        assert parser.feed(client_frame(Opcode.TEXT, b"x" * 50, fin=False)
                           + client_frame(Opcode.CONT, b"y" * 50)) == [(ws.OP_TEXT, b"x" * 50 + b"y" * 50)]


# -- protocol violations and their close codes --------------------------------------------------------


def test_unmasked_frame_is_a_protocol_error() -> None:
    assert violation(Frame(Opcode.TEXT, b"hi").serialize(mask=False)).close_code == 1002


@pytest.mark.parametrize("rsv", [0x40, 0x20, 0x10, 0x70])
def test_reserved_bits_are_a_protocol_error(rsv: int) -> None:
    assert violation(raw_frame(0x80 | rsv | ws.OP_TEXT, b"hi")).close_code == 1002


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_unknown_opcodes_are_a_protocol_error(opcode: int) -> None:
    assert violation(raw_frame(0x80 | opcode, b"x")).close_code == 1002


@pytest.mark.parametrize("opcode", [ws.OP_PING, ws.OP_PONG, ws.OP_CLOSE])
def test_fragmented_control_frame_is_a_protocol_error(opcode: int) -> None:
    assert violation(raw_frame(opcode, b"\x03\xe8")).close_code == 1002


@pytest.mark.parametrize("opcode", [ws.OP_PING, ws.OP_PONG, ws.OP_CLOSE])
def test_control_frame_over_125_bytes_is_a_protocol_error(opcode: int) -> None:
    assert violation(raw_frame(0x80 | opcode, b"\x03\xe8" + b"x" * 124)).close_code == 1002


def test_control_frame_of_125_bytes_is_accepted() -> None:
    assert ws.FrameParser(4096).feed(client_frame(Opcode.PING, b"x" * 125)) == [(ws.OP_PING, b"x" * 125)]


def test_continuation_without_a_started_message_is_a_protocol_error() -> None:
    assert violation(client_frame(Opcode.CONT, b"orphan")).close_code == 1002


def test_continuation_after_a_finished_message_is_a_protocol_error() -> None:
    stream = (client_frame(Opcode.TEXT, b"a", fin=False) + client_frame(Opcode.CONT, b"b")
              + client_frame(Opcode.CONT, b"c"))
    assert violation(stream).close_code == 1002


@pytest.mark.parametrize("opcode", [Opcode.TEXT, Opcode.BINARY])
def test_new_data_frame_while_a_fragmented_message_is_open_is_a_protocol_error(opcode: Opcode) -> None:
    stream = client_frame(Opcode.TEXT, b"start", fin=False) + client_frame(opcode, b"again")
    assert violation(stream).close_code == 1002


def test_oversized_message_is_refused_from_its_header_before_the_payload_arrives() -> None:
    frame = client_frame(Opcode.BINARY, b"z" * 70_000)
    parser = ws.FrameParser(65_536)
    with pytest.raises(ws.ProtocolViolation) as err:
        parser.feed(frame[:10])  # the 2-byte header and the 8-byte length; not even the mask
    assert err.value.close_code == 1009


def test_oversized_message_is_refused_when_its_header_arrives_split() -> None:
    parser = ws.FrameParser(1000)
    header = raw_frame(0x80 | ws.OP_TEXT, length=10_000_000)
    assert parser.feed(header[:1]) == []
    assert parser.feed(header[1:3]) == []
    with pytest.raises(ws.ProtocolViolation) as err:
        parser.feed(header[3:10])
    assert err.value.close_code == 1009


def test_one_byte_over_the_limit_is_refused() -> None:
    assert violation(client_frame(Opcode.TEXT, b"a" * 101), max_message_bytes=100).close_code == 1009


def test_fragments_whose_sum_passes_the_limit_are_refused_at_the_header_that_passes_it() -> None:
    parser = ws.FrameParser(100)
    assert parser.feed(client_frame(Opcode.TEXT, b"a" * 60, fin=False)) == []
    assert parser.feed(client_frame(Opcode.CONT, b"b" * 30, fin=False)) == []
    with pytest.raises(ws.ProtocolViolation) as err:
        parser.feed(client_frame(Opcode.CONT, b"c" * 11)[:2])
    assert err.value.close_code == 1009


def test_length_with_the_top_bit_set_is_a_protocol_error() -> None:
    header = bytes((0x80 | ws.OP_BINARY, 0x80 | 127)) + (1 << 63).to_bytes(8, "big") + MASK
    assert violation(header, max_message_bytes=1 << 64).close_code == 1002


def test_violation_carries_a_reason() -> None:
    err = violation(raw_frame(0x83, b"x"))
    assert err.reason and str(err) == err.reason


# -- close payloads ------------------------------------------------------------------------------------


def test_close_without_payload_means_no_status() -> None:
    assert ws.parse_close(b"") == (1005, "")


def test_close_with_a_one_byte_payload_is_a_protocol_error() -> None:
    with pytest.raises(ws.ProtocolViolation) as err:
        ws.parse_close(b"\x03")
    assert err.value.close_code == 1002


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535])
def test_invalid_close_codes_are_a_protocol_error(code: int) -> None:
    with pytest.raises(ws.ProtocolViolation) as err:
        ws.parse_close(code.to_bytes(2, "big") + b"why")
    assert err.value.close_code == 1002


@pytest.mark.parametrize("code", [
    1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4000, 4999,
])
def test_valid_close_codes_are_returned_with_their_reason(code: int) -> None:
    assert ws.parse_close(Close(code, "ça va").serialize()) == (code, "ça va")


def test_close_code_without_reason() -> None:
    assert ws.parse_close(b"\x03\xe8") == (1000, "")


@pytest.mark.parametrize("reason", [b"\xff", b"\xc3", b"ok \xed\xa0\x80"])
def test_close_reason_that_is_not_utf8_is_invalid_data(reason: bytes) -> None:
    with pytest.raises(ws.ProtocolViolation) as err:
        ws.parse_close(b"\x03\xe8" + reason)
    assert err.value.close_code == 1007


# -- server frames out, read back with the websockets parser -------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70_000])
def test_text_frame_is_read_by_websockets(size: int) -> None:
    payload = random.Random(size).randbytes(size)
    frame = parse_server_frame(ws.text_frame(payload))
    assert (frame.opcode, frame.fin, bytes(frame.data)) == (Opcode.TEXT, True, payload)


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
def test_text_frame_uses_the_shortest_length_encoding(size: int) -> None:
    assert ws.text_frame(b"a" * size) == Frame(Opcode.TEXT, b"a" * size).serialize(mask=False)


@pytest.mark.parametrize("payload", [b"", b"ping data", b"p" * 125])
def test_pong_frame_echoes_the_ping_payload(payload: bytes) -> None:
    frame = parse_server_frame(ws.pong_frame(payload))
    assert (frame.opcode, frame.fin, bytes(frame.data)) == (Opcode.PONG, True, payload)


def test_pong_frame_never_exceeds_a_control_frame() -> None:
    frame = parse_server_frame(ws.pong_frame(b"p" * 200))
    assert bytes(frame.data) == b"p" * 125


def test_ping_frame_is_an_empty_ping() -> None:
    frame = parse_server_frame(ws.PING_FRAME)
    assert (frame.opcode, frame.fin, bytes(frame.data)) == (Opcode.PING, True, b"")


@pytest.mark.parametrize("code, reason", [
    (1000, ""), (1001, "server shutting down"), (1008, "policy"), (4001, "ünïcode"),
])
def test_close_frame_is_read_by_websockets(code: int, reason: str) -> None:
    frame = parse_server_frame(ws.close_frame(code, reason))
    assert frame.opcode == Opcode.CLOSE
    assert Close.parse(bytes(frame.data)) == Close(code, reason)
    assert ws.parse_close(bytes(frame.data)) == (code, reason)


def test_close_reason_is_cut_to_123_bytes() -> None:
    frame = parse_server_frame(ws.close_frame(1011, "r" * 500))
    assert Close.parse(bytes(frame.data)) == Close(1011, "r" * 123)


def test_close_reason_is_cut_without_splitting_a_character() -> None:
    frame = parse_server_frame(ws.close_frame(1000, "é" * 100))  # 200 bytes; 123 would split an é
    close = Close.parse(bytes(frame.data))
    assert close == Close(1000, "é" * 61)
    assert len(frame.data) == 2 + 122


@pytest.mark.parametrize("char", ["€", "𝄞"])  # 3- and 4-byte characters
def test_close_reason_cut_keeps_whole_multibyte_characters(char: str) -> None:
    reason = char * 100
    payload = bytes(parse_server_frame(ws.close_frame(1000, reason)).data)
    code, kept = ws.parse_close(payload)
    assert code == 1000
    assert reason.startswith(kept)
    assert 123 - len(char.encode()) < len(kept.encode()) <= 123


def test_server_frames_are_read_back_by_the_parser_once_masked() -> None:
    """The parser and the encoders agree: what the server writes, masked like a client, reads the same."""
    for frame in (ws.text_frame(b"t" * 70_000), ws.pong_frame(b"pp"), ws.close_frame(1000, "bye"), ws.PING_FRAME):
        parsed = parse_server_frame(frame)
        masked = Frame(parsed.opcode, parsed.data, parsed.fin).serialize(mask=True)
        assert ws.FrameParser(1 << 20).feed(masked) == [(int(parsed.opcode), bytes(parsed.data))]


# -- UTF-8 of text messages, fragment limit, messages before a violation ---------------------------------


@pytest.mark.parametrize("bad", [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\xe2\x82"])
def test_text_message_that_is_not_utf8_is_1007(bad: bytes) -> None:
    assert violation(client_frame(Opcode.TEXT, b"ok " + bad)).close_code == 1007


def test_binary_message_is_not_checked_for_utf8() -> None:
    assert ws.FrameParser(4096).feed(client_frame(Opcode.BINARY, b"\xff\xfe")) == [(ws.OP_BINARY, b"\xff\xfe")]


def test_fragmented_text_fails_at_the_fragment_with_the_bad_byte_not_at_the_end() -> None:
    parser = ws.FrameParser(4096)
    assert parser.feed(client_frame(Opcode.TEXT, "caf".encode(), fin=False)) == []
    with pytest.raises(ws.ProtocolViolation) as err:
        parser.feed(client_frame(Opcode.CONT, b"\xc3\x28", fin=False))  # the message is not over yet
    assert err.value.close_code == 1007


def test_fragmented_text_may_split_a_character_but_may_not_end_inside_one() -> None:
    data = "é€𝄞".encode()
    parser = ws.FrameParser(4096)
    stream = b"".join(client_frame(Opcode.TEXT if i == 0 else Opcode.CONT, data[i:i + 1], fin=i == len(data) - 1)
                      for i in range(len(data)))
    assert parser.feed(stream) == [(ws.OP_TEXT, data)]
    truncated = client_frame(Opcode.TEXT, data[:1], fin=False) + client_frame(Opcode.CONT, data[1:3])  # é, half a €
    assert violation(truncated).close_code == 1007


def test_a_message_in_more_than_max_fragments_is_1009_and_at_the_limit_is_read() -> None:
    limit = ws.FrameParser.MAX_FRAGMENTS
    first = client_frame(Opcode.BINARY, b"a", fin=False)
    empty = client_frame(Opcode.CONT, b"", fin=False)
    last = client_frame(Opcode.CONT, b"z")
    assert ws.FrameParser(4096).feed(first + empty * (limit - 2) + last) == [(ws.OP_BINARY, b"az")]
    assert violation(first + empty * (limit - 1) + last).close_code == 1009


def test_messages_before_a_violation_are_carried_by_it_and_nothing_is_read_after() -> None:
    parser = ws.FrameParser(4096)
    stream = (client_frame(Opcode.TEXT, b"one") + client_frame(Opcode.PING, b"p")
              + Frame(Opcode.TEXT, b"unmasked").serialize(mask=False))
    with pytest.raises(ws.ProtocolViolation) as err:
        parser.feed(stream)
    assert err.value.messages == [(ws.OP_TEXT, b"one"), (ws.OP_PING, b"p")]
    assert err.value.fail_frame() == (ws.OP_FAIL, b"\x03\xea" + err.value.reason.encode())
    assert parser.feed(client_frame(Opcode.TEXT, b"after")) == []
