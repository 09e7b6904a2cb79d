"""Write the wrap and seal vectors of protocol/vectors/crypto.json (``wrap``, ``wrap_invalid``, ``seal``,
``open_invalid``) from the fixed inputs below, with ``agentchat.crypto`` as the reference.

    python protocol/gen_crypto_vectors.py          # rewrite those sections of protocol/vectors/crypto.json
    python protocol/gen_crypto_vectors.py --check  # exit 1 if they are out of date

The main vectors use values the server accepts (``frames/defs.json``: a channel id is ``ch_`` + 16 to 32
characters, a peek id ``pk_`` + 16 to 32, an epoch 0 .. 2^31-1), so a client can replay them through a
server. The vectors with an ``edge_case`` field check the encoding at its edges (non-ASCII text, epoch
2^53-1) and are outside what the server accepts; ``tests/unit/test_crypto.py`` holds both to that.
The other sections (RFC vectors, DIDs, the agent, registration, login) are written by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey  # noqa: E402

from agentchat import crypto  # noqa: E402
from agentchat.crypto import AgentKeys, b64d, b64e  # noqa: E402

TARGET = HERE / "vectors" / "crypto.json"

# RFC 7748 section 6.1: Alice's key is the first wrap's ephemeral key, Bob's the agent's encryption key.
ALICE_PRIVATE = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"
BOB_PRIVATE = "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"
# RFC 8032 TEST 1: the agent's signing key (its DID is AGENT); OTHER signs for another agent.
AGENT_SIGNING_PRIVATE = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"
OTHER_SIGNING_PRIVATE = "01" * 32
EPOCH_KEY = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
OTHER_EPOCH_KEY = "a5" * 32

CHANNEL = "ch_7f3a9c2e4b1d8a60"
OTHER_CHANNEL = "ch_7f3a9c2e4b1d8a61"
PEEK_CHANNEL = "ch_Lx-4q_Ze9TbW2uYkR0vN7c"
PEEK_RECIPIENT = "peek:pk_01HV8XR2M4N6P8Q0TS"
MAX_EPOCH = 2**31 - 1


def _signer(private_hex: str) -> AgentKeys:
    return AgentKeys.from_private_bytes(bytes.fromhex(private_hex), bytes(32))


AGENT = _signer(AGENT_SIGNING_PRIVATE).did
OTHER = _signer(OTHER_SIGNING_PRIVATE).did


def _public(private_hex: str) -> str:
    return X25519PrivateKey.from_private_bytes(bytes.fromhex(private_hex)).public_key().public_bytes_raw().hex()


def wrap_vector(description: str, *, epoch_key: str, recipient_private: str, channel: str, epoch: int,
                recipient: str, ephemeral_private: str, nonce: str, edge_case: str = "") -> dict[str, Any]:
    recipient_public = _public(recipient_private)
    ephemeral_public = _public(ephemeral_private)
    shared = X25519PrivateKey.from_private_bytes(bytes.fromhex(ephemeral_private)).exchange(
        X25519PublicKey.from_public_bytes(bytes.fromhex(recipient_public)))
    info = crypto.wrap_info(channel=channel, epoch=epoch, recipient=recipient)
    salt = bytes.fromhex(ephemeral_public + recipient_public)
    vector: dict[str, Any] = {"description": description}
    if edge_case:
        vector["edge_case"] = edge_case
    vector["inputs"] = {
        "epoch_key_hex": epoch_key, "recipient_private_hex": recipient_private, "recipient_public_hex": recipient_public,
        "channel": channel, "epoch": epoch, "recipient": recipient, "ephemeral_private_hex": ephemeral_private,
        "nonce_hex": nonce,
    }
    vector["intermediate"] = {
        "ephemeral_public_hex": ephemeral_public, "shared_secret_hex": shared.hex(), "salt_hex": salt.hex(),
        "info": info.decode(), "info_hex": info.hex(),
        "kek_hex": crypto._kek(shared, bytes.fromhex(ephemeral_public), bytes.fromhex(recipient_public), info).hex(),
    }
    vector["wire"] = crypto._wrap_with(bytes.fromhex(ephemeral_private), bytes.fromhex(nonce), bytes.fromhex(epoch_key),
                                       bytes.fromhex(recipient_public), channel=channel, epoch=epoch, recipient=recipient)
    return vector


def seal_vector(description: str, *, epoch_key: str, plaintext: bytes, channel: str, epoch: int, signer: str,
                client_id: str, nonce: str, edge_case: str = "") -> dict[str, Any]:
    keys = _signer(signer)
    sender = keys.did
    wire = crypto._seal_with(bytes.fromhex(nonce), bytes.fromhex(epoch_key), plaintext, channel=channel, epoch=epoch,
                             sender=sender, client_id=client_id, signer=keys)
    aad = crypto.message_aad(channel=channel, epoch=epoch, sender=sender, client_id=client_id)
    signature_input = crypto.message_signature_input(channel=channel, epoch=epoch, sender=sender, client_id=client_id,
                                                     nonce=b64d(wire["nonce"]), ciphertext=b64d(wire["ciphertext"]))
    vector: dict[str, Any] = {"description": description}
    if edge_case:
        vector["edge_case"] = edge_case
    vector["inputs"] = {
        "epoch_key_hex": epoch_key, "plaintext_hex": plaintext.hex(), "channel": channel, "epoch": epoch,
        "sender": sender, "client_id": client_id, "signer_private_hex": signer,
        "sender_signing_key_hex": keys.public.signing_key.hex(), "nonce_hex": nonce,
    }
    vector["intermediate"] = {"aad": aad.decode(), "aad_hex": aad.hex(), "signature_input": signature_input.decode(),
                              "signature_input_hex": signature_input.hex()}
    vector["wire"] = wire
    return vector


def _flip(text: str, index: int = 0) -> str:
    raw = bytearray(b64d(text))
    raw[index] ^= 0x01
    return b64e(bytes(raw))


def wrap_vectors() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    member = wrap_vector(
        "member: ephemeral key is RFC 7748 Alice's, recipient is the agent (Bob's key), so the shared secret is the RFC's",
        epoch_key=EPOCH_KEY, recipient_private=BOB_PRIVATE, channel=CHANNEL, epoch=3, recipient=AGENT,
        ephemeral_private=ALICE_PRIVATE, nonce="000102030405060708090a0b")
    valid = [
        member,
        wrap_vector("peeker: browser-generated key, the channel's first epoch",
                    epoch_key=OTHER_EPOCH_KEY, recipient_private="22" * 32, channel=PEEK_CHANNEL, epoch=1,
                    recipient=PEEK_RECIPIENT, ephemeral_private="11" * 32, nonce="ff" * 12),
        wrap_vector("member, the largest epoch the server accepts (2^31-1)",
                    epoch_key=OTHER_EPOCH_KEY, recipient_private=BOB_PRIVATE, channel=CHANNEL, epoch=MAX_EPOCH,
                    recipient=AGENT, ephemeral_private="33" * 32, nonce="0a" * 12),
        wrap_vector("encoding edge case: non-ASCII channel, epoch 0, short peek id",
                    edge_case="outside what the server accepts (frames/defs.json): checks UTF-8 text and a short "
                              "recipient in the info string",
                    epoch_key=OTHER_EPOCH_KEY, recipient_private="22" * 32, channel="général ✓", epoch=0,
                    recipient="peek:pk_01HV8XR2", ephemeral_private="11" * 32, nonce="ff" * 12),
    ]
    wire = member["wire"]
    context = {"channel": CHANNEL, "epoch": 3, "recipient": AGENT}
    ciphertext = b64d(wire["ciphertext"])
    invalid = [
        ("ciphertext bit flipped", {**wire, "ciphertext": _flip(wire["ciphertext"], 0)}, {}),
        ("tag bit flipped", {**wire, "ciphertext": _flip(wire["ciphertext"], len(ciphertext) - 16)}, {}),
        ("nonce bit flipped", {**wire, "nonce": _flip(wire["nonce"])}, {}),
        ("ephemeral key bit flipped", {**wire, "ephemeral_key": _flip(wire["ephemeral_key"])}, {}),
        ("other channel", wire, {"channel": OTHER_CHANNEL}),
        ("other epoch", wire, {"epoch": 4}),
        ("other recipient (wrapped for a member, opened as a peeker)", wire, {"recipient": PEEK_RECIPIENT}),
        ("low-order ephemeral key (all-zero shared secret)", {**wire, "ephemeral_key": b64e(bytes(32))}, {}),
        ("unknown alg", {**wire, "alg": "x25519-hkdf-sha256-aes128gcm"}, {}),
        ("ciphertext truncated", {**wire, "ciphertext": b64e(ciphertext[:-1])}, {}),
    ]
    return valid, [{"description": d, "wire": w, **context, **change} for d, w, change in invalid]


def seal_vectors() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    member = seal_vector("member message, the epoch key from the first wrap vector",
                         epoch_key=EPOCH_KEY, plaintext=b"hello, channel", channel=CHANNEL, epoch=3,
                         signer=AGENT_SIGNING_PRIVATE, client_id="m-0001", nonce="0c0b0a090807060504030201")
    valid = [
        member,
        seal_vector("non-ASCII text, a UUID client id", epoch_key=OTHER_EPOCH_KEY, plaintext="héllo ✓ 🔐".encode(),
                    channel=PEEK_CHANNEL, epoch=1, signer=OTHER_SIGNING_PRIVATE,
                    client_id="c1d2e3f4-0000-4000-8000-000000000001", nonce="00" * 12),
        seal_vector("empty plaintext, the largest epoch the server accepts (2^31-1)", epoch_key=EPOCH_KEY,
                    plaintext=b"", channel=CHANNEL, epoch=MAX_EPOCH, signer=AGENT_SIGNING_PRIVATE,
                    client_id="m-0002", nonce="ee" * 12),
        seal_vector("encoding edge case: non-ASCII channel, epoch 2^53-1",
                    edge_case="outside what the server accepts (frames/defs.json): checks UTF-8 text and the "
                              "largest integer a JavaScript number holds exactly in the signed strings",
                    epoch_key=OTHER_EPOCH_KEY, plaintext="héllo ✓ 🔐".encode(), channel="général ✓",
                    epoch=2**53 - 1, signer=OTHER_SIGNING_PRIVATE, client_id="m-0003", nonce="00" * 12),
    ]
    wire = member["wire"]
    frame = {"channel": CHANNEL, "sender": AGENT, "client_id": "m-0001",
             "sender_signing_key_hex": member["inputs"]["sender_signing_key_hex"]}
    other_signature = _signer(OTHER_SIGNING_PRIVATE).sign(crypto.message_signature_input(
        channel=CHANNEL, epoch=3, sender=AGENT, client_id="m-0001", nonce=b64d(wire["nonce"]),
        ciphertext=b64d(wire["ciphertext"])))
    unsigned = {"sender_signing_key_hex": None}
    invalid = [
        ("ciphertext bit flipped", {**wire, "ciphertext": _flip(wire["ciphertext"])}, {}, "signature"),
        ("nonce bit flipped", {**wire, "nonce": _flip(wire["nonce"])}, {}, "signature"),
        ("epoch changed", {**wire, "epoch": 4}, {}, "signature"),
        ("other channel", wire, {"channel": OTHER_CHANNEL}, "signature"),
        ("other sender", wire, {"sender": OTHER}, "signature"),
        ("other client_id", wire, {"client_id": "m-0002"}, "signature"),
        ("signed by another key than the sender's", {**wire, "signature": b64e(other_signature)}, {}, "signature"),
        ("signature bit flipped", {**wire, "signature": _flip(wire["signature"])}, {}, "signature"),
        ("ciphertext bit flipped, signature not checked", {**wire, "ciphertext": _flip(wire["ciphertext"])},
         unsigned, "decrypt"),
        ("other client_id, signature not checked", wire, {"client_id": "m-0002", **unsigned}, "decrypt"),
    ]
    return valid, [{"description": d, "wire": w, **frame, **change, "error": e} for d, w, change, e in invalid]


def render(current: dict[str, Any]) -> str:
    wrap, wrap_invalid = wrap_vectors()
    seal, open_invalid = seal_vectors()
    vectors = {**current, "wrap": wrap, "wrap_invalid": wrap_invalid, "seal": seal, "open_invalid": open_invalid,
               "open_invalid_epoch_key_hex": EPOCH_KEY}
    return json.dumps(vectors, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    current_text = TARGET.read_text(encoding="utf-8")
    text = render(json.loads(current_text))
    if "--check" in argv:
        if text != current_text:
            print(f"{TARGET} is out of date: run python protocol/gen_crypto_vectors.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
