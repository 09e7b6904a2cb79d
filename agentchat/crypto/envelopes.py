"""Message envelopes: sealed under the channel's epoch key and signed by the sender; opened and
verified by the recipients."""

from __future__ import annotations

import secrets
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agentchat.crypto.base import (CryptoError, KEY_SIZE, LABEL_MSG, LABEL_MSG_SIG, MAX_SAFE_INTEGER,
                                   NONCE_SIZE, SIGNATURE_SIZE, TAG_SIZE, b64e, _check_bytes, _check_field,
                                   _check_uint, _join, _wire_bytes)
from agentchat.crypto.identity import AgentKeys, verify_signature


# --- message envelopes ----------------------------------------------------------------------------


def message_aad(*, channel: str, epoch: int, sender: str, client_id: str) -> bytes:
    """AES-GCM associated data of a message:
    ``agentchat/msg/v1\\n{channel}\\n{epoch}\\n{sender}\\n{client_id}``."""
    return _join(
        LABEL_MSG,
        _check_field(channel, "channel"),
        str(_check_uint(epoch, "epoch")),
        _check_field(sender, "sender"),
        _check_field(client_id, "client_id"),
    )


def message_signature_input(
    *, channel: str, epoch: int, sender: str, client_id: str, nonce: bytes, ciphertext: bytes
) -> bytes:
    """What the sender signs: ``agentchat/msg-sig/v1\\n{channel}\\n{epoch}\\n{sender}\\n{client_id}``
    ``\\n{b64e(nonce)}\\n{b64e(ciphertext)}`` (one string, no break between the two halves)."""
    return _join(
        LABEL_MSG_SIG,
        _check_field(channel, "channel"),
        str(_check_uint(epoch, "epoch")),
        _check_field(sender, "sender"),
        _check_field(client_id, "client_id"),
        b64e(nonce),
        b64e(ciphertext),
    )


def seal(
    epoch_key: bytes,
    plaintext: bytes,
    *,
    channel: str,
    epoch: int,
    sender: str,
    client_id: str,
    signer: AgentKeys,
) -> dict[str, Any]:
    """Encrypt and sign a message for a channel epoch.

    ``sender`` is the sender's DID (``signer.did``), so a reader can check the signature from the DID
    alone. Returns ``{"epoch", "nonce", "ciphertext", "signature"}`` (bytes as base64url).
    """
    return _seal_with(
        secrets.token_bytes(NONCE_SIZE),
        epoch_key,
        plaintext,
        channel=channel,
        epoch=epoch,
        sender=sender,
        client_id=client_id,
        signer=signer,
    )


def _seal_with(
    nonce: bytes,
    epoch_key: bytes,
    plaintext: bytes,
    *,
    channel: str,
    epoch: int,
    sender: str,
    client_id: str,
    signer: AgentKeys,
) -> dict[str, Any]:
    """:func:`seal` with its nonce given: for test vectors only."""
    nonce = _check_bytes(nonce, NONCE_SIZE, "nonce")
    epoch_key = _check_bytes(epoch_key, KEY_SIZE, "epoch key")
    if not isinstance(plaintext, (bytes, bytearray, memoryview)):
        raise ValueError(f"plaintext must be bytes, not {type(plaintext).__name__}")
    aad = message_aad(channel=channel, epoch=epoch, sender=sender, client_id=client_id)
    ciphertext = AESGCM(epoch_key).encrypt(nonce, bytes(plaintext), aad)
    signature = signer.sign(
        message_signature_input(
            channel=channel,
            epoch=epoch,
            sender=sender,
            client_id=client_id,
            nonce=nonce,
            ciphertext=ciphertext,
        )
    )
    return {
        "epoch": epoch,
        "nonce": b64e(nonce),
        "ciphertext": b64e(ciphertext),
        "signature": b64e(signature),
    }


def open_envelope(
    envelope: dict[str, Any],
    epoch_key: bytes,
    *,
    channel: str,
    sender: str,
    client_id: str,
    sender_signing_key: bytes | None,
) -> bytes:
    """Verify and decrypt an envelope made by :func:`seal`; returns the plaintext.

    ``channel``, ``sender`` and ``client_id`` come from the frame that carried the envelope; the epoch
    is the envelope's own ``epoch`` (pick ``epoch_key`` by it); a field that could not have been sealed
    (empty, or with a newline) is reported as :class:`CryptoError` too. When ``sender_signing_key`` is given
    (``signing_key_from_did(sender)``) the signature is checked first: ``CryptoError("bad signature")``.
    With ``None`` the signature is not checked: the plaintext is then only known to come from some
    holder of the epoch key. Any malformed field or failed decryption raises :class:`CryptoError`.
    """
    epoch_key = _check_bytes(epoch_key, KEY_SIZE, "epoch key")
    if sender_signing_key is not None:
        sender_signing_key = _check_bytes(sender_signing_key, KEY_SIZE, "sender signing key")
    what = "envelope"
    if not isinstance(envelope, dict):
        raise CryptoError(f"{what} must be an object")
    epoch = envelope.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= MAX_SAFE_INTEGER:
        raise CryptoError(f"{what}: epoch must be an integer between 0 and 2**53-1")
    nonce = _wire_bytes(envelope, "nonce", NONCE_SIZE, what)
    ciphertext = _wire_bytes(envelope, "ciphertext", None, what)
    if len(ciphertext) < TAG_SIZE:
        raise CryptoError(f"{what}: ciphertext is shorter than the {TAG_SIZE}-byte tag")
    try:
        aad = message_aad(channel=channel, epoch=epoch, sender=sender, client_id=client_id)
    except ValueError as exc:  # these fields came with the envelope, so they are wire data too
        raise CryptoError(f"{what}: {exc}") from None
    if sender_signing_key is not None:
        signature = _wire_bytes(envelope, "signature", SIGNATURE_SIZE, what)
        sig_input = message_signature_input(
            channel=channel,
            epoch=epoch,
            sender=sender,
            client_id=client_id,
            nonce=nonce,
            ciphertext=ciphertext,
        )
        if not verify_signature(sender_signing_key, signature, sig_input):
            raise CryptoError("bad signature")
    try:
        return AESGCM(epoch_key).decrypt(nonce, ciphertext, aad)
    except InvalidTag:
        raise CryptoError(
            f"{what} does not decrypt: tampered, or wrong key/channel/epoch/sender/client_id"
        ) from None
