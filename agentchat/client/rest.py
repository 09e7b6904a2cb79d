"""The agent's REST side: one HTTP session, a session token renewed before it expires, and error
answers raised as ``AgentChatClientError`` with the server's stable code (protocol/errors.md)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson

from agentchat import crypto

TOKEN_REFRESH_MARGIN = 60.0  # seconds before expiry when a new token is fetched
# Waits between attempts of a request refused as not_member just after this agent accepted the invitation.
ACCEPTED_RETRY_DELAYS = (0.1, 0.2, 0.4, 0.8, None)
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


class AgentChatClientError(Exception):
    """An error the server answered with: ``code`` is the stable wire code (protocol/errors.md)."""

    def __init__(self, code: str, message: str, retryable: bool = False, status: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable
        self.status = status


def is_idempotent(method: str, body: Any) -> bool:
    """Whether sending this request twice does what sending it once does: an idempotent method
    (RFC 9110, 9.2.2), or a body the server de-duplicates by its ``client_id`` (a message)."""
    return method in IDEMPOTENT_METHODS or (isinstance(body, dict) and "client_id" in body)


async def call_json(http: aiohttp.ClientSession, method: str, url: str, body: Any = None, *,
                    token: str | None = None, params: dict[str, Any] | None = None) -> Any:
    """One REST call: JSON in and out; an error answer raises ``AgentChatClientError`` with its code."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = "Bearer " + token
    data = orjson.dumps(body) if body is not None else None
    for attempt in (1, 2):
        try:
            async with http.request(method, url, data=data, headers=headers, params=params) as response:
                raw = await response.read()
            break
        except aiohttp.ServerDisconnectedError:
            # A keep-alive connection from the pool that the server closed (it restarted, or a proxy
            # dropped it) fails on first use, before or after the server saw the request. aiohttp
            # drops that connection, so the request goes once more on a fresh one if that is safe.
            if attempt == 2 or not is_idempotent(method, body):
                raise
    payload = orjson.loads(raw) if raw else None
    if response.status >= 400:
        err = (payload or {}).get("error", {}) if isinstance(payload, dict) else {}
        raise AgentChatClientError(err.get("code", "http_error"), err.get("message", raw.decode()[:200]),
                                   bool(err.get("retryable")), response.status)
    return payload


class NameCache:
    """Agents' registered names by DID, looked up once each from the public profile route."""

    def __init__(self) -> None:
        self._names: dict[str, str] = {}

    def remember(self, did: str, name: str) -> None:
        self._names[did] = name

    async def name_of(self, http: aiohttp.ClientSession, server: str, did: str) -> str:
        name = self._names.get(did)
        if name is None:
            try:
                profile = await call_json(http, "GET", f"{server}/api/v1/agents/{did}")
                name = str(profile.get("name", ""))
            except (AgentChatClientError, aiohttp.ClientError, asyncio.TimeoutError):
                return ""  # shown as the short DID; asked again next time
            self._names[did] = name
        return name


class RestSession:
    """REST calls as one agent: signs in with its keys (register or login) and keeps the token fresh."""

    def __init__(self, server: str, keys: crypto.AgentKeys, *, request_timeout: float) -> None:
        self.server = server
        self.keys = keys
        self.names = NameCache()
        self._http: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(total=request_timeout)
        self._token: str | None = None
        self._token_expires = 0.0
        # A channel request refused as not_member may be about a channel this agent is invited to but
        # has not answered yet (its socket was not open when the invitation came). This hook answers
        # by the invitation policy and returns True if it accepted; the request is then tried again.
        self.on_not_member: Callable[[str], Awaitable[bool]] | None = None

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=self._timeout)
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    async def request(self, method: str, path: str, body: Any = None, *, auth: bool = True,
                      params: dict[str, Any] | None = None) -> Any:
        token = await self.token() if auth else None
        try:
            return await call_json(self.http, method, self.server + path, body, token=token, params=params)
        except AgentChatClientError as exc:
            parts = path.split("/")
            if exc.code != "not_member" or len(parts) < 5 or parts[3] != "channels" or not auth:
                raise
            if self.on_not_member is None or not await self.on_not_member(parts[4]):
                raise
            # Accepted: the process that answers next may hear of it a moment later than the one
            # that took it (server/membership.py), so a not_member right after is retried briefly.
            for delay in ACCEPTED_RETRY_DELAYS:
                try:
                    return await call_json(self.http, method, self.server + path, body, token=await self.token(),
                                           params=params)
                except AgentChatClientError as again:
                    if again.code != "not_member" or delay is None:
                        raise
                await asyncio.sleep(delay)
            raise

    async def all_pages(self, path: str, field: str) -> list[Any]:
        found: list[Any] = []
        params: dict[str, Any] = {"limit": 1000}
        while True:
            page = await self.request("GET", path, params=params)
            found.extend(page[field])
            if not page["has_more"]:
                return found
            params["after"] = page["next_after"]

    # ------------------------------------------------------------------------------ signing in

    async def register(self, name: str, *, rename: bool = False) -> dict[str, Any]:
        """``Agent.register``: the server's answer (did, token, agent)."""
        timestamp = int(time.time() * 1000)
        message = crypto.registration_message(name, self.keys.public, timestamp)
        body: dict[str, Any] = {"name": name, "keys": self.keys.public.to_wire(), "timestamp": timestamp,
                                "signature": crypto.b64e(self.keys.sign(message))}
        if rename:
            body["rename"] = True
        result = await self.request("POST", "/api/v1/agents/register", body, auth=False)
        self._set_token(result["token"], result["expires_at"])
        self.names.remember(result["did"], result["agent"]["name"])
        return result

    async def login(self) -> str:
        did = self.keys.did
        challenge = await self.request("POST", "/api/v1/auth/challenge", {"did": did}, auth=False)
        signature = self.keys.sign(crypto.login_message(did, challenge["challenge"]))
        result = await self.request("POST", "/api/v1/auth/login", {
            "did": did, "challenge": challenge["challenge"], "signature": crypto.b64e(signature),
        }, auth=False)
        self._set_token(result["token"], result["expires_at"])
        return result["token"]

    def _set_token(self, token: str, expires_at_ms: int) -> None:
        self._token = token
        self._token_expires = expires_at_ms / 1000

    def forget_token(self) -> None:
        """The server refused the token: the next call logs in again."""
        self._token = None

    async def token(self) -> str:
        """A valid session token, logging in again shortly before the current one expires."""
        if self._token is None or time.time() > self._token_expires - TOKEN_REFRESH_MARGIN:
            await self.login()
        assert self._token is not None
        return self._token

    # ------------------------------------------------------------------------------ other agents

    async def profile(self, did: str) -> dict[str, Any]:
        profile = await self.request("GET", f"/api/v1/agents/{did}", auth=False)
        self.names.remember(did, profile["name"])
        return profile

    async def name_of(self, did: str) -> str:
        """The name ``did`` registered under ("" if it cannot be looked up now)."""
        return await self.names.name_of(self.http, self.server, did)
