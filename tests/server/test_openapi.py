"""The served OpenAPI document, and real REST answers checked against it.

Every call goes through ``Api.call``, which fails if the answer's status is not documented for the
route or its body does not match the documented schema, and checks that a request the server accepted
matches the documented request schema (and a refused one, where the test says so, does not).
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

import pytest

from agentchat import crypto
from agentchat.config import load_settings
from agentchat.server.app import build_app
from tests.conftest import RestAgent
from tests.server.test_rest import envelope, new_channel_id
from tests.unit.test_protocol import assert_valid, openapi_pointer

OPENAPI = Path(__file__).resolve().parents[2] / "protocol" / "openapi.json"
DOC = json.loads(OPENAPI.read_text(encoding="utf-8"))


async def test_openapi_json_is_served(client) -> None:
    response = await client.get("/api/v1/openapi.json")
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.read() == OPENAPI.read_bytes()


def response_validator(method: str, template: str, status: int) -> Any:
    operation = DOC["paths"][template][method.lower()]
    documented = operation["responses"]
    assert str(status) in documented, (
        f"{method} {template} answered {status}, which protocol/openapi.json does not document "
        f"(documented: {sorted(documented)})")
    response = documented[str(status)]
    if "$ref" in response:
        return openapi_pointer("components", "responses", response["$ref"].rsplit("/", 1)[1], "content",
                               "application/json", "schema")
    return openapi_pointer("paths", template, method.lower(), "responses", str(status), "content",
                           "application/json", "schema")


def request_validator(method: str, template: str) -> Any:
    return openapi_pointer("paths", template, method.lower(), "requestBody", "content", "application/json", "schema")


class Api:
    def __init__(self, client: Any) -> None:
        self.client = client
        self.seen: set[tuple[str, str, int]] = set()

    async def call(self, method: str, template: str, *, expect: int, token: str | None = None,
                   body: Any = None, raw: bytes | None = None, params: dict[str, Any] | None = None,
                   schema_refuses: bool = False, **path: str) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        kwargs: dict[str, Any] = {"headers": headers, "params": params}
        if raw is not None:
            kwargs["data"] = raw
            headers["Content-Type"] = "application/json"
        elif body is not None:
            kwargs["json"] = body
        response = await self.client.request(method, template.format(**path), **kwargs)
        answer = await response.json()
        assert response.status == expect, (method, template, response.status, answer)
        assert_valid(response_validator(method, template, response.status), answer)
        if body is not None:
            accepted = not list(request_validator(method, template).iter_errors(body))
            if response.status < 300:
                assert accepted, f"{method} {template}: the server accepted a body its documented schema refuses"
            if schema_refuses:
                assert not accepted, f"{method} {template}: the documented schema accepts a body the server refuses"
        if response.status >= 400 and answer["error"]["retryable"]:
            assert "Retry-After" in response.headers
        self.seen.add((method, template, response.status))
        return answer


def wraps_for(channel: str, epoch: int, key: bytes, *agents: RestAgent) -> dict[str, Any]:
    return {a.did: crypto.wrap_epoch_key(key, a.keys.public.encryption_key, channel=channel, epoch=epoch,
                                         recipient=a.did) for a in agents}


async def test_identity_routes_answer_as_documented(client) -> None:
    api = Api(client)
    health = await api.call("GET", "/health", expect=200)
    assert health["status"] == "healthy"
    alice = RestAgent(client, "alice")
    registered = await api.call("POST", "/api/v1/agents/register", expect=201, body=alice.registration())
    alice.token = registered["token"]
    await api.call("POST", "/api/v1/agents/register", expect=400, body={**alice.registration(), "admin": True},
                   schema_refuses=True)
    await api.call("POST", "/api/v1/agents/register", expect=400, body={**alice.registration(), "keys": {}},
                   schema_refuses=True)
    await api.call("POST", "/api/v1/agents/register", expect=400,
                   body=alice.registration(timestamp=int(time.time() * 1000) - 3_600_000))
    await api.call("POST", "/api/v1/agents/register", expect=400, raw=b"{nope")
    await api.call("POST", "/api/v1/agents/register", expect=413, raw=b'{"name":"' + b"x" * 300_000 + b'"}')

    me = await api.call("GET", "/api/v1/agents/me", expect=200, token=alice.token)
    assert me["did"] == alice.did
    await api.call("GET", "/api/v1/agents/me", expect=401)
    await api.call("GET", "/api/v1/agents/me", expect=401, token="forged")
    await api.call("GET", "/api/v1/agents/{did}", expect=200, did=alice.did)
    await api.call("GET", "/api/v1/agents/{did}", expect=400, did="did:example:nope")
    await api.call("GET", "/api/v1/agents/{did}", expect=404, did=crypto.AgentKeys.generate().did)

    challenge = await api.call("POST", "/api/v1/auth/challenge", expect=200, body={"did": alice.did})
    await api.call("POST", "/api/v1/auth/challenge", expect=404, body={"did": crypto.AgentKeys.generate().did})
    await api.call("POST", "/api/v1/auth/challenge", expect=400, body={"did": alice.did, "x": 1}, schema_refuses=True)
    login = {"did": alice.did, "challenge": challenge["challenge"],
             "signature": crypto.b64e(alice.keys.sign(crypto.login_message(alice.did, challenge["challenge"])))}
    grant = await api.call("POST", "/api/v1/auth/login", expect=200, body=login)
    assert grant["did"] == alice.did
    await api.call("POST", "/api/v1/auth/login", expect=401, body=login)  # single use
    await api.call("POST", "/api/v1/auth/login", expect=400, body={**login, "signature": "short"}, schema_refuses=True)

    spec = await client.get("/api/v1/openapi.json")
    assert spec.status == 200


async def test_channel_and_message_routes_answer_as_documented(client, make_agent) -> None:
    api = Api(client)
    alice, bob, carol = await make_agent("alice"), await make_agent("bob"), await make_agent("carol")
    channel = new_channel_id()
    key1 = crypto.new_epoch_key()
    create = {"id": channel, "name": "pair", "members": [bob.did], "epoch_keys": wraps_for(channel, 1, key1, alice, bob)}
    created = await api.call("POST", "/api/v1/channels", expect=201, token=alice.token, body=create)
    assert created["members"] == [alice.did] and created["invited"] == [bob.did]
    invitations = await api.call("GET", "/api/v1/invitations", expect=200, token=bob.token)
    assert [i["channel"] for i in invitations["invitations"]] == [channel] and invitations["has_more"] is False
    await api.call("GET", "/api/v1/invitations", expect=400, token=bob.token, params={"limit": 0})
    await api.call("POST", "/api/v1/invitations/{channel}/accept", expect=404, token=carol.token, channel=channel)
    joined = await api.call("POST", "/api/v1/invitations/{channel}/accept", expect=200, token=bob.token,
                            channel=channel)
    assert joined["members"] == sorted([alice.did, bob.did]) and joined["invited"] == []
    await api.call("POST", "/api/v1/invitations/{channel}/decline", expect=200, token=carol.token, channel=channel)
    await api.call("PUT", "/api/v1/agents/me/blocks/{did}", expect=200, token=carol.token, did=bob.did)
    blocks = await api.call("GET", "/api/v1/agents/me/blocks", expect=200, token=carol.token)
    assert blocks["blocked"] == [bob.did]
    await api.call("DELETE", "/api/v1/agents/me/blocks/{did}", expect=200, token=carol.token, did=bob.did)
    await api.call("PATCH", "/api/v1/channels/{channel}", expect=403, token=bob.token, channel=channel,
                   body={"listed": False})
    await api.call("POST", "/api/v1/channels", expect=409, token=alice.token, body=create)
    await api.call("POST", "/api/v1/channels", expect=400, token=alice.token,
                   body={k: v for k, v in create.items() if k != "epoch_keys"} | {"id": new_channel_id()},
                   schema_refuses=True)
    await api.call("POST", "/api/v1/channels", expect=401, body=create)

    listing = await api.call("GET", "/api/v1/channels", expect=200, token=alice.token)
    assert [c["id"] for c in listing["channels"]] == [channel]
    await api.call("GET", "/api/v1/channels/{channel}", expect=200, token=bob.token, channel=channel)
    await api.call("GET", "/api/v1/channels/{channel}", expect=403, token=carol.token, channel=channel)
    await api.call("GET", "/api/v1/channels/{channel}", expect=404, token=alice.token, channel=new_channel_id())
    await api.call("GET", "/api/v1/channels/{channel}", expect=400, token=alice.token, channel="general")

    await api.call("POST", "/api/v1/channels/{channel}/members", expect=403, token=bob.token,
                   body={"did": carol.did}, channel=channel)
    await api.call("POST", "/api/v1/channels/{channel}/members", expect=404, token=alice.token,
                   body={"did": crypto.AgentKeys.generate().did}, channel=channel)
    added = await api.call("POST", "/api/v1/channels/{channel}/members", expect=200, token=alice.token,
                           body={"did": carol.did}, channel=channel)
    assert carol.did in added["invited"] and carol.did not in added["members"]
    await api.call("POST", "/api/v1/invitations/{channel}/accept", expect=200, token=carol.token, channel=channel)

    key2 = crypto.new_epoch_key()
    rotated = await api.call("POST", "/api/v1/channels/{channel}/epochs", expect=201, token=bob.token,
                             body={"epoch": 2, "epoch_keys": wraps_for(channel, 2, key2, alice, bob, carol)},
                             channel=channel)
    assert rotated["epoch"] == 2
    await api.call("POST", "/api/v1/channels/{channel}/epochs", expect=409, token=bob.token,
                   body={"epoch": 2, "epoch_keys": wraps_for(channel, 2, key2, alice, bob, carol)}, channel=channel)
    await api.call("POST", "/api/v1/channels/{channel}/epochs", expect=400, token=bob.token,
                   body={"epoch": 3, "epoch_keys": wraps_for(channel, 3, key2, alice, bob)}, channel=channel)

    found = await api.call("GET", "/api/v1/channels/{channel}/epochs/{epoch}/key", expect=200, token=carol.token,
                           channel=channel, epoch="current")
    assert crypto.unwrap_epoch_key(found["wrapped_key"], carol.keys.encryption_private_key, channel=channel,
                                   epoch=2, recipient=carol.did) == key2
    await api.call("GET", "/api/v1/channels/{channel}/epochs/{epoch}/key", expect=200, token=alice.token,
                   channel=channel, epoch="1")
    await api.call("GET", "/api/v1/channels/{channel}/epochs/{epoch}/key", expect=404, token=carol.token,
                   channel=channel, epoch="1")
    await api.call("GET", "/api/v1/channels/{channel}/epochs/{epoch}/key", expect=400, token=carol.token,
                   channel=channel, epoch="latest")

    send = {"client_id": "m-1", "envelope": envelope(alice, channel, key2, "hello", "m-1", epoch=2)}
    first = await api.call("POST", "/api/v1/channels/{channel}/messages", expect=201, token=alice.token,
                           body=send, channel=channel)
    again = await api.call("POST", "/api/v1/channels/{channel}/messages", expect=201, token=alice.token,
                           body=send, channel=channel)
    assert again["seq"] == first["seq"]
    await api.call("POST", "/api/v1/channels/{channel}/messages", expect=409, token=alice.token, channel=channel,
                   body={"client_id": "m-2", "envelope": envelope(alice, channel, key1, "old", "m-2", epoch=1)})
    await api.call("POST", "/api/v1/channels/{channel}/messages", expect=400, token=alice.token, channel=channel,
                   body={**send, "client_id": "not ok"}, schema_refuses=True)
    outsider = await make_agent("dave")
    await api.call("POST", "/api/v1/channels/{channel}/messages", expect=403, token=outsider.token, channel=channel,
                   body={"client_id": "m-3", "envelope": envelope(outsider, channel, key2, "hi", "m-3", epoch=2)})
    await api.call("POST", "/api/v1/channels/{channel}/messages", expect=413, token=alice.token, channel=channel,
                   raw=b'{"client_id":"' + b"x" * 300_000 + b'"}')

    page = await api.call("GET", "/api/v1/channels/{channel}/messages", expect=200, token=bob.token, channel=channel,
                          params={"after": 0, "limit": 10})
    assert [m["seq"] for m in page["messages"]] == [first["seq"]] and page["has_more"] is False
    await api.call("GET", "/api/v1/channels/{channel}/messages", expect=400, token=bob.token, channel=channel,
                   params={"limit": 0})
    await api.call("GET", "/api/v1/channels/{channel}/messages", expect=403, token=outsider.token, channel=channel)

    await api.call("DELETE", "/api/v1/channels/{channel}/members/{did}", expect=403, token=bob.token,
                   channel=channel, did=alice.did)
    removed = await api.call("DELETE", "/api/v1/channels/{channel}/members/{did}", expect=200, token=alice.token,
                             channel=channel, did=carol.did)
    assert carol.did not in removed["members"]
    again = await api.call("DELETE", "/api/v1/channels/{channel}/members/{did}", expect=200, token=alice.token,
                           channel=channel, did=carol.did)  # idempotent: a retry is answered like the first
    assert again["members"] == removed["members"]

    exercised = {(m, t) for m, t, _ in api.seen}
    for method, template in [("POST", "/api/v1/channels"), ("GET", "/api/v1/channels"),
                             ("GET", "/api/v1/channels/{channel}"), ("POST", "/api/v1/channels/{channel}/members"),
                             ("DELETE", "/api/v1/channels/{channel}/members/{did}"),
                             ("POST", "/api/v1/channels/{channel}/epochs"),
                             ("GET", "/api/v1/channels/{channel}/epochs/{epoch}/key"),
                             ("POST", "/api/v1/channels/{channel}/messages"),
                             ("GET", "/api/v1/channels/{channel}/messages")]:
        assert (method, template) in exercised


@pytest.mark.parametrize("method, path, status, allow", [
    ("GET", "/api/v1/nope", 404, None),
    ("PUT", "/api/v1/channels", 405, "GET, HEAD, POST"),
    ("TRACE", "/health", 405, "GET, HEAD"),
    ("GET", "/api/v1/agents/register", 405, "POST"),  # not read as a DID
    ("GET", "/web/nope.js", 404, None),
    ("GET", "/web/", 404, None),
    ("GET", "/web/../pyproject.toml", 404, None),
])
async def test_unknown_routes_and_methods_get_the_error_object(client, method: str, path: str, status: int,
                                                                allow: str | None) -> None:
    response = await client.request(method, path)
    assert response.status == status
    assert response.headers.get("Allow") == allow
    assert response.content_type == "application/json"
    assert_valid(openapi_pointer("components", "schemas", "error_response"), await response.json())


async def test_static_files_are_served_with_nosniff(client) -> None:
    response = await client.get("/web/app.js")
    assert response.status == 200
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "javascript" in response.content_type


async def test_operator_revenue_without_a_token_is_401_even_when_the_view_is_disabled(client) -> None:
    response = await client.get("/api/v1/operator/revenue")
    assert response.status == 401
    assert (await response.json())["error"]["code"] == "auth_required"
    response = await client.get("/api/v1/operator/revenue", headers={"Authorization": "Bearer x"})
    assert response.status == 403


async def test_an_epoch_in_unicode_digits_is_a_400_not_a_500(client, make_agent) -> None:
    from tests.server.test_rest import create_channel

    alice = await make_agent("alice")
    channel, _ = await create_channel(alice, [])
    response = await client.get(f"/api/v1/channels/{channel}/epochs/\u00b2/key", headers=alice.auth)
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "invalid_field"


async def test_auth_rate_limit_answers_429_with_retry_after(aiohttp_client, tmp_path) -> None:
    settings = load_settings(env={}, store=f"file://{tmp_path}/data", token_secret="t" * 40,
                             auth_requests_per_second=2)
    api = Api(await aiohttp_client(build_app(settings)))
    did = crypto.AgentKeys.generate().did
    codes = []
    for _ in range(6):
        response = await api.client.post("/api/v1/auth/challenge", json={"did": did})
        codes.append(response.status)
        if response.status == 429:
            assert_valid(response_validator("POST", "/api/v1/auth/challenge", 429), await response.json())
            assert response.headers["Retry-After"] == "1"
            break
    assert 429 in codes, codes


@pytest.mark.parametrize("scope", ["agent", "peek"])
async def test_agent_only_routes_refuse_peek_tokens_as_documented(client, make_agent, scope) -> None:
    """A peek token (scope peek) is valid but may not use agent routes: 403, which is documented."""
    from agentchat.server.appkeys import TOKENS

    api = Api(client)
    agent = await make_agent("alice")
    token = agent.token
    if scope == "peek":
        token, _ = client.server.app[TOKENS].issue("peek", "pk_" + secrets.token_urlsafe(16),
                                                   channel=new_channel_id())
    await api.call("GET", "/api/v1/agents/me", expect=200 if scope == "agent" else 403, token=token)
    await api.call("GET", "/api/v1/channels", expect=200 if scope == "agent" else 403, token=token)
