"""protocol/vectors/crypto.json checked on a second, independent implementation: libsodium (through
PyNaCl) for X25519, Ed25519 and AES-256-GCM, and the standard library's HMAC for HKDF-SHA256
(RFC 5869). ``test_crypto.py`` checks the same vectors on ``cryptography`` (OpenSSL), which
``agentchat.crypto`` uses: a vector both agree on is not an artefact of one library.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import nacl.bindings
import nacl.signing
import pytest

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parents[2] / "protocol" / "vectors" / "crypto.json").read_text(encoding="utf-8"))


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hkdf_sha256(secret: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    prk = hmac.new(salt, secret, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out, counter = out + block, counter + 1
    return out[:length]


def aes256gcm(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    try:
        return nacl.bindings.crypto_aead_aes256gcm_encrypt(plaintext, aad, nonce, key)
    except Exception as exc:  # libsodium's AES-GCM needs the CPU's AES instructions
        pytest.skip(f"libsodium AES-256-GCM unavailable here: {exc!r}")


@pytest.mark.parametrize("case", VECTORS["x25519_rfc7748"]["scalar_mult"])
def test_x25519_scalar_mult(case: dict[str, str]) -> None:
    assert nacl.bindings.crypto_scalarmult(h(case["scalar_hex"]), h(case["u_hex"])) == h(case["output_hex"])


def test_x25519_diffie_hellman() -> None:
    dh = VECTORS["x25519_rfc7748"]["diffie_hellman"]
    a, b = h(dh["alice_private_hex"]), h(dh["bob_private_hex"])
    assert nacl.bindings.crypto_scalarmult_base(a) == h(dh["alice_public_hex"])
    assert nacl.bindings.crypto_scalarmult(a, h(dh["bob_public_hex"])) == h(dh["shared_secret_hex"])


def test_ed25519_rfc8032_and_the_agent_vector() -> None:
    case = VECTORS["ed25519_rfc8032"]
    key = nacl.signing.SigningKey(h(case["secret_key_hex"]))
    assert bytes(key.verify_key) == h(case["public_key_hex"])
    assert key.sign(h(case["message_hex"])).signature == h(case["signature_hex"])
    agent = VECTORS["agent"]
    assert bytes(nacl.signing.SigningKey(h(agent["signing_private_hex"])).verify_key) == h(agent["signing_key_hex"])
    assert nacl.bindings.crypto_scalarmult_base(h(agent["encryption_private_hex"])) == h(agent["encryption_key_hex"])


@pytest.mark.parametrize("name", ["registration", "login"])
def test_registration_and_login_signatures(name: str) -> None:
    case, agent = VECTORS[name], VECTORS["agent"]
    signed = nacl.signing.SigningKey(h(agent["signing_private_hex"])).sign(h(case["message_hex"]))
    assert signed.signature == h(case["signature_hex"])


@pytest.mark.parametrize("case", VECTORS["wrap"], ids=lambda c: c["description"][:30])
def test_wrap(case: dict[str, Any]) -> None:
    i, mid, wire = case["inputs"], case["intermediate"], case["wire"]
    eph_pub = nacl.bindings.crypto_scalarmult_base(h(i["ephemeral_private_hex"]))
    assert eph_pub == b64d(wire["ephemeral_key"])
    shared = nacl.bindings.crypto_scalarmult(h(i["ephemeral_private_hex"]), h(i["recipient_public_hex"]))
    assert shared == h(mid["shared_secret_hex"])
    kek = hkdf_sha256(shared, eph_pub + h(i["recipient_public_hex"]), h(mid["info_hex"]))
    assert kek == h(mid["kek_hex"])
    assert aes256gcm(kek, h(i["nonce_hex"]), h(i["epoch_key_hex"]), h(mid["info_hex"])) == b64d(wire["ciphertext"])


@pytest.mark.parametrize("case", VECTORS["seal"], ids=lambda c: c["description"][:30])
def test_seal(case: dict[str, Any]) -> None:
    i, mid, wire = case["inputs"], case["intermediate"], case["wire"]
    sealed = aes256gcm(h(i["epoch_key_hex"]), h(i["nonce_hex"]), h(i["plaintext_hex"]), h(mid["aad_hex"]))
    assert sealed == b64d(wire["ciphertext"])
    signer = nacl.signing.SigningKey(h(i["signer_private_hex"]))
    assert bytes(signer.verify_key) == h(i["sender_signing_key_hex"])
    assert signer.sign(h(mid["signature_input_hex"])).signature == b64d(wire["signature"])
