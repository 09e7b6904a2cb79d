"""Epoch keys and their wrapping to each member's X25519 key (X25519, HKDF-SHA256, AES-256-GCM)."""

from __future__ import annotations

import secrets
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agentchat.crypto.base import (CryptoError, KEY_SIZE, LABEL_WRAP, NONCE_SIZE, TAG_SIZE, WRAP_ALG, b64e,
                                   _check_bytes, _check_field, _check_uint, _join, _wire_bytes)


# --- epoch keys -----------------------------------------------------------------------------------


def new_epoch_key() -> bytes:
    """A fresh channel epoch key: 32 random bytes (an AES-256 key)."""
    return secrets.token_bytes(KEY_SIZE)


def wrap_info(*, channel: str, epoch: int, recipient: str) -> bytes:
    """HKDF info and AES-GCM associated data of a wrapped epoch key:
    ``agentchat/wrap/v1\\n{channel}\\n{epoch}\\n{recipient}``."""
    return _join(
        LABEL_WRAP,
        _check_field(channel, "channel"),
        str(_check_uint(epoch, "epoch")),
        _check_field(recipient, "recipient"),
    )


def _kek(shared: bytes, ephemeral_public: bytes, recipient_public: bytes, info: bytes) -> bytes:
    if shared == bytes(KEY_SIZE):
        # A low-order public key makes the shared secret all zeros, whoever the other party is.
        raise CryptoError("X25519 shared secret is all zeros (low-order public key)")
    salt = ephemeral_public + recipient_public
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=salt, info=info).derive(shared)


def _x25519(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:  # cryptography refuses an all-zero result itself
        raise CryptoError("X25519 shared secret is all zeros (low-order public key)") from None


def wrap_epoch_key(
    epoch_key: bytes, recipient_x25519_public: bytes, *, channel: str, epoch: int, recipient: str
) -> dict[str, str]:
    """Encrypt ``epoch_key`` so that only the holder of ``recipient_x25519_public``'s private key can
    read it, bound to (channel, epoch, recipient).

    ``recipient`` is the member's DID, or ``"peek:" + peek_id`` for a peeker's browser key. Raises
    ``ValueError`` for bad arguments and :class:`CryptoError` if the recipient key is a low-order point.
    """
    return _wrap_with(
        X25519PrivateKey.generate(),
        secrets.token_bytes(NONCE_SIZE),
        epoch_key,
        recipient_x25519_public,
        channel=channel,
        epoch=epoch,
        recipient=recipient,
    )


def _wrap_with(
    ephemeral_private: X25519PrivateKey | bytes,
    nonce: bytes,
    epoch_key: bytes,
    recipient_x25519_public: bytes,
    *,
    channel: str,
    epoch: int,
    recipient: str,
) -> dict[str, str]:
    """:func:`wrap_epoch_key` with its randomness given: for test vectors only."""
    if isinstance(ephemeral_private, (bytes, bytearray)):
        ephemeral_private = X25519PrivateKey.from_private_bytes(
            _check_bytes(ephemeral_private, KEY_SIZE, "ephemeral X25519 private key")
        )
    nonce = _check_bytes(nonce, NONCE_SIZE, "nonce")
    epoch_key = _check_bytes(epoch_key, KEY_SIZE, "epoch key")
    recipient_public = _check_bytes(recipient_x25519_public, KEY_SIZE, "recipient X25519 public key")
    info = wrap_info(channel=channel, epoch=epoch, recipient=recipient)
    ephemeral_public = ephemeral_private.public_key().public_bytes_raw()
    kek = _kek(_x25519(ephemeral_private, recipient_public), ephemeral_public, recipient_public, info)
    return {
        "alg": WRAP_ALG,
        "ephemeral_key": b64e(ephemeral_public),
        "nonce": b64e(nonce),
        "ciphertext": b64e(AESGCM(kek).encrypt(nonce, epoch_key, info)),
    }


def unwrap_epoch_key(
    wrapped: dict[str, Any],
    x25519_private: X25519PrivateKey | bytes,
    *,
    channel: str,
    epoch: int,
    recipient: str,
) -> bytes:
    """Recover the epoch key from an object made by :func:`wrap_epoch_key`.

    ``x25519_private`` is the recipient's key (``AgentKeys.encryption_private_key``, or 32 raw bytes).
    ``channel``, ``epoch`` and ``recipient`` must be the values it was wrapped for. Raises
    :class:`CryptoError` if the object is malformed, was tampered with, or is for another key or
    another (channel, epoch, recipient).
    """
    if isinstance(x25519_private, (bytes, bytearray)):
        x25519_private = X25519PrivateKey.from_private_bytes(
            _check_bytes(x25519_private, KEY_SIZE, "X25519 private key")
        )
    info = wrap_info(channel=channel, epoch=epoch, recipient=recipient)
    what = "wrapped key"
    if not isinstance(wrapped, dict):
        raise CryptoError(f"{what} must be an object")
    if wrapped.get("alg") != WRAP_ALG:
        raise CryptoError(f"{what}: alg must be {WRAP_ALG!r}")
    ephemeral_public = _wire_bytes(wrapped, "ephemeral_key", KEY_SIZE, what)
    nonce = _wire_bytes(wrapped, "nonce", NONCE_SIZE, what)
    ciphertext = _wire_bytes(wrapped, "ciphertext", KEY_SIZE + TAG_SIZE, what)
    recipient_public = x25519_private.public_key().public_bytes_raw()
    kek = _kek(_x25519(x25519_private, ephemeral_public), ephemeral_public, recipient_public, info)
    try:
        return AESGCM(kek).decrypt(nonce, ciphertext, info)
    except InvalidTag:
        raise CryptoError(
            f"{what} does not decrypt: tampered, or not for this key/channel/epoch/recipient"
        ) from None
