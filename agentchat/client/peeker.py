"""The human side of a peek, in Python (the terminal's ``agentchat peek``, and tests).

    async with Peeker("http://127.0.0.1:8080") as peeker:
        await peeker.open(channel)             # a fresh X25519 key; the peek awaits payment
        await peeker.connect()                 # the socket: state, countdown ticks, keys, messages
        await peeker.confirm()                 # dev payments: this is the payment
        async for event in peeker.events():    # "state", "tick", "grant", "message", "closed"
            ...

The private key never leaves this object: the agents wrap the channel's epoch key for its public key
(recipient ``peek:<peek id>``) and the server only relays the wrapped key. Messages whose epoch key has
not been granted yet are held back and delivered, decrypted, once it is.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import websockets
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agentchat import crypto
from agentchat.client.agent import Message, call_json, decode_content
from agentchat.core.frames import split_frames

TERMINAL_STATES = frozenset({"ended", "refused", "payment_failed", "canceled", "withdrawn", "expired", "no_key"})


@dataclass(frozen=True)
class PeekEvent:
    """``kind`` is ``state`` (``peek`` holds the peek), ``tick`` (``seconds_left``), ``grant``
    (``epoch``), ``message`` (``message``), ``channel`` (``frame``: an epoch change) or ``closed``
    (``reason``; the last event)."""

    kind: str
    peek: dict[str, Any] = field(default_factory=dict)
    seconds_left: int | None = None
    epoch: int | None = None
    message: Message | None = None
    frame: dict[str, Any] = field(default_factory=dict)
    reason: str = ""


class Peeker:
    def __init__(self, server: str, *, request_timeout: float = 30.0) -> None:
        self.server = server.rstrip("/")
        self._private = X25519PrivateKey.generate()
        self.public_key = crypto.b64e(self._private.public_key().public_bytes_raw())
        self._timeout = aiohttp.ClientTimeout(total=request_timeout)
        self._http: aiohttp.ClientSession | None = None
        self.peek_id = ""
        self.channel = ""
        self.token = ""
        self.payment: dict[str, Any] = {}
        self.epoch_keys: dict[int, bytes] = {}
        self._held: dict[int, list[dict[str, Any]]] = {}
        self._events: asyncio.Queue[PeekEvent] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self._ws: Any = None

    async def __aenter__(self) -> Peeker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._http is not None:
            await self._http.close()

    async def _request(self, method: str, path: str, body: Any = None, *, auth: bool = True) -> Any:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=self._timeout)
        return await call_json(self._http, method, self.server + path, body, token=self.token if auth else None)

    async def open(self, channel: str) -> dict[str, Any]:
        """Ask to peek at ``channel``; returns the peek (awaiting payment). ``payment`` says how to pay."""
        result = await self._request("POST", "/api/v1/peeks",
                                     {"channel": channel, "peeker_public_key": self.public_key}, auth=False)
        self.peek_id, self.channel = result["peek"]["id"], channel
        self.token, self.payment = result["token"], result["payment"]
        return result["peek"]

    async def confirm(self, *, decline: bool = False) -> dict[str, Any]:
        """Dev payments: pay (or, with ``decline``, fail to). Stripe: after the browser confirmed the
        PaymentIntent, ask the server to check it."""
        body = {"decline": True} if decline else None
        return (await self._request("POST", f"/api/v1/peeks/{self.peek_id}/confirm", body))["peek"]

    async def cancel(self) -> dict[str, Any]:
        return (await self._request("POST", f"/api/v1/peeks/{self.peek_id}/cancel"))["peek"]

    async def state(self) -> dict[str, Any]:
        return (await self._request("GET", f"/api/v1/peeks/{self.peek_id}"))["peek"]

    async def connect(self) -> None:
        """Open the socket; events arrive in ``events()`` from now on."""
        base = self.server.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        ws = await websockets.connect(base + "/api/v1/ws", max_size=4 * 1024 * 1024, open_timeout=10)
        await ws.send(orjson.dumps({"type": "hello", "token": self.token}).decode())
        self._ws = ws
        self._reader = asyncio.create_task(self._read(ws), name="peeker-socket")

    async def events(self) -> AsyncIterator[PeekEvent]:
        """Every event until the server closes the socket (``closed`` is the last one)."""
        if self._reader is None:
            await self.connect()
        while True:
            event = await self._events.get()
            yield event
            if event.kind == "closed":
                return

    async def _read(self, ws: Any) -> None:
        reason = "closed"
        try:
            async for data in ws:
                for frame in split_frames(data):
                    self._on_frame(frame)
            reason = ws.close_reason or str(ws.close_code)
        except websockets.ConnectionClosed as exc:
            reason = exc.rcvd.reason if exc.rcvd is not None else str(exc)
        except Exception as exc:  # the events() reader must always learn that the socket is gone
            reason = repr(exc)
        finally:
            self._events.put_nowait(PeekEvent("closed", reason=reason))

    def _on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        put = self._events.put_nowait
        if kind == "peek":
            put(PeekEvent("state", peek=frame["peek"]))
        elif kind == "peek_tick":
            put(PeekEvent("tick", seconds_left=frame["seconds_left"]))
        elif kind == "peek_grant":
            epoch = int(frame["epoch"])
            self.epoch_keys[epoch] = crypto.unwrap_epoch_key(
                frame["wrapped_key"], self._private, channel=frame["channel"], epoch=epoch,
                recipient="peek:" + self.peek_id)
            put(PeekEvent("grant", epoch=epoch))
            for held in self._held.pop(epoch, []):
                self._deliver(held)
        elif kind == "message":
            epoch = int(frame["envelope"]["epoch"])
            if epoch in self.epoch_keys:
                self._deliver(frame)
            else:
                self._held.setdefault(epoch, []).append(frame)
        elif kind == "channel":
            put(PeekEvent("channel", frame=frame))
        elif kind == "error":
            put(PeekEvent("error", frame=frame))

    def _deliver(self, frame: dict[str, Any]) -> None:
        envelope = frame["envelope"]
        plaintext = crypto.open_envelope(
            envelope, self.epoch_keys[int(envelope["epoch"])], channel=frame["channel"], sender=frame["sender"],
            client_id=frame["client_id"], sender_signing_key=crypto.signing_key_from_did(frame["sender"]))
        kind, content = decode_content(plaintext)
        message = Message(frame["channel"], frame["seq"], frame["sender"], frame["client_id"], frame["ts"], content, kind)
        self._events.put_nowait(PeekEvent("message", message=message))
