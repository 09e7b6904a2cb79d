"""``build_app(settings)``: the aiohttp application, its routes, and the lifetime of every backend.

Start order (``cleanup_ctx``, closed in reverse): store → token secret → bus → hub → message writer,
then payments → peek service → indicators (the two services listen to the hub: ``hub.HubListener``).
On shutdown the writer stores every queued message first (their acks still go out), then the sockets
are closed (1001 going away, after their queued frames), then the hub, the bus and the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from aiohttp import web

from agentchat import web as webpage
from agentchat.bus import bus_from_url
from agentchat.config import Settings
from agentchat.errors import AgentChatError, error
from agentchat.server import agent_socket
from agentchat.server.api import agents, channels, indicators, invitations, lifecycle, peeks
from agentchat.core.cors import parse_origins
from agentchat.server.http import bearer_token, cors_middleware, error_middleware, json_response
from agentchat.server.hub import SEQ_RESEED_GAP, Hub
from agentchat.payments import provider_from_settings
from agentchat.payments.ledger import LedgerStore
from agentchat.server.appkeys import (BUS, HISTORY, HUB, INDICATORS, LEDGER, METRICS, OPENING, PAYMENTS, PEEKS,
                                      RECORDS, SESSIONS, SETTINGS, STORE, TOKENS, WRITER)
from agentchat.server.indicators import IndicatorService, peeks_from
from agentchat.server.peeks import PeekService
from agentchat.server.metrics import Metrics
from agentchat.server.retention import RetentionPolicy
from agentchat.server.token_secret import load_token_secrets
from agentchat.server.tokens import TokenIssuer
from agentchat.server.connections import ADDRESS_LIMIT, ALLOWED_ORIGINS, WEBSOCKET_ROUTES, AddressLimit, AgentChatRunner
from agentchat.store import keys as store_keys
from agentchat.store import store_from_url
from agentchat.store.base import ObjectStore
from agentchat.store.instrumented import CountingStore
from agentchat.store.messages import MessageLog, MessageWriter
from agentchat.store.records import Records

log = logging.getLogger(__name__)

PROTOCOL_DIR = Path(__file__).resolve().parents[2] / "protocol"
STARTED_AT = time.time()


async def backends_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    metrics = app[METRICS]
    store = CountingStore(store_from_url(settings.store), metrics.store_ops, metrics.store_errors)
    await store.start()
    app[STORE] = store
    app[RECORDS] = Records(store)
    try:
        secret, previous = await load_token_secrets(settings, store)
    except BaseException:
        await store.close()
        raise
    app[TOKENS] = TokenIssuer(secret, settings.token_ttl_seconds, previous=previous)
    bus = bus_from_url(settings.bus)
    app[BUS] = bus
    instance = secrets.token_hex(8)  # this process, in claims, heartbeats and write-ahead keys
    writer = MessageWriter(store, bus, instance=instance, max_wait=settings.batch_max_wait_ms / 1000,
                           max_messages=settings.batch_max_messages,
                           pending_max=settings.limits.pending_writes_max, on_flush=_observe_flush(metrics))
    app[WRITER] = writer
    app[HISTORY] = MessageLog(store, bus, writer)
    several_processes = _scheme(settings.bus) != "memory"
    # One process on the in-process bus that stopped cleanly stored every number it handed out, so its
    # counters can restart right after the stored ones; any other start keeps the safety gap.
    clean_restart = not several_processes and await _take_clean_shutdown_mark(store)
    hub = Hub(bus, app[RECORDS], app[HISTORY], writer, metrics=app[METRICS], instance=instance,
              send_queue_max=settings.limits.send_queue_max,
              gap_fill_wait=(settings.batch_max_wait_ms / 1000 + 0.05) if several_processes else 0.0,
              reseed_gap=0 if clean_restart else SEQ_RESEED_GAP)
    app[HUB] = hub
    writer.retention = RetentionPolicy(settings, app[RECORDS], bus, hub, instance)
    await hub.start()
    # Recovers what stopped processes left in write-ahead objects before anything is served.
    await writer.start(hub.is_alive, hub.sequencer.record_recovered)
    log.debug("agentchat ready: bus=%s store=%s payments=%s", _scheme(settings.bus), _scheme(settings.store),
             _scheme(settings.payments))
    try:
        yield
    finally:
        await hub.close()
        await writer.close()
        if not several_processes and writer.pending == 0:
            await store.put(store_keys.clean_shutdown(), b"")
        await bus.close()
        await store.close()


async def peeks_ctx(app: web.Application) -> AsyncIterator[None]:
    """Payments, the ledger and the peek service; started after the hub, closed before it."""
    settings = app[SETTINGS]
    payments = provider_from_settings(settings)
    await payments.start()
    app[PAYMENTS] = payments
    app[LEDGER] = LedgerStore(app[STORE])
    service = PeekService(settings=settings, store=app[STORE], bus=app[BUS], hub=app[HUB], records=app[RECORDS],
                          payments=payments, ledger=app[LEDGER])
    app[PEEKS] = service
    app[HUB].add_listener(service)
    await service.start()
    try:
        yield
    finally:
        app[HUB].remove_listener(service)
        await service.close()
        await payments.close()


async def indicators_ctx(app: web.Application) -> AsyncIterator[None]:
    """The public indicators; started after the hub and the peek service, closed before them."""
    service = IndicatorService(bus=app[BUS], hub=app[HUB], records=app[RECORDS], store=app[STORE])
    service.active_peeks = peeks_from(app[PEEKS])
    app[INDICATORS] = service
    app[HUB].add_listener(service)
    await service.start()
    try:
        yield
    finally:
        app[HUB].remove_listener(service)
        await service.close()


async def _take_clean_shutdown_mark(store: ObjectStore) -> bool:
    if await store.get(store_keys.clean_shutdown()) is None:
        return False
    await store.delete(store_keys.clean_shutdown())  # a crash from now on must not find it
    return True


def _observe_flush(metrics: Metrics) -> Callable[[int, float], None]:
    def observe(count: int, seconds: float) -> None:
        metrics.batch_messages.observe(count)
        metrics.batch_flush_seconds.observe(seconds)
    return observe


def _scheme(url: str) -> str:
    return url.split("://", 1)[0]


async def health(request: web.Request) -> web.Response:
    """200 when every component answers, else 503 naming the failing ones."""
    app = request.app
    components: dict[str, str] = {}
    try:
        await app[BUS].ping()
        components["bus"] = "ok"
    except AgentChatError as exc:
        components["bus"] = exc.code
    try:
        await app[STORE].get(store_keys.health_probe())
        components["store"] = "ok" if app[WRITER].healthy else "store_unavailable"
    except AgentChatError as exc:
        components["store"] = exc.code
    failing = [name for name, state in components.items() if state != "ok"]
    body = {
        "status": "healthy" if not failing else "unhealthy",
        "timestamp": int(time.time() * 1000),
        "uptime_seconds": round(time.time() - STARTED_AT, 1),
        "components": components,
        "sessions": app[METRICS].sessions,
        "pending_writes": app[WRITER].pending,
    }
    if failing:
        body["failing"] = failing
    return json_response(body, 200 if not failing else 503)


async def metrics_page(request: web.Request) -> web.Response:
    """Prometheus text format. With ``AGENTCHAT_METRICS_TOKEN`` set it needs that bearer token;
    without, only loopback clients may read it (a scraper on the same host or through a sidecar)."""
    settings = request.app[SETTINGS]
    if settings.metrics_token:
        if not hmac.compare_digest(bearer_token(request), settings.metrics_token):
            raise error("forbidden", "wrong metrics token")
    elif not _is_loopback(request.remote):
        raise error("forbidden", "set AGENTCHAT_METRICS_TOKEN to read /metrics from another host")
    return web.Response(body=request.app[METRICS].exposition(),
                        content_type="text/plain", charset="utf-8", headers={"X-Content-Type-Options": "nosniff"})


def _is_loopback(remote: str | None) -> bool:
    try:
        return remote is not None and ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=(PROTOCOL_DIR / "openapi.json").read_bytes(), content_type="application/json")


async def on_shutdown(app: web.Application) -> None:
    # Store what is queued first, so its acks still reach open sockets (new sends are refused with a
    # retryable store_unavailable meanwhile), then close the sockets with 1001.
    await app[WRITER].close()
    await app[HUB].flush_claims()
    await agent_socket.close_all_sessions(app)


AppContext = Callable[[web.Application], AsyncIterator[None]]


def build_app(settings: Settings, *, extra_contexts: Sequence[AppContext] = ()) -> web.Application:
    """``extra_contexts``: ``cleanup_ctx`` entries started after every service and closed before them,
    for instruments that watch a running server (``bench/stalls.py``)."""
    allowed_origins = parse_origins(settings.cors_origins)
    middlewares = [cors_middleware(allowed_origins), error_middleware] if allowed_origins else [error_middleware]
    app = web.Application(middlewares=middlewares, client_max_size=settings.limits.max_body_bytes)
    app[ALLOWED_ORIGINS] = allowed_origins
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[SESSIONS] = set()
    app[OPENING] = set()
    # Served straight from the listening socket (server/connections.py); the aiohttp route below takes the
    # upgrades that reach it anyway.
    app[WEBSOCKET_ROUTES] = {"/api/v1/ws": agent_socket.AgentSocket}
    app[ADDRESS_LIMIT] = AddressLimit(settings.limits.max_connections_per_address, settings.trusted_proxies)
    app.cleanup_ctx.append(backends_ctx)
    app.cleanup_ctx.append(peeks_ctx)
    app.cleanup_ctx.append(indicators_ctx)
    app.cleanup_ctx.append(agent_socket.heartbeat_ctx)
    app.cleanup_ctx.extend(extra_contexts)
    app.on_shutdown.append(on_shutdown)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/api/v1/openapi.json", openapi)
    app.router.add_get("/api/v1/ws", agent_socket.websocket)
    app.router.add_routes(agents.routes)
    app.router.add_routes(channels.routes)
    app.router.add_routes(invitations.routes)
    app.router.add_routes(lifecycle.routes)
    app.router.add_routes(peeks.routes)
    app.router.add_routes(indicators.routes)
    webpage.add_routes(app, settings)
    return app


LISTEN_BACKLOG = 2048


def make_runner(app: web.Application, *, handle_signals: bool = False, shutdown_timeout: float = 10.0) -> AgentChatRunner:
    """The runner ``agentchat serve`` uses: WebSocket routes skip aiohttp's per-socket state."""
    return AgentChatRunner(app, handle_signals=handle_signals, access_log=None, shutdown_timeout=shutdown_timeout)


class ListenError(OSError):
    """The server could not bind its address (in use, or not allowed)."""


def run(app: web.Application, host: str, port: int, shutdown_timeout: float = 10.0,
        on_listening: Callable[[], None] | None = None) -> None:
    """Serve ``app`` until SIGINT or SIGTERM, then shut down gracefully (what ``web.run_app`` does,
    with ``AgentChatRunner`` so that WebSocket routes skip aiohttp's per-socket state).

    ``on_listening`` is called once the port is bound. ``ListenError`` if it cannot be."""

    async def serve() -> None:
        runner = make_runner(app, handle_signals=True, shutdown_timeout=shutdown_timeout)
        await runner.setup()
        listening = False
        try:
            # A longer accept queue than the default 128: a burst of reconnecting clients (a process
            # restarted, a network blip) would otherwise see SYNs dropped and retried a second later.
            try:
                await web.TCPSite(runner, host, port, backlog=LISTEN_BACKLOG).start()
            except OSError as exc:
                raise ListenError(exc.errno, exc.strerror or str(exc)) from None
            listening = True
            if on_listening is not None:
                on_listening()
            await asyncio.Event().wait()  # until a signal ends it
        finally:
            if listening:
                log.info("stopping: storing queued messages, then closing sockets (1001)")
            await runner.cleanup()
            if listening:
                log.info("stopped")

    loop = asyncio.new_event_loop()
    main = loop.create_task(serve())
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        main.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(main)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


__all__ = ["AppContext", "ListenError", "build_app", "error", "make_runner", "run"]
