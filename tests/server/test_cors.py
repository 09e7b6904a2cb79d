"""CORS (core/cors.py): pages on the listed origins may call the API and open its sockets, preflights
are answered as the Fetch standard says, and any other site's page gets no CORS header and no socket.
With no list (the default) the API is same-origin only and no answer depends on Origin."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agentchat.config import ConfigError, load_settings
from agentchat.server.api import indicators as indicators_api
from agentchat.server.app import build_app

PAGE = "http://127.0.0.1:9001"
OTHER = "https://evil.example"
UPGRADE = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


def _settings(tmp_path: Path, **overrides: Any) -> Any:
    return load_settings(env={}, store=f"file://{tmp_path}/data", token_secret="t" * 40, **overrides)


@pytest.fixture
async def client(aiohttp_client: Any, tmp_path: Path) -> Any:
    return await aiohttp_client(build_app(_settings(tmp_path, cors_origins=f"{PAGE}, https://chat.example:443")))


def _preflight(origin: str) -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"}


async def test_a_listed_origins_preflight_is_allowed(client: Any) -> None:
    response = await client.options("/api/v1/channels", headers=_preflight(PAGE))
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == PAGE
    assert set(response.headers["Access-Control-Allow-Methods"].split(", ")) >= {"GET", "POST", "PUT", "DELETE"}
    assert {"authorization", "content-type"} <= set(response.headers["Access-Control-Allow-Headers"].lower().split(", "))
    assert int(response.headers["Access-Control-Max-Age"]) > 0
    assert "Origin" in response.headers.getall("Vary")
    assert "Access-Control-Allow-Credentials" not in response.headers
    # the list is kept as browsers write origins: the default port left out
    listed = await client.options("/api/v1/channels", headers=_preflight("https://chat.example"))
    assert listed.headers["Access-Control-Allow-Origin"] == "https://chat.example"


async def test_another_origins_preflight_gets_no_cors_header(client: Any) -> None:
    for origin in (OTHER, "null", PAGE + ".evil.example", "http://127.0.0.1:9002"):
        response = await client.options("/api/v1/channels", headers=_preflight(origin))
        assert response.status == 403 and (await response.json())["error"]["code"] == "forbidden"
        assert not [name for name in response.headers if name.lower().startswith("access-control-")]
        assert "Origin" in response.headers.getall("Vary")


async def test_answers_to_a_listed_origin_carry_its_origin_errors_included(client: Any) -> None:
    ok = await client.get("/api/v1/indicators", headers={"Origin": PAGE})
    assert ok.status == 200 and ok.headers["Access-Control-Allow-Origin"] == PAGE
    assert "Origin" in ok.headers.getall("Vary")
    refused = await client.get("/api/v1/agents/me", headers={"Origin": PAGE})
    assert refused.status == 401 and refused.headers["Access-Control-Allow-Origin"] == PAGE
    assert (await refused.json())["error"]["code"] == "auth_required"
    other = await client.get("/api/v1/indicators", headers={"Origin": OTHER})
    assert "Access-Control-Allow-Origin" not in other.headers and "Origin" in other.headers.getall("Vary")
    plain = await client.get("/api/v1/indicators")  # no Origin: a cache must still not mix the two
    assert "Access-Control-Allow-Origin" not in plain.headers and "Origin" in plain.headers.getall("Vary")
    assert all(value != "*" for value in ok.headers.getall("Access-Control-Allow-Origin"))


async def test_by_default_no_answer_depends_on_origin(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(build_app(_settings(tmp_path)))
    preflight = await client.options("/api/v1/channels", headers=_preflight(PAGE))
    assert preflight.status == 405  # OPTIONS is not a method of the API
    assert not [name for name in preflight.headers if name.lower().startswith("access-control-")]
    answer = await client.get("/api/v1/indicators", headers={"Origin": PAGE})
    assert "Access-Control-Allow-Origin" not in answer.headers and "Vary" not in answer.headers


@pytest.mark.parametrize("path", ["/api/v1/ws", "/api/v1/indicators/ws"])
async def test_socket_upgrades_check_the_origin(client: Any, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(indicators_api, "SOCKETS_PER_SECOND", 100)  # six upgrades in a row here
    for origin in (PAGE, "https://chat.example", f"http://127.0.0.1:{client.port}"):  # listed, or the server's own
        socket = await client.ws_connect(path, origin=origin)
        await socket.close()
    socket = await client.ws_connect(path)  # a non-browser client sends no Origin
    await socket.close()
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(path, origin=OTHER)
    assert refused.value.status == 403
    # the refusal is in the JSON error envelope
    response = await client.get(path, headers={**UPGRADE, "Origin": OTHER})
    assert response.status == 403
    error = (await response.json())["error"]
    assert error["code"] == "forbidden" and OTHER in error["message"]


async def test_with_no_list_only_the_servers_own_pages_open_sockets(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(build_app(_settings(tmp_path)))
    socket = await client.ws_connect("/api/v1/indicators/ws", origin=f"http://127.0.0.1:{client.port}")
    await socket.close()
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/api/v1/indicators/ws", origin=PAGE)
    assert refused.value.status == 403


@pytest.mark.parametrize("value", ["*", "https://*.example", "null", "https://chat.example/app", "chat.example",
                                   "ftp://chat.example"])
def test_the_list_takes_exact_origins_only(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="cors_origins: "):
        _settings(tmp_path, cors_origins=value)


async def test_the_page_served_elsewhere_names_the_api_and_its_policy_allows_it(aiohttp_client: Any,
                                                                                tmp_path: Path) -> None:
    client = await aiohttp_client(build_app(_settings(tmp_path, public_api_url="https://api.chat.example/")))
    page = await client.get("/")
    assert '<meta name="agentchat-api" content="https://api.chat.example">' in await page.text()
    policy = dict(part.strip().split(" ", 1) for part in page.headers["Content-Security-Policy"].split(";"))
    assert policy["connect-src"] == "'self' https://api.chat.example wss://api.chat.example"
    assert policy["script-src"] == "'self'"
    same = await (await aiohttp_client(build_app(_settings(tmp_path / "same")))).get("/")
    assert '<meta name="agentchat-api" content="">' in await same.text()  # the page's own origin
    assert "connect-src 'self';" in same.headers["Content-Security-Policy"]
    with pytest.raises(ConfigError, match="public_api_url: "):
        _settings(tmp_path, public_api_url="https://api.chat.example/v1")
