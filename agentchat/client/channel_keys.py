"""Channel keys and crypto on the agent's side: epoch keys (made here, wrapped for each key holder,
unwrapped with this agent's private key), sealing and opening envelopes, and moving a channel to a
new epoch. The server stores only wrapped keys and ciphertext (protocol/crypto.md)."""

from __future__ import annotations

import asyncio
from typing import Any

from agentchat import crypto
from agentchat.client.messages import Message, decode_content, encode_content
from agentchat.client.rest import AgentChatClientError, RestSession


def key_holders(meta: dict[str, Any]) -> list[str]:
    """Whom a channel's epoch keys are wrapped for: its members and its pending invitees."""
    return sorted(set(meta["members"]) | set(meta.get("invited", ())))


class ChannelKeys:
    """This agent's epoch keys by (channel, epoch), and each channel's current epoch as last heard."""

    def __init__(self, rest: RestSession, keys: crypto.AgentKeys) -> None:
        self._rest = rest
        self._keys = keys
        self._did = keys.did
        self._epoch_keys: dict[tuple[str, int], bytes] = {}
        self._current_epoch: dict[str, int] = {}

    async def channel(self, channel: str) -> dict[str, Any]:
        """``Agent.channel``: the channel's metadata; its epoch becomes the current one."""
        meta = await self._rest.request("GET", f"/api/v1/channels/{channel}")
        self._current_epoch[channel] = meta["epoch"]
        return meta

    def epoch_changed(self, channel: str, epoch: int) -> None:
        self._current_epoch[channel] = epoch

    def forget_epoch(self, channel: str) -> None:
        """The current epoch is unknown (stale, or the channel is gone): it is asked for next time."""
        self._current_epoch.pop(channel, None)

    def adopt(self, channel: str, epoch: int, key: bytes) -> None:
        """``key`` is the channel's key from ``epoch`` on (the server took it)."""
        self._epoch_keys[(channel, epoch)] = key
        self._current_epoch[channel] = epoch

    async def epoch_key(self, channel: str, epoch: int) -> bytes:
        key = self._epoch_keys.get((channel, epoch))
        if key is None:
            found = await self._rest.request("GET", f"/api/v1/channels/{channel}/epochs/{epoch}/key")
            key = crypto.unwrap_epoch_key(found["wrapped_key"], self._keys.encryption_private_key,
                                          channel=channel, epoch=epoch, recipient=self._did)
            self._epoch_keys[(channel, epoch)] = key
        return key

    async def current(self, channel: str) -> int:
        epoch = self._current_epoch.get(channel)
        if epoch is None:
            epoch = (await self.channel(channel))["epoch"]
        return epoch

    async def _encryption_key_of(self, did: str) -> bytes:
        """A member's X25519 key, checked against its DID: the server cannot substitute its own."""
        profile = await self._rest.profile(did)
        keys = crypto.PublicKeys.from_wire(profile["keys"])
        if keys.did != did:
            raise crypto.CryptoError(f"the server returned keys that do not belong to {did}")
        return keys.encryption_key

    async def wrap_for(self, channel: str, epoch: int, members: list[str], epoch_key: bytes) -> dict[str, Any]:
        wrapped = {}
        for member in members:
            public = await self._encryption_key_of(member)
            wrapped[member] = crypto.wrap_epoch_key(epoch_key, public, channel=channel, epoch=epoch, recipient=member)
        return wrapped

    # ------------------------------------------------------------------------------ envelopes

    async def seal(self, channel: str, content: Any, client_id: str) -> dict[str, Any]:
        epoch = await self.current(channel)
        key = await self.epoch_key(channel, epoch)
        return crypto.seal(key, encode_content(content), channel=channel, epoch=epoch, sender=self._did,
                           client_id=client_id, signer=self._keys)

    async def open(self, record: dict[str, Any]) -> Message:
        """A stored or live message, decrypted and its signature checked against the sender's DID."""
        envelope = record["envelope"]
        key = await self.epoch_key(record["channel"], envelope["epoch"])
        plaintext = crypto.open_envelope(
            envelope, key, channel=record["channel"], sender=record["sender"], client_id=record["client_id"],
            sender_signing_key=crypto.signing_key_from_did(record["sender"]))
        kind, content = decode_content(plaintext)
        return Message(record["channel"], record["seq"], record["sender"], record["client_id"], record["ts"],
                       content, kind, await self._rest.name_of(record["sender"]))

    # ------------------------------------------------------------------------------ new epochs

    async def rotate_epoch(self, channel: str) -> dict[str, Any]:
        """``Agent.rotate_epoch``: a new epoch key for the current members. If another member rotated
        first, use theirs."""
        for _ in range(5):
            answer = await self._start_next_epoch(channel, await self.channel(channel))
            if answer is not None:
                return answer
        raise AgentChatClientError("conflict", "could not rotate the epoch: others keep rotating it")

    async def rotate_past(self, channel: str, epoch: int, delay: float = 0.0) -> dict[str, Any] | None:
        """Someone who held the key of ``epoch`` may no longer read (a peek is over, a member was
        removed): move the channel past it, so what is said next is under a key they never had.
        Every member tries; the first rotation is enough. Returns the channel if this call rotated."""
        if delay:
            await asyncio.sleep(delay)
        for _ in range(3):
            try:
                meta = await self.channel(channel)
            except AgentChatClientError as exc:
                if exc.code == "not_member":  # removed meanwhile: not ours to rotate
                    return None
                raise
            if meta["epoch"] > epoch:
                return None
            if await self._start_next_epoch(channel, meta) is not None:
                return await self.channel(channel)
        return None

    async def _start_next_epoch(self, channel: str, meta: dict[str, Any]) -> dict[str, Any] | None:
        """Make the key of the epoch after ``meta``'s, wrap it for the channel's key holders and hand
        it to the server: the server's answer, or None if another member started that epoch first."""
        epoch = meta["epoch"] + 1
        epoch_key = crypto.new_epoch_key()
        wrapped = await self.wrap_for(channel, epoch, key_holders(meta), epoch_key)
        try:
            answer = await self._rest.request("POST", f"/api/v1/channels/{channel}/epochs",
                                              {"epoch": epoch, "epoch_keys": wrapped})
        except AgentChatClientError as exc:
            if exc.code == "conflict":
                return None
            raise
        self.adopt(channel, epoch, epoch_key)
        return answer
