"""WebSocket connections served on asyncio transports, without aiohttp's per-socket state.

An idle socket served through aiohttp's ``WebSocketResponse`` keeps ~13 KB alive (the parsed request,
the HTTP protocol and parser, the handler task and its coroutines, the WebSocket reader, writer and
queue). Here a socket is one ``WebSocketConnection`` (an ``asyncio.Protocol``) and its small frame
parser (``core/rfc6455.py``): frames are handled in ``data_received``, and a task exists only while
the handling of a frame has to wait (a bus round trip, a store read).

How connections get here:
- ``FrontProtocol`` is what the listening socket makes for each new connection (see ``AgentChatRunner``).
  It reads the first request head: a valid upgrade to a WebSocket route becomes that route's
  connection at once; anything else is handed, bytes and all, to aiohttp's HTTP protocol, which serves
  it as if it had been there from the start.
- An upgrade that reaches aiohttp anyway (a keep-alive connection that served HTTP requests first, as
  behind a proxy that reuses upstream connections; or a route that must look at the request first, like
  the public indicators socket's per-address rate limit) is answered by ``upgrade_within_aiohttp``:
  aiohttp writes the 101, the transport is handed to the connection, and the request's handler waits
  for it to close (that socket keeps aiohttp's request state: a fallback, not the main road).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Generator, Mapping
from typing import Any, cast

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from agentchat.core import rfc6455 as codec
from agentchat.errors import error

log = logging.getLogger(__name__)

# Above this many bytes waiting in a transport's write buffer, the connection counts as paused for
# writing (its session keeps frames queued) until the buffer drains below a quarter of it.
WRITE_BUFFER_HIGH = 256 * 1024
# Messages read while an earlier one is still being handled, before reading pauses.
BACKLOG_MAX = 32
# How long a close handshake the server started may take before the connection is dropped.
CLOSE_TIMEOUT = 5.0
# How long a new connection may take to send its first request head, and how big that head may be
# before it is left to aiohttp (which answers 431 or 400).
HEAD_TIMEOUT = 30.0
HEAD_MAX_BYTES = 16 * 1024

Factory = Callable[[], "WebSocketConnection"]
WEBSOCKET_ROUTES = web.AppKey("websocket_routes", dict)  # dict[str, Callable[[web.Application], WebSocketConnection]]


class _Continue:
    """Awaits the rest of a coroutine that has already run up to its first suspension (it was started
    by hand, so a frame that needs no waiting costs no task)."""

    __slots__ = ("_coro", "_yielded")

    def __init__(self, coro: Coroutine[Any, Any, Any], yielded: Any) -> None:
        self._coro = coro
        self._yielded = yielded

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, value = self._coro, self._yielded
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # e.g. the task was cancelled: the coroutine gets it
                try:
                    value = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


class WebSocketConnection(asyncio.Protocol):
    """One upgraded socket. Subclasses handle messages in ``message_received`` (a coroutine, run at
    once and only turned into a task if it has to wait; the next message waits for it), and may
    override ``opened``, ``activity``, ``writable`` and ``lost``."""

    # The frame parser of every socket of the class (a subclass may raise its fragment limit).
    parser_class: type[codec.FrameParser] = codec.FrameParser

    __slots__ = ("transport", "out", "write_paused", "close_sent", "_parser", "_backlog", "_busy",
                 "_close_timer", "_lost", "_lost_waiters", "__weakref__")

    def __init__(self, max_message_bytes: int) -> None:
        self.transport: asyncio.Transport | None = None
        # The transport while messages may be written to it now; None while its write buffer is full,
        # once a close frame is sent and once it is gone (one test on the path of every delivery).
        self.out: asyncio.Transport | None = None
        self.write_paused = False
        self.close_sent = False
        self._parser = self.parser_class(max_message_bytes)
        self._backlog: list[tuple[int, bytes]] | None = None  # messages waiting for the one in progress
        self._busy = False
        self._close_timer: asyncio.TimerHandle | None = None
        self._lost = False
        self._lost_waiters: list[asyncio.Future[None]] | None = None

    # -- for subclasses ------------------------------------------------------------------------------

    def opened(self) -> None:
        """The 101 has been sent and the transport is ours."""

    async def message_received(self, data: bytes) -> None:
        """One text message (and binary ones, unless ``binary_received`` is overridden). Errors are the
        subclass's to report; one that escapes is logged."""

    def binary_received(self, data: bytes) -> Coroutine[Any, Any, None]:
        """One binary message: handled as a text one unless overridden."""
        return self.message_received(data)

    def activity(self) -> None:
        """The peer sent a frame (any, pings and pongs included)."""

    def writable(self) -> None:
        """The transport's write buffer drained after ``write_paused`` was set."""

    def flush(self) -> None:
        """Write out what the subclass has queued: the connection is about to fail, and nothing may
        follow its close frame (the answers to the messages read before a violation go out first)."""

    def lost(self) -> None:
        """The connection is gone (closed either way, or dropped)."""

    # -- for everyone ----------------------------------------------------------------------------------

    @property
    def closing(self) -> bool:
        """No more messages go out: a close frame was sent, or the connection is gone."""
        return self.close_sent or self._lost

    def close(self, code: int, reason: str = "") -> None:
        """Start the close handshake; the transport is closed when the peer answers (or after
        ``CLOSE_TIMEOUT``)."""
        transport = self.transport
        if self.close_sent or self._lost or transport is None:
            return
        self.close_sent = True
        self.out = None
        transport.write(codec.close_frame(code, reason))
        self._close_timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, transport.abort)

    def limit_messages(self, max_bytes: int) -> None:
        """From now on, a message over ``max_bytes`` fails the connection with 1009 (from its header)."""
        self._parser.max_message_bytes = max_bytes

    def abort(self) -> None:
        """Drop the connection without a close handshake (the peer is taken for gone)."""
        if self.transport is not None:
            self.transport.abort()

    async def wait_closed(self) -> None:
        if self._lost:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._lost_waiters is None:
            self._lost_waiters = []
        self._lost_waiters.append(waiter)
        await waiter

    # -- asyncio.Protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = self.out = transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        self.opened()

    def data_received(self, data: bytes) -> None:
        if self._lost:
            return
        try:
            messages = self._parser.feed(data)
        except codec.ProtocolViolation as exc:
            if not exc.messages:
                self._fail(exc.close_code, exc.reason)
                return
            # The messages read before the violation are valid: handled first, then the failure.
            messages = exc.messages
            messages.append(exc.fail_frame())
        if not messages:
            return
        self.activity()
        if self._busy:
            backlog = self._backlog
            if backlog is None:
                backlog = self._backlog = []
            backlog.extend(messages)
            if len(backlog) > BACKLOG_MAX and self.transport is not None:
                self.transport.pause_reading()
            return
        self._run(messages)

    def _run(self, messages: list[tuple[int, bytes]]) -> None:
        """Handle messages in order; stops (keeping the rest) when one has to wait."""
        for index in range(len(messages)):
            opcode, payload = messages[index]
            if opcode <= codec.OP_BINARY:
                if self.close_sent:
                    continue  # after our close frame, data is read and dropped (RFC 6455, 5.5.1)
                coro = self.message_received(payload) if opcode == codec.OP_TEXT else self.binary_received(payload)
                try:
                    yielded = coro.send(None)
                except StopIteration:
                    continue
                except Exception:
                    log.exception("socket message handler failed")
                    continue
                self._busy = True
                rest = messages[index + 1:]
                if rest:
                    self._backlog = rest
                asyncio.get_running_loop().create_task(self._finish(coro, yielded))
                return
            if opcode == codec.OP_PING:
                if not self.closing and self.transport is not None:
                    self.transport.write(codec.pong_frame(payload))
            elif opcode == codec.OP_CLOSE:
                self._close_received(payload)
                return
            elif opcode == codec.OP_FAIL:
                self._fail(int.from_bytes(payload[:2], "big"), payload[2:].decode("utf-8"))
                return
            # pongs: activity() already noted them

    async def _finish(self, coro: Coroutine[Any, Any, Any], yielded: Any) -> None:
        try:
            await _Continue(coro, yielded)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("socket message handler failed")
        self._busy = False
        backlog = self._backlog
        if backlog:
            self._backlog = None
            if len(backlog) > BACKLOG_MAX and self.transport is not None and not self._lost:
                self.transport.resume_reading()  # paused by data_received
            self._run(backlog)

    def _close_received(self, payload: bytes) -> None:
        transport = self.transport
        if transport is None:
            return
        try:
            code, _ = codec.parse_close(payload)
        except codec.ProtocolViolation as exc:
            self._fail(exc.close_code, exc.reason)
            return
        if not self.close_sent:  # the peer started it: answer with its code, then close (5.5.1)
            self.close_sent = True
            self.out = None
            transport.write(codec.close_frame(codec.CLOSE_NORMAL if code == codec.CLOSE_NO_STATUS else code))
        transport.close()

    def _fail(self, code: int, reason: str) -> None:
        """Fail the connection (RFC 6455, 7.1.7): a close frame if none was sent, then the TCP close."""
        log.debug("failing socket: %s %s", code, reason)
        transport = self.transport
        if transport is None:
            return
        if not self.close_sent:
            self.flush()
            self.close_sent = True
            self.out = None
            transport.write(codec.close_frame(code, reason))
        transport.close()

    def pause_writing(self) -> None:
        self.write_paused = True
        self.out = None

    def resume_writing(self) -> None:
        self.write_paused = False
        if not self.closing:
            self.out = self.transport
        self.writable()

    def eof_received(self) -> bool | None:
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.out = None
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self._backlog = None
        waiters, self._lost_waiters = self._lost_waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)
        self.lost()


# -- the road in: the first request head of every connection -----------------------------------------


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]] | None:
    """Method, path and headers (lower-case names, repeats joined with ', ') of an HTTP/1.1 request
    head; None for anything unusual, which aiohttp's parser then judges."""
    request_line, _, header_block = head.partition(b"\r\n")
    parts = request_line.split(b" ")
    if len(parts) != 3 or parts[2] != b"HTTP/1.1":
        return None
    headers: dict[str, str] = {}
    for line in header_block.split(b"\r\n") if header_block else ():
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            return None
        key = name.decode("latin-1").lower()
        text = value.strip().decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return parts[0].decode("latin-1"), parts[1].partition(b"?")[0].decode("latin-1"), headers


class _HTTPHandler(RequestHandler):
    """aiohttp's HTTP connection handler, but a request its parser refuses (a URL over 8 KB, a NUL in a
    header, a bad method or version) is answered in the JSON error envelope (``bad_request``) and
    logged in one line without a traceback: anyone can send such requests, and a traceback each would
    let them flood the log. Errors of the application itself (status 500) keep aiohttp's handling."""

    __slots__ = ()

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status == 500:
            return super().handle_error(request, status, exc, message)
        text = getattr(exc, "message", None) or message or str(exc or status)
        reason = " ".join(str(text).split())[:160]  # one line, whatever the request held
        log.info("bad HTTP request from %s: %s", request.remote, reason)
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already sent")
        refused = error("bad_request", reason)
        # Not server/http.py's error_response: that module depends on the app's keys, which need this one.
        response = web.Response(body=orjson.dumps({"error": refused.to_wire()}), status=refused.status,
                                content_type="application/json")
        response.force_close()
        return response


class FrontProtocol(asyncio.Protocol):
    """A new connection until its first request head has been read (see the module's docstring)."""

    __slots__ = ("_http", "_routes", "_transport", "_buffer", "_timer")

    def __init__(self, http: web.Server, routes: Mapping[str, Factory]) -> None:
        self._http = http
        self._routes = routes
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport = cast(asyncio.Transport, transport)
        self._timer = asyncio.get_running_loop().call_later(HEAD_TIMEOUT, transport.close)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > HEAD_MAX_BYTES:
                self._hand_to_http(buffer)
            else:
                self._buffer = buffer
            return
        self._buffer = b""
        request = _parse_head(buffer[:end])
        factory = self._routes.get(request[1]) if request is not None else None
        if request is None or factory is None:
            self._hand_to_http(buffer)
            return
        try:
            accept = codec.check_upgrade(request[0], request[2])
        except codec.UpgradeRefused:
            self._hand_to_http(buffer)  # the route's aiohttp handler answers with the error
            return
        self._stop_timer()
        transport = self._transport
        assert transport is not None
        transport.write(codec.switching_protocols(accept))
        connection = factory()
        transport.set_protocol(connection)
        connection.connection_made(transport)
        rest = buffer[end + 4:]
        if rest:  # a client may not send frames before the 101 (RFC 6455, 4.1); harmless if it does
            connection.data_received(rest)

    def _hand_to_http(self, buffer: bytes) -> None:
        self._stop_timer()
        transport = self._transport
        assert transport is not None
        handler = self._http()
        handler.__class__ = _HTTPHandler  # same layout (no slots of its own): only handle_error differs
        transport.set_protocol(handler)
        handler.connection_made(transport)
        handler.data_received(buffer)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()


class _FrontFactory:
    """The protocol factory the listening sockets use: a ``FrontProtocol`` per connection."""

    def __init__(self, http: web.Server, routes: Mapping[str, Factory]) -> None:
        self._http = http
        self._routes = routes

    def __call__(self) -> FrontProtocol:
        return FrontProtocol(self._http, self._routes)


class AgentChatRunner(web.AppRunner):
    """``web.AppRunner`` whose sites listen through ``FrontProtocol``: WebSocket routes registered in
    ``app[WEBSOCKET_ROUTES]`` (path -> ``connection_factory(app)``) are served by their connections,
    everything else by the application as usual."""

    _front: _FrontFactory | None = None

    @property
    def server(self) -> Any:
        http = super().server
        if http is None:
            return None
        if self._front is None:
            app = self.app
            routes = {path: _bind(make, app) for path, make in app.get(WEBSOCKET_ROUTES, {}).items()}
            self._front = _FrontFactory(http, routes)
        return self._front


def _bind(make: Callable[[web.Application], WebSocketConnection], app: web.Application) -> Factory:
    return lambda: make(app)


async def upgrade_within_aiohttp(request: web.Request, connection: WebSocketConnection) -> web.StreamResponse:
    """Serve ``connection`` on the socket of an upgrade request that aiohttp is handling (see the
    module's docstring); returns once the socket is closed. Bad upgrades get a ``bad_upgrade`` error."""
    try:
        accept = codec.check_upgrade(request.method, request.headers)  # type: ignore[arg-type]
    except codec.UpgradeRefused as exc:
        raise error("bad_upgrade", exc.reason) from None
    response = web.StreamResponse(status=101, headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                                       "Sec-WebSocket-Accept": accept})
    await response.prepare(request)
    transport = request.transport
    if transport is None or transport.is_closing():
        return response
    http = transport.get_protocol()
    transport.set_protocol(connection)
    connection.connection_made(transport)
    try:
        await connection.wait_closed()
    except asyncio.CancelledError:  # the server is shutting down
        connection.abort()
        raise
    finally:
        # aiohttp's protocol no longer gets the transport's events: tell it the connection is gone, so
        # that its server forgets it (once this handler has returned).
        asyncio.get_running_loop().call_soon(http.connection_lost, None)
    return response
