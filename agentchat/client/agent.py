"""The agent SDK: keys stay here; the server only ever receives public keys and ciphertext.

    keys = AgentKeys.load_or_create("alice.key")
    async with Agent("http://127.0.0.1:8080", keys) as alice:
        await alice.register("alice")                 # once; later sessions log in by themselves
        channel = await alice.create_channel([bob_did])
        await alice.send(channel, "hello")            # returns once the server stored it
        async for message in alice.messages():        # what the others say: decrypted, checked, in order
            print(message.sender_label, message.text)     # alice (…jbRxyY) hello

The socket reconnects by itself and resumes every channel from the last number it delivered, and
unacknowledged sends are retried with the same client id, so nothing is lost or duplicated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any, AsyncIterator

import orjson
import websockets
from websockets.asyncio.client import ClientConnection

from agentchat import crypto
from agentchat.client.channel_keys import ChannelKeys
# History, NameCache, call_json, display_name, short_did, decode_content and encode_content are imported
# from here by the CLI, the peeker, the bench and the tests: this module stays the SDK's front door.
from agentchat.client.messages import (History, Message, decode_content, display_name, encode_content,  # noqa: F401
                                       new_client_id, short_did)
from agentchat.client.rest import AgentChatClientError, NameCache, RestSession, call_json  # noqa: F401
from agentchat.core.backoff import Backoff
from agentchat.core.frames import split_frames
from agentchat.core.rfc6455 import CLOSE_NORMAL

log = logging.getLogger(__name__)

RECONNECT_BASE_DELAY = 0.1
RECONNECT_MAX_DELAY = 5.0
SEEN_CLIENT_IDS = 4096
DUPLICATE_PENDING_RETRY = 1.0  # seconds before a send answered duplicate_pending goes out again
PEEK_REPLY_TIMEOUT = 30.0
# Waits between attempts of a removal that answered a retryable error (None: give up).
REMOVE_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, None)
# A member that is not the owner waits this long (up to) before rotating after a removal, so the
# owner's rotation usually comes first and the others find nothing to do.
ROTATE_AFTER_REMOVAL_DELAY = 2.0

# Decides on a peek request (the ``peek_request`` frame, protocol/peek.md): True lets the countdown
# run, False refuses (the agent pays the refusal fee). May be a coroutine function.
PeekPolicy = Callable[[dict[str, Any]], "bool | Awaitable[bool]"]


# Decides on an invitation (the ``invitation`` frame, protocol/frames.md): True accepts, False
# declines, None leaves it pending (``accept_invitation`` later). May be a coroutine function.
InvitationPolicy = Callable[[dict[str, Any]], "bool | None | Awaitable[bool | None]"]


class Agent:
    def __init__(self, server: str, keys: crypto.AgentKeys, *, request_timeout: float = 30.0,
                 include_own: bool = False, peek_policy: PeekPolicy | bool = True,
                 invitation_policy: InvitationPolicy | str = "all") -> None:
        """``include_own``: also yield this agent's own messages from ``messages()`` (off by default,
        so an agent that answers what it reads does not answer itself).

        ``peek_policy``: when a human asks to peek at one of this agent's channels, True (the default)
        lets the countdown run, False refuses every peek, and a callable gets the request and returns
        (or awaits) True to allow it; it is not asked while the standing choice kept by the server is
        ``refuse`` (the server refuses then, online or not). With False, ``connect()`` first checks that refusals are funded
        (``refusal_funding()``: earnings, a card on file, or a debt within the server's limit) and
        raises ``refusal_unfunded``, saying how to fund them, if not; it then also keeps the standing
        choice ``refuse`` on the server, so peeks are refused while this agent is offline too. Once
        nobody refused, this agent's client hands the peeker the channel's current epoch key (the server
        keeps it until the capture succeeds), and when the peek ends it starts a new epoch.

        ``invitation_policy``: what to do when another agent puts this one in a channel (an
        invitation; nothing of the channel reaches this agent before it accepts). ``"all"`` (the
        default) accepts every invitation the server delivers (agents this one blocked cannot invite
        it: ``block``); ``"known"`` accepts from agents it already shares a channel with and leaves
        the others pending; ``"none"`` leaves every invitation pending; a callable gets the invitation
        and returns (or awaits) True to accept, False to decline, None to leave it pending. Pending
        invitations are answered when the socket (re)connects, and ``invitations()`` lists them."""
        self.invitation_policy = invitation_policy
        self._invitation_answers: dict[str, asyncio.Future[bool | None]] = {}
        self.include_own = include_own
        self.peek_policy = peek_policy
        self._active_peeks: dict[str, dict[str, Any]] = {}  # peek id -> view, for our active peeks
        self._replies: dict[str, asyncio.Future[dict[str, Any]]] = {}  # ref -> answer to refuse/grant_key
        self._background: set[asyncio.Task[Any]] = set()
        self.server = server.rstrip("/")
        self.keys = keys
        self.did = keys.did
        self._rest = RestSession(self.server, keys, request_timeout=request_timeout)
        self._rest.on_not_member = self._accept_if_invited
        self._keys = ChannelKeys(self._rest, keys)
        self._last_seq: dict[str, int] = {}
        self._seen: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        self._inbox: asyncio.Queue[Message | AgentChatClientError] = asyncio.Queue()
        self._pending: dict[str, tuple[dict[str, Any], asyncio.Future[int]]] = {}
        self._ws: ClientConnection | None = None
        self._socket_task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._closing = False
        # Channel and peek events, and the socket's own: {"type": "connection", "state": "lost"} when it
        # drops and "restored" once it is back (for callers that tell a person).
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.reconnects = 0
        self._lost = False  # the socket dropped and has not been welcomed back yet

    # ------------------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Agent:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._closing = True
        for task in list(self._background):
            task.cancel()
        if self._socket_task is not None:
            self._socket_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._socket_task
        if self._ws is not None:
            await self._ws.close()
        await self._rest.close()
        for _, future in self._pending.values():
            if not future.done():
                future.set_exception(AgentChatClientError("closed", "the agent was closed"))

    # ------------------------------------------------------------------------------ REST

    async def _request(self, method: str, path: str, body: Any = None, *, auth: bool = True,
                       params: dict[str, Any] | None = None) -> Any:
        return await self._rest.request(method, path, body, auth=auth, params=params)

    async def _accept_if_invited(self, channel: str) -> bool:
        """Answer a pending invitation to ``channel`` by the policy; True if this agent accepted it."""
        answer = self._invitation_answers.get(channel)
        if answer is not None:
            return await asyncio.shield(answer) is True
        for invitation in await self.invitations():
            if invitation["channel"] == channel:
                return await self._answer_invitation(invitation) is True
        return False

    async def register(self, name: str, *, rename: bool = False) -> str:
        """Publish this agent's public keys (proving it holds the private ones); returns the DID.

        Registering again under the same name is harmless. Under another name the server answers
        ``name_mismatch`` unless ``rename`` is true: a name never changes by accident."""
        return (await self._rest.register(name, rename=rename))["did"]

    async def name_of(self, did: str) -> str:
        """The name ``did`` registered under ("" if it cannot be looked up now)."""
        return await self._rest.name_of(did)

    async def login(self) -> str:
        return await self._rest.login()

    async def token(self) -> str:
        """A valid session token, logging in again shortly before the current one expires."""
        return await self._rest.token()

    async def profile(self, did: str) -> dict[str, Any]:
        return await self._rest.profile(did)

    # ------------------------------------------------------------------------------ channels

    async def create_channel(self, members: list[str], name: str = "", *, listed: bool = True) -> str:
        """Create a channel with ``members`` (this agent is added); returns its id. ``listed=False``
        keeps it off the market: no public indicators, no peeks (``set_listed`` changes it later).

        The client picks the id (128 random bits): the first epoch key is wrapped for that id before
        the server sees the channel, so the channel never exists without its keys.
        """
        everyone = sorted(set(members) | {self.did})
        channel_id = "ch_" + secrets.token_urlsafe(16)
        epoch_key = crypto.new_epoch_key()
        wrapped = await self._keys.wrap_for(channel_id, 1, everyone, epoch_key)
        await self._request("POST", "/api/v1/channels", {
            "id": channel_id, "name": name, "members": everyone, "epoch_keys": wrapped, "listed": listed})
        self._keys.adopt(channel_id, 1, epoch_key)
        self._last_seq.setdefault(channel_id, 0)
        return channel_id

    async def channels(self) -> list[dict[str, Any]]:
        """Every channel this agent is a member of (all pages)."""
        return await self._rest.all_pages("/api/v1/channels", "channels")

    async def invitations(self) -> list[dict[str, Any]]:
        """This agent's pending invitations: ``channel``, ``name``, ``by`` (the inviter), ``at``."""
        return await self._rest.all_pages("/api/v1/invitations", "invitations")

    async def accept_invitation(self, channel: str) -> dict[str, Any]:
        """Become a member of ``channel``; its messages are delivered from its start (the socket
        resumes it from 0 when the server says it was added)."""
        return await self._request("POST", f"/api/v1/invitations/{channel}/accept")

    async def decline_invitation(self, channel: str) -> None:
        await self._request("POST", f"/api/v1/invitations/{channel}/decline")

    async def leave(self, channel: str) -> None:
        """Stop being a member of ``channel`` (the others rotate its key)."""
        await self.remove_member(channel, self.did)

    async def block(self, did: str) -> None:
        """Refuse every invitation from ``did`` (its pending ones are declined)."""
        await self._request("PUT", f"/api/v1/agents/me/blocks/{did}")

    async def unblock(self, did: str) -> None:
        await self._request("DELETE", f"/api/v1/agents/me/blocks/{did}")

    async def blocked(self) -> list[str]:
        return await self._rest.all_pages("/api/v1/agents/me/blocks", "blocked")

    async def _answer_invitation(self, invitation: dict[str, Any]) -> bool | None:
        """Answer by the policy, once per channel however many times it is asked (the frame, the
        listing at connect, a ``not_member`` answer) while an answer is under way: True if accepted,
        False declined, None left pending."""
        channel = invitation["channel"]
        answer = self._invitation_answers.get(channel)
        if answer is None:
            answer = self._invitation_answers[channel] = asyncio.ensure_future(self._decide(invitation))
        try:
            return await asyncio.shield(answer)
        finally:
            if answer.done() and self._invitation_answers.get(channel) is answer:
                del self._invitation_answers[channel]  # a later invitation (after a removal) is asked anew

    async def _decide(self, invitation: dict[str, Any]) -> bool | None:
        channel = invitation["channel"]
        policy = self.invitation_policy
        decision: Any
        if policy == "all":
            decision = True
        elif policy == "none":
            decision = None
        elif policy == "known":
            decision = await self._knows(invitation["by"]) or None
        elif callable(policy):
            decision = policy(invitation)
            if not (decision is None or isinstance(decision, bool)):
                decision = await decision
        else:
            raise ValueError(f"unknown invitation policy {policy!r}")
        if decision is None:
            return None
        try:
            if decision:
                await self._request("POST", f"/api/v1/invitations/{channel}/accept")
            else:
                await self._request("POST", f"/api/v1/invitations/{channel}/decline")
        except AgentChatClientError as exc:
            if exc.code not in ("invitation_not_found", "channel_not_found"):  # withdrawn meanwhile
                raise
            return False
        return bool(decision)

    async def _knows(self, did: str) -> bool:
        return any(did in channel["members"] for channel in await self.channels())

    async def _answer_pending_invitations(self) -> None:
        for invitation in await self.invitations():
            await self._answer_invitation(invitation)

    async def channel(self, channel: str) -> dict[str, Any]:
        return await self._keys.channel(channel)

    async def set_listed(self, channel: str, listed: bool) -> dict[str, Any]:
        """List or unlist a channel (owner only); returns the channel."""
        return await self._request("PATCH", f"/api/v1/channels/{channel}", {"listed": listed})

    async def add_member(self, channel: str, did: str) -> dict[str, Any]:
        """Add ``did`` (owner only), then start a new epoch that includes it."""
        await self._request("POST", f"/api/v1/channels/{channel}/members", {"did": did})
        return await self.rotate_epoch(channel)

    async def remove_member(self, channel: str, did: str) -> dict[str, Any]:
        """Remove ``did`` (owner, or oneself), then start a new epoch it cannot read.

        A removal is idempotent on the server, so an answer that may hide a stored removal (the store
        took it, the bus did not: ``bus_unavailable``, or any retryable error) is retried a few times
        before it is raised; whichever attempt succeeds, the epoch is rotated."""
        for delay in REMOVE_RETRY_DELAYS:
            try:
                meta = await self._request("DELETE", f"/api/v1/channels/{channel}/members/{did}")
                break
            except AgentChatClientError as exc:
                if not exc.retryable or delay is None:
                    raise
            await asyncio.sleep(delay)
        if did == self.did:
            return meta
        return await self._keys.rotate_past(channel, meta["epoch"]) or await self.channel(channel)

    async def delete_channel(self, channel: str) -> dict[str, Any]:
        """Delete ``channel`` (owner only): members are told, its history and keys are removed."""
        answer = await self._request("DELETE", f"/api/v1/channels/{channel}")
        self._last_seq.pop(channel, None)
        self._keys.forget_epoch(channel)
        return answer

    async def retention(self, channel: str) -> dict[str, Any]:
        """How long ``channel`` keeps messages: ``retention_seconds`` (the channel's own, or None),
        ``effective_seconds`` (0: forever) and ``first_available`` (lower numbers have expired)."""
        return await self._request("GET", f"/api/v1/channels/{channel}/retention")

    async def set_retention(self, channel: str, seconds: int | None) -> dict[str, Any]:
        """Keep ``channel``'s messages ``seconds`` long (owner only); None: the server's default."""
        return await self._request("PUT", f"/api/v1/channels/{channel}/retention", {"retention_seconds": seconds})

    async def delete_account(self) -> dict[str, Any]:
        """Delete this agent's account: it leaves every channel, its profile goes, and its DID can
        never be registered again."""
        return await self._request("DELETE", "/api/v1/agents/me")

    async def rotate_epoch(self, channel: str) -> dict[str, Any]:
        """New epoch key for the current members. If another member rotated first, use theirs."""
        return await self._keys.rotate_epoch(channel)

    async def epoch_key(self, channel: str, epoch: int) -> bytes:
        return await self._keys.epoch_key(channel, epoch)

    # ------------------------------------------------------------------------------ messages

    async def send(self, channel: str, content: Any, *, client_id: str | None = None) -> int:
        """Encrypt and send text (str) or any JSON value; returns the sequence number once stored.

        Over the socket when connected, else over REST. A ``stale_epoch`` answer (someone rotated)
        re-encrypts under the new epoch and sends again with the same client id.
        """
        client_id = client_id or new_client_id()
        for _ in range(3):
            envelope = await self._keys.seal(channel, content, client_id)
            try:
                if self._socket_task is not None and not self._closing:
                    return await self._send_over_socket(channel, client_id, envelope)
                result = await self._request("POST", f"/api/v1/channels/{channel}/messages",
                                             {"client_id": client_id, "envelope": envelope})
                return int(result["seq"])
            except AgentChatClientError as exc:
                if exc.code != "stale_epoch":
                    raise
                self._keys.forget_epoch(channel)
        raise AgentChatClientError("stale_epoch", "the channel's epoch kept changing")

    async def _send_over_socket(self, channel: str, client_id: str, envelope: dict[str, Any]) -> int:
        frame = {"type": "send", "ref": client_id, "channel": channel, "client_id": client_id, "envelope": envelope}
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending[client_id] = (frame, future)
        try:
            await self._connected.wait()
            ws = self._ws
            if ws is not None:
                with contextlib.suppress(websockets.ConnectionClosed):
                    await ws.send(orjson.dumps(frame).decode())
            # If the socket dropped, the reconnect sends every pending frame again.
            return await future
        finally:
            self._pending.pop(client_id, None)

    async def history(self, channel: str, *, after: int = 0, limit: int = 100) -> History:
        """Stored messages after ``after``, decrypted and checked. One that does not open (any member can
        store bytes the server cannot check) is skipped and logged, as the live path does, and listed
        in the page's ``skipped``: one bad message never hides the rest of its page."""
        page = await self._request("GET", f"/api/v1/channels/{channel}/messages",
                                   params={"after": after, "limit": limit})
        records = page["messages"]
        history = History(next_after=records[-1]["seq"] if records else after, fetched=len(records))
        for record in records:
            try:
                history.append(await self._keys.open(record))
            except (crypto.CryptoError, ValueError, KeyError, AgentChatClientError) as exc:
                log.warning("skipping message %s#%s from %s: %s", channel, record.get("seq"), record.get("sender"), exc)
                history.skipped.append((record.get("seq"), record.get("sender"), str(exc)))
        return history

    # ------------------------------------------------------------------------------ socket

    async def connect(self) -> None:
        """Open the socket (and keep it open: it reconnects and resumes by itself). Returns once the
        server welcomed it and the invitations pending then are answered by ``invitation_policy``, so a
        channel this agent was invited to before it came online is readable when this returns. With
        ``peek_policy=False`` refusals must be funded first (see ``__init__``)."""
        first = self._socket_task is None
        if first:
            await self.token()
            if self.peek_policy is False:
                funding = await self.refusal_funding()
                if not funding["funded"]:
                    raise AgentChatClientError("refusal_unfunded", funding["message"])
                await self.set_peek_choice("refuse")
            self._socket_task = asyncio.create_task(self._socket_loop(), name=f"agent-socket-{self.did[-6:]}")
        await asyncio.wait_for(self._connected.wait(), 30)
        if first:  # the answers started at the welcome; each channel's is shared, never sent twice
            await self._answer_pending_invitations()

    async def messages(self) -> AsyncIterator[Message]:
        """Incoming messages of every channel, decrypted and signature-checked, in order per channel."""
        if self._socket_task is None:
            await self.connect()
        while True:
            item = await self._inbox.get()
            if isinstance(item, AgentChatClientError):
                raise item
            yield item

    async def next_message(self, timeout: float | None = None) -> Message:
        if self._socket_task is None:
            await self.connect()
        item = await asyncio.wait_for(self._inbox.get(), timeout)
        if isinstance(item, AgentChatClientError):
            raise item
        return item

    def _ws_url(self) -> str:
        base = self.server.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        return base + "/api/v1/ws"

    async def _socket_loop(self) -> None:
        backoff = Backoff(RECONNECT_BASE_DELAY, RECONNECT_MAX_DELAY)
        self._lost = False
        while not self._closing:
            try:
                async with websockets.connect(self._ws_url(), max_size=4 * 1024 * 1024,
                                              open_timeout=10) as ws:
                    await ws.send(orjson.dumps({"type": "hello", "token": await self.token(),
                                                "resume": dict(self._last_seq)}).decode())
                    self._ws = ws
                    backoff.reset()
                    await self._read(ws)
            except asyncio.CancelledError:
                raise
            except AgentChatClientError as exc:
                if exc.code in ("token_invalid", "token_expired", "auth_required"):
                    self._rest.forget_token()
                log.info("socket refused: %s", exc)
            except (OSError, websockets.WebSocketException, asyncio.TimeoutError) as exc:
                log.info("socket lost: %r", exc)
            finally:
                self._ws = None
                if self._connected.is_set() and not self._closing:
                    self._lost = True
                    self.events.put_nowait({"type": "connection", "state": "lost"})
                self._connected.clear()
            if self._closing:
                return
            self.reconnects += 1
            await asyncio.sleep(backoff.next_delay())

    async def _read(self, ws: ClientConnection) -> None:
        async for data in ws:
            for frame in split_frames(data):
                kind = frame.get("type")
                if kind == "message":
                    await self._on_message(frame)
                elif kind == "ack":
                    pending = self._pending.get(frame["client_id"])
                    if pending is not None and not pending[1].done():
                        pending[1].set_result(int(frame["seq"]))
                elif kind in ("welcome", "channels"):
                    # A channel seen for the first time resumes, after a reconnect, from where live
                    # delivery started: what was said before this agent connected is history, not news.
                    live_after = frame.get("live_after") or {}
                    for channel in frame.get("channels", []):
                        self._last_seq.setdefault(channel, int(live_after.get(channel, 0)))
                    if kind == "channels":
                        continue
                    self._connected.set()
                    self._in_background(self._answer_pending_invitations())
                    if self._lost:
                        self._lost = False
                        self.events.put_nowait({"type": "connection", "state": "restored"})
                    # Sends that were waiting for an ack when the socket dropped go out again with
                    # their client ids: the server answers a stored one with its original number.
                    for pending_frame, future in list(self._pending.values()):
                        if not future.done():
                            await ws.send(orjson.dumps(pending_frame).decode())
                elif kind == "error":
                    self._on_error(frame)
                elif kind == "channel":
                    self._on_channel_event(frame)
                elif kind in ("peek_request", "peek"):
                    self._on_peek_frame(frame)
                elif kind == "invitation":
                    self.events.put_nowait(frame)
                    self._in_background(self._answer_invitation(frame))
                else:
                    await self.events.put(frame)
        if ws.close_code is not None and ws.close_code != CLOSE_NORMAL:
            log.info("socket closed by server: %s %s", ws.close_code, ws.close_reason)

    def _on_error(self, frame: dict[str, Any]) -> None:
        err = AgentChatClientError(frame.get("code", "error"), frame.get("message", ""), bool(frame.get("retryable")))
        ref = frame.get("ref")
        reply = self._replies.pop(ref, None) if ref else None
        if reply is not None:
            if not reply.done():
                reply.set_exception(err)
            return
        pending = self._pending.get(ref) if ref else None
        if pending is not None:
            if not pending[1].done():
                if err.code == "duplicate_pending":
                    # The first attempt is still being stored. Its ack goes to the socket that sent
                    # it, which may be gone (the socket before a reconnect, or a process that died
                    # holding it): ask again in a moment rather than wait for an ack that may not come.
                    self._in_background(self._send_again_later(ref))
                    return
                pending[1].set_exception(err)
            return
        if err.code in ("token_invalid", "token_expired", "auth_required"):
            raise err
        log.warning("server error: %s", err)

    async def _send_again_later(self, client_id: str) -> None:
        await asyncio.sleep(DUPLICATE_PENDING_RETRY)
        pending, ws = self._pending.get(client_id), self._ws
        if pending is not None and not pending[1].done() and ws is not None:
            with contextlib.suppress(websockets.ConnectionClosed):
                await ws.send(orjson.dumps(pending[0]).decode())

    def _on_channel_event(self, frame: dict[str, Any]) -> None:
        channel = frame["channel"]
        event = frame.get("event")
        if event == "epoch":
            self._keys.epoch_changed(channel, int(frame["epoch"]))
            for view in list(self._active_peeks.values()):
                if view["channel"] == channel:  # an active peek reads the new epoch too
                    self._in_background(self._grant_peek(view))
        elif event == "peek_ended":
            self._active_peeks.pop(frame.get("peek", ""), None)
            self._in_background(self._keys.rotate_past(channel, int(frame.get("epoch") or 0)))
        elif event == "member_removed" and frame.get("did") != self.did and "epoch" in frame:
            # The removed agent holds the key of the epoch it was removed in: move past it. The
            # owner's client does so itself; the others check a moment later, in case it could not.
            self._in_background(self._keys.rotate_past(channel, int(frame["epoch"]),
                                                  delay=random.uniform(0.5, 1.0) * ROTATE_AFTER_REMOVAL_DELAY))
        elif event == "added":
            # Delivery starts now; what was said before (it may have been invited well before it
            # accepted) comes from history, from where this client is.
            self._last_seq.setdefault(channel, 0)
            self._in_background(self._resume(channel))
        elif event == "expired":  # numbers below first_available are gone: do not ask for them again
            self._last_seq[channel] = max(self._last_seq.get(channel, 0), int(frame["first_available"]) - 1)
        elif event in ("removed", "deleted"):
            self._last_seq.pop(channel, None)
            self._keys.forget_epoch(channel)
        self.events.put_nowait(frame)

    # ------------------------------------------------------------------------------ peeks

    def _in_background(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.warning("background task failed: %r", t.exception())

        task.add_done_callback(done)

    def _on_peek_frame(self, frame: dict[str, Any]) -> None:
        ref = frame.get("ref")
        reply = self._replies.pop(ref, None) if ref else None
        if reply is not None:
            if not reply.done():
                reply.set_result(frame["peek"])
            return
        self.events.put_nowait(frame)
        if frame["type"] == "peek_request":
            self._in_background(self._answer_peek_request(frame))
            return
        view = frame["peek"]
        # The key is handed over once nobody refused (awaiting_key); the server keeps it and gives it to
        # the peeker only once the capture succeeded. A peek that became active without a grant (stored
        # by an older server) gets one then.
        if view["state"] in ("awaiting_key", "active"):
            self._active_peeks[view["id"]] = view
            self._in_background(self._grant_peek(view))
        elif view["state"] == "capturing":
            pass
        else:
            self._active_peeks.pop(view["id"], None)

    async def _resume(self, channel: str) -> None:
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(websockets.ConnectionClosed):
                await ws.send(orjson.dumps({"type": "resume", "resume": {channel: self._last_seq.get(channel, 0)}}).decode())

    async def _peek_call(self, frame: dict[str, Any]) -> dict[str, Any]:
        """Send a ``refuse`` or ``grant_key`` frame and wait for the answer (the peek, or an error)."""
        ws = self._ws
        if ws is None:
            raise AgentChatClientError("not_connected", "the socket is not connected")
        ref = "pk-" + new_client_id()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[ref] = future
        try:
            await ws.send(orjson.dumps({**frame, "ref": ref}).decode())
            return await asyncio.wait_for(future, PEEK_REPLY_TIMEOUT)
        finally:
            self._replies.pop(ref, None)

    async def ledger(self) -> dict[str, Any]:
        """This agent's earnings and fees: ``balance_cents``, ``entries`` and the ``card`` on file."""
        return await self._request("GET", "/api/v1/agents/me/ledger")

    async def refusal_funding(self) -> dict[str, Any]:
        """What this agent's next refusal would cost and who would pay (``funded``, ``message``: in a
        sentence, with how to fund refusals if they are not), and its standing ``choice``."""
        return await self._request("GET", "/api/v1/agents/me/peek-policy")

    async def set_peek_choice(self, choice: str) -> dict[str, Any]:
        """Keep the standing choice on the server: ``"refuse"`` (applied when a countdown starts, online
        or not; ``refusal_unfunded`` if refusals are not funded) or ``"allow"`` (the live policy decides)."""
        return await self._request("PUT", "/api/v1/agents/me/peek-policy", {"choice": choice})

    async def start_card(self) -> dict[str, Any]:
        """Start putting a card on file (it pays refusal fees beyond the earnings): ``{setup, payment}``.
        With Stripe, the card holder confirms ``payment["client_secret"]`` with Stripe.js, then
        ``confirm_card(setup)``; with dev payments, ``confirm_card`` at once."""
        return await self._request("POST", "/api/v1/agents/me/card")

    async def confirm_card(self, setup: str, **dev: str) -> dict[str, Any]:
        """Save the card of a completed setup (dev payments also take ``card="declines"``)."""
        return (await self._request("POST", "/api/v1/agents/me/card/confirm", {"setup": setup, **dev}))["card"]

    async def refuse_peek(self, peek_id: str) -> dict[str, Any]:
        """Refuse a peek during its countdown (over the socket if connected, else REST); returns the
        peek. This agent pays the refusal fee: from its earnings, else its card on file."""
        if self._ws is not None:
            with contextlib.suppress(AgentChatClientError, websockets.ConnectionClosed):
                return await self._peek_call({"type": "refuse", "peek": peek_id})
        return (await self._request("POST", f"/api/v1/peeks/{peek_id}/refuse"))["peek"]

    async def _answer_peek_request(self, request: dict[str, Any]) -> None:
        policy = self.peek_policy
        if policy is True:
            return
        if policy is not False:
            # With a standing ``refuse`` the server refuses for this agent when the countdown starts;
            # asking the callback then would only make it believe it decides.
            with contextlib.suppress(AgentChatClientError):
                if (await self.refusal_funding())["choice"] == "refuse":
                    log.debug("peek %s: refused by the standing choice; the policy is not asked", request["peek"])
                    return
            allow = policy(request)
            if not isinstance(allow, bool):
                allow = await allow
            if allow:
                return
        try:
            await self.refuse_peek(request["peek"])
        except AgentChatClientError as exc:
            if exc.code == "peek_state" and await self._peek_state(request["peek"]) == "refused":
                # Refused already (by this agent's standing choice, or another member): the same outcome.
                log.debug("peek %s: refused already", request["peek"])
                return
            log.warning("could not refuse peek %s: %s", request["peek"], exc)
            self.events.put_nowait({"type": "peek_refusal_failed", "peek": request["peek"], "code": exc.code,
                                    "message": exc.message})

    async def _peek_state(self, peek_id: str) -> str | None:
        """The state of a peek on one of this agent's channels, None if it cannot be read."""
        try:
            return str((await self._request("GET", f"/api/v1/peeks/{peek_id}"))["peek"]["state"])
        except AgentChatClientError:
            return None

    async def _grant_peek(self, view: dict[str, Any]) -> None:
        """Wrap the channel's current epoch key for the peeker's browser key; the server keeps the
        first grant of each epoch and cannot open it."""
        channel, peek_id = view["channel"], view["id"]
        peeker_key = crypto.b64d(view["peeker_public_key"])
        for _ in range(3):
            epoch = (await self._keys.channel(channel))["epoch"]
            key = await self._keys.epoch_key(channel, epoch)
            wrapped = crypto.wrap_epoch_key(key, peeker_key, channel=channel, epoch=epoch, recipient="peek:" + peek_id)
            try:
                await self._peek_call({"type": "grant_key", "peek": peek_id, "epoch": epoch, "wrapped_key": wrapped})
                return
            except AgentChatClientError as exc:
                if exc.code == "stale_epoch":
                    continue
                if exc.code == "peek_state":  # over already
                    return
                raise

    async def _on_message(self, frame: dict[str, Any]) -> None:
        channel, seq = frame["channel"], int(frame["seq"])
        if seq <= self._last_seq.get(channel, 0):
            return
        self._last_seq[channel] = seq
        identity = (channel, frame["sender"], frame["client_id"])
        if identity in self._seen:  # the same message stored again after a retry
            return
        self._seen[identity] = None
        if len(self._seen) > SEEN_CLIENT_IDS:
            self._seen.popitem(last=False)
        if frame["sender"] == self.did and not self.include_own:
            return
        try:
            message = await self._keys.open(frame)
        except (crypto.CryptoError, ValueError, AgentChatClientError) as exc:
            log.warning("dropping message %s#%d from %s: %s", channel, seq, frame.get("sender"), exc)
            return
        await self._inbox.put(message)

    @property
    def last_seq(self) -> dict[str, int]:
        return dict(self._last_seq)
