"""localstripe (a Stripe API emulator) for the tests: its aiohttp app in a thread of this process, on
127.0.0.1 and a free port, with its dump of every change to ``/tmp`` turned off.

    from tests.stripe_service import stripe_server  # noqa: F401  (session fixture)

    settings = load_settings(env={}, payments="stripe://", **stripe_server.settings())

Webhooks are not sent by the emulator: tests sign events with ``sign_webhook`` (Stripe's scheme:
``t=<unix time>,v1=<hex HMAC-SHA256 of "t.body" under the endpoint secret>``) and post them.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

WEBHOOK_SECRET = "whsec_agentchat_tests"
SECRET_KEY = "sk_test_agentchat"
PUBLISHABLE_KEY = "pk_test_agentchat"


class LocalStripe:
    def __init__(self) -> None:
        import localstripe.resources as resources
        from aiohttp import web
        from localstripe.server import app

        # Every change would be pickled to /tmp/localstripe.pickle; keep everything in memory.
        resources.store.dump_to_disk = lambda: None  # type: ignore[method-assign]
        self._app = app
        self._web = web
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._runner: Any = None
        self.port = 0
        self._thread = threading.Thread(target=self._run, name="localstripe", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("localstripe did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self._runner = self._web.AppRunner(self._app, access_log=None)
        await self._runner.setup()
        site = self._web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def settings(self) -> dict[str, str]:
        """The ``stripe_*`` settings of a server that uses this emulator."""
        return {"stripe_secret_key": SECRET_KEY, "stripe_publishable_key": PUBLISHABLE_KEY,
                "stripe_webhook_secret": WEBHOOK_SECRET, "stripe_api_base": self.url}

    def stop(self) -> None:
        async def shutdown() -> None:
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def sign_webhook(body: bytes, secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> str:
    """A ``Stripe-Signature`` header for ``body``, as Stripe makes it."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


@pytest.fixture(scope="session")
def stripe_server() -> Iterator[LocalStripe]:
    server = LocalStripe()
    yield server
    server.stop()
