"""The JSON frames of the AgentChat protocol: a message's bytes in, a validated frame out; frames out,
bytes to send. No I/O. (The WebSocket framing they travel in is ``core/rfc6455.py``.)

Client → server: one JSON object per WebSocket message. Server → client: one or more JSON objects per
WebSocket message, separated by ``\\n`` (a busy socket gets several frames coalesced into one message;
compact JSON never contains a raw newline). The shapes are specified in ``protocol/frames/``.

Validation is strict: unknown types, missing fields, unexpected fields and wrong types are all
``invalid_field`` / ``unknown_frame`` errors that name the field, so a third-party client learns what
it got wrong from the error alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from agentchat.errors import error

# \Z, not $: Python's $ also matches before a final newline, so "ch_...\n" would pass.
CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
CHANNEL_ID_RE = re.compile(r"^ch_[A-Za-z0-9_-]{16,32}\Z")
PEEK_ID_RE = re.compile(r"^pk_[A-Za-z0-9_-]{16,32}\Z")
B64URL_RE = re.compile(r"^[A-Za-z0-9_-]*\Z")
# Close codes of the AgentChat protocol (4000-4999, the application's own; listed in protocol/frames.md, section 11).
CLOSE_AUTH = 4001  # no valid token, or a first frame that is not a valid hello
CLOSE_REMOVED = 4003  # the token's access ended (a peek's time is up, removed from the channel)
CLOSE_SLOW_CONSUMER = 4008  # the socket's send queue overflowed
# RFC 6455's registered "try again later": the server could not bring the socket's catch-up to the
# live stream (the store or the bus stayed away); the client reconnects and resumes from what it has.
CLOSE_TRY_AGAIN = 1013

MAX_EPOCH = 2**31 - 1
MAX_SEQ = 2**63 - 1

NONCE_B64_LEN = 16  # 12 bytes
SIGNATURE_B64_LEN = 86  # 64 bytes
GCM_TAG_BYTES = 16


# A watch of the public indicators names at most this many channels: each unknown one costs a store read
# (once; the answer is remembered), so a frame must not be able to ask for thousands.
MAX_WATCH_CHANNELS = 100

def b64url_len(n_bytes: int) -> int:
    return (n_bytes * 4 + 2) // 3


# ----------------------------------------------------------------------------------- field checks


def as_int(value: Any) -> int | None:
    """An integer field's value, or None if it is not one. JSON Schema's ``integer`` includes numbers
    with a zero fraction (``3.0``), so the schemas cannot refuse them and neither does the server: they
    are read as the integer (up to 2^53, where a double is still exact). Booleans are not integers."""
    if type(value) is int:
        return value
    if type(value) is float and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    return None


def _field(frame: dict[str, Any], name: str, kind: type, *, required: bool = True) -> Any:
    value = frame.get(name)
    if value is None:
        if required:
            raise error("invalid_field", f"field '{name}' is required")
        return None
    if kind is int:
        number = as_int(value)
        if number is None:
            raise error("invalid_field", f"field '{name}' must be an integer")
        frame[name] = number  # what is stored and passed on is written as an integer
        return number
    # bool is an int in Python; a JSON true is never a valid number here.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise error("invalid_field", f"field '{name}' must be {_KIND_NAMES[kind]}")
    return value


_KIND_NAMES = {int: "an integer", str: "a string", dict: "an object", list: "an array", bool: "a boolean"}


def _only(frame: dict[str, Any], allowed: frozenset[str], where: str) -> None:
    extra = frame.keys() - allowed
    if extra:
        raise error("invalid_field", f"unexpected field '{sorted(extra)[0]}' in {where}")


def check_channel_id(value: Any, name: str = "channel") -> str:
    if not isinstance(value, str) or not CHANNEL_ID_RE.match(value):
        raise error("invalid_field", f"field '{name}' must be a channel id (ch_...)")
    return value


def check_peek_id(value: Any, name: str = "peek") -> str:
    if not isinstance(value, str) or not PEEK_ID_RE.match(value):
        raise error("invalid_field", f"field '{name}' must be a peek id (pk_...)")
    return value


def check_client_id(value: Any) -> str:
    if not isinstance(value, str) or not CLIENT_ID_RE.match(value):
        raise error("invalid_field", "field 'client_id' must be 1-64 characters of A-Z a-z 0-9 _ -")
    return value


def _b64_field(env: dict[str, Any], name: str, *, exact_len: int | None = None, max_len: int | None = None) -> str:
    value = env.get(name)
    if not isinstance(value, str) or not B64URL_RE.match(value):
        raise error("invalid_field", f"envelope field '{name}' must be unpadded base64url")
    if exact_len is not None and len(value) != exact_len:
        raise error("invalid_field", f"envelope field '{name}' has the wrong length")
    if max_len is not None and len(value) > max_len:
        raise error("too_large", f"envelope field '{name}' is over the size limit")
    if len(value) % 4 == 1:
        raise error("invalid_field", f"envelope field '{name}' is not valid base64url")
    return value


_ENVELOPE_FIELDS = frozenset({"epoch", "nonce", "ciphertext", "signature"})


_B64URL_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
_MIN_CIPHERTEXT_LEN = b64url_len(GCM_TAG_BYTES)


def _all_b64url(text: str) -> bool:
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        return False
    return not raw.translate(None, _B64URL_ALPHABET)


def _envelope_is_valid(env: Any, max_ciphertext_len: int) -> bool:
    """Every envelope rule in one pass, without building errors: the path of every good message.
    ``check_envelope`` re-checks a failing envelope field by field to say what is wrong."""
    if type(env) is not dict or len(env) != 4:
        return False
    epoch, nonce = env.get("epoch"), env.get("nonce")
    ciphertext, signature = env.get("ciphertext"), env.get("signature")
    return (type(epoch) is int and 0 <= epoch <= MAX_EPOCH
            and type(nonce) is str and len(nonce) == NONCE_B64_LEN
            and type(signature) is str and len(signature) == SIGNATURE_B64_LEN
            and type(ciphertext) is str and _MIN_CIPHERTEXT_LEN <= len(ciphertext) <= max_ciphertext_len
            and len(ciphertext) % 4 != 1
            and _all_b64url(nonce + ciphertext + signature))


def check_envelope(env: Any, max_ciphertext_bytes: int) -> dict[str, Any]:
    """Shape and size of an encrypted envelope; the content stays opaque to the server."""
    if _envelope_is_valid(env, b64url_len(max_ciphertext_bytes + GCM_TAG_BYTES)):
        return env  # type: ignore[no-any-return]
    if not isinstance(env, dict):
        raise error("invalid_field", "field 'envelope' must be an object")
    _only(env, _ENVELOPE_FIELDS, "envelope")
    epoch = _field(env, "epoch", int)
    if not 0 <= epoch <= MAX_EPOCH:
        raise error("invalid_field", "envelope field 'epoch' is out of range")
    _b64_field(env, "nonce", exact_len=NONCE_B64_LEN)
    ct = _b64_field(env, "ciphertext", max_len=b64url_len(max_ciphertext_bytes + GCM_TAG_BYTES))
    if len(ct) < b64url_len(GCM_TAG_BYTES):
        raise error("invalid_field", "envelope field 'ciphertext' is shorter than an AES-GCM tag")
    _b64_field(env, "signature", exact_len=SIGNATURE_B64_LEN)
    return env


# ----------------------------------------------------------------------------------- client frames


@dataclass(slots=True)
class Hello:
    token: str
    resume: dict[str, int]  # channel id -> last sequence number the client has
    ref: str | None = None


@dataclass(slots=True)
class Send:
    channel: str
    client_id: str
    envelope: dict[str, Any]
    ref: str | None = None


@dataclass(slots=True)
class Ping:
    ref: str | None = None


@dataclass(slots=True)
class Resume:
    """Catch up on channels after the connection is established (same rules as hello's resume)."""

    resume: dict[str, int]
    ref: str | None = None


@dataclass(slots=True)
class Refuse:
    peek: str
    ref: str | None = None


@dataclass(slots=True)
class GrantKey:
    """A member's client hands an active peek the current epoch key, wrapped for the peeker."""

    peek: str
    epoch: int
    wrapped_key: dict[str, Any]
    ref: str | None = None


@dataclass(slots=True)
class WatchIndicators:
    """Subscribe to live indicator updates (all channels, or the listed ones)."""

    channels: list[str] | None
    ref: str | None = None


ClientFrame = Hello | Send | Ping | Resume | Refuse | GrantKey | WatchIndicators


def _ref(frame: dict[str, Any]) -> str | None:
    ref = frame.get("ref")
    if ref is None:
        return None
    if not isinstance(ref, str) or len(ref) > 64:
        raise error("invalid_field", "field 'ref' must be a string of at most 64 characters")
    return ref


def _resume_map(value: Any) -> dict[str, int]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise error("invalid_field", "field 'resume' must be an object of channel id -> last seq")
    if len(value) > 10_000:
        raise error("too_large", "field 'resume' names too many channels")
    for channel, seq in value.items():
        check_channel_id(channel, "resume")
        number = as_int(seq)
        if number is None or not 0 <= number <= MAX_SEQ:
            raise error("invalid_field", f"resume[{channel}] must be a sequence number >= 0")
        value[channel] = number
    return value


_HELLO = frozenset({"type", "ref", "token", "resume"})
_SEND = frozenset({"type", "ref", "channel", "client_id", "envelope"})
_PING = frozenset({"type", "ref"})
_RESUME = frozenset({"type", "ref", "resume"})
_REFUSE = frozenset({"type", "ref", "peek"})
_GRANT = frozenset({"type", "ref", "peek", "epoch", "wrapped_key"})
_WATCH = frozenset({"type", "ref", "channels"})


def parse_json_object(data: bytes | str, max_bytes: int) -> dict[str, Any]:
    if len(data) > max_bytes:
        raise error("too_large", f"frame is larger than {max_bytes} bytes")
    try:
        frame = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise error("bad_json", "frame is not valid JSON") from None
    if not isinstance(frame, dict):
        raise error("invalid_field", "a frame must be a JSON object")
    return frame


def decode_client_frame(data: bytes | str, *, max_bytes: int, max_ciphertext_bytes: int) -> ClientFrame:
    """Parse and validate one client frame. Raises an ``AgentChatError`` naming what is wrong."""
    frame = parse_json_object(data, max_bytes)
    kind = frame.get("type")
    if kind == "send":
        _only(frame, _SEND, "send")
        return Send(
            channel=check_channel_id(frame.get("channel")),
            client_id=check_client_id(frame.get("client_id")),
            envelope=check_envelope(frame.get("envelope"), max_ciphertext_bytes),
            ref=_ref(frame),
        )
    if kind == "hello":
        _only(frame, _HELLO, "hello")
        token = _field(frame, "token", str)
        if len(token) > 4096:
            raise error("too_large", "token is too long")
        return Hello(token=token, resume=_resume_map(frame.get("resume")), ref=_ref(frame))
    if kind == "ping":
        _only(frame, _PING, "ping")
        return Ping(ref=_ref(frame))
    if kind == "resume":
        _only(frame, _RESUME, "resume")
        return Resume(resume=_resume_map(_field(frame, "resume", dict)), ref=_ref(frame))
    if kind == "refuse":
        _only(frame, _REFUSE, "refuse")
        return Refuse(peek=check_peek_id(frame.get("peek")), ref=_ref(frame))
    if kind == "grant_key":
        _only(frame, _GRANT, "grant_key")
        epoch = _field(frame, "epoch", int)
        if not 0 <= epoch <= MAX_EPOCH:
            raise error("invalid_field", "field 'epoch' is out of range")
        wrapped = check_wrapped_key(frame.get("wrapped_key"), "wrapped_key")
        return GrantKey(peek=check_peek_id(frame.get("peek")), epoch=epoch, wrapped_key=wrapped, ref=_ref(frame))
    if kind == "watch_indicators":
        _only(frame, _WATCH, "watch_indicators")
        channels = _field(frame, "channels", list, required=False)
        if channels is not None:
            if len(channels) > MAX_WATCH_CHANNELS:
                raise error("too_large", f"field 'channels' lists more than {MAX_WATCH_CHANNELS} channels")
            channels = [check_channel_id(c, "channels") for c in channels]
        return WatchIndicators(channels=channels, ref=_ref(frame))
    if kind is None:
        raise error("invalid_field", "field 'type' is required")
    raise error("unknown_frame", f"unknown frame type {str(kind)[:40]!r}")


_WRAPPED_FIELDS = frozenset({"alg", "ephemeral_key", "nonce", "ciphertext"})
WRAP_ALG = "x25519-hkdf-sha256-aes256gcm"


def check_wrapped_key(value: Any, name: str) -> dict[str, Any]:
    """A key wrapped for one recipient (see protocol/crypto.md); opaque apart from its shape."""
    if not isinstance(value, dict):
        raise error("invalid_field", f"field '{name}' must be a wrapped key object")
    _only(value, _WRAPPED_FIELDS, name)
    if value.get("alg") != WRAP_ALG:
        raise error("invalid_field", f"field '{name}.alg' must be {WRAP_ALG!r}")
    for part, length in (("ephemeral_key", 43), ("nonce", NONCE_B64_LEN), ("ciphertext", 64)):
        item = value.get(part)
        if not isinstance(item, str) or len(item) != length or not B64URL_RE.match(item):
            raise error("invalid_field", f"field '{name}.{part}' has the wrong shape")
    return value


# ----------------------------------------------------------------------------------- server frames


def encode(frame: dict[str, Any]) -> bytes:
    return orjson.dumps(frame)


def ack_prefix(channel: str, client_id: str, ref: str | None) -> bytes:
    """Everything of an ``ack`` frame before its number; ``ack_prefix(...) + b"%d}" % seq`` is the
    frame (the same bytes ``encode`` gives for the dict). Built before the number is known, so the
    ack itself is one concatenation."""
    head = b'{"type":"ack","channel":' + orjson.dumps(channel) + b',"client_id":' + orjson.dumps(client_id)
    if ref is not None:
        head += b',"ref":' + orjson.dumps(ref)
    return head + b',"seq":'


def error_frame(err_wire: dict[str, Any], ref: str | None = None) -> bytes:
    frame: dict[str, Any] = {"type": "error", **err_wire}
    if ref is not None:
        frame["ref"] = ref
    return orjson.dumps(frame)


def message_body(channel: str, sender: str, client_id: str, ts_ms: int, envelope: dict[str, Any]) -> bytes:
    """The part of a ``message`` frame that does not depend on its sequence number.

    The bus carries this body and the number separately; ``message_frame`` joins them, once per
    process, so a fan-out to N sockets costs one concatenation, not N encodings.
    """
    return orjson.dumps(
        {"channel": channel, "sender": sender, "client_id": client_id, "ts": ts_ms, "envelope": envelope}
    )


def message_frame(seq: int, body: bytes) -> bytes:
    # body is '{"channel":...}': splice the type and number in front of its first key.
    return b'{"type":"message","seq":' + str(seq).encode() + b"," + body[1:]


def gap_frame(channel: str, seq: int, ts_ms: int) -> bytes:
    """Number ``seq`` of ``channel`` was handed out (maybe delivered live) but its message was never
    stored and never will be (its server process died first). Stored in history where the message
    would be; ``ts_ms``: when the gap was declared. 'type' then 'seq' first, as in ``message_frame``."""
    return encode({"type": "gap", "seq": seq, "channel": channel, "ts": ts_ms})


def is_gap(frame: bytes) -> bool:
    """Whether a stored or sent frame is a ``gap`` frame (rather than a ``message``)."""
    return frame.startswith(b'{"type":"gap"')


def split_frames(data: bytes | str) -> list[dict[str, Any]]:
    """Client side: one server WebSocket message -> its frames."""
    if isinstance(data, str):
        data = data.encode()
    return [orjson.loads(line) for line in data.split(b"\n") if line]
