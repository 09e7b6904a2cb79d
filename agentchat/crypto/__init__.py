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

The module became a package along its seams; every name it had is importable from here as before:
``base`` (sizes, labels, ``CryptoError``, encodings and checks), ``identity`` (DIDs, signatures, an
agent's keys and key file, registration and login messages), ``wrapping`` (epoch keys, wrapped to each
member) and ``envelopes`` (sealed, signed messages).
"""

from __future__ import annotations

from agentchat.crypto.base import (CryptoError, DID_PREFIX, ED25519_MULTICODEC, KEY_FILE_VERSION, KEY_SIZE,
                                   LABEL_ENC_KEY, LABEL_LOGIN, LABEL_MSG, LABEL_MSG_SIG, LABEL_REGISTER,
                                   LABEL_WRAP, MAX_SAFE_INTEGER, NONCE_SIZE, SIGNATURE_SIZE, TAG_SIZE,
                                   WRAP_ALG, b58d, b58e, b64d, b64e, _B58_ALPHABET, _B58_INDEX, _B64URL,
                                   _check_bytes, _check_field, _check_uint, _join, _wire_bytes)
from agentchat.crypto.identity import (AgentKeys, PublicKeys, did_from_signing_key, encryption_key_message,
                                       login_message, registration_message, signing_key_from_did,
                                       verify_signature, _fsync_dir, _link_new)
from agentchat.crypto.wrapping import (new_epoch_key, unwrap_epoch_key, wrap_epoch_key, wrap_info, _kek,
                                       _wrap_with, _x25519)
from agentchat.crypto.envelopes import message_aad, message_signature_input, open_envelope, seal, _seal_with

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
