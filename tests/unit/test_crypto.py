"""agentchat.crypto: round trips, tamper detection, key files, and protocol/vectors/crypto.json.

The vector tests check two things: that this module reproduces the stored outputs, and that the steps of
protocol/crypto.md, redone here directly on the `cryptography` primitives, give the same bytes, so the
spec, the vectors and the code cannot drift apart.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agentchat import crypto
from agentchat.crypto import (
    DID_PREFIX,
    AgentKeys,
    CryptoError,
    PublicKeys,
    b58d,
    b58e,
    b64d,
    b64e,
    did_from_signing_key,
    login_message,
    new_epoch_key,
    open_envelope,
    registration_message,
    seal,
    signing_key_from_did,
    unwrap_epoch_key,
    verify_signature,
    wrap_epoch_key,
)

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parents[2] / "protocol" / "vectors" / "crypto.json").read_text(encoding="utf-8")
)
h = bytes.fromhex
posix_only = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")


def x25519(scalar: bytes, u: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(scalar).exchange(X25519PublicKey.from_public_bytes(u))


def public_x25519(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


@pytest.fixture(scope="module")
def alice() -> AgentKeys:
    return AgentKeys.generate()


@pytest.fixture(scope="module")
def bob() -> AgentKeys:
    return AgentKeys.generate()


# --- encodings ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", VECTORS["base64url"]["valid"], ids=lambda c: c["text"] or "empty")
def test_base64url_vectors(case: dict[str, str]) -> None:
    assert b64e(h(case["hex"])) == case["text"]
    assert b64d(case["text"]) == h(case["hex"])


@pytest.mark.parametrize("text", VECTORS["base64url"]["invalid"])
def test_base64url_rejects_what_it_would_not_produce(text: str) -> None:
    with pytest.raises(ValueError):
        b64d(text)


def test_base64url_round_trips_every_length() -> None:
    for n in range(70):
        data = os.urandom(n)
        assert b64d(b64e(data)) == data
    with pytest.raises(ValueError):
        b64d(b"AA")  # type: ignore[arg-type]


@pytest.mark.parametrize("case", VECTORS["base58btc"]["valid"], ids=lambda c: c["text"] or "empty")
def test_base58btc_vectors(case: dict[str, str]) -> None:
    assert b58e(h(case["hex"])) == case["text"]
    assert b58d(case["text"]) == h(case["hex"])


@pytest.mark.parametrize("text", VECTORS["base58btc"]["invalid"])
def test_base58btc_rejects_characters_outside_the_alphabet(text: str) -> None:
    with pytest.raises(ValueError):
        b58d(text)


# --- X25519 and Ed25519 against the RFCs ----------------------------------------------------------


@pytest.mark.parametrize("case", VECTORS["x25519_rfc7748"]["scalar_mult"])
def test_x25519_rfc7748_section_5_2(case: dict[str, str]) -> None:
    assert x25519(h(case["scalar_hex"]), h(case["u_hex"])) == h(case["output_hex"])


def test_x25519_rfc7748_section_5_2_iterated() -> None:
    it = VECTORS["x25519_rfc7748"]["iterated"]
    k = u = h(it["start_hex"])
    for i in range(1, 1001):
        k, u = x25519(k, u), k
        if i == 1:
            assert k == h(it["after_1_hex"])
    assert k == h(it["after_1000_hex"])


def test_x25519_rfc7748_section_6_1() -> None:
    dh = VECTORS["x25519_rfc7748"]["diffie_hellman"]
    a, b = h(dh["alice_private_hex"]), h(dh["bob_private_hex"])
    a_pub, b_pub = public_x25519(a), public_x25519(b)
    assert a_pub == h(dh["alice_public_hex"])
    assert b_pub == h(dh["bob_public_hex"])
    assert x25519(a, b_pub) == x25519(b, a_pub) == h(dh["shared_secret_hex"])


def test_ed25519_rfc8032_test_1() -> None:
    case = VECTORS["ed25519_rfc8032"]
    key = Ed25519PrivateKey.from_private_bytes(h(case["secret_key_hex"]))
    assert key.public_key().public_bytes_raw() == h(case["public_key_hex"])
    assert key.sign(h(case["message_hex"])) == h(case["signature_hex"])
    assert verify_signature(h(case["public_key_hex"]), h(case["signature_hex"]), h(case["message_hex"]))


# --- DIDs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", VECTORS["did"]["valid"], ids=lambda c: c["did"][-8:])
def test_did_vectors(case: dict[str, str]) -> None:
    assert did_from_signing_key(h(case["signing_key_hex"])) == case["did"]
    assert signing_key_from_did(case["did"]) == h(case["signing_key_hex"])
    if "did_key" in case:  # the same identifier as did:key
        assert case["did_key"].split(":", 2)[2] == case["did"][len(DID_PREFIX) :]


def test_did_round_trip(alice: AgentKeys) -> None:
    assert alice.did.startswith(DID_PREFIX + "z6Mk")
    assert signing_key_from_did(alice.did) == alice.public.signing_key
    assert alice.public.did == alice.did
    for _ in range(50):
        key = os.urandom(32)
        assert signing_key_from_did(did_from_signing_key(key)) == key


@pytest.mark.parametrize("did", VECTORS["did"]["invalid"])
def test_malformed_did_is_rejected(did: str) -> None:
    with pytest.raises(ValueError):
        signing_key_from_did(did)


def test_did_rejects_non_text_and_huge_input() -> None:
    with pytest.raises(ValueError):
        signing_key_from_did(b"did:agentchat:z6Mk")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="too long"):
        signing_key_from_did(DID_PREFIX + "z" + "2" * 10_000)


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_did_from_signing_key_wants_32_bytes(size: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        did_from_signing_key(bytes(size))


# --- public keys ----------------------------------------------------------------------------------


def test_agent_vector() -> None:
    v = VECTORS["agent"]
    keys = AgentKeys.from_private_bytes(h(v["signing_private_hex"]), h(v["encryption_private_hex"]))
    assert keys.public.signing_key == h(v["signing_key_hex"])
    assert keys.public.encryption_key == h(v["encryption_key_hex"])
    assert keys.did == v["did"]
    assert crypto.encryption_key_message(keys.public.encryption_key) == h(v["enc_key_message_hex"])
    assert keys.public.to_wire() == v["public_keys_wire"]  # Ed25519 signatures are deterministic
    assert PublicKeys.from_wire(v["public_keys_wire"]) == keys.public
    assert keys.private_bytes() == (h(v["signing_private_hex"]), h(v["encryption_private_hex"]))


def test_public_keys_wire_round_trip(alice: AgentKeys) -> None:
    wire = alice.public.to_wire()
    assert set(wire) == {"signing_key", "encryption_key", "encryption_key_signature"}
    assert all(isinstance(x, str) for x in wire.values())
    assert PublicKeys.from_wire(json.loads(json.dumps(wire))) == alice.public


@pytest.mark.parametrize("case", VECTORS["public_keys_invalid"], ids=lambda c: c["description"])
def test_public_keys_invalid_vectors(case: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        PublicKeys.from_wire(case["wire"])


def test_public_keys_from_wire_rejects_bad_shapes(alice: AgentKeys, bob: AgentKeys) -> None:
    wire = alice.public.to_wire()
    for bad in (
        None,
        [],
        {**wire, "extra": "x"},
        {**wire, "encryption_key": 5},
        {**wire, "encryption_key": b64e(bytes(33))},
        {**wire, "encryption_key_signature": b64e(bytes(64))},
        {**wire, "encryption_key_signature": bob.public.to_wire()["encryption_key_signature"]},
    ):
        with pytest.raises(ValueError):
            PublicKeys.from_wire(bad)


def test_public_keys_constructor_checks_sizes_and_signature(alice: AgentKeys) -> None:
    pk = alice.public
    with pytest.raises(ValueError, match="signing_key.*32 bytes"):
        PublicKeys(pk.signing_key[:31], pk.encryption_key, pk.encryption_key_signature)
    with pytest.raises(ValueError, match="encryption_key.*32 bytes"):
        PublicKeys(pk.signing_key, pk.encryption_key + b"\0", pk.encryption_key_signature)
    with pytest.raises(ValueError, match="64 bytes"):
        PublicKeys(pk.signing_key, pk.encryption_key, pk.encryption_key_signature[:63])
    with pytest.raises(ValueError, match="does not verify"):
        PublicKeys(pk.signing_key, os.urandom(32), pk.encryption_key_signature)


# --- signatures, registration, login --------------------------------------------------------------


def test_registration_vector() -> None:
    v, a = VECTORS["registration"], VECTORS["agent"]
    public = PublicKeys.from_wire(a["public_keys_wire"])
    message = registration_message(v["name"], public, v["timestamp_ms"])
    assert message == h(v["message_hex"]) == v["message"].encode()
    assert verify_signature(public.signing_key, h(v["signature_hex"]), message)
    keys = AgentKeys.from_private_bytes(h(a["signing_private_hex"]), h(a["encryption_private_hex"]))
    assert keys.sign(message) == h(v["signature_hex"])


def test_login_vector() -> None:
    v = VECTORS["login"]
    message = login_message(v["did"], v["challenge"])
    assert message == h(v["message_hex"]) == v["message"].encode()
    assert verify_signature(signing_key_from_did(v["did"]), h(v["signature_hex"]), message)


def test_registration_and_login_messages_are_plain_text(alice: AgentKeys) -> None:
    reg = registration_message("näme", alice.public, 1700000000000)
    assert reg.decode().split("\n") == [
        "agentchat/register/v1",
        "näme",
        b64e(alice.public.signing_key),
        b64e(alice.public.encryption_key),
        "1700000000000",
    ]
    assert login_message(alice.did, "abc") == f"agentchat/login/v1\n{alice.did}\nabc".encode()


@pytest.mark.parametrize("name", ["", "two\nlines", "\ud800"])
def test_registration_rejects_unsignable_names(alice: AgentKeys, name: str) -> None:
    with pytest.raises(ValueError):
        registration_message(name, alice.public, 1)


@pytest.mark.parametrize("ts", [-1, True, 1.5, 2**53, "1"])
def test_registration_rejects_bad_timestamps(alice: AgentKeys, ts: Any) -> None:
    with pytest.raises(ValueError):
        registration_message("a", alice.public, ts)


def test_login_rejects_newlines(alice: AgentKeys) -> None:
    with pytest.raises(ValueError):
        login_message(alice.did, "x\ny")
    with pytest.raises(ValueError):
        login_message(alice.did + "\n", "x")


def test_verify_signature(alice: AgentKeys, bob: AgentKeys) -> None:
    message = login_message(alice.did, "challenge")
    signature = alice.sign(message)
    assert verify_signature(alice.public.signing_key, signature, message)
    assert not verify_signature(bob.public.signing_key, signature, message)  # someone else's key
    assert not verify_signature(alice.public.signing_key, bob.sign(message), message)  # forgery
    assert not verify_signature(alice.public.signing_key, signature, message + b"x")
    assert not verify_signature(alice.public.signing_key, signature[:63], message)
    assert not verify_signature(alice.public.signing_key, bytes(64), message)
    # a login signature is no registration signature: every signed string starts with its own label
    assert not verify_signature(
        alice.public.signing_key, signature, registration_message("challenge", alice.public, 0)
    )
    with pytest.raises(ValueError, match="32 bytes"):
        verify_signature(alice.public.signing_key[:16], signature, message)


# --- epoch key wrapping ---------------------------------------------------------------------------


def test_new_epoch_key() -> None:
    keys = {new_epoch_key() for _ in range(10)}
    assert len(keys) == 10
    assert all(len(k) == 32 for k in keys)


@pytest.mark.parametrize("case", VECTORS["wrap"], ids=lambda c: c["description"][:30])
def test_wrap_vectors(case: dict[str, Any]) -> None:
    i, wire = case["inputs"], case["wire"]
    ctx = {"channel": i["channel"], "epoch": i["epoch"], "recipient": i["recipient"]}
    made = crypto._wrap_with(
        h(i["ephemeral_private_hex"]),
        h(i["nonce_hex"]),
        h(i["epoch_key_hex"]),
        h(i["recipient_public_hex"]),
        **ctx,
    )
    assert made == wire
    assert unwrap_epoch_key(wire, h(i["recipient_private_hex"]), **ctx) == h(i["epoch_key_hex"])


@pytest.mark.parametrize("case", VECTORS["wrap"], ids=lambda c: c["description"][:30])
def test_wrap_vectors_follow_the_spec_steps(case: dict[str, Any]) -> None:
    """protocol/crypto.md section "Wrapping an epoch key", step by step, straight on the primitives."""
    i, mid, wire = case["inputs"], case["intermediate"], case["wire"]
    recipient_pub = public_x25519(h(i["recipient_private_hex"]))
    assert recipient_pub == h(i["recipient_public_hex"])
    eph_pub = public_x25519(h(i["ephemeral_private_hex"]))
    assert eph_pub == h(mid["ephemeral_public_hex"]) == b64d(wire["ephemeral_key"])
    shared = x25519(h(i["ephemeral_private_hex"]), recipient_pub)
    assert shared == x25519(h(i["recipient_private_hex"]), eph_pub) == h(mid["shared_secret_hex"])
    info = f"agentchat/wrap/v1\n{i['channel']}\n{i['epoch']}\n{i['recipient']}".encode()
    assert info == h(mid["info_hex"]) == mid["info"].encode()
    assert h(mid["salt_hex"]) == eph_pub + recipient_pub
    kek = HKDF(algorithm=hashes.SHA256(), length=32, salt=eph_pub + recipient_pub, info=info).derive(shared)
    assert kek == h(mid["kek_hex"])
    assert wire["alg"] == "x25519-hkdf-sha256-aes256gcm"
    assert b64d(wire["nonce"]) == h(i["nonce_hex"])
    assert AESGCM(kek).encrypt(h(i["nonce_hex"]), h(i["epoch_key_hex"]), info) == b64d(wire["ciphertext"])


@pytest.mark.parametrize("case", VECTORS["wrap_invalid"], ids=lambda c: c["description"])
def test_wrap_invalid_vectors(case: dict[str, Any]) -> None:
    bob_private = h(VECTORS["x25519_rfc7748"]["diffie_hellman"]["bob_private_hex"])
    with pytest.raises(CryptoError):
        unwrap_epoch_key(
            case["wire"],
            bob_private,
            channel=case["channel"],
            epoch=case["epoch"],
            recipient=case["recipient"],
        )


def test_wrap_round_trip(alice: AgentKeys, bob: AgentKeys) -> None:
    key = new_epoch_key()
    ctx = {"channel": "ch1", "epoch": 7, "recipient": bob.did}
    wrapped = wrap_epoch_key(key, bob.public.encryption_key, **ctx)
    assert set(wrapped) == {"alg", "ephemeral_key", "nonce", "ciphertext"}
    assert len(b64d(wrapped["ciphertext"])) == 48
    assert unwrap_epoch_key(json.loads(json.dumps(wrapped)), bob.encryption_private_key, **ctx) == key
    again = wrap_epoch_key(key, bob.public.encryption_key, **ctx)
    assert again["ephemeral_key"] != wrapped["ephemeral_key"] and again["nonce"] != wrapped["nonce"]
    with pytest.raises(CryptoError):  # another agent's private key
        unwrap_epoch_key(wrapped, alice.encryption_private_key, **ctx)


def test_wrap_for_a_peeker_browser_key() -> None:
    browser_private = X25519PrivateKey.generate()
    browser_public = browser_private.public_key().public_bytes_raw()
    key = new_epoch_key()
    wrapped = wrap_epoch_key(key, browser_public, channel="ch1", epoch=2, recipient="peek:pk_1")
    assert unwrap_epoch_key(wrapped, browser_private, channel="ch1", epoch=2, recipient="peek:pk_1") == key
    with pytest.raises(CryptoError):
        unwrap_epoch_key(wrapped, browser_private, channel="ch1", epoch=2, recipient="peek:pk_2")


@pytest.mark.parametrize(
    "change",
    [
        {"channel": "ch2"},
        {"epoch": 8},
        {"recipient": "did:agentchat:z6MkOther"},
        {"recipient": "peek:pk_1"},
    ],
    ids=lambda c: next(iter(c)),
)
def test_unwrap_fails_for_other_context(bob: AgentKeys, change: dict[str, Any]) -> None:
    ctx = {"channel": "ch1", "epoch": 7, "recipient": bob.did}
    wrapped = wrap_epoch_key(new_epoch_key(), bob.public.encryption_key, **ctx)
    with pytest.raises(CryptoError):
        unwrap_epoch_key(wrapped, bob.encryption_private_key, **{**ctx, **change})


@pytest.mark.parametrize("field", ["ephemeral_key", "nonce", "ciphertext"])
@pytest.mark.parametrize("index", [0, -1])
def test_unwrap_detects_tampering(bob: AgentKeys, field: str, index: int) -> None:
    ctx = {"channel": "ch1", "epoch": 7, "recipient": bob.did}
    wrapped = wrap_epoch_key(new_epoch_key(), bob.public.encryption_key, **ctx)
    raw = bytearray(b64d(wrapped[field]))
    raw[index] ^= 0x01
    with pytest.raises(CryptoError):
        unwrap_epoch_key({**wrapped, field: b64e(bytes(raw))}, bob.encryption_private_key, **ctx)


def test_unwrap_rejects_malformed_objects(bob: AgentKeys) -> None:
    ctx = {"channel": "ch1", "epoch": 7, "recipient": bob.did}
    wrapped = wrap_epoch_key(new_epoch_key(), bob.public.encryption_key, **ctx)
    for bad in (
        None,
        "x",
        {k: v for k, v in wrapped.items() if k != "nonce"},
        {**wrapped, "alg": "none"},
        {**wrapped, "nonce": 12},
        {**wrapped, "nonce": wrapped["nonce"] + "="},
        {**wrapped, "nonce": b64e(bytes(16))},
        {**wrapped, "ephemeral_key": b64e(bytes(31))},
        {**wrapped, "ciphertext": b64e(bytes(32))},
    ):
        with pytest.raises(CryptoError):
            unwrap_epoch_key(bad, bob.encryption_private_key, **ctx)  # type: ignore[arg-type]


def test_wrap_refuses_a_low_order_recipient_key() -> None:
    with pytest.raises(CryptoError, match="all zeros"):
        wrap_epoch_key(new_epoch_key(), bytes(32), channel="c", epoch=0, recipient="peek:x")


def test_wrap_argument_checks(bob: AgentKeys) -> None:
    pub = bob.public.encryption_key
    with pytest.raises(ValueError, match="epoch key must be 32 bytes"):
        wrap_epoch_key(bytes(16), pub, channel="c", epoch=0, recipient=bob.did)
    with pytest.raises(ValueError, match="recipient X25519 public key must be 32 bytes"):
        wrap_epoch_key(bytes(32), pub[:31], channel="c", epoch=0, recipient=bob.did)
    with pytest.raises(ValueError, match="newline"):
        wrap_epoch_key(bytes(32), pub, channel="c\n0", epoch=0, recipient=bob.did)
    with pytest.raises(ValueError, match="epoch"):
        wrap_epoch_key(bytes(32), pub, channel="c", epoch=-1, recipient=bob.did)
    with pytest.raises(ValueError, match="empty"):
        wrap_epoch_key(bytes(32), pub, channel="c", epoch=0, recipient="")
    with pytest.raises(ValueError, match="X25519 private key must be 32 bytes"):
        unwrap_epoch_key({}, bytes(31), channel="c", epoch=0, recipient=bob.did)


# --- message envelopes ----------------------------------------------------------------------------


def _vector_signer(case: dict[str, Any]) -> AgentKeys:
    # The encryption half does not matter to a seal; any valid scalar will do.
    return AgentKeys.from_private_bytes(h(case["inputs"]["signer_private_hex"]), bytes(32))


@pytest.mark.parametrize("case", VECTORS["seal"], ids=lambda c: c["description"][:30])
def test_seal_vectors(case: dict[str, Any]) -> None:
    i, wire = case["inputs"], case["wire"]
    signer = _vector_signer(case)
    assert signer.did == i["sender"]
    ctx = {"channel": i["channel"], "sender": i["sender"], "client_id": i["client_id"]}
    made = crypto._seal_with(
        h(i["nonce_hex"]),
        h(i["epoch_key_hex"]),
        h(i["plaintext_hex"]),
        epoch=i["epoch"],
        signer=signer,
        **ctx,
    )
    assert made == wire
    signing_key = h(i["sender_signing_key_hex"])
    plaintext = open_envelope(wire, h(i["epoch_key_hex"]), sender_signing_key=signing_key, **ctx)
    assert plaintext == h(i["plaintext_hex"])


@pytest.mark.parametrize("case", VECTORS["seal"], ids=lambda c: c["description"][:30])
def test_seal_vectors_follow_the_spec_steps(case: dict[str, Any]) -> None:
    """protocol/crypto.md section "Message envelopes", step by step, straight on the primitives."""
    i, mid, wire = case["inputs"], case["intermediate"], case["wire"]
    fields = f"{i['channel']}\n{i['epoch']}\n{i['sender']}\n{i['client_id']}"
    aad = f"agentchat/msg/v1\n{fields}".encode()
    assert aad == h(mid["aad_hex"]) == mid["aad"].encode()
    ciphertext = AESGCM(h(i["epoch_key_hex"])).encrypt(h(i["nonce_hex"]), h(i["plaintext_hex"]), aad)
    assert b64e(ciphertext) == wire["ciphertext"]
    assert wire["nonce"] == b64e(h(i["nonce_hex"])) and wire["epoch"] == i["epoch"]
    sig_input = f"agentchat/msg-sig/v1\n{fields}\n{wire['nonce']}\n{wire['ciphertext']}".encode()
    assert sig_input == h(mid["signature_input_hex"]) == mid["signature_input"].encode()
    signer = Ed25519PrivateKey.from_private_bytes(h(i["signer_private_hex"]))
    assert signer.public_key().public_bytes_raw() == h(i["sender_signing_key_hex"])
    assert signer.sign(sig_input) == b64d(wire["signature"])


@pytest.mark.parametrize("case", VECTORS["open_invalid"], ids=lambda c: c["description"])
def test_open_invalid_vectors(case: dict[str, Any]) -> None:
    key_hex = case["sender_signing_key_hex"]
    with pytest.raises(CryptoError) as exc:
        open_envelope(
            case["wire"],
            h(VECTORS["open_invalid_epoch_key_hex"]),
            channel=case["channel"],
            sender=case["sender"],
            client_id=case["client_id"],
            sender_signing_key=None if key_hex is None else h(key_hex),
        )
    assert (str(exc.value) == "bad signature") == (case["error"] == "signature")


def _sealed(alice: AgentKeys, plaintext: bytes = b"hi bob") -> tuple[bytes, dict[str, Any], dict[str, Any]]:
    key = new_epoch_key()
    ctx = {"channel": "ch1", "sender": alice.did, "client_id": "c-1"}
    envelope = seal(key, plaintext, epoch=4, signer=alice, **ctx)
    return key, envelope, ctx


def test_seal_round_trip(alice: AgentKeys) -> None:
    key, envelope, ctx = _sealed(alice, "héllo ✓".encode())
    assert set(envelope) == {"epoch", "nonce", "ciphertext", "signature"}
    assert envelope["epoch"] == 4
    envelope = json.loads(json.dumps(envelope))
    signing_key = signing_key_from_did(alice.did)
    assert open_envelope(envelope, key, sender_signing_key=signing_key, **ctx) == "héllo ✓".encode()
    assert open_envelope(envelope, key, sender_signing_key=None, **ctx) == "héllo ✓".encode()
    empty = seal(key, b"", epoch=0, signer=alice, **ctx)
    assert len(b64d(empty["ciphertext"])) == 16  # just the tag
    assert open_envelope(empty, key, sender_signing_key=signing_key, **ctx) == b""


def test_two_seals_of_the_same_text_differ(alice: AgentKeys) -> None:
    key, envelope, ctx = _sealed(alice)
    other = seal(key, b"hi bob", epoch=4, signer=alice, **ctx)
    assert other["nonce"] != envelope["nonce"] and other["ciphertext"] != envelope["ciphertext"]


@pytest.mark.parametrize("field", ["ciphertext", "nonce", "signature"])
@pytest.mark.parametrize("index", [0, -1])
def test_open_detects_tampered_envelope_fields(alice: AgentKeys, field: str, index: int) -> None:
    key, envelope, ctx = _sealed(alice)
    raw = bytearray(b64d(envelope[field]))
    raw[index] ^= 0x80
    tampered = {**envelope, field: b64e(bytes(raw))}
    with pytest.raises(CryptoError, match="bad signature"):
        open_envelope(tampered, key, sender_signing_key=alice.public.signing_key, **ctx)
    if field != "signature":  # without the signature check, AES-GCM still catches it
        with pytest.raises(CryptoError, match="does not decrypt"):
            open_envelope(tampered, key, sender_signing_key=None, **ctx)


def test_open_detects_a_changed_epoch(alice: AgentKeys) -> None:
    key, envelope, ctx = _sealed(alice)
    with pytest.raises(CryptoError, match="bad signature"):
        open_envelope({**envelope, "epoch": 5}, key, sender_signing_key=alice.public.signing_key, **ctx)
    with pytest.raises(CryptoError, match="does not decrypt"):
        open_envelope({**envelope, "epoch": 5}, key, sender_signing_key=None, **ctx)


@pytest.mark.parametrize(
    "change", [{"channel": "ch2"}, {"client_id": "c-2"}, {"sender": "did:agentchat:z6MkOther"}], ids=str
)
def test_open_detects_changed_associated_data(alice: AgentKeys, change: dict[str, str]) -> None:
    key, envelope, ctx = _sealed(alice)
    with pytest.raises(CryptoError, match="bad signature"):
        open_envelope(envelope, key, sender_signing_key=alice.public.signing_key, **{**ctx, **change})
    with pytest.raises(CryptoError, match="does not decrypt"):
        open_envelope(envelope, key, sender_signing_key=None, **{**ctx, **change})


def test_open_with_the_wrong_epoch_key_fails(alice: AgentKeys) -> None:
    _, envelope, ctx = _sealed(alice)
    with pytest.raises(CryptoError, match="does not decrypt"):
        open_envelope(envelope, new_epoch_key(), sender_signing_key=alice.public.signing_key, **ctx)


def test_forged_sender_is_caught(alice: AgentKeys, bob: AgentKeys) -> None:
    """Bob holds the epoch key too, but cannot write in Alice's name."""
    key = new_epoch_key()
    ctx = {"channel": "ch1", "sender": alice.did, "client_id": "c-1"}
    forged = seal(key, b"I owe bob $100", epoch=1, signer=bob, **ctx)
    with pytest.raises(CryptoError, match="bad signature"):
        open_envelope(forged, key, sender_signing_key=signing_key_from_did(alice.did), **ctx)
    # a signature moved from a real message of Alice's does not cover the new ciphertext
    real = seal(key, b"hello", epoch=1, signer=alice, **ctx)
    moved = {**forged, "signature": real["signature"]}
    with pytest.raises(CryptoError, match="bad signature"):
        open_envelope(moved, key, sender_signing_key=alice.public.signing_key, **ctx)


def test_open_rejects_malformed_envelopes(alice: AgentKeys) -> None:
    key, envelope, ctx = _sealed(alice)
    for bad in (
        None,
        [],
        {k: v for k, v in envelope.items() if k != "epoch"},
        {k: v for k, v in envelope.items() if k != "signature"},
        {**envelope, "epoch": "4"},
        {**envelope, "epoch": True},
        {**envelope, "epoch": -1},
        {**envelope, "nonce": b64e(bytes(11))},
        {**envelope, "ciphertext": b64e(bytes(15))},
        {**envelope, "ciphertext": envelope["ciphertext"] + "*"},
        {**envelope, "signature": b64e(bytes(63))},
    ):
        with pytest.raises(CryptoError):
            open_envelope(
                bad, key, sender_signing_key=alice.public.signing_key, **ctx  # type: ignore[arg-type]
            )
    with pytest.raises(CryptoError):  # received fields that could never have been sealed
        open_envelope(envelope, key, sender_signing_key=None, **{**ctx, "client_id": "c\n1"})


def test_seal_argument_checks(alice: AgentKeys) -> None:
    ctx = {"channel": "ch1", "sender": alice.did, "client_id": "c-1"}
    with pytest.raises(ValueError, match="epoch key must be 32 bytes"):
        seal(bytes(31), b"x", epoch=0, signer=alice, **ctx)
    with pytest.raises(ValueError, match="plaintext must be bytes"):
        seal(bytes(32), "x", epoch=0, signer=alice, **ctx)  # type: ignore[arg-type]
    for field in ("channel", "sender", "client_id"):
        with pytest.raises(ValueError, match="newline"):
            seal(bytes(32), b"x", epoch=0, signer=alice, **{**ctx, field: "a\nb"})
        with pytest.raises(ValueError, match="empty"):
            seal(bytes(32), b"x", epoch=0, signer=alice, **{**ctx, field: ""})
    for epoch in (-1, True, 2**53, 1.0):
        with pytest.raises(ValueError, match="epoch"):
            seal(bytes(32), b"x", epoch=epoch, signer=alice, **ctx)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="epoch key must be 32 bytes"):
        open_envelope({}, bytes(16), sender_signing_key=None, **ctx)
    with pytest.raises(ValueError, match="sender signing key must be 32 bytes"):
        open_envelope({}, bytes(32), sender_signing_key=bytes(31), **ctx)


# --- key files ------------------------------------------------------------------------------------


@posix_only
def test_key_file_is_private_and_round_trips(tmp_path: Path, alice: AgentKeys) -> None:
    path = tmp_path / "nested" / "dir" / "agent.json"
    alice.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0
    assert sorted(p.name for p in path.parent.iterdir()) == ["agent.json"]  # no temporary file left
    content = json.loads(path.read_text())
    assert set(content) == {"version", "signing_private", "encryption_private", "did"}
    assert content["version"] == 1 and content["did"] == alice.did
    loaded = AgentKeys.load(path)
    assert loaded.did == alice.did
    assert loaded.public == alice.public
    assert loaded.private_bytes() == alice.private_bytes()
    message = b"data"
    assert verify_signature(alice.public.signing_key, loaded.sign(message), message)


@posix_only
def test_key_file_mode_ignores_a_permissive_umask(tmp_path: Path, alice: AgentKeys) -> None:
    old = os.umask(0)
    try:
        alice.save(tmp_path / "agent.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "agent.json").stat().st_mode) == 0o600


def test_save_does_not_replace_an_identity_unless_asked(
    tmp_path: Path, alice: AgentKeys, bob: AgentKeys
) -> None:
    path = tmp_path / "agent.json"
    alice.save(path)
    with pytest.raises(FileExistsError):
        bob.save(path)
    assert AgentKeys.load(path).did == alice.did
    bob.save(path, overwrite=True)
    assert AgentKeys.load(path).did == bob.did
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.json"]
    if os.name == "posix":
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


@posix_only
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o644])
def test_load_refuses_a_key_file_others_can_access(tmp_path: Path, alice: AgentKeys, mode: int) -> None:
    path = tmp_path / "agent.json"
    alice.save(path)
    path.chmod(mode)
    with pytest.raises(ValueError, match="chmod 600"):
        AgentKeys.load(path)


def _write_private(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o600)


def test_load_validates_contents(tmp_path: Path, alice: AgentKeys, bob: AgentKeys) -> None:
    good = alice.to_json()
    path = tmp_path / "agent.json"
    for bad in (
        "not json",
        "[]",
        json.dumps({**good, "did": bob.did}),
        json.dumps({**good, "version": 2}),
        json.dumps({**good, "version": True}),
        json.dumps({**good, "extra": 1}),
        json.dumps({k: v for k, v in good.items() if k != "did"}),
        json.dumps({**good, "signing_private": b64e(bytes(31))}),
        json.dumps({**good, "encryption_private": "!!"}),
        json.dumps({**good, "signing_private": 7}),
    ):
        _write_private(path, bad)
        with pytest.raises(ValueError):
            AgentKeys.load(path)
    with pytest.raises(FileNotFoundError):
        AgentKeys.load(tmp_path / "missing.json")


def test_agent_keys_never_show_private_keys(alice: AgentKeys) -> None:
    signing_private, encryption_private = alice.private_bytes()
    text = repr(alice)
    assert alice.did in text
    assert b64e(signing_private) not in text and b64e(encryption_private) not in text
    assert signing_private.hex() not in text


def test_from_private_bytes_checks_sizes() -> None:
    with pytest.raises(ValueError, match="Ed25519 seed must be 32 bytes"):
        AgentKeys.from_private_bytes(bytes(31), bytes(32))
    with pytest.raises(ValueError, match="X25519 private key must be 32 bytes"):
        AgentKeys.from_private_bytes(bytes(32), bytes(33))


def test_load_or_create(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "agent.json"
    first = AgentKeys.load_or_create(path)
    assert path.exists()
    again = AgentKeys.load_or_create(path)
    assert again.did == first.did and again.private_bytes() == first.private_bytes()
