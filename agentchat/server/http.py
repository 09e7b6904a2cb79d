"""What every REST handler shares: JSON in and out, errors as ``{"error": {...}}``, who is asking,
and per-address rate limits."""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from aiohttp import web

from agentchat.errors import AgentChatError, error
from agentchat.bus import keys as bus_keys
from agentchat.server.appkeys import BUS, METRICS, SETTINGS, TOKENS
from agentchat.server.tokens import Principal

log = logging.getLogger(__name__)


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def error_response(exc: AgentChatError) -> web.Response:
    response = json_response({"error": exc.to_wire()}, exc.status)
    if exc.retryable:
        response.headers["Retry-After"] = "1"
    return response


_HTTP_CODES = {403: "forbidden", 404: "not_found", 405: "method_not_allowed", 413: "too_large", 429: "rate_limited"}


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Errors as ``{"error": {...}}`` with their status."""
    try:
        return await handler(request)
    except AgentChatError as exc:
        request.app[METRICS].errors_sent += 1
        return error_response(exc)
    except web.HTTPRequestEntityTooLarge:
        return error_response(error("too_large", "the request body is larger than the server accepts"))
    except web.HTTPNotFound:
        return error_response(error("not_found", f"no route {request.method} {request.path}"))
    except web.HTTPMethodNotAllowed as exc:
        response = error_response(error("method_not_allowed", f"{request.method} is not allowed on {request.path}"))
        response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # Whatever aiohttp itself refuses still gets the one error envelope.
        code = _HTTP_CODES.get(exc.status, "bad_request")
        return error_response(error(code, exc.reason or code))
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(error("internal"))


async def read_json(request: web.Request, allowed: frozenset[str]) -> dict[str, Any]:
    """The request's JSON object, refusing fields outside ``allowed``."""
    limit = request.app[SETTINGS].limits.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise error("too_large", f"the body is over {limit} bytes")
    raw = await request.read()
    if len(raw) > limit:
        raise error("too_large", f"the body is over {limit} bytes")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise error("bad_json", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise error("invalid_field", "the body must be a JSON object")
    extra = body.keys() - allowed
    if extra:
        raise error("invalid_field", f"unexpected field '{sorted(extra)[0]}'")
    return body


def require_str(body: dict[str, Any], name: str, max_len: int) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise error("invalid_field", f"field '{name}' must be a non-empty string")
    if len(value) > max_len:
        raise error("invalid_field", f"field '{name}' is longer than {max_len} characters")
    return value


def bearer_token(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise error("auth_required")
    return token.strip()


def principal(request: web.Request) -> Principal:
    """Who is asking; every non-public route calls this first."""
    return request.app[TOKENS].verify(bearer_token(request))


def agent_did(request: web.Request) -> str:
    return principal(request).did


def client_address(request: web.Request) -> str:
    """The client's address: the peer's, or behind ``trusted_proxies`` load balancers the entry they
    appended to X-Forwarded-For (entries further left are the client's to forge)."""
    hops = request.app[SETTINGS].trusted_proxies
    if hops:
        forwarded = [part.strip() for part in request.headers.get("X-Forwarded-For", "").split(",") if part.strip()]
        if len(forwarded) >= hops:
            return forwarded[-hops]
    return request.remote or "unknown"


async def rate_limit(request: web.Request, bucket: str, per_second: int) -> None:
    """Fixed one-second window per client address, shared by every process through the bus."""
    address = client_address(request)
    window = int(time.time())
    count = await request.app[BUS].incr(bus_keys.rate_window(bucket, address, window), 2.0)
    if count > per_second:
        raise error("rate_limited", f"more than {per_second} requests per second from this address")


def query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise error("invalid_field", f"query parameter '{name}' must be a whole number") from None
    if not low <= value <= high:
        raise error("invalid_field", f"query parameter '{name}' must be between {low} and {high}")
    return value
