"""The JSON frame codec, without an event loop: bytes in, frames or errors out."""

from __future__ import annotations

import orjson
import pytest

from agentchat.core import frames
from agentchat.errors import AgentChatError
from agentchat.store.messages import frame_seq

CHANNEL = "ch_" + "A" * 22
ENVELOPE = {"epoch": 1, "nonce": "A" * 16, "ciphertext": "B" * 40, "signature": "C" * 86}


def decode(frame: object) -> frames.ClientFrame:
    data = frame if isinstance(frame, bytes) else orjson.dumps(frame)
    return frames.decode_client_frame(data, max_bytes=4096, max_ciphertext_bytes=1024)


def code_of(frame: object) -> str:
    with pytest.raises(AgentChatError) as err:
        decode(frame)
    return err.value.code


def test_send_round_trip() -> None:
    frame = decode({"type": "send", "ref": "r1", "channel": CHANNEL, "client_id": "abc_1", "envelope": ENVELOPE})
    assert frame == frames.Send(channel=CHANNEL, client_id="abc_1", envelope=ENVELOPE, ref="r1")


def test_hello_with_resume() -> None:
    frame = decode({"type": "hello", "token": "t", "resume": {CHANNEL: 5}})
    assert frame == frames.Hello(token="t", resume={CHANNEL: 5})


@pytest.mark.parametrize("frame, code", [
    (b"{", "bad_json"),
    (b"[1]", "invalid_field"),
    ({"ref": "x"}, "invalid_field"),
    ({"type": "dance"}, "unknown_frame"),
    ({"type": "ping", "extra": 1}, "invalid_field"),
    ({"type": "ping", "ref": 5}, "invalid_field"),
    ({"type": "hello"}, "invalid_field"),
    ({"type": "hello", "token": "t", "resume": {"general": 1}}, "invalid_field"),
    ({"type": "hello", "token": "t", "resume": {CHANNEL: -1}}, "invalid_field"),
    ({"type": "hello", "token": "t", "resume": {CHANNEL: True}}, "invalid_field"),
    ({"type": "send", "channel": CHANNEL, "client_id": "c", "envelope": {**ENVELOPE, "epoch": True}}, "invalid_field"),
    ({"type": "send", "channel": CHANNEL, "client_id": "c", "envelope": {**ENVELOPE, "nonce": "A" * 15}}, "invalid_field"),
    ({"type": "send", "channel": CHANNEL, "client_id": "c", "envelope": {**ENVELOPE, "ciphertext": "A"}}, "invalid_field"),
    ({"type": "send", "channel": CHANNEL, "client_id": "c", "envelope": {**ENVELOPE, "ciphertext": "+/=="}}, "invalid_field"),
    ({"type": "send", "channel": CHANNEL, "client_id": "c", "envelope": {**ENVELOPE, "ciphertext": "A" * 2000}}, "too_large"),
    ({"type": "send", "channel": CHANNEL, "client_id": "", "envelope": ENVELOPE}, "invalid_field"),
    ({"type": "send", "channel": CHANNEL, "client_id": "c" * 65, "envelope": ENVELOPE}, "invalid_field"),
    ({"type": "send", "channel": "ch_short", "client_id": "c", "envelope": ENVELOPE}, "invalid_field"),
    ({"type": "send", "channel": CHANNEL, "client_id": "c", "envelope": [1]}, "invalid_field"),
    (b"{" + b" " * 5000 + b"}", "too_large"),
])
def test_bad_frames_have_stable_codes(frame: object, code: str) -> None:
    assert code_of(frame) == code


def test_message_frame_is_spliced_once_and_parses() -> None:
    body = frames.message_body(CHANNEL, "did:agentchat:zX", "c1", 1234, ENVELOPE)
    frame = frames.message_frame(42, body)
    assert orjson.loads(frame) == {"type": "message", "seq": 42, "channel": CHANNEL, "sender": "did:agentchat:zX",
                                   "client_id": "c1", "ts": 1234, "envelope": ENVELOPE}
    assert frame_seq(frame) == 42


def test_split_frames_reads_coalesced_messages() -> None:
    joined = b"\n".join([frames.encode({"type": "pong"}), frames.encode({"type": "ack", "seq": 1})])
    assert frames.split_frames(joined) == [{"type": "pong"}, {"type": "ack", "seq": 1}]
    assert frames.split_frames(joined.decode()) == frames.split_frames(joined)


def test_error_frame_carries_ref() -> None:
    frame = orjson.loads(frames.error_frame({"code": "x", "message": "y", "retryable": False}, "r9"))
    assert frame == {"type": "error", "code": "x", "message": "y", "retryable": False, "ref": "r9"}


@pytest.mark.parametrize("ref", [None, "r-1", 'quote " and \\ backslash', "ünïcode"])
def test_ack_prefix_gives_the_same_bytes_as_encoding_the_frame(ref: str | None) -> None:
    frame = {"type": "ack", "channel": "ch_" + "a" * 22, "client_id": "c-1_x", "seq": 12345}
    if ref is not None:
        frame["ref"] = ref
    built = frames.ack_prefix(frame["channel"], frame["client_id"], ref) + b"%d}" % 12345
    assert orjson.loads(built) == frame


@pytest.mark.parametrize("value, expected", [(3, 3), (3.0, 3), (-0.0, 0), (2.0**53, 2**53), (2.5, None),
                                             (2.0**60, None), (True, None), ("3", None), (None, None)])
def test_integers_may_be_written_with_a_zero_fraction(value: object, expected: int | None) -> None:
    result = frames.as_int(value)
    assert result == expected and (result is None or type(result) is int)


def test_an_envelope_epoch_written_as_1_0_is_read_and_passed_on_as_1() -> None:
    frame = frames.decode_client_frame(orjson.dumps({"type": "send", "channel": "ch_" + "a" * 16, "client_id": "c",
                                                     "envelope": {**ENVELOPE, "epoch": 1.0}}), max_bytes=1 << 20,
                                       max_ciphertext_bytes=1 << 16)
    assert type(frame.envelope["epoch"]) is int and frame.envelope["epoch"] == 1
