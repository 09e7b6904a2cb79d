"""Cross-origin access (the Fetch standard's CORS): which browser pages on other origins may call the API
and open its sockets.

The allow-list is ``AGENTCHAT_CORS_ORIGINS``: exact origins (``https://chat.example``), no wildcards.
Empty (the default) means same origin only: no CORS header is ever sent, and a browser's socket upgrade
must come from the server's own host. The API authenticates with bearer tokens, never cookies, so no
answer says ``Access-Control-Allow-Credentials`` and none says ``*``: an allowed origin is echoed.

Pure functions; ``server/http.py`` answers REST requests with them and ``server/connections.py``
checks socket upgrades with them (upgrades are served before any middleware).
"""

from __future__ import annotations

from urllib.parse import urlsplit

# What a preflight allows: every method and request header the API takes from a page.
ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE"
ALLOW_HEADERS = "Authorization, Content-Type"
# Readable by the page on an answer: a retryable error's back-off.
EXPOSE_HEADERS = "Retry-After"
# How long a browser may reuse a preflight's answer (Chromium caps it at 2 hours).
MAX_AGE_SECONDS = 600

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def normalize_origin(text: str) -> str:
    """``scheme://host[:port]`` as a browser serializes an Origin header (lower case, default port
    left out); ValueError with a sentence for anything else (a path, a wildcard, ``null``)."""
    raw = text.strip()
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{raw!r} is not an origin: use scheme://host[:port] with http or https")
    if "*" in raw:
        raise ValueError(f"{raw!r}: origins are exact, no wildcards")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{raw!r} is not an origin: only scheme://host[:port], no path")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{raw!r} has an invalid port") from None
    host = parts.hostname.lower()
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    if port is not None and port != _DEFAULT_PORTS[parts.scheme]:
        host = f"{host}:{port}"
    return f"{parts.scheme}://{host}"


def parse_origins(text: str) -> frozenset[str]:
    """The allow-list from its setting: origins separated by commas or spaces."""
    return frozenset(normalize_origin(item) for item in text.replace(",", " ").split())


def same_origin(origin: str, host: str | None) -> bool:
    """Whether ``origin`` names the host the request was sent to (its Host header). The scheme is not
    compared: behind a proxy that ends TLS the request arrives as plain HTTP from an https page."""
    if not host:
        return False
    parts = urlsplit(origin)
    if parts.scheme not in _DEFAULT_PORTS or not parts.netloc:
        return False
    default = f":{_DEFAULT_PORTS[parts.scheme]}"
    asked = host.strip().lower()
    if asked.endswith(default):
        asked = asked[: -len(default)]
    return parts.netloc.lower() == asked


def upgrade_allowed(origin: str | None, host: str | None, allowed: frozenset[str]) -> bool:
    """Whether a socket upgrade may proceed. Browsers always send Origin on an upgrade (and the page's
    origin is all that tells a cross-site page's socket apart); other clients send none and are not
    concerned."""
    return origin is None or origin in allowed or same_origin(origin, host)


def preflight_headers(origin: str) -> dict[str, str]:
    """The answer to an allowed origin's preflight (OPTIONS with Access-Control-Request-Method)."""
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": ALLOW_METHODS,
        "Access-Control-Allow-Headers": ALLOW_HEADERS,
        "Access-Control-Max-Age": str(MAX_AGE_SECONDS),
    }


def response_headers(origin: str) -> dict[str, str]:
    """Added to every other answer to an allowed origin."""
    return {"Access-Control-Allow-Origin": origin, "Access-Control-Expose-Headers": EXPOSE_HEADERS}
