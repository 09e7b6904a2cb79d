"""What the crypto modules share: sizes, the versioned labels, ``CryptoError``, base64url and
base58btc, and the checks of arguments, of wire fields and of the text fields joined into signed and
authenticated data."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any


KEY_SIZE = 32  # Ed25519 and X25519 public/private keys, epoch keys, key-encryption keys
SIGNATURE_SIZE = 64
NONCE_SIZE = 12  # AES-GCM
TAG_SIZE = 16  # AES-GCM
MAX_SAFE_INTEGER = 2**53 - 1  # largest integer a JavaScript number holds exactly

DID_PREFIX = "did:agentchat:"
ED25519_MULTICODEC = b"\xed\x01"  # varint of 0xed, "ed25519-pub" in the multicodec table
WRAP_ALG = "x25519-hkdf-sha256-aes256gcm"
KEY_FILE_VERSION = 1

# Domain-separation labels: each starts the byte string it names, so a signature or a key made for one
# purpose is never valid for another.
LABEL_ENC_KEY = "agentchat/enc-key/v1"
LABEL_REGISTER = "agentchat/register/v1"
LABEL_LOGIN = "agentchat/login/v1"
LABEL_WRAP = "agentchat/wrap/v1"
LABEL_MSG = "agentchat/msg/v1"
LABEL_MSG_SIG = "agentchat/msg-sig/v1"


class CryptoError(Exception):
    """Data from the wire does not decrypt or verify: malformed, tampered, forged or not for us.

    The message says which check failed; it never contains key material.
    """


# --- base64url ------------------------------------------------------------------------------------

_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def b64e(data: bytes) -> str:
    """Encode bytes as base64url without padding (RFC 4648 section 5)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64d(text: str) -> bytes:
    """Decode base64url without padding, strictly.

    Raises ``ValueError`` for anything :func:`b64e` would not have produced: padding, characters outside
    ``A-Z a-z 0-9 - _`` (including whitespace and the standard alphabet's ``+ /``), an impossible length,
    or non-zero unused bits in the last character. So every byte string has exactly one accepted text.
    """
    if not isinstance(text, str):
        raise ValueError(f"base64url text must be a str, not {type(text).__name__}")
    if not _B64URL.fullmatch(text):
        raise ValueError("base64url text has characters outside A-Z a-z 0-9 - _ (or padding)")
    if len(text) % 4 == 1:
        raise ValueError("base64url text has an impossible length")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error as exc:  # unreachable after the checks above; kept as a guard
        raise ValueError(f"bad base64url: {exc}") from None
    if b64e(data) != text:
        raise ValueError("base64url text is not canonical (non-zero unused bits)")
    return data


# --- base58btc ------------------------------------------------------------------------------------

_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58_ALPHABET)}


def b58e(data: bytes) -> str:
    """Encode bytes as base58btc (Bitcoin alphabet); each leading zero byte becomes a ``1``."""
    zeros = len(data) - len(data.lstrip(b"\0"))
    n = int.from_bytes(data, "big")
    digits = []
    while n:
        n, r = divmod(n, 58)
        digits.append(_B58_ALPHABET[r])
    return "1" * zeros + "".join(reversed(digits))


def b58d(text: str) -> bytes:
    """Decode base58btc (Bitcoin alphabet); ``ValueError`` on any character outside the alphabet."""
    n = 0
    for c in text:
        i = _B58_INDEX.get(c)
        if i is None:
            raise ValueError(f"character {c!r} is not in the base58btc alphabet")
        n = n * 58 + i
    zeros = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * zeros + body


# --- small checks ---------------------------------------------------------------------------------


def _check_bytes(value: object, size: int, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ValueError(f"{what} must be bytes, not {type(value).__name__}")
    value = bytes(value)
    if len(value) != size:
        raise ValueError(f"{what} must be {size} bytes, got {len(value)}")
    return value


def _check_field(value: object, what: str) -> str:
    """A text field of a signed or authenticated byte string: non-empty, no newline, valid UTF-8."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a str, not {type(value).__name__}")
    if not value:
        raise ValueError(f"{what} must not be empty")
    if "\n" in value:
        raise ValueError(f"{what} must not contain a newline")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid Unicode text (lone surrogate)") from None
    return value


def _check_uint(value: object, what: str) -> int:
    """An integer field: 0 .. 2**53-1, so JavaScript holds it exactly and prints it the same way."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an int, not {type(value).__name__}")
    if not 0 <= value <= MAX_SAFE_INTEGER:
        raise ValueError(f"{what} must be between 0 and 2**53-1, got {value}")
    return value


def _join(*fields: str) -> bytes:
    return "\n".join(fields).encode("utf-8")


def _wire_bytes(d: dict[str, Any], field: str, size: int | None, what: str) -> bytes:
    value = d.get(field)
    if not isinstance(value, str):
        raise CryptoError(f"{what}: {field} is missing or not a string")
    try:
        raw = b64d(value)
    except ValueError as exc:
        raise CryptoError(f"{what}: {field}: {exc}") from None
    if size is not None and len(raw) != size:
        raise CryptoError(f"{what}: {field} must be {size} bytes, got {len(raw)}")
    return raw
