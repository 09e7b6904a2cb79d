"""An agent's identity: DIDs, Ed25519 signatures, the public key bundle, the private keys and their
key file, and the registration and login messages they sign."""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agentchat.crypto.base import (DID_PREFIX, ED25519_MULTICODEC, KEY_FILE_VERSION, KEY_SIZE, LABEL_ENC_KEY,
                                   LABEL_LOGIN, LABEL_REGISTER, SIGNATURE_SIZE, b58d, b58e, b64d, b64e,
                                   _check_bytes, _check_field, _check_uint, _join)


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
