"""WebSocket connections served on asyncio transports, without aiohttp's per-socket state.

An idle socket served through aiohttp's ``WebSocketResponse`` keeps ~13 KB alive (the parsed request,
the HTTP protocol and parser, the handler task and its coroutines, the WebSocket reader, writer and
queue). Here a socket is one ``WebSocketConnection`` (an ``asyncio.Protocol``) and its small sans-I/O
state, the frame parser and close handshake (``core/rfc6455.py``'s ``ServerConnection``; this only adapts it
to the transport): frames are handled in ``data_received``, and a task exists only while
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

from agentchat.bus.base import PlacedFuture
from agentchat.core import rfc6455 as codec
from agentchat.core.cors import upgrade_allowed
from agentchat.errors import error

log = logging.getLogger(__name__)

# Above this many bytes waiting in a transport's write buffer, the connection counts as paused for
# writing (its session keeps frames queued) until the buffer drains below a quarter of it.
WRITE_BUFFER_HIGH = 256 * 1024
# Messages read while an earlier one is still being handled, before reading pauses.
BACKLOG_MAX = 32
# How long a new connection may take to send its first request head, and how big that head may be
# before it is left to aiohttp (which answers 431 or 400).
HEAD_TIMEOUT = 30.0
HEAD_MAX_BYTES = 16 * 1024

# An idle HTTP keep-alive connection is closed after this long (aiohttp's default is about an hour).
KEEPALIVE_TIMEOUT = 75.0

Factory = Callable[[], "WebSocketConnection"]
WEBSOCKET_ROUTES = web.AppKey("websocket_routes", dict)  # dict[str, Callable[[web.Application], WebSocketConnection]]


def forwarded_address(peer: str | None, x_forwarded_for: str, hops: int) -> str:
    """The client's address: the peer's, or behind ``hops`` trusted proxies the entry they appended to
    X-Forwarded-For (entries further left are the client's to forge)."""
    if hops:
        forwarded = [part.strip() for part in x_forwarded_for.split(",") if part.strip()]
        if len(forwarded) >= hops:
            return forwarded[-hops]
    return peer or "unknown"


class AddressLimit:
    """Open WebSocket connections per client address, at most ``per_address`` (0: no cap, and then
    nothing is counted: a count nobody checks would cost every socket memory).

    Only WebSockets are counted: they are what stays open. A connection that has not sent its first
    request head is closed after ``HEAD_TIMEOUT``, an idle HTTP keep-alive one after
    ``KEEPALIVE_TIMEOUT``."""

    __slots__ = ("per_address", "hops", "open")

    def __init__(self, per_address: int, hops: int) -> None:
        self.per_address = per_address
        self.hops = hops  # trusted proxies in front (``Settings.trusted_proxies``)
        self.open: dict[str, AddressCount] = {}

    def take(self, address: str) -> AddressCount | None:
        """Count one more connection of ``address``: the count it gives back when it closes (shared by
        every connection of the address); None (nothing counted) when the address is at the cap."""
        count = self.open.get(address)
        if count is None:
            count = self.open[address] = AddressCount(self, address)
        elif self.per_address and count.open >= self.per_address:
            return None
        count.open += 1
        return count


class AddressCount:
    """The open connections of one address. Each of them holds this one object (a slot, 8 bytes), not
    a tuple and a string of its own (~120 bytes on every socket)."""

    __slots__ = ("limit", "address", "open")

    def __init__(self, limit: AddressLimit, address: str) -> None:
        self.limit = limit
        self.address = address
        self.open = 0

    def give_back(self) -> None:
        """One of the address's connections is gone."""
        self.open -= 1
        if self.open <= 0 and self.limit.open.get(self.address) is self:
            del self.limit.open[self.address]


def _capped(limit: AddressLimit | None) -> AddressLimit | None:
    return limit if limit is not None and limit.per_address else None


ADDRESS_LIMIT = web.AppKey("address_limit", AddressLimit)
# The origins besides the server's own whose pages may open its sockets (server/cors.py).
ALLOWED_ORIGINS = web.AppKey("allowed_origins", frozenset)


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
    once and only turned into a task if it has to wait; the next message waits for it, unless what it
    waits on is a ``PlacedFuture``: a send already in its place in the bus's order), and may
    override ``opened``, ``writable``, ``flush`` and ``lost``.

    Every idle socket holds one of these, so each slot is 8 bytes times the sockets: no
    ``__weakref__`` (nothing refers to a socket weakly), nothing that another slot already says
    (``write_paused``), nothing shared by every socket of a route."""

    # The sans-I/O state (frame parser, close handshake, keepalive) of every socket of the class (a
    # subclass may raise its fragment limit).
    parser_class: type[codec.ServerConnection] = codec.ServerConnection

    __slots__ = ("transport", "out", "_parser", "_backlog", "_close_timer", "_lost", "_lost_waiters",
                 "_counted")

    def __init__(self, max_message_bytes: int) -> None:
        self.transport: asyncio.Transport | None = None
        # The transport while messages may be written to it now; None while its write buffer is full,
        # once a close frame is sent and once it is gone (one test on the path of every delivery).
        self.out: asyncio.Transport | None = None
        self._parser = self.parser_class(max_message_bytes)
        # While a message's handling waits (a task finishes it): the messages read since, in order (a
        # list, often empty); None while no handling waits.
        self._backlog: list[tuple[int, bytes]] | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._lost = False
        self._lost_waiters: list[asyncio.Future[None]] | None = None
        self._counted: AddressCount | None = None  # given back when the connection is lost

    # -- for subclasses ------------------------------------------------------------------------------

    def opened(self) -> None:
        """The 101 has been sent and the transport is ours."""

    async def message_received(self, data: bytes) -> None:
        """One text message (and binary ones, unless ``binary_received`` is overridden). Errors are the
        subclass's to report; one that escapes is logged."""

    def binary_received(self, data: bytes) -> Coroutine[Any, Any, None]:
        """One binary message: handled as a text one unless overridden."""
        return self.message_received(data)

    def writable(self) -> None:
        """The transport's write buffer drained after it was over its mark (``write_paused``)."""

    def flush(self) -> None:
        """Write out what the subclass has queued: the connection is about to fail, and nothing may
        follow its close frame (the answers to the messages read before a violation go out first)."""

    def lost(self) -> None:
        """The connection is gone (closed either way, or dropped)."""

    # -- for everyone ----------------------------------------------------------------------------------

    @property
    def closing(self) -> bool:
        """No more messages go out: a close frame was sent, or the connection is gone."""
        return self._parser.close_sent or self._lost

    @property
    def write_paused(self) -> bool:
        """The transport's write buffer is over its high mark (``WRITE_BUFFER_HIGH``) until it drains:
        what is queued waits (``writable`` is called then)."""
        return self.out is None and self.transport is not None and not self.closing

    def keep_alive(self) -> None:
        """From now on the heartbeat watches the peer (``heartbeat``): pinged when silent, dropped when
        it does not answer."""
        self._parser.watch()

    def heartbeat(self, ping_at: int, drop_at: int) -> bool:
        """One tick of the heartbeat (``codec.heartbeat_ticks``): the ping or the drop the connection's
        state asks for. True when the connection was dropped (its peer taken for gone: no close
        handshake, the peer sees 1006)."""
        action = self._parser.tick(ping_at, drop_at)
        if action is codec.Keepalive.WAIT:
            return False
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        if action is codec.Keepalive.DROP:
            transport.abort()
            return True
        # Written as is, between two whole messages like every other write to the transport (none is
        # ever written in parts), so the ping needs no task or coroutine.
        transport.write(codec.PING_FRAME)
        return False

    def close(self, code: int, reason: str = "") -> None:
        """Start the close handshake; the transport is closed when the peer answers (or after
        ``codec.CLOSE_TIMEOUT``)."""
        transport = self.transport
        if self._lost or transport is None:
            return
        frame = self._parser.send_close(code, reason)
        if frame is None:
            return
        self.out = None
        transport.write(frame)
        self._close_timer = asyncio.get_running_loop().call_later(codec.CLOSE_TIMEOUT, transport.abort)

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
        state = self._parser
        try:
            messages = state.feed(data)
        except codec.ProtocolViolation as exc:
            if not exc.messages:
                self._fail(exc.close_code, exc.reason)
                return
            # The messages read before the violation are valid: handled first, then the failure.
            messages = exc.messages
            messages.append(exc.fail_frame())
        if not messages:
            return
        state.heard()
        backlog = self._backlog
        if backlog is not None:  # they wait for the message being handled
            backlog.extend(messages)
            if len(backlog) > BACKLOG_MAX and self.transport is not None:
                self.transport.pause_reading()
            return
        self._run(messages)

    def _run(self, messages: list[tuple[int, bytes]]) -> None:
        """Handle messages in order; stops (keeping the rest) when one has to wait."""
        state = self._parser
        for index in range(len(messages)):
            opcode, payload = messages[index]
            if opcode <= codec.OP_BINARY:
                if state.close_sent:
                    continue  # after our close frame, data is read and dropped (RFC 6455, 5.5.1)
                coro = self.message_received(payload) if opcode == codec.OP_TEXT else self.binary_received(payload)
                try:
                    yielded = coro.send(None)
                except StopIteration:
                    continue
                except Exception:
                    log.exception("socket message handler failed")
                    continue
                if type(yielded) is PlacedFuture:
                    # A send queued for the bus in its place: the next message need not wait for it.
                    asyncio.get_running_loop().create_task(self._complete(coro, yielded))
                    continue
                self._backlog = messages[index + 1:]
                asyncio.get_running_loop().create_task(self._finish(coro, yielded))
                return
            if opcode == codec.OP_PING:
                pong = state.receive_ping(payload)
                if pong is not None and not self._lost and self.transport is not None:
                    self.transport.write(pong)
            elif opcode == codec.OP_CLOSE:
                self._close_received(payload)
                return
            elif opcode == codec.OP_FAIL:
                self._fail(int.from_bytes(payload[:2], "big"), payload[2:].decode("utf-8"))
                return
            # pongs: heard() in data_received already noted them

    async def _finish(self, coro: Coroutine[Any, Any, Any], yielded: Any) -> None:
        await self._complete(coro, yielded)
        backlog = self._backlog
        self._backlog = None
        if backlog:
            if len(backlog) > BACKLOG_MAX and self.transport is not None and not self._lost:
                self.transport.resume_reading()  # paused by data_received
            self._run(backlog)

    async def _complete(self, coro: Coroutine[Any, Any, Any], yielded: Any) -> None:
        """Run a message's handling, suspended at ``yielded``, to its end (an error is logged)."""
        try:
            await _Continue(coro, yielded)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("socket message handler failed")

    def _close_received(self, payload: bytes) -> None:
        transport = self.transport
        if transport is None:
            return
        try:
            answer = self._parser.receive_close(payload)
        except codec.ProtocolViolation as exc:
            self._fail(exc.close_code, exc.reason)
            return
        if answer is not None:  # the peer started it
            self.out = None
            transport.write(answer)
        transport.close()

    def _fail(self, code: int, reason: str) -> None:
        """Fail the connection (RFC 6455, 7.1.7): a close frame if none was sent, then the TCP close."""
        log.debug("failing socket: %s %s", code, reason)
        transport = self.transport
        if transport is None:
            return
        if not self._parser.close_sent:
            self.flush()  # before the close frame, after which the session may write nothing
            frame = self._parser.fail(code, reason)
            if frame is not None:
                self.out = None
                transport.write(frame)
        transport.close()

    def pause_writing(self) -> None:
        self.out = None

    def resume_writing(self) -> None:
        if not self.closing:
            self.out = self.transport
        self.writable()

    def eof_received(self) -> bool | None:
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.out = None
        if self._counted is not None:
            self._counted.give_back()
            self._counted = None
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

    __slots__ = ("_http", "_routes", "_limit", "_origins", "_transport", "_buffer", "_timer")

    def __init__(self, http: web.Server, routes: Mapping[str, Factory], limit: AddressLimit | None,
                 origins: frozenset[str]) -> None:
        self._http = http
        self._routes = routes
        self._limit = limit
        self._origins = origins
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
        if not upgrade_allowed(request[2].get("origin"), request[2].get("host"), self._origins):
            self._hand_to_http(buffer)  # upgrade_within_aiohttp refuses it with forbidden
            return
        transport = self._transport
        assert transport is not None
        limit = self._limit
        counted = None
        if limit is not None:
            peer = transport.get_extra_info("peername")
            counted = limit.take(forwarded_address(peer[0] if peer else None,
                                                   request[2].get("x-forwarded-for", ""), limit.hops))
            if counted is None:
                self._hand_to_http(buffer)  # upgrade_within_aiohttp refuses it with rate_limited
                return
        self._stop_timer()
        transport.write(codec.switching_protocols(accept))
        connection = factory()
        connection._counted = counted
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

    def __init__(self, http: web.Server, routes: Mapping[str, Factory], limit: AddressLimit | None,
                 origins: frozenset[str]) -> None:
        self._http = http
        self._routes = routes
        self._limit = limit
        self._origins = origins

    def __call__(self) -> FrontProtocol:
        return FrontProtocol(self._http, self._routes, self._limit, self._origins)


class AgentChatRunner(web.AppRunner):
    """``web.AppRunner`` whose sites listen through ``FrontProtocol``: WebSocket routes registered in
    ``app[WEBSOCKET_ROUTES]`` (path -> ``connection_factory(app)``) are served by their connections,
    everything else by the application as usual."""

    _front: _FrontFactory | None = None

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        kwargs.setdefault("keepalive_timeout", KEEPALIVE_TIMEOUT)
        super().__init__(app, **kwargs)

    @property
    def server(self) -> Any:
        http = super().server
        if http is None:
            return None
        if self._front is None:
            app = self.app
            routes = {path: _bind(make, app) for path, make in app.get(WEBSOCKET_ROUTES, {}).items()}
            self._front = _FrontFactory(http, routes, _capped(app.get(ADDRESS_LIMIT)),
                                        app.get(ALLOWED_ORIGINS, frozenset()))
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
    origin = request.headers.get("Origin")
    if not upgrade_allowed(origin, request.headers.get("Host"), request.app.get(ALLOWED_ORIGINS, frozenset())):
        # A page on another site may not act through its visitor's browser (AGENTCHAT_CORS_ORIGINS).
        raise error("forbidden", f"origin {origin} may not open this socket")
    limit = _capped(request.app.get(ADDRESS_LIMIT))
    counted = None
    if limit is not None:
        counted = limit.take(forwarded_address(request.remote, request.headers.get("X-Forwarded-For", ""),
                                               limit.hops))
        if counted is None:
            raise error("rate_limited", f"more than {limit.per_address} open sockets from this address")
    response = web.StreamResponse(status=101, headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                                       "Sec-WebSocket-Accept": accept})
    try:
        await response.prepare(request)
    except BaseException:
        if counted is not None:
            counted.give_back()
        raise
    transport = request.transport
    if transport is None or transport.is_closing():
        if counted is not None:
            counted.give_back()
        return response
    connection._counted = counted
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
