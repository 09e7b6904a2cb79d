"""Public indicators through aiohttp's test client: the REST routes, the public socket and the agents'
socket, counts across two server processes sharing a bus, the recount after the bus forgets, peeks."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.frames import Frame, Opcode
from agentchat.config import load_settings
from agentchat.core.indicators import MINUTE_MS
from agentchat.server.app import build_app
from agentchat.server.indicators import UPDATE_INTERVAL
from agentchat.server.appkeys import INDICATORS
from tests.conftest import RestAgent
from tests.server.peek_agents import go_online
from tests.server.test_frames_conformance import Socket, kind, open_socket
from tests.server.test_openapi import Api
from tests.server.test_peeks import open_peek, wait_state
from tests.server.test_rest import create_channel, envelope
from tests.server.websocket.test_websocket_layer import RawConnection
from tests.services import redis_server  # noqa: F401  (fixture)
from tests.unit.test_protocol import FRAMES, SERVER_FRAME, assert_valid, validator_for

INDICATORS_FRAME = validator_for(FRAMES / "server" / "indicators.json")


async def send(client: Any, agent: RestAgent, channel: str, key: bytes, n: int, prefix: str = "m") -> None:
    for i in range(n):
        status, body = await agent.call("POST", f"/api/v1/channels/{channel}/messages", json={
            "client_id": f"{prefix}{i}", "envelope": envelope(agent, channel, key, f"secret {prefix}{i}", f"{prefix}{i}")})
        assert status == 201, body


async def eventually(get: Callable[[], Any], check: Callable[[Any], bool], timeout: float = 6.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await get()
        if check(value):
            return value
        assert time.monotonic() < deadline, f"still {value}"
        await asyncio.sleep(0.1)  # under the route's 20 requests/s per address, however long it takes


def indicators_of(client: Any, channel: str) -> Callable[[], Any]:
    async def get() -> Any:
        response = await client.get(f"/api/v1/indicators/{channel}")
        assert response.status == 200, await response.text()
        return await response.json()
    return get


async def public_socket(client: Any) -> Socket:
    return Socket(await client.ws_connect("/api/v1/indicators/ws"))


def frames_of(socket: Socket, type_: str) -> list[dict[str, Any]]:
    return [f for f in socket.frames if f.get("type") == type_]


def updates_for(socket: Socket, channel: str) -> list[dict[str, Any]]:
    return [item for f in frames_of(socket, "indicators") if "ref" not in f for item in f["channels"]
            if item["channel"] == channel]


# ------------------------------------------------------------------------------ REST


async def test_rest_routes_answer_as_documented_with_counts_only(client, make_agent) -> None:
    api = Api(client)
    alice, bob, carol = await make_agent("alice"), await make_agent("bob"), await make_agent("carol")
    busy, busy_key = await create_channel(alice, [bob, carol])
    quiet, _ = await create_channel(bob, [])
    await send(client, alice, busy, busy_key, 5)
    before = int(time.time() // 60) * MINUTE_MS
    item = await eventually(indicators_of(client, busy), lambda i: i["messages_total"] == 5)
    await api.call("GET", "/api/v1/indicators/{channel}", expect=200, channel=busy)
    assert item["members"] == 3 and item["name"] == "test"
    assert item["messages_per_minute"] == 5
    assert item["agents_online"] == 0  # nobody has a socket open
    assert item["peeks"] == {"total": 0, "active": 0}
    assert item["last_activity_at"] in (before, before + MINUTE_MS) and item["last_activity_at"] % MINUTE_MS == 0
    assert b"secret" not in orjson.dumps(item)

    page = await api.call("GET", "/api/v1/indicators", expect=200)
    assert [c["channel"] for c in page["channels"]] == [busy, quiet]  # liveliest first
    assert page["total"] == 2 and page["next_offset"] is None and page["sort"] == "active"
    first = await api.call("GET", "/api/v1/indicators", expect=200, params={"sort": "channel", "limit": 1})
    second = await api.call("GET", "/api/v1/indicators", expect=200,
                            params={"sort": "channel", "limit": 1, "offset": first["next_offset"]})
    assert first["next_offset"] == 1 and second["next_offset"] is None
    assert [first["channels"][0]["channel"], second["channels"][0]["channel"]] == sorted([busy, quiet])
    quiet_item = next(c for c in page["channels"] if c["channel"] == quiet)
    assert quiet_item["messages_total"] == 0 and quiet_item["last_activity_at"] is None

    for params in ({"sort": "loudest"}, {"limit": 0}, {"limit": 101}, {"offset": -1}, {"limit": "x"}):
        answer = await api.call("GET", "/api/v1/indicators", expect=400, params=params)
        assert answer["error"]["code"] == "invalid_field"
    assert (await api.call("GET", "/api/v1/indicators/{channel}", expect=404, channel="ch_" + "n" * 20)
            )["error"]["code"] == "channel_not_found"
    assert (await api.call("GET", "/api/v1/indicators/{channel}", expect=400, channel="general")
            )["error"]["code"] == "invalid_field"


async def test_rest_routes_are_rate_limited_per_address(aiohttp_client, tmp_path: Path) -> None:
    client = await aiohttp_client(build_app(load_settings(env={}, store=f"file://{tmp_path}/data", token_secret="t" * 40)))
    api = Api(client)
    statuses = [(await client.get("/api/v1/indicators")).status for _ in range(30)]
    assert statuses.count(429) >= 5 and statuses[0] == 200
    answer = await api.call("GET", "/api/v1/indicators", expect=429)
    assert answer["error"]["code"] == "rate_limited"


# ------------------------------------------------------------------------------ sockets


async def test_public_socket_pushes_updates_throttled_to_one_per_second(client, make_agent) -> None:
    alice, bob = await make_agent("alice"), await make_agent("bob")
    channel, key = await create_channel(alice, [bob])
    other, _ = await create_channel(bob, [])
    watcher = await public_socket(client)
    await watcher.send({"type": "watch_indicators", "ref": "w", "channels": [channel, "ch_" + "u" * 20]})
    answer = await watcher.wait_for(kind("indicators", ref="w"))
    assert [c["channel"] for c in answer["channels"]] == [channel]  # the unknown channel is left out
    assert answer["more"] is False
    everything = await public_socket(client)
    await everything.send({"type": "watch_indicators", "ref": "all"})
    answer_all = await everything.wait_for(kind("indicators", ref="all"))
    assert {c["channel"] for c in answer_all["channels"]} == {channel, other}

    # 40 messages sent as fast as possible over about two seconds
    started = time.monotonic()
    for i in range(4):
        await send(client, alice, channel, key, 10, prefix=f"b{i}-")
        await asyncio.sleep(0.5)
    await watcher.wait_for(lambda f: any(c["messages_total"] == 40 for c in f.get("channels", ())), timeout=5)
    elapsed = time.monotonic() - started
    updates = updates_for(watcher, channel)
    assert len(updates) <= elapsed / UPDATE_INTERVAL + 2, f"{len(updates)} updates in {elapsed:.1f} s"
    assert [u["messages_total"] for u in updates] == sorted(u["messages_total"] for u in updates)
    await everything.wait_for(lambda f: any(c["messages_total"] == 40 for c in f.get("channels", ())), timeout=5)
    assert not updates_for(watcher, other)  # not watched by this socket
    for frame in watcher.frames + everything.frames:
        assert_valid(INDICATORS_FRAME, frame)
        assert_valid(SERVER_FRAME, frame)

    # a new watch replaces the old one; [] ends it
    await watcher.send({"type": "watch_indicators", "ref": "none", "channels": []})
    await watcher.wait_for(kind("indicators", ref="none"))
    seen = len(watcher.frames)
    await send(client, alice, channel, key, 2, prefix="after-")
    await everything.wait_for(lambda f: any(c["messages_total"] == 42 for c in f.get("channels", ())), timeout=5)
    await asyncio.sleep(0.2)
    assert len(watcher.frames) == seen


async def test_public_socket_takes_only_watching_and_ping(client) -> None:
    socket = await public_socket(client)
    await socket.send({"type": "ping", "ref": "p"})
    await socket.wait_for(kind("pong", ref="p"))
    await socket.send({"type": "hello", "ref": "h", "token": "t"})
    assert (await socket.wait_for(kind("error", ref="h")))["code"] == "unknown_frame"
    await socket.send(b"{oops")
    await socket.wait_for(kind("error", code="bad_json"))
    await socket.send({"type": "watch_indicators", "ref": "x", "channels": "all"})
    assert (await socket.wait_for(kind("error", ref="x")))["code"] == "invalid_field"
    for frame in socket.frames:
        assert_valid(SERVER_FRAME, frame)
    # a flood is refused, then cut off
    for i in range(60):
        await socket.send({"type": "ping", "ref": f"f{i}"})
    assert await socket.closed() == 1008
    assert any(f.get("code") == "rate_limited" for f in socket.frames)


async def test_a_flood_read_in_one_go_gets_its_rate_limited_errors_before_the_1008(client) -> None:
    """A loaded server reads a whole flood in one read and handles it in one turn of its loop: the
    error frames queued for it must go out before the close frame, not be dropped by it (the cause of
    the occasional failure of the test above under load)."""
    conn = await RawConnection.open(client)
    try:
        assert (await conn.upgrade("/api/v1/indicators/ws"))[0] == 101
        conn.writer.write(b"".join(Frame(Opcode.TEXT, orjson.dumps({"type": "ping", "ref": f"f{i}"})).serialize(mask=True)
                                   for i in range(100)))
        code, reason = await conn.close_frame()
        assert (code, reason) == (1008, "rate_limited")
        assert any(f.get("code") == "rate_limited" for f in conn.frames)
        assert any(f.get("type") == "pong" for f in conn.frames)
    finally:
        conn.close()


async def test_agents_online_and_the_agents_socket_can_watch(client, make_agent) -> None:
    alice, bob, carol = await make_agent("alice"), await make_agent("bob"), await make_agent("carol")
    channel, key = await create_channel(alice, [bob, carol])
    ws_alice = await open_socket(client, {"type": "hello", "token": alice.token})
    await ws_alice.wait_for(kind("welcome"))
    await ws_alice.send({"type": "watch_indicators", "ref": "w", "channels": [channel]})
    answer = await ws_alice.wait_for(kind("indicators", ref="w"))
    assert_valid(SERVER_FRAME, answer)
    await eventually(indicators_of(client, channel), lambda i: i["agents_online"] == 1)
    ws_bob = await open_socket(client, {"type": "hello", "token": bob.token})
    ws_bob_again = await open_socket(client, {"type": "hello", "token": bob.token})  # same agent, two sockets
    await ws_bob_again.wait_for(kind("welcome"))
    await ws_alice.wait_for(lambda f: f.get("type") == "indicators" and f["channels"][0]["agents_online"] == 2)
    item = await eventually(indicators_of(client, channel), lambda i: i["agents_online"] == 2)
    assert item["members"] == 3
    await ws_bob.ws.close()
    await asyncio.sleep(1.2)
    assert (await indicators_of(client, channel)())["agents_online"] == 2  # bob still has a socket
    await ws_bob_again.ws.close()
    await eventually(indicators_of(client, channel), lambda i: i["agents_online"] == 1)
    await ws_alice.wait_for(lambda f: f.get("type") == "indicators" and f["channels"][0]["agents_online"] == 1)


# ------------------------------------------------------------------------------ across processes


def shared_bus(kind: str, request: Any) -> str:
    """A bus URL two apps in this test share: a named in-process broker, or a namespace on Redis."""
    name = f"indicators{secrets.token_hex(4)}"
    if kind == "memory":
        return f"memory://{name}"
    redis = request.getfixturevalue("redis_server")
    return f"{redis.url}?namespace={name}"


@pytest.mark.parametrize("bus", ["memory", "redis"])
async def test_two_processes_sharing_a_bus_show_the_same_numbers(aiohttp_client, tmp_path: Path, bus: str,
                                                                 request: Any) -> None:
    bus_url = shared_bus(bus, request)

    def settings() -> Any:
        return load_settings(env={}, store=f"file://{tmp_path}/data", bus=bus_url, token_secret="t" * 40)
    one = await aiohttp_client(build_app(settings()))
    two = await aiohttp_client(build_app(settings()))
    alice, bob = await RestAgent(one, "alice").register(), await RestAgent(one, "bob").register()
    bob.client = two
    channel, key = await create_channel(alice, [bob])
    watcher = await public_socket(two)
    await watcher.send({"type": "watch_indicators", "ref": "w"})
    await watcher.wait_for(kind("indicators", ref="w"))
    ws_bob = await open_socket(two, {"type": "hello", "token": bob.token})
    await ws_bob.wait_for(kind("welcome"))
    await send(one, alice, channel, key, 3, prefix="one-")
    await send(two, bob, channel, key, 4, prefix="two-")
    for client in (one, two):
        item = await eventually(indicators_of(client, channel),
                                lambda i: i["messages_total"] == 7 and i["agents_online"] == 1)
        assert item["messages_per_minute"] == 7
    await watcher.wait_for(lambda f: any(c["messages_total"] == 7 for c in f.get("channels", ())))
    # bob also on the first process (a reconnect that landed there before the old socket went), and
    # alice there too: two agents online, not three
    ws_bob_again = await open_socket(one, {"type": "hello", "token": bob.token})
    ws_alice = await open_socket(one, {"type": "hello", "token": alice.token})
    await ws_bob_again.wait_for(kind("welcome"))
    await ws_alice.wait_for(kind("welcome"))
    for client in (one, two):
        await eventually(indicators_of(client, channel), lambda i: i["agents_online"] == 2)
    await asyncio.sleep(UPDATE_INTERVAL * 1.5)  # another round of reports
    for client in (one, two):
        assert (await indicators_of(client, channel)())["agents_online"] == 2


@pytest.mark.parametrize("bus", ["memory", "redis"])
async def test_totals_are_recounted_from_the_store_when_the_bus_forgot_them(aiohttp_client, tmp_path: Path,
                                                                            bus: str, request: Any) -> None:
    store = f"file://{tmp_path}/data"
    bus_url = shared_bus(bus, request)
    first = await aiohttp_client(build_app(load_settings(env={}, store=store, bus=bus_url, token_secret="t" * 40)))
    alice = await RestAgent(first, "alice").register()
    channel, key = await create_channel(alice, [])
    await send(first, alice, channel, key, 6)
    await eventually(indicators_of(first, channel), lambda i: i["messages_total"] == 6)
    await first.close()
    if bus == "redis":  # Redis restarted without persistence: everything this server kept there is gone
        import redis.asyncio as aioredis

        client = aioredis.from_url(request.getfixturevalue("redis_server").url)
        namespace = bus_url.split("namespace=", 1)[1]
        forgotten = [key async for key in client.scan_iter(match=f"{namespace}:*")]
        assert forgotten
        await client.delete(*forgotten)
        await client.aclose()
    else:  # a new in-process bus
        bus_url = shared_bus(bus, request)
    second = await aiohttp_client(build_app(load_settings(env={}, store=store, bus=bus_url, token_secret="t" * 40)))
    alice.client = second
    item = await eventually(indicators_of(second, channel), lambda i: i["messages_total"] == 6)
    assert item["last_activity_at"] is not None and item["messages_per_minute"] == 0
    await send(second, alice, channel, key, 2, prefix="n")
    await eventually(indicators_of(second, channel), lambda i: i["messages_total"] == 8 and i["messages_per_minute"] == 2)


# ------------------------------------------------------------------------------ peeks


async def test_peeks_active_and_total(aiohttp_client, tmp_path: Path) -> None:
    settings = load_settings(env={}, store=f"file://{tmp_path}/data", token_secret="t" * 40,
                             peek_refusal_window_seconds=0.5, peek_duration_seconds=2.5, peek_scan_seconds=0.2)
    client = await aiohttp_client(build_app(settings))
    alice = await RestAgent(client, "alice").register()
    channel, _ = await create_channel(alice, [])
    online = await go_online(client, alice)  # a peek needs a member online to hand over the key
    watcher = await public_socket(client)
    await watcher.send({"type": "watch_indicators", "channels": [channel]})
    body, auth = await open_peek(client, channel)
    peek_id = body["peek"]["id"]
    assert (await client.post(f"/api/v1/peeks/{peek_id}/confirm", headers=auth)).status == 200
    await wait_state(client, peek_id, auth, "active")
    await eventually(indicators_of(client, channel), lambda i: i["peeks"] == {"total": 1, "active": 1})
    await wait_state(client, peek_id, auth, "ended")
    await eventually(indicators_of(client, channel), lambda i: i["peeks"] == {"total": 1, "active": 0})
    # pushes go out on their own clock, so the REST answer may come first: wait for the push too
    await watcher.wait_for(lambda f: "ref" not in f and any(
        c["channel"] == channel and c["peeks"] == {"total": 1, "active": 0} for c in f.get("channels", ())))
    pushed = updates_for(watcher, channel)
    assert any(u["peeks"]["active"] == 1 for u in pushed) and pushed[-1]["peeks"] == {"total": 1, "active": 0}
    await online.close()


# ------------------------------------------------------------------------------ the page


async def test_the_page_and_its_files_are_served_with_a_strict_policy(client) -> None:
    response = await client.get("/")
    assert response.status == 200 and response.content_type == "text/html"
    html = await response.text()
    assert 'data-price-cents="500"' in html and 'data-refusal-window="60"' in html and "__" not in html
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "connect-src 'self'" in policy and "https:" not in policy
    for name, kind in (("app.js", "javascript"), ("crypto.js", "javascript"), ("style.css", "text/css")):
        served = await client.get(f"/web/{name}")
        assert served.status == 200 and kind in served.content_type, (name, served.content_type)
    for missing in ("/web/__init__.py", "/web/../__init__.py", "/web/nope.js", "/web/"):
        answer = await client.get(missing)
        assert answer.status in (403, 404), missing


def test_stripe_js_is_allowed_only_when_stripe_payments_have_a_publishable_key(tmp_path: Path) -> None:
    from agentchat.web import content_security_policy, render_index, uses_stripe

    dev = load_settings(env={}, store=f"file://{tmp_path}/data")
    stripe = load_settings(env={}, store=f"file://{tmp_path}/data", payments="stripe://",
                           stripe_secret_key="sk_test_x", stripe_publishable_key="pk_test_x")
    keyless = load_settings(env={}, store=f"file://{tmp_path}/data", payments="stripe://", stripe_secret_key="sk_test_x")
    assert not uses_stripe(dev) and uses_stripe(stripe) and not uses_stripe(keyless)
    assert "js.stripe.com" not in content_security_policy(False)
    assert "script-src 'self' https://js.stripe.com" in content_security_policy(True)
    assert 'data-payments="stripe"' in render_index(stripe) and 'data-payments="dev"' in render_index(dev)


async def test_a_watch_names_at_most_100_channels_and_unknown_ids_cost_one_read(client, make_agent) -> None:
    """A socket naming junk channel ids frame after frame: each id is read from the store once, then
    answered from memory; a watch of more than 100 channels is too large."""
    alice = await make_agent("alice")
    known, _ = await create_channel(alice, [])
    records = client.server.app[INDICATORS].records
    reads: list[str] = []
    real = records.get_channel

    async def counted(channel: str) -> Any:
        reads.append(channel)
        return await real(channel)

    records.get_channel = counted  # type: ignore[method-assign]
    junk = [f"ch_{secrets.token_urlsafe(15)}" for _ in range(99)]
    watcher = await public_socket(client)
    for n in range(5):
        await watcher.send({"type": "watch_indicators", "ref": f"w{n}", "channels": [known, *junk]})
        answer = await watcher.wait_for(kind("indicators", ref=f"w{n}"))
        assert [c["channel"] for c in answer["channels"]] == [known]
    assert len([r for r in reads if r in junk]) == 99  # once each, not once per frame
    await watcher.send({"type": "watch_indicators", "ref": "big", "channels": [known, *junk, "ch_" + "z" * 20]})
    assert (await watcher.wait_for(kind("error", ref="big")))["code"] == "too_large"
    # A channel created after it was asked for shows at once.
    records.get_channel = real  # type: ignore[method-assign]
    fresh, _ = await create_channel(alice, [])
    await watcher.send({"type": "watch_indicators", "ref": "fresh", "channels": [fresh]})
    answer = await watcher.wait_for(kind("indicators", ref="fresh"))
    assert [c["channel"] for c in answer["channels"]] == [fresh]
