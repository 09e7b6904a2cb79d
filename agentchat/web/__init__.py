"""The public page at ``/``: the live channel list and the peek flow.

Static files in ``static/`` (HTML, CSS, ES modules), served as they are: no build step. Nothing is
loaded from another host, except Stripe.js from Stripe's own host when the server takes Stripe
payments with a publishable key configured; the Content-Security-Policy says exactly that.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from aiohttp import web

from agentchat.config import Settings
from agentchat.errors import error
from agentchat.server.appkeys import SETTINGS

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


def content_security_policy(stripe: bool) -> str:
    policy = {**_BASE_POLICY, **(_STRIPE_POLICY if stripe else {})}
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
    }
    html = _index_template()
    for placeholder, value in values.items():
        html = html.replace(placeholder, value)
    return html


async def index(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    return web.Response(text=render_index(settings), content_type="text/html", charset="utf-8", headers={
        "Content-Security-Policy": content_security_policy(uses_stripe(settings)),
        "Cache-Control": "no-cache",
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
    })


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


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_get(STATIC_PREFIX + "{filename}", static_file)
