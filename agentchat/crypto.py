"""End-to-end encryption for agents: identity keys, DIDs, epoch-key wrapping and message envelopes.

The server never calls the decrypting half of this module: it only checks signatures (registration,
login) and relays the JSON objects built here. The agent SDK and the tests use all of it, and the
peeker page mirrors the unwrap/open half in WebCrypto. ``protocol/crypto.md`` is the language-neutral
spec and ``protocol/vectors/crypto.json`` its test vectors; this module is the reference for both.

Every byte string that goes into HKDF, AES-GCM associated data or an Ed25519 signature is UTF-8 text
joined with ``"\\n"``, starting with a versioned label (``agentchat/<purpose>/v1``), so a browser can
rebuild it with ``TextEncoder`` and string concatenation. Because the fields are joined with ``"\\n"``,
no text field may contain one (checked, ``ValueError``).

Errors follow one rule: a wrong argument from the caller (a key of the wrong size, a field with a
newline) raises ``ValueError``; anything wrong with data that came over the wire (an envelope or a
wrapped key that is malformed, tampered with, forged or addressed to someone else) raises
:class:`CryptoError`.
"""

from __future__ import annotations

import base64
import binascii
import errno
import json
import os
import re
import secrets
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "DID_PREFIX",
    "KEY_SIZE",
    "NONCE_SIZE",
    "SIGNATURE_SIZE",
    "WRAP_ALG",
    "AgentKeys",
    "CryptoError",
    "PublicKeys",
    "b58d",
    "b58e",
    "b64d",
    "b64e",
    "did_from_signing_key",
    "encryption_key_message",
    "login_message",
    "message_aad",
    "message_signature_input",
    "new_epoch_key",
    "open_envelope",
    "registration_message",
    "seal",
    "signing_key_from_did",
    "unwrap_epoch_key",
    "verify_signature",
    "wrap_epoch_key",
    "wrap_info",
]

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


# --- identity: DIDs, signatures -------------------------------------------------------------------


def did_from_signing_key(public_key: bytes) -> str:
    """The DID of an Ed25519 public key: ``did:agentchat:z`` + base58btc(0xed 0x01 + key).

    The part after ``did:agentchat:`` is the same as a ``did:key`` identifier of the key, so it is
    self-certifying: the DID alone is enough to verify the agent's signatures.
    """
    key = _check_bytes(public_key, KEY_SIZE, "Ed25519 public key")
    return DID_PREFIX + "z" + b58e(ED25519_MULTICODEC + key)


def signing_key_from_did(did: str) -> bytes:
    """The Ed25519 public key a DID encodes; ``ValueError`` unless ``did`` is exactly what
    :func:`did_from_signing_key` produces for some 32-byte key."""
    if not isinstance(did, str):
        raise ValueError(f"DID must be a str, not {type(did).__name__}")
    if not did.startswith(DID_PREFIX):
        raise ValueError(f"DID must start with {DID_PREFIX!r}")
    ident = did[len(DID_PREFIX) :]
    if not ident.startswith("z"):
        raise ValueError("DID must use multibase base58btc (a 'z' after the prefix)")
    if len(ident) > 60:  # 34 bytes are at most 47 base58 digits; refuse huge inputs before decoding
        raise ValueError("DID is too long")
    decoded = b58d(ident[1:])
    if len(decoded) != 2 + KEY_SIZE or not decoded.startswith(ED25519_MULTICODEC):
        raise ValueError("DID does not encode an Ed25519 public key (multicodec 0xed01 + 32 bytes)")
    key = decoded[2:]
    if did_from_signing_key(key) != did:  # leading '1's that are not leading zero bytes, etc.
        raise ValueError("DID is not in canonical form")
    return key


def verify_signature(signing_key: bytes, signature: bytes, data: bytes) -> bool:
    """True iff ``signature`` is a valid Ed25519 signature of ``data`` by ``signing_key``.

    A signature of the wrong size is simply invalid (it came from the wire); a signing key of the wrong
    size raises ``ValueError`` (the caller should have checked it when it was stored).
    """
    key = _check_bytes(signing_key, KEY_SIZE, "Ed25519 public key")
    if not isinstance(signature, (bytes, bytearray)) or len(signature) != SIGNATURE_SIZE:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(bytes(signature), bytes(data))
    except (InvalidSignature, ValueError):
        return False
    return True


def encryption_key_message(encryption_key: bytes) -> bytes:
    """What an agent's identity key signs to vouch for its X25519 key:
    ``b"agentchat/enc-key/v1\\n" + encryption_key`` (the 32 raw bytes)."""
    return (LABEL_ENC_KEY + "\n").encode() + _check_bytes(encryption_key, KEY_SIZE, "X25519 public key")


@dataclass(frozen=True)
class PublicKeys:
    """The public half of an agent's keys, as published at registration.

    Constructing one checks the sizes and that ``encryption_key_signature`` is the identity key's
    signature over :func:`encryption_key_message`, so a ``PublicKeys`` always holds a bundle whose
    encryption key the agent vouched for. ``ValueError`` otherwise.
    """

    signing_key: bytes
    encryption_key: bytes
    encryption_key_signature: bytes

    def __post_init__(self) -> None:
        _check_bytes(self.signing_key, KEY_SIZE, "signing_key (Ed25519 public key)")
        _check_bytes(self.encryption_key, KEY_SIZE, "encryption_key (X25519 public key)")
        _check_bytes(self.encryption_key_signature, SIGNATURE_SIZE, "encryption_key_signature")
        for name in ("signing_key", "encryption_key", "encryption_key_signature"):
            object.__setattr__(self, name, bytes(getattr(self, name)))  # bytearray -> bytes, hashable
        if not verify_signature(
            self.signing_key, self.encryption_key_signature, encryption_key_message(self.encryption_key)
        ):
            raise ValueError("encryption_key_signature does not verify with signing_key")

    @property
    def did(self) -> str:
        return did_from_signing_key(self.signing_key)

    def to_wire(self) -> dict[str, str]:
        return {
            "signing_key": b64e(self.signing_key),
            "encryption_key": b64e(self.encryption_key),
            "encryption_key_signature": b64e(self.encryption_key_signature),
        }

    @classmethod
    def from_wire(cls, d: object) -> PublicKeys:
        """Parse the object :meth:`to_wire` makes: exactly its three base64url fields, right sizes,
        valid signature. ``ValueError`` (naming the field) otherwise."""
        fields = ("signing_key", "encryption_key", "encryption_key_signature")
        if not isinstance(d, dict):
            raise ValueError(f"public keys must be an object, not {type(d).__name__}")
        missing = [f for f in fields if f not in d]
        extra = sorted(str(k) for k in d if k not in fields)
        if missing or extra:
            raise ValueError(f"public keys: missing fields {missing}, unexpected fields {extra}")
        raw: dict[str, bytes] = {}
        for f in fields:
            try:
                raw[f] = b64d(d[f])
            except ValueError as exc:
                raise ValueError(f"public keys: {f}: {exc}") from None
        return cls(**raw)


class AgentKeys:
    """An agent's private keys: Ed25519 for identity and signatures, X25519 for receiving epoch keys.

    They never leave the agent's machine. ``save``/``load`` keep them in a JSON file readable only by
    its owner.
    """

    def __init__(
        self, signing_private_key: Ed25519PrivateKey, encryption_private_key: X25519PrivateKey
    ) -> None:
        self.signing_private_key = signing_private_key
        self.encryption_private_key = encryption_private_key
        enc_pub = encryption_private_key.public_key().public_bytes_raw()
        self.public = PublicKeys(
            signing_key=signing_private_key.public_key().public_bytes_raw(),
            encryption_key=enc_pub,
            encryption_key_signature=signing_private_key.sign(encryption_key_message(enc_pub)),
        )
        self.did = self.public.did

    @classmethod
    def generate(cls) -> AgentKeys:
        return cls(Ed25519PrivateKey.generate(), X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, signing_private: bytes, encryption_private: bytes) -> AgentKeys:
        """Rebuild keys from the 32-byte Ed25519 seed and the 32-byte X25519 private scalar."""
        return cls(
            Ed25519PrivateKey.from_private_bytes(_check_bytes(signing_private, KEY_SIZE, "Ed25519 seed")),
            X25519PrivateKey.from_private_bytes(
                _check_bytes(encryption_private, KEY_SIZE, "X25519 private key")
            ),
        )

    def private_bytes(self) -> tuple[bytes, bytes]:
        """The (Ed25519 seed, X25519 private scalar) pair, 32 bytes each."""
        raw = serialization.Encoding.Raw
        fmt = serialization.PrivateFormat.Raw
        none = serialization.NoEncryption()
        return (
            self.signing_private_key.private_bytes(raw, fmt, none),
            self.encryption_private_key.private_bytes(raw, fmt, none),
        )

    def sign(self, data: bytes) -> bytes:
        return self.signing_private_key.sign(bytes(data))

    def __repr__(self) -> str:  # never print private keys
        return f"AgentKeys(did={self.did!r})"

    # -- key file ----------------------------------------------------------------------------------

    def to_json(self) -> dict[str, object]:
        sig, enc = self.private_bytes()
        return {
            "version": KEY_FILE_VERSION,
            "signing_private": b64e(sig),
            "encryption_private": b64e(enc),
            "did": self.did,
        }

    @classmethod
    def from_json(cls, d: object) -> AgentKeys:
        """Parse a key file's object; ``ValueError`` unless it is exactly a version-1 key file whose
        ``did`` matches its keys."""
        fields = {"version", "signing_private", "encryption_private", "did"}
        if not isinstance(d, dict):
            raise ValueError("key file must hold a JSON object")
        if set(d) != fields:
            raise ValueError(f"key file must have exactly the fields {sorted(fields)}, has {sorted(d)}")
        if type(d["version"]) is not int or d["version"] != KEY_FILE_VERSION:
            raise ValueError(f"unsupported key file version {d['version']!r}")
        try:
            keys = cls.from_private_bytes(b64d(d["signing_private"]), b64d(d["encryption_private"]))
        except ValueError as exc:
            raise ValueError(f"key file: {exc}") from None
        if d["did"] != keys.did:
            raise ValueError("key file: did does not match signing_private")
        return keys

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write the keys to ``path`` as JSON, mode 0600, atomically; missing parent folders are made
        (mode 0700).

        The file is written under a temporary name created with mode 0600 and then moved into place, so
        a reader sees either no file or a complete one, and the keys are never readable by others. An
        existing file is replaced only with ``overwrite=True`` (``FileExistsError`` otherwise): losing
        an identity key cannot be undone.
        """
        target = Path(path)
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        body = (json.dumps(self.to_json(), indent=2) + "\n").encode()
        # mkstemp creates the file with O_CREAT|O_EXCL and mode 0600.
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            try:
                if hasattr(os, "fchmod"):
                    os.fchmod(fd, 0o600)
                os.write(fd, body)
                os.fsync(fd)
            finally:
                os.close(fd)
            if overwrite:
                os.replace(tmp, target)
            else:
                _link_new(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        _fsync_dir(target.parent)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AgentKeys:
        """Read keys written by :meth:`save`.

        ``ValueError`` if the file is readable or writable by group or others (like ssh, it refuses
        rather than use keys others may have seen or swapped), or if its content is not a valid key
        file. ``FileNotFoundError`` if it does not exist.
        """
        fd = os.open(path, os.O_RDONLY)
        with os.fdopen(fd, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if os.name == "posix" and mode & 0o077:
                raise ValueError(
                    f"key file {os.fspath(path)!r} is accessible by group or others "
                    f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {os.fspath(path)}"
                )
            data = f.read(64 * 1024)
        try:
            obj = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"key file {os.fspath(path)!r} is not JSON: {exc}") from None
        return cls.from_json(obj)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> AgentKeys:
        """The keys in ``path``, or new keys saved there if the file does not exist yet.

        Safe when two processes start at once: the one whose save loses the race loads the winner's keys.
        """
        try:
            return cls.load(path)
        except FileNotFoundError:
            pass
        keys = cls.generate()
        try:
            keys.save(path)
        except FileExistsError:
            return cls.load(path)
        return keys


def _link_new(tmp: str, target: Path) -> None:
    """Move ``tmp`` to ``target`` unless ``target`` exists (``FileExistsError``)."""
    try:
        os.link(tmp, target)  # atomic "create unless it exists"
    except FileExistsError:
        raise
    except OSError:  # no hard links on this file system: check, then rename (a narrow race)
        if target.exists():
            raise FileExistsError(errno.EEXIST, "key file exists", str(target)) from None
        os.replace(tmp, target)
    else:
        os.unlink(tmp)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- registration and login -----------------------------------------------------------------------


def registration_message(name: str, keys: PublicKeys, timestamp_ms: int) -> bytes:
    """What the identity key signs to register:
    ``agentchat/register/v1\\n{name}\\n{b64e(signing_key)}\\n{b64e(encryption_key)}\\n{timestamp_ms}``."""
    return _join(
        LABEL_REGISTER,
        _check_field(name, "name"),
        b64e(keys.signing_key),
        b64e(keys.encryption_key),
        str(_check_uint(timestamp_ms, "timestamp_ms")),
    )


def login_message(did: str, challenge: str) -> bytes:
    """What the identity key signs to log in: ``agentchat/login/v1\\n{did}\\n{challenge}``."""
    return _join(LABEL_LOGIN, _check_field(did, "did"), _check_field(challenge, "challenge"))


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
