"""Identity: register an agent's public keys, look one up, log in by challenge and signature."""

from __future__ import annotations

import hashlib
import secrets
import time

from aiohttp import web

from agentchat import crypto
from agentchat.bus import keys as bus_keys
from agentchat.core.frames import as_int
from agentchat.errors import error
from agentchat.server.http import agent_did, json_response, rate_limit, read_json, require_str
from agentchat.server.appkeys import BUS, RECORDS, SETTINGS, STORE, TOKENS
from agentchat.store import keys as store_keys

routes = web.RouteTableDef()

# A registration's signed timestamp may be this far from the server's clock.
REGISTRATION_SKEW_MS = 5 * 60 * 1000


def public_profile(record: dict) -> dict:
    return {"did": record["did"], "name": record["name"], "keys": record["keys"],
            "created_at": record["created_at"]}


@routes.post("/api/v1/agents/register")
async def register(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    await rate_limit(request, "auth", settings.limits.auth_requests_per_second)
    body = await read_json(request, frozenset({"name", "keys", "timestamp", "signature"}))
    name = require_str(body, "name", settings.limits.max_name_chars)
    if not name.isprintable():
        raise error("invalid_field", "field 'name' must be printable text")
    try:
        keys = crypto.PublicKeys.from_wire(body.get("keys"))
    except (ValueError, TypeError) as exc:
        raise error("invalid_field", f"field 'keys': {exc}") from None
    timestamp = as_int(body.get("timestamp"))
    if timestamp is None:
        raise error("invalid_field", "field 'timestamp' must be milliseconds since the epoch")
    if abs(timestamp - int(time.time() * 1000)) > REGISTRATION_SKEW_MS:
        raise error("stale_request", "the registration's timestamp is more than 5 minutes off")
    signature = _signature(body)
    if not crypto.verify_signature(keys.signing_key, signature,
                                   crypto.registration_message(name, keys, timestamp)):
        raise error("bad_signature", "the registration signature does not verify with the signing key")
    # A registration answers with a token: a captured request must not mint another one. Each signature
    # is accepted once, for as long as its timestamp could pass (5 minutes either way).
    used = bus_keys.registration_used(hashlib.sha256(signature).hexdigest()[:32])
    if await request.app[BUS].set_if_absent(used, b"1", 2 * REGISTRATION_SKEW_MS / 1000 + 60) is not None:
        raise error("request_replayed", "this registration was already used: sign a new one (new timestamp)")
    if await request.app[STORE].get(store_keys.agent_tombstone(keys.did)) is not None:
        raise error("agent_deleted", f"the account of {keys.did} was deleted; make new keys")
    now = int(time.time() * 1000)
    record = await request.app[RECORDS].put_agent(
        {"did": keys.did, "name": name, "keys": keys.to_wire(), "created_at": now, "updated_at": now}
    )
    token, expires_at = request.app[TOKENS].issue("agent", keys.did)
    return json_response({"did": keys.did, "agent": public_profile(record), "token": token,
                          "expires_at": expires_at}, 201)


def _signature(body: dict) -> bytes:
    raw = body.get("signature")
    try:
        signature = crypto.b64d(raw) if isinstance(raw, str) else b""
    except ValueError:
        signature = b""
    if len(signature) != crypto.SIGNATURE_SIZE:
        raise error("invalid_field", "field 'signature' must be a base64url Ed25519 signature")
    return signature


def _did_field(body: dict) -> str:
    did = require_str(body, "did", 128)
    try:
        crypto.signing_key_from_did(did)
    except ValueError:
        raise error("invalid_field", "field 'did' is not a did:agentchat DID") from None
    return did


@routes.get("/api/v1/agents/me")
async def me(request: web.Request) -> web.Response:
    record = await request.app[RECORDS].get_agent(agent_did(request))
    if record is None:
        raise error("agent_not_found")
    return json_response(public_profile(record))


# Only paths that start like a DID: "/api/v1/agents/register" is the POST route alone (GET it: 405).
@routes.get("/api/v1/agents/{did:did:[^/]*}")
async def profile(request: web.Request) -> web.Response:
    """Public: anyone may look up an agent's public keys (that is what they are for)."""
    did = request.match_info["did"]
    try:
        crypto.signing_key_from_did(did)
    except ValueError:
        raise error("invalid_field", "not a did:agentchat DID") from None
    record = await request.app[RECORDS].get_agent(did)
    if record is None:
        raise error("agent_not_found", f"no agent {did}")
    return json_response(public_profile(record))


@routes.post("/api/v1/auth/challenge")
async def challenge(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    await rate_limit(request, "auth", settings.limits.auth_requests_per_second)
    body = await read_json(request, frozenset({"did"}))
    did = _did_field(body)
    if await request.app[RECORDS].get_agent(did) is None:
        if await request.app[STORE].get(store_keys.agent_tombstone(did)) is not None:
            raise error("agent_deleted", f"the account of {did} was deleted")
        raise error("agent_not_found", f"no agent {did}")
    nonce = secrets.token_urlsafe(32)
    ttl = settings.challenge_ttl_seconds
    await request.app[BUS].set(bus_keys.auth_challenge(nonce), did.encode(), ttl)
    return json_response({"challenge": nonce, "expires_at": int((time.time() + ttl) * 1000)})


@routes.post("/api/v1/auth/login")
async def login(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    await rate_limit(request, "auth", settings.limits.auth_requests_per_second)
    body = await read_json(request, frozenset({"did", "challenge", "signature"}))
    did = _did_field(body)
    nonce = require_str(body, "challenge", 128)
    signature = _signature(body)
    # take(): single use, even when two logins race with the same challenge.
    owner = await request.app[BUS].take(bus_keys.auth_challenge(nonce))
    if owner is None or owner.decode() != did:
        raise error("challenge_invalid")
    record = await request.app[RECORDS].get_agent(did)
    if record is None:
        raise error("agent_not_found")
    if not crypto.verify_signature(crypto.signing_key_from_did(did), signature, crypto.login_message(did, nonce)):
        raise error("bad_signature", "the login signature does not verify with the agent's key")
    token, expires_at = request.app[TOKENS].issue("agent", did)
    return json_response({"did": did, "token": token, "expires_at": expires_at})
