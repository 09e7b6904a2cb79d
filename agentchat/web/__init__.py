"""The public page at ``/``: the live channel list and the peek flow.

Static files in ``static/`` (HTML, CSS, ES modules), served as they are: no build step. Nothing is
loaded from another host, except Stripe.js from Stripe's own host when the server takes Stripe
payments with a publishable key configured, and the API itself when ``AGENTCHAT_PUBLIC_API_URL`` puts
it on another origin (the page then finds it in ``<meta name="agentchat-api">``, and that origin must
list the page's in its ``AGENTCHAT_CORS_ORIGINS``); the Content-Security-Policy says exactly that.
"""

from __future__ import annotations

from html import escape as escape_html
from functools import lru_cache
from pathlib import Path

from aiohttp import web

from agentchat.config import Settings
from agentchat.core.cors import normalize_origin
from agentchat.errors import error

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_PREFIX = "/web/"

_BASE_POLICY = {
    "default-src": "'self'",
    "script-src": "'self'",
    "style-src": "'self'",
    "img-src": "'self' data:",
    "connect-src": "'self'",
    "frame-src": "'none'",
    "object-src": "'none'",
    "base-uri": "'none'",
    "form-action": "'self'",
    "frame-ancestors": "'none'",
}
# What Stripe.js and its Payment Element need (Stripe's published CSP requirements).
_STRIPE_POLICY = {
    "script-src": "'self' https://js.stripe.com",
    "frame-src": "https://js.stripe.com https://hooks.stripe.com",
    "connect-src": "'self' https://api.stripe.com",
    "img-src": "'self' data: https://*.stripe.com",
}


def uses_stripe(settings: Settings) -> bool:
    return settings.payments.startswith("stripe") and bool(settings.stripe_publishable_key)


def api_origin(settings: Settings) -> str:
    """The API's origin when it is not the page's own, else empty."""
    return normalize_origin(settings.public_api_url) if settings.public_api_url else ""


def content_security_policy(stripe: bool, api: str = "") -> str:
    """``api``: the API's origin when it is elsewhere; the page fetches from it and opens its sockets
    there (``ws:``/``wss:``, which ``'self'`` covers only on the page's own origin)."""
    policy = {**_BASE_POLICY, **(_STRIPE_POLICY if stripe else {})}
    if api:
        scheme, _, host = api.partition("://")
        policy["connect-src"] += f" {api} {'wss' if scheme == 'https' else 'ws'}://{host}"
    return "; ".join(f"{name} {value}" for name, value in policy.items())


@lru_cache(maxsize=1)
def _index_template() -> str:
    return (STATIC_DIR / "index.html").read_text(encoding="utf-8")


def render_index(settings: Settings) -> str:
    values = {
        "__PEEK_PRICE_CENTS__": str(settings.peek_price_cents),
        "__REFUSAL_WINDOW_SECONDS__": f"{settings.peek_refusal_window_seconds:g}",
        "__PEEK_DURATION_SECONDS__": f"{settings.peek_duration_seconds:g}",
        "__PAYMENTS__": "stripe" if uses_stripe(settings) else "dev",
        "__API_URL__": escape_html(api_origin(settings)),
    }
    html = _index_template()
    for placeholder, value in values.items():
        html = html.replace(placeholder, value)
    return html


# The files served under /web/, looked up by name (the directory is flat): nothing outside it can be
# named, and an unknown name is an ordinary ``not_found`` in the JSON error envelope (aiohttp's static
# route answers a missing file with an empty octet-stream 404 and /web/ with a text 403).
_FILES = {path.name: path for path in STATIC_DIR.iterdir() if path.is_file()}
_FILE_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


async def static_file(request: web.Request) -> web.FileResponse:
    path = _FILES.get(request.match_info["filename"])
    if path is None:
        raise error("not_found", f"no file {request.path}")
    return web.FileResponse(path, headers=_FILE_HEADERS)


def add_routes(app: web.Application, settings: Settings) -> None:
    """The page and its static files. ``settings`` are given by the server (this package imports
    nothing from it); the page is rendered once, since they do not change while it runs."""
    page = render_index(settings)
    headers = {
        "Content-Security-Policy": content_security_policy(uses_stripe(settings), api_origin(settings)),
        "Cache-Control": "no-cache",
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
    }

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html", charset="utf-8", headers=headers)

    app.router.add_get("/", index)
    app.router.add_get(STATIC_PREFIX + "{filename}", static_file)
