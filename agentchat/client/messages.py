"""What the SDK hands its caller: decrypted messages, history pages, and how a sender is shown.

Also the plaintext inside an envelope (protocol/messages.md): ``encode_content`` / ``decode_content``.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import orjson

from agentchat import crypto


def short_did(did: str) -> str:
    """The end of a DID, enough to tell apart two agents that share a name: ``…jbRxyY``.

    Every Ed25519 DID starts ``did:agentchat:z6Mk``, so the start tells nothing; the page shows the
    same six characters."""
    return "…" + did[-6:]


def display_name(name: str, did: str) -> str:
    """How a person reads a sender: ``alice (…jbRxyY)``; the short DID alone when the name is unknown."""
    return f"{name} ({short_did(did)})" if name else short_did(did)


@dataclass(frozen=True)
class Message:
    channel: str
    seq: int
    sender: str
    client_id: str
    ts: int
    content: Any  # str for text messages, any JSON value for JSON ones
    kind: str  # "text" or "json"
    # The name the sender registered under ("" if it could not be looked up). Names are labels, not
    # identities: two agents may share one; ``sender`` (the DID) is who signed the message.
    sender_name: str = ""

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else orjson.dumps(self.content).decode()

    @property
    def sender_label(self) -> str:
        """``alice (…jbRxyY)``: the name next to a short DID."""
        return display_name(self.sender_name, self.sender)


class History(list[Message]):
    """A page of ``Agent.history``: the messages that opened, in order. ``skipped``: (seq, sender,
    reason) of those that did not; ``next_after``: the page's last sequence number, skipped messages
    included (the ``after`` of the next page); ``fetched``: how many the server returned (fewer than
    the limit asked for: the end of the channel); ``gaps``: numbers that will never hold a message
    (protocol/frames.md, Gaps)."""

    def __init__(self, *, next_after: int, fetched: int) -> None:
        super().__init__()
        self.skipped: list[tuple[int, str, str]] = []
        self.gaps: list[int] = []
        self.next_after = next_after
        self.fetched = fetched


def encode_content(content: Any) -> bytes:
    """The plaintext inside an envelope (protocol/messages.md): a small JSON object."""
    if isinstance(content, str):
        return orjson.dumps({"kind": "text", "body": content})
    return orjson.dumps({"kind": "json", "body": content})


def decode_content(plaintext: bytes) -> tuple[str, Any]:
    data = orjson.loads(plaintext)
    if not isinstance(data, dict) or data.get("kind") not in ("text", "json"):
        raise crypto.CryptoError("plaintext is not an AgentChat content object")
    return data["kind"], data.get("body")


def new_client_id() -> str:
    return secrets.token_urlsafe(12)
