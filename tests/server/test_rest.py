"""REST routes through aiohttp's test client: identity, channels, messages, and every bad input."""

from __future__ import annotations

import secrets
import time

import jwt
import pytest

from agentchat import crypto
from agentchat.config import load_settings
from agentchat.server.app import build_app
from tests.conftest import RestAgent


def new_channel_id() -> str:
    return "ch_" + secrets.token_urlsafe(16)


async def create_channel(owner: RestAgent, members: list[RestAgent], epoch_key: bytes | None = None,
                         channel_id: str | None = None) -> tuple[str, bytes]:
    channel_id = channel_id or new_channel_id()
    epoch_key = epoch_key or crypto.new_epoch_key()
    everyone = {owner.did: owner, **{m.did: m for m in members}}
    wrapped = {did: crypto.wrap_epoch_key(epoch_key, agent.keys.public.encryption_key, channel=channel_id,
                                          epoch=1, recipient=did) for did, agent in everyone.items()}
    status, body = await owner.call("POST", "/api/v1/channels", json={
        "id": channel_id, "name": "test", "members": sorted(everyone), "epoch_keys": wrapped})
    assert status == 201, body
    for member in members:  # each invited agent accepts (consent: server/api/invitations.py)
        status, body = await member.call("POST", f"/api/v1/invitations/{channel_id}/accept")
        assert status == 200, body
    return channel_id, epoch_key


def envelope(agent: RestAgent, channel: str, key: bytes, text: str, client_id: str, epoch: int = 1) -> dict:
    return crypto.seal(key, text.encode(), channel=channel, epoch=epoch, sender=agent.did,
                       client_id=client_id, signer=agent.keys)


# ------------------------------------------------------------------------------ health


async def test_health_reports_components(client) -> None:
    response = await client.get("/health")
    body = await response.json()
    assert response.status == 200
    assert body["status"] == "healthy"
    assert body["components"] == {"bus": "ok", "store": "ok"}
    assert abs(body["timestamp"] - time.time() * 1000) < 5000


async def test_unknown_route_is_a_json_error(client) -> None:
    response = await client.get("/api/v1/nope")
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "not_found"


# ------------------------------------------------------------------------------ identity


async def test_register_returns_did_and_token_and_profile_has_keys(client, make_agent) -> None:
    alice = await make_agent("alice")
    assert alice.did.startswith("did:agentchat:z")
    response = await client.get(f"/api/v1/agents/{alice.did}")
    profile = await response.json()
    assert profile["name"] == "alice"
    assert profile["keys"] == alice.keys.public.to_wire()
    status, me = await alice.call("GET", "/api/v1/agents/me")
    assert status == 200 and me["did"] == alice.did


@pytest.mark.parametrize("mutate, code", [
    (lambda b: b.update(signature=crypto.b64e(b"\0" * 64)), "bad_signature"),
    (lambda b: b.update(name="mallory"), "bad_signature"),
    (lambda b: b.update(timestamp=int(time.time() * 1000) - 3_600_000), "stale_request"),
    (lambda b: b["keys"].update(encryption_key=crypto.b64e(b"\1" * 32)), "invalid_field"),
    (lambda b: b.pop("keys"), "invalid_field"),
    (lambda b: b.update(extra=1), "invalid_field"),
    (lambda b: b.update(name=""), "invalid_field"),
    (lambda b: b.update(name="x" * 65), "invalid_field"),
    (lambda b: b.update(timestamp="now"), "invalid_field"),
])
async def test_bad_registrations_are_refused_with_a_code(client, mutate, code) -> None:
    agent = RestAgent(client, "alice")
    body = agent.registration()
    mutate(body)
    response = await client.post("/api/v1/agents/register", json=body)
    assert response.status in (400, 401)
    assert (await response.json())["error"]["code"] == code


async def test_malformed_and_oversized_bodies(client) -> None:
    response = await client.post("/api/v1/agents/register", data=b"{not json",
                                 headers={"Content-Type": "application/json"})
    assert (await response.json())["error"]["code"] == "bad_json"
    response = await client.post("/api/v1/agents/register", data=b"[1,2]")
    assert (await response.json())["error"]["code"] == "invalid_field"
    response = await client.post("/api/v1/agents/register", data=b"{" + b" " * 300_000 + b"}")
    assert response.status == 413
    assert (await response.json())["error"]["code"] == "too_large"


async def test_login_by_challenge_is_single_use(client, make_agent) -> None:
    alice = await make_agent("alice")
    challenge = await (await client.post("/api/v1/auth/challenge", json={"did": alice.did})).json()
    signature = crypto.b64e(alice.keys.sign(crypto.login_message(alice.did, challenge["challenge"])))
    login = {"did": alice.did, "challenge": challenge["challenge"], "signature": signature}
    first = await client.post("/api/v1/auth/login", json=login)
    assert first.status == 200
    token = (await first.json())["token"]
    me = await client.get("/api/v1/agents/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status == 200
    replay = await client.post("/api/v1/auth/login", json=login)
    assert replay.status == 401
    assert (await replay.json())["error"]["code"] == "challenge_invalid"


async def test_login_with_wrong_signature_or_someone_elses_challenge(client, make_agent) -> None:
    alice, bob = await make_agent("alice"), await make_agent("bob")
    challenge = (await (await client.post("/api/v1/auth/challenge", json={"did": alice.did})).json())["challenge"]
    forged = crypto.b64e(bob.keys.sign(crypto.login_message(alice.did, challenge)))
    response = await client.post("/api/v1/auth/login", json={"did": alice.did, "challenge": challenge,
                                                               "signature": forged})
    assert (await response.json())["error"]["code"] == "bad_signature"
    challenge = (await (await client.post("/api/v1/auth/challenge", json={"did": alice.did})).json())["challenge"]
    signature = crypto.b64e(bob.keys.sign(crypto.login_message(bob.did, challenge)))
    response = await client.post("/api/v1/auth/login", json={"did": bob.did, "challenge": challenge,
                                                               "signature": signature})
    assert (await response.json())["error"]["code"] == "challenge_invalid"


async def test_challenge_for_unknown_agent(client) -> None:
    did = crypto.AgentKeys.generate().did
    response = await client.post("/api/v1/auth/challenge", json={"did": did})
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "agent_not_found"
    response = await client.post("/api/v1/auth/challenge", json={"did": "did:web:example.com"})
    assert (await response.json())["error"]["code"] == "invalid_field"


async def test_tokens_forged_expired_missing(client, make_agent, settings) -> None:
    alice = await make_agent("alice")
    response = await client.get("/api/v1/channels")
    assert (await response.json())["error"]["code"] == "auth_required"
    forged = jwt.encode({"sub": alice.did, "scope": "agent", "iss": "agentchat", "iat": int(time.time()),
                         "exp": int(time.time()) + 60}, "x" * 40, algorithm="HS256")
    response = await client.get("/api/v1/channels", headers={"Authorization": f"Bearer {forged}"})
    assert (await response.json())["error"]["code"] == "token_invalid"
    expired = jwt.encode({"sub": alice.did, "scope": "agent", "iss": "agentchat", "iat": int(time.time()) - 100,
                          "exp": int(time.time()) - 10}, settings.token_secret, algorithm="HS256")
    response = await client.get("/api/v1/channels", headers={"Authorization": f"Bearer {expired}"})
    assert (await response.json())["error"]["code"] == "token_expired"


async def test_auth_routes_are_rate_limited(aiohttp_client, tmp_path) -> None:
    settings = load_settings(env={}, store=f"file://{tmp_path}/data", auth_requests_per_second=5)
    client = await aiohttp_client(build_app(settings))
    did = crypto.AgentKeys.generate().did
    codes = []
    for _ in range(30):
        response = await client.post("/api/v1/auth/challenge", json={"did": did})
        codes.append((await response.json())["error"]["code"])
    assert "rate_limited" in codes


# ------------------------------------------------------------------------------ channels


async def test_channel_lifecycle_and_membership_rules(client, make_agent) -> None:
    alice, bob, carol = await make_agent("alice"), await make_agent("bob"), await make_agent("carol")
    channel, key = await create_channel(alice, [bob])
    status, listing = await bob.call("GET", "/api/v1/channels")
    assert [c["id"] for c in listing["channels"]] == [channel]
    status, body = await carol.call("GET", f"/api/v1/channels/{channel}")
    assert status == 403 and body["error"]["code"] == "not_member"
    # only the owner adds
    status, body = await bob.call("POST", f"/api/v1/channels/{channel}/members", json={"did": carol.did})
    assert status == 403 and body["error"]["code"] == "forbidden"
    status, body = await alice.call("POST", f"/api/v1/channels/{channel}/members", json={"did": carol.did})
    assert status == 200 and carol.did in body["invited"] and carol.did not in body["members"]
    status, body = await carol.call("POST", f"/api/v1/invitations/{channel}/accept")
    assert status == 200 and carol.did in body["members"]
    # bob's own wrapped key opens
    status, body = await bob.call("GET", f"/api/v1/channels/{channel}/epochs/current/key")
    assert crypto.unwrap_epoch_key(body["wrapped_key"], bob.keys.encryption_private_key, channel=channel,
                                   epoch=1, recipient=bob.did) == key
    # carol was added after epoch 1: no key for her until someone rotates
    status, body = await carol.call("GET", f"/api/v1/channels/{channel}/epochs/1/key")
    assert status == 404
    # bob may not remove carol, but may leave
    status, body = await bob.call("DELETE", f"/api/v1/channels/{channel}/members/{carol.did}")
    assert body["error"]["code"] == "forbidden"
    status, body = await bob.call("DELETE", f"/api/v1/channels/{channel}/members/{bob.did}")
    assert status == 200 and bob.did not in body["members"]
    status, body = await bob.call("GET", f"/api/v1/channels/{channel}")
    assert body["error"]["code"] == "not_member"


async def test_channel_creation_errors(client, make_agent) -> None:
    alice = await make_agent("alice")
    ghost = crypto.AgentKeys.generate()
    status, body = await alice.call("POST", "/api/v1/channels", json={
        "id": new_channel_id(), "members": [ghost.did], "epoch_keys": {}})
    assert status == 404 and body["error"]["code"] == "agent_not_found"
    status, body = await alice.call("POST", "/api/v1/channels", json={
        "id": new_channel_id(), "members": [], "epoch_keys": {}})
    assert status == 400 and "epoch_keys" in body["error"]["message"]
    status, body = await alice.call("POST", "/api/v1/channels", json={"id": "general", "epoch_keys": {}})
    assert body["error"]["code"] == "invalid_field"
    channel, _ = await create_channel(alice, [])
    with pytest.raises(AssertionError):
        await create_channel(alice, [], channel_id=channel)  # taken ids are refused
    status, body = await alice.call("GET", f"/api/v1/channels/{new_channel_id()}")
    assert status == 404 and body["error"]["code"] == "channel_not_found"


async def test_epoch_rotation_requires_every_member_and_the_next_number(client, make_agent) -> None:
    alice, bob = await make_agent("alice"), await make_agent("bob")
    channel, _ = await create_channel(alice, [bob])
    new_key = crypto.new_epoch_key()
    wrapped = {a.did: crypto.wrap_epoch_key(new_key, a.keys.public.encryption_key, channel=channel, epoch=2,
                                            recipient=a.did) for a in (alice, bob)}
    status, body = await bob.call("POST", f"/api/v1/channels/{channel}/epochs",
                                  json={"epoch": 3, "epoch_keys": wrapped})
    assert status == 409
    status, body = await bob.call("POST", f"/api/v1/channels/{channel}/epochs",
                                  json={"epoch": 2, "epoch_keys": {alice.did: wrapped[alice.did]}})
    assert status == 400
    status, body = await bob.call("POST", f"/api/v1/channels/{channel}/epochs",
                                  json={"epoch": 2, "epoch_keys": wrapped})
    assert status == 201 and body["epoch"] == 2
    status, body = await alice.call("POST", f"/api/v1/channels/{channel}/epochs",
                                    json={"epoch": 2, "epoch_keys": wrapped})
    assert status == 409


# ------------------------------------------------------------------------------ messages


async def test_rest_send_is_acked_idempotent_and_readable(client, make_agent) -> None:
    alice, bob = await make_agent("alice"), await make_agent("bob")
    channel, key = await create_channel(alice, [bob])
    seqs = []
    for i in range(3):
        status, body = await alice.call("POST", f"/api/v1/channels/{channel}/messages", json={
            "client_id": f"m{i}", "envelope": envelope(alice, channel, key, f"hello {i}", f"m{i}")})
        assert status == 201, body
        seqs.append(body["seq"])
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    # a retry with the same client id gets the original number, and nothing is stored twice
    status, body = await alice.call("POST", f"/api/v1/channels/{channel}/messages", json={
        "client_id": "m1", "envelope": envelope(alice, channel, key, "hello 1", "m1")})
    assert status == 201 and body["seq"] == seqs[1]
    status, page = await bob.call("GET", f"/api/v1/channels/{channel}/messages?after=0&limit=10")
    assert [m["seq"] for m in page["messages"]] == seqs
    texts = [crypto.open_envelope(m["envelope"], key, channel=channel, sender=m["sender"],
                                  client_id=m["client_id"], sender_signing_key=alice.keys.public.signing_key)
             for m in page["messages"]]
    assert texts == [b"hello 0", b"hello 1", b"hello 2"]
    status, page = await bob.call("GET", f"/api/v1/channels/{channel}/messages?after={seqs[0]}&limit=1")
    assert [m["seq"] for m in page["messages"]] == [seqs[1]] and page["has_more"]


async def test_message_errors(client, make_agent) -> None:
    alice, bob, carol = await make_agent("alice"), await make_agent("bob"), await make_agent("carol")
    channel, key = await create_channel(alice, [bob])
    url = f"/api/v1/channels/{channel}/messages"
    good = envelope(alice, channel, key, "hi", "c1")
    status, body = await carol.call("POST", url, json={"client_id": "c1", "envelope": good})
    assert status == 403 and body["error"]["code"] == "not_member"
    status, body = await carol.call("GET", url)
    assert status == 403 and body["error"]["code"] == "not_member"
    cases = [
        ({"client_id": "c1"}, "invalid_field"),
        ({"client_id": "bad id!", "envelope": good}, "invalid_field"),
        ({"client_id": "c1", "envelope": {**good, "nonce": "short"}}, "invalid_field"),
        ({"client_id": "c1", "envelope": {**good, "extra": 1}}, "invalid_field"),
        ({"client_id": "c1", "envelope": {**good, "epoch": "1"}}, "invalid_field"),
        ({"client_id": "c1", "envelope": {**good, "epoch": 7}}, "stale_epoch"),
        ({"client_id": "c1", "envelope": {**good, "ciphertext": "A" * 100_000}}, "too_large"),
    ]
    for body_in, code in cases:
        status, body = await alice.call("POST", url, json=body_in)
        assert body["error"]["code"] == code, (body_in.keys(), body)
    status, body = await alice.call("GET", url + "?limit=100000")
    assert body["error"]["code"] == "invalid_field"
    status, body = await alice.call("GET", url + "?after=-1")
    assert body["error"]["code"] == "invalid_field"


async def test_rate_limits_behind_a_trusted_proxy_use_the_forwarded_address(aiohttp_client, tmp_path) -> None:
    settings = load_settings(env={}, store=f"file://{tmp_path}/data", auth_requests_per_second=3,
                             trusted_proxies=1)
    client = await aiohttp_client(build_app(settings))
    did = crypto.AgentKeys.generate().did

    async def codes(address: str, n: int) -> list[str]:
        found = []
        for _ in range(n):
            response = await client.post("/api/v1/auth/challenge", json={"did": did},
                                         headers={"X-Forwarded-For": f"6.6.6.6, {address}"})
            found.append((await response.json())["error"]["code"])
        return found

    assert "rate_limited" in await codes("10.0.0.1", 12)
    assert (await codes("10.0.0.2", 1)) == ["agent_not_found"]  # another client is not held back


async def test_health_is_503_naming_the_failing_component(client) -> None:
    from agentchat.errors import error
    from agentchat.server.appkeys import BUS, STORE

    async def broken(*args, **kwargs):
        raise error("store_unavailable")

    async def bus_down():
        raise error("bus_unavailable")

    client.app[STORE].inner.get = broken
    response = await client.get("/health")
    body = await response.json()
    assert response.status == 503
    assert body["status"] == "unhealthy" and body["failing"] == ["store"]
    client.app[BUS].ping = bus_down
    body = await (await client.get("/health")).json()
    assert body["failing"] == ["bus", "store"]
    assert body["components"] == {"bus": "bus_unavailable", "store": "store_unavailable"}


async def test_a_captured_registration_cannot_be_replayed_to_mint_a_token(client) -> None:
    alice = RestAgent(client, "alice")
    captured = alice.registration()
    first = await client.post("/api/v1/agents/register", json=captured)
    assert first.status == 201
    replay = await client.post("/api/v1/agents/register", json=captured)
    assert replay.status == 400
    body = await replay.json()
    assert body["error"]["code"] == "request_replayed" and "token" not in body
    time.sleep(0.002)  # a new timestamp: a new signature, and registering again is fine
    again = await client.post("/api/v1/agents/register", json=alice.registration())
    assert again.status == 201
