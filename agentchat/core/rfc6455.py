"""The server side of RFC 6455 WebSockets, without I/O: the opening handshake, the frame codec and
one connection's state (``ServerConnection``: the close handshake, the pong to a ping, and the
keepalive: when a silent peer gets a ping and when it is taken for gone).

``server/connections.py`` runs it on an asyncio transport. It exists because a socket served through
aiohttp's ``WebSocketResponse`` keeps ~13 KB of HTTP and WebSocket state alive for as long as it is
open (the parsed request, the HTTP protocol, two tasks, a reader, a writer and a queue); this codec
keeps a few hundred bytes, and reads a frame in a handful of bytecode steps.

What it accepts: masked client frames, text/binary messages (fragmented or not), ping, pong and close.
No extension is ever negotiated (so no compression), so any reserved bit set is a protocol error.
Text messages must be UTF-8 (section 8.1: else the connection fails with 1007). A whole text message
is checked with ``bytes.isascii`` and, only if it is not ASCII, one ``bytes.decode`` (C code, a
fraction of the JSON parse that follows); a fragmented
one with an incremental decoder fed each fragment as it arrives, so an invalid byte fails the
connection at the fragment that carries it rather than after the whole message was buffered.
"""

from __future__ import annotations

import base64
import codecs
import enum
import hashlib
import struct
from collections.abc import Mapping

try:  # the C helper of the websockets package, a dependency of the SDK
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - pure-Python fallback of the same package
    from websockets.utils import apply_mask

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
_KNOWN_OPCODES = frozenset((OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG))

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_NO_STATUS = 1005  # never sent: what a close frame without a payload means
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY = 1008  # policy violation (AgentChat: a socket that kept flooding)
CLOSE_TOO_BIG = 1009
# Not an opcode of RFC 6455: the pseudo-frame a connection queues to fail itself once the messages
# that arrived before a protocol violation are handled (payload: 2-byte close code, then the reason).
OP_FAIL = 0x10

# RFC 6455 section 1.3: the GUID every server appends to the client's key.
_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# A WebSocket ping with no payload (section 5.5.2).
PING_FRAME = b"\x89\x00"


class ProtocolViolation(Exception):
    """The peer broke RFC 6455: the connection is failed with this close code.

    ``messages`` are the whole messages and control frames that arrived before the violation in the
    same ``feed``: they are valid, and are handled before the connection is failed (a message is not
    lost because the bytes after it, read together with it, were bad)."""

    def __init__(self, close_code: int, reason: str) -> None:
        super().__init__(reason)
        self.close_code = close_code
        self.reason = reason
        self.messages: list[tuple[int, bytes]] = []

    def fail_frame(self) -> tuple[int, bytes]:
        """The ``OP_FAIL`` pseudo-frame for this violation (see ``OP_FAIL``)."""
        return OP_FAIL, self.close_code.to_bytes(2, "big") + self.reason.encode("utf-8")


class UpgradeRefused(Exception):
    """An HTTP request that cannot be upgraded to a WebSocket, with the HTTP status to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# -- opening handshake (section 4.2) --------------------------------------------------------------


def _has_token(value: str, token: str) -> bool:
    return any(part.strip().lower() == token for part in value.split(","))


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _ACCEPT_GUID).digest()).decode("ascii")


def check_upgrade(method: str, headers: Mapping[str, str]) -> str:
    """The ``Sec-WebSocket-Accept`` value for a valid upgrade request; else ``UpgradeRefused``.

    ``headers`` is looked up by lower-case name."""
    if method != "GET":
        raise UpgradeRefused(400, "a WebSocket upgrade is a GET request")
    if not _has_token(headers.get("upgrade", ""), "websocket"):
        raise UpgradeRefused(426, "this route is a WebSocket: send 'Upgrade: websocket'")
    if not _has_token(headers.get("connection", ""), "upgrade"):
        raise UpgradeRefused(400, "a WebSocket upgrade needs 'Connection: Upgrade'")
    if headers.get("sec-websocket-version", "").strip() != "13":
        raise UpgradeRefused(426, "only WebSocket version 13 is served (Sec-WebSocket-Version: 13)")
    key = headers.get("sec-websocket-key", "").strip()
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError(key)
    except ValueError:
        raise UpgradeRefused(400, "Sec-WebSocket-Key must be 16 random bytes in base64") from None
    return accept_key(key)


def switching_protocols(accept: str) -> bytes:
    """The complete ``101 Switching Protocols`` response."""
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept.encode("ascii") + b"\r\n\r\n")


# -- frames the server sends (section 5.2: unmasked) -----------------------------------------------


_TEXT_HEAD_16 = struct.Struct(">BBH").pack
_TEXT_HEAD_64 = struct.Struct(">BBQ").pack


def text_frame(payload: bytes) -> bytes:
    """A complete unmasked text message (built once per write: it is on the path of every delivery)."""
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65536:
        return _TEXT_HEAD_16(0x81, 126, size) + payload
    return _TEXT_HEAD_64(0x81, 127, size) + payload


def binary_frame(payload: bytes) -> bytes:
    """A complete unmasked binary message (the server sends none; the conformance echo does)."""
    frame = text_frame(payload)
    return b"\x82" + frame[1:]


def _control_frame(opcode: int, payload: bytes) -> bytes:
    return bytes((0x80 | opcode, len(payload))) + payload


def pong_frame(payload: bytes) -> bytes:
    """The answer to a ping: the same application data (at most 125 bytes, as the ping's)."""
    return _control_frame(OP_PONG, payload[:125])


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame; the reason is cut to fit a control frame (123 bytes of UTF-8)."""
    data = reason.encode("utf-8")[:123]
    while data:  # do not cut a character in two
        try:
            data.decode("utf-8")
            break
        except UnicodeDecodeError:
            data = data[:-1]
    return _control_frame(OP_CLOSE, code.to_bytes(2, "big") + data)


def _valid_close_code(code: int) -> bool:
    # Section 7.4: 1004-1006 and 1015 are never sent; 1012-1014 are registered since (IANA).
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def parse_close(payload: bytes) -> tuple[int, str]:
    """The code and reason of a received close frame."""
    if not payload:
        return CLOSE_NO_STATUS, ""
    if len(payload) == 1:
        raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, "close frame with a 1-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if not _valid_close_code(code):
        raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolViolation(CLOSE_INVALID_DATA, "close reason is not UTF-8") from None
    return code, reason


# -- frames the server reads ------------------------------------------------------------------------


_UTF8Decoder = codecs.getincrementaldecoder("utf-8")
# The parser's unfinished-frame state once it has failed: it reads nothing more.
_FAILED: list[bytes] = []


class FrameParser:
    """Client-to-server frames in, whole messages and control frames out, in arrival order.

    ``feed`` returns ``(opcode, payload)`` pairs: ``OP_TEXT``/``OP_BINARY`` with the whole (unmasked,
    reassembled) message, or a control opcode with its payload. It raises ``ProtocolViolation`` for
    anything RFC 6455 forbids (carrying the messages parsed before it), for a message over
    ``max_message_bytes`` as soon as its header says so (close code 1009), before its payload is
    buffered, for a message in more than ``MAX_FRAGMENTS`` frames (1009: each fragment, even an empty
    one, costs memory), and for a text message that is not UTF-8 (1007). Once it has raised, it reads
    nothing more. Bytes of an unfinished frame are kept as the chunks they came in and joined once,
    when enough have arrived."""

    # A class constant, not a slot: the same for every socket of a route, and no bytes per socket.
    MAX_FRAGMENTS = 1024

    __slots__ = ("max_message_bytes", "_chunks", "_need", "_fragments", "_fragments_size", "_decoder")

    def __init__(self, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self._chunks: list[bytes] | None = None  # an unfinished frame's bytes, while there is one
        # Bytes still missing before parsing the unfinished frame is worth trying again (a countdown, not
        # a second count of the bytes held: one slot less on every socket).
        self._need = 0
        self._fragments: list[bytes] | None = None  # a fragmented message's parts so far
        self._fragments_size = 0
        # While a fragmented message is open: its UTF-8 decoder if it is text, None if binary.
        self._decoder: codecs.IncrementalDecoder | None = None

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        chunks = self._chunks
        if chunks is not None:
            if chunks is _FAILED:
                return []
            chunks.append(data)
            self._need -= len(data)
            if self._need > 0:
                return []
            data = b"".join(chunks)
            self._chunks = None
        out: list[tuple[int, bytes]] = []
        # One loop in one frame of the interpreter (no call per read): it is on the path of every message.
        try:
            pos, end = 0, len(data)
            while end - pos >= 2:
                first, second = data[pos], data[pos + 1]
                if first & 0x70:
                    raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, "reserved bits set (no extension was negotiated)")
                if not second & 0x80:
                    raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, "client frames must be masked")
                opcode = first & 0x0F
                length = second & 0x7F
                head = pos + 2
                if length == 126:
                    if end - head < 2:
                        break
                    length = int.from_bytes(data[head:head + 2], "big")
                    head += 2
                elif length == 127:
                    if end - head < 8:
                        break
                    length = int.from_bytes(data[head:head + 8], "big")
                    head += 8
                    if length >> 63:
                        raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, "frame length over 2^63")
                if opcode >= OP_CLOSE:
                    if opcode not in _KNOWN_OPCODES:
                        raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode}")
                    if not first & 0x80 or length > 125:
                        raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, "control frames are single and at most 125 bytes")
                elif opcode > OP_BINARY:
                    raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode}")
                elif length + self._fragments_size > self.max_message_bytes:
                    raise ProtocolViolation(CLOSE_TOO_BIG, f"message over {self.max_message_bytes} bytes")
                start = head + 4
                stop = start + length
                if stop > end:
                    break
                payload = apply_mask(data[start:stop], data[head:start]) if length else b""
                pos = stop
                if opcode >= OP_CLOSE:
                    out.append((opcode, payload))
                elif opcode == OP_CONTINUATION:
                    fragments = self._fragments
                    if fragments is None:
                        raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, "continuation frame without a message to continue")
                    if len(fragments) >= self.MAX_FRAGMENTS:
                        raise ProtocolViolation(CLOSE_TOO_BIG, f"message in more than {self.MAX_FRAGMENTS} frames")
                    decoder = self._decoder
                    if decoder is not None:
                        _check_utf8(decoder, payload, first & 0x80)
                    fragments.append(payload)
                    self._fragments_size += length
                    if first & 0x80:
                        out.append((OP_BINARY if decoder is None else OP_TEXT, b"".join(fragments)))
                        self._fragments = self._decoder = None
                        self._fragments_size = 0
                elif self._fragments is not None:
                    raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, "new message before the fragmented one ended")
                elif first & 0x80:
                    if opcode == OP_TEXT and not payload.isascii():  # ASCII (most JSON) is UTF-8: no decoding
                        try:
                            payload.decode("utf-8")
                        except UnicodeDecodeError:
                            raise ProtocolViolation(CLOSE_INVALID_DATA, "text message is not UTF-8") from None
                    out.append((opcode, payload))
                else:
                    if opcode == OP_TEXT:
                        decoder = self._decoder = _UTF8Decoder()
                        _check_utf8(decoder, payload, 0)
                    self._fragments = [payload]
                    self._fragments_size = length
        except ProtocolViolation as exc:
            self._chunks = _FAILED
            self._fragments = self._decoder = None
            exc.messages = out
            raise
        if pos < end:
            rest = data[pos:]
            self._chunks = [rest]
            # The whole frame once its header tells its size; until then, any byte more.
            self._need = (_frame_size(rest) or len(rest) + 1) - len(rest)
        return out


def _check_utf8(decoder: codecs.IncrementalDecoder, payload: bytes, final: int) -> None:
    """Feeds one fragment of a text message to its decoder (which keeps an unfinished character for
    the next): invalid bytes fail the connection now, not once the message is whole."""
    try:
        decoder.decode(payload, bool(final))
    except UnicodeDecodeError:
        raise ProtocolViolation(CLOSE_INVALID_DATA, "text message is not UTF-8") from None


def _frame_size(head: bytes) -> int:
    """The size of the frame starting ``head`` (header, mask and payload), 0 if its header is unfinished."""
    if len(head) < 2:
        return 0
    length = head[1] & 0x7F
    if length == 126:
        return 8 + int.from_bytes(head[2:4], "big") if len(head) >= 4 else 0
    if length == 127:
        return 14 + int.from_bytes(head[2:10], "big") if len(head) >= 10 else 0
    return 6 + length


# -- one connection's state ------------------------------------------------------------------------

# How long a close handshake the server started may take: then the connection is dropped.
CLOSE_TIMEOUT = 5.0
# A peer that has sent nothing for PING_AFTER_SECONDS gets a ping; if it then sends nothing (not even
# the pong) for PONG_WAIT_SECONDS it is taken for gone (protocol/frames.md, "Ping").
PING_AFTER_SECONDS = 30.0
PONG_WAIT_SECONDS = 15.0


class Keepalive(enum.Enum):
    """What one heartbeat tick (``ServerConnection.tick``) asks of the transport adapter."""

    WAIT = "wait"  # nothing
    PING = "ping"  # write ``PING_FRAME``
    DROP = "drop"  # drop the connection without a close handshake (the peer sees 1006)


def heartbeat_ticks(tick_seconds: float) -> tuple[int, int]:
    """``(ping_at, drop_at)`` for ``ServerConnection.tick`` when the heartbeat ticks every
    ``tick_seconds``: the ping one tick later than the silence alone says (a tick can come just after
    the peer's last frame, and the peer is owed ``PING_AFTER_SECONDS`` of silence before it), the drop
    ``PONG_WAIT_SECONDS`` after the ping."""
    ping_at = round(PING_AFTER_SECONDS / tick_seconds) + 1
    return ping_at, ping_at + round(PONG_WAIT_SECONDS / tick_seconds)


class ServerConnection(FrameParser):
    """One connection's state on the server side, without I/O: the frame parser plus the close
    handshake (RFC 6455, sections 5.5.1 and 7) and the keepalive.

    The transport adapter (``server/connections.py``) feeds it what happened (bytes read with
    ``feed``, a close or ping frame read, the application's wish to close or to fail the connection)
    and writes what each call returns: a frame, or nothing when None. After a frame from
    ``send_close`` it drops the connection if the peer has not answered within ``CLOSE_TIMEOUT``;
    after ``receive_close`` and ``fail`` it closes the TCP connection (the server closes first,
    section 7.1.1). Once ``close_sent``, messages read are dropped and nothing more may be written.

    Keepalive: the clock is a tick, injected by whoever calls ``tick`` (the server's one heartbeat
    task, every few seconds for every socket, so that an idle socket holds no timer). After
    ``watch``, the adapter calls ``heard`` whenever ``feed`` returned frames (any frame is a sign of
    life, pongs included) and does what ``tick`` returns.

    One object per socket with the parser (a subclass, so no object more and two slots: an idle socket
    stays small)."""

    __slots__ = ("close_sent", "silent_ticks")

    def __init__(self, max_message_bytes: int) -> None:
        super().__init__(max_message_bytes)
        self.close_sent = False
        # Ticks since the peer last sent a frame; None while the keepalive does not watch it (before
        # ``watch``, and once it said ``DROP``). Small ints: no object per socket.
        self.silent_ticks: int | None = None

    def watch(self) -> None:
        """From now on ``tick`` counts the peer's silence (the server starts once a session is open)."""
        self.silent_ticks = 0

    def heard(self) -> None:
        """The peer sent a frame (call it once per ``feed`` that returned any)."""
        if self.silent_ticks is not None:
            self.silent_ticks = 0

    def tick(self, ping_at: int, drop_at: int) -> Keepalive:
        """One tick of the heartbeat's clock (``heartbeat_ticks`` gives ``ping_at`` and ``drop_at``):
        ``PING`` once the peer has been silent ``ping_at`` ticks (unless the close frame is sent:
        nothing may follow it), ``DROP`` at ``drop_at`` (then it is watched no more), else ``WAIT``."""
        ticks = self.silent_ticks
        if ticks is None:
            return Keepalive.WAIT
        ticks += 1
        if ticks >= drop_at:
            self.silent_ticks = None
            return Keepalive.DROP
        self.silent_ticks = ticks
        if ticks == ping_at and not self.close_sent:
            return Keepalive.PING
        return Keepalive.WAIT

    def send_close(self, code: int, reason: str = "") -> bytes | None:
        """The server starts the close handshake: the close frame, or None if one was sent already."""
        if self.close_sent:
            return None
        self.close_sent = True
        return close_frame(code, reason)

    def receive_close(self, payload: bytes) -> bytes | None:
        """The peer's close frame: the answer (its code, section 5.5.1), or None if the server's close
        frame went first. Raises ``ProtocolViolation`` for an invalid payload (then ``fail``)."""
        code, _ = parse_close(payload)
        if self.close_sent:
            return None
        self.close_sent = True
        return close_frame(CLOSE_NORMAL if code == CLOSE_NO_STATUS else code)

    def fail(self, code: int, reason: str) -> bytes | None:
        """Fail the connection (section 7.1.7): the close frame, or None if one was sent already."""
        return self.send_close(code, reason)

    def receive_ping(self, payload: bytes) -> bytes | None:
        """The pong to write, or None once the close frame is sent (nothing may follow it)."""
        return None if self.close_sent else pong_frame(payload)
