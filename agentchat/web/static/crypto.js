// The peeker's cryptography, on the browser's WebCrypto only (protocol/crypto.md sections 1, 3, 5, 6
// and 9): a fresh X25519 key made here, the channel's epoch keys unwrapped with it, and messages
// opened (Ed25519 signature checked where the browser has Ed25519, then AES-256-GCM). The private key
// is made non-extractable: nothing, this code included, can read it back out of the browser.
//
// `selfTest(vectors)` checks all of this against protocol/vectors/crypto.json (the tests run it).

const subtle = globalThis.crypto.subtle;
const utf8 = new TextEncoder();
const utf8Decoder = new TextDecoder("utf-8", { fatal: true });

export const WRAP_ALG = "x25519-hkdf-sha256-aes256gcm";

export class CryptoError extends Error {
  constructor(message) {
    super(message);
    this.name = "CryptoError";
  }
}

// ------------------------------------------------------------------------------ encodings

const B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
const B64URL_RE = /^[A-Za-z0-9_-]*$/;

export function b64e(bytes) {
  let out = "";
  for (let i = 0; i < bytes.length; i += 3) {
    const n = (bytes[i] << 16) | ((bytes[i + 1] ?? 0) << 8) | (bytes[i + 2] ?? 0);
    const chars = Math.min(4, Math.ceil(((bytes.length - i) * 8) / 6));
    for (let c = 0; c < chars; c++) out += B64URL[(n >> (18 - 6 * c)) & 63];
  }
  return out;
}

/** Strict unpadded base64url (crypto.md section 1): exactly one accepted text per byte string. */
export function b64d(text, length) {
  if (typeof text !== "string" || !B64URL_RE.test(text) || text.length % 4 === 1) {
    throw new CryptoError("not unpadded base64url");
  }
  const bytes = new Uint8Array(Math.floor((text.length * 3) / 4));
  let bits = 0;
  let value = 0;
  let at = 0;
  for (const char of text) {
    value = (value << 6) | B64URL.indexOf(char);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      bytes[at++] = (value >> bits) & 0xff;
    }
  }
  if (value & ((1 << bits) - 1)) throw new CryptoError("non-zero unused bits in base64url");
  if (length !== undefined && bytes.length !== length) throw new CryptoError(`expected ${length} bytes`);
  return bytes;
}

export function toHex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export function fromHex(text) {
  const bytes = new Uint8Array(text.length / 2);
  for (let i = 0; i < bytes.length; i++) bytes[i] = parseInt(text.slice(2 * i, 2 * i + 2), 16);
  return bytes;
}

export function concat(a, b) {
  const out = new Uint8Array(a.length + b.length);
  out.set(a, 0);
  out.set(b, a.length);
  return out;
}

function equalBytes(a, b) {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

const B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

export function b58e(bytes) {
  const digits = [];
  for (const byte of bytes) {
    let carry = byte;
    for (let i = 0; i < digits.length; i++) {
      carry += digits[i] << 8;
      digits[i] = carry % 58;
      carry = Math.floor(carry / 58);
    }
    while (carry) {
      digits.push(carry % 58);
      carry = Math.floor(carry / 58);
    }
  }
  let out = "";
  for (const byte of bytes) {
    if (byte !== 0) break;
    out += "1";
  }
  return out + digits.reverse().map((d) => B58[d]).join("");
}

export function b58d(text) {
  const bytes = [];
  for (const char of text) {
    let carry = B58.indexOf(char);
    if (carry < 0) throw new CryptoError("not base58btc");
    for (let i = 0; i < bytes.length; i++) {
      carry += bytes[i] * 58;
      bytes[i] = carry & 0xff;
      carry >>= 8;
    }
    while (carry) {
      bytes.push(carry & 0xff);
      carry >>= 8;
    }
  }
  let zeros = 0;
  while (zeros < text.length && text[zeros] === "1") zeros++;
  return new Uint8Array([...new Array(zeros).fill(0), ...bytes.reverse()]);
}

// ------------------------------------------------------------------------------ DIDs and byte strings

const DID_PREFIX = "did:agentchat:z";

/** The Ed25519 public key a DID encodes (crypto.md section 3); throws for anything else. */
export function signingKeyFromDid(did) {
  if (typeof did !== "string" || !did.startsWith(DID_PREFIX)) throw new CryptoError("not a did:agentchat DID");
  const raw = b58d(did.slice(DID_PREFIX.length));
  if (raw.length !== 34 || raw[0] !== 0xed || raw[1] !== 0x01) throw new CryptoError("not an Ed25519 DID");
  if (b58e(raw) !== did.slice(DID_PREFIX.length)) throw new CryptoError("not the canonical DID text");
  return raw.slice(2);
}

function text(value, name) {
  if (typeof value !== "string" || value === "" || value.includes("\n")) {
    throw new CryptoError(`${name} must be non-empty text without a line feed`);
  }
  return value;
}

function integer(value, name) {
  if (!Number.isSafeInteger(value) || value < 0) throw new CryptoError(`${name} must be an integer >= 0`);
  return String(value);
}

export function wrapInfo(channel, epoch, recipient) {
  return `agentchat/wrap/v1\n${text(channel, "channel")}\n${integer(epoch, "epoch")}\n${text(recipient, "recipient")}`;
}

export function messageAad(channel, epoch, sender, clientId) {
  return `agentchat/msg/v1\n${text(channel, "channel")}\n${integer(epoch, "epoch")}\n${text(sender, "sender")}\n${text(clientId, "client_id")}`;
}

export function signatureInput(channel, epoch, sender, clientId, nonce, ciphertext) {
  return `agentchat/msg-sig/v1\n${text(channel, "channel")}\n${integer(epoch, "epoch")}\n${text(sender, "sender")}\n` +
    `${text(clientId, "client_id")}\n${nonce}\n${ciphertext}`;
}

// ------------------------------------------------------------------------------ keys

/** The peeker's key pair: the private half cannot be exported; the public half goes to the server. */
export async function newPeekerKey() {
  const pair = await subtle.generateKey({ name: "X25519" }, false, ["deriveBits"]);
  const publicRaw = new Uint8Array(await subtle.exportKey("raw", pair.publicKey));
  return { privateKey: pair.privateKey, publicRaw, publicB64: b64e(publicRaw) };
}

/** A known X25519 private key (test vectors only: a real peeker never imports one). */
export async function importX25519Private(privateRaw, publicRaw) {
  const jwk = { kty: "OKP", crv: "X25519", d: b64e(privateRaw), x: b64e(publicRaw) };
  return subtle.importKey("jwk", jwk, { name: "X25519" }, false, ["deriveBits"]);
}

async function x25519(privateKey, publicRaw) {
  let shared;
  try {
    const peer = await subtle.importKey("raw", publicRaw, { name: "X25519" }, false, []);
    shared = new Uint8Array(await subtle.deriveBits({ name: "X25519", public: peer }, privateKey, 256));
  } catch (err) {
    throw new CryptoError("X25519 failed (low-order key)");
  }
  if (shared.every((b) => b === 0)) throw new CryptoError("X25519 gave the all-zero secret");
  return shared;
}

async function hkdf(ikm, salt, info) {
  const key = await subtle.importKey("raw", ikm, "HKDF", false, ["deriveBits"]);
  return new Uint8Array(await subtle.deriveBits({ name: "HKDF", hash: "SHA-256", salt, info }, key, 256));
}

async function aesGcmOpen(keyOrRaw, nonce, ciphertext, aad) {
  const key = keyOrRaw instanceof Uint8Array
    ? await subtle.importKey("raw", keyOrRaw, "AES-GCM", false, ["decrypt"])
    : keyOrRaw;
  try {
    return new Uint8Array(await subtle.decrypt({ name: "AES-GCM", iv: nonce, additionalData: aad }, key, ciphertext));
  } catch (err) {
    throw new CryptoError("decryption failed");
  }
}

/**
 * Unwrap an epoch key wrapped for this peeker (crypto.md section 5): the 32 key bytes.
 * `me`: {privateKey, publicRaw}. `expected`: {channel, epoch, recipient}. With `trace`, the
 * intermediate values are written into it (for the vectors).
 */
export async function unwrapEpochKey(wrapped, me, expected, trace) {
  if (!wrapped || wrapped.alg !== WRAP_ALG) throw new CryptoError("unknown key-wrapping algorithm");
  const eph = b64d(wrapped.ephemeral_key, 32);
  const nonce = b64d(wrapped.nonce, 12);
  const ciphertext = b64d(wrapped.ciphertext, 48);
  const info = utf8.encode(wrapInfo(expected.channel, expected.epoch, expected.recipient));
  const shared = await x25519(me.privateKey, eph);
  const salt = concat(eph, me.publicRaw);
  const kek = await hkdf(shared, salt, info);
  const key = await aesGcmOpen(kek, nonce, ciphertext, info);
  if (trace) Object.assign(trace, { shared, salt, info, kek });
  return key;
}

export async function importEpochKey(raw) {
  return subtle.importKey("raw", raw, "AES-GCM", false, ["decrypt"]);
}

let ed25519Support;

/** Whether this browser verifies Ed25519 signatures (else messages are shown as unverified). */
export async function hasEd25519() {
  if (ed25519Support === undefined) {
    try {
      await subtle.importKey("raw", new Uint8Array(32).fill(1), { name: "Ed25519" }, false, ["verify"]);
      ed25519Support = true;
    } catch (err) {
      ed25519Support = false;
    }
  }
  return ed25519Support;
}

/**
 * Open an envelope (crypto.md section 6). `frame`: {channel, sender, client_id}. Checks the sender's
 * signature first where the browser can (`verify`), then decrypts. Returns {plaintext, verified}.
 */
export async function openEnvelope(envelope, epochKey, frame, { verify = true, signingKey } = {}) {
  const epoch = envelope.epoch;
  integer(epoch, "epoch");
  const nonce = b64d(envelope.nonce, 12);
  const ciphertext = b64d(envelope.ciphertext);
  if (ciphertext.length < 16) throw new CryptoError("ciphertext shorter than a tag");
  const signature = b64d(envelope.signature, 64);
  let verified = false;
  if (verify && (await hasEd25519())) {
    const publicKey = await subtle.importKey("raw", signingKey ?? signingKeyFromDid(frame.sender),
      { name: "Ed25519" }, false, ["verify"]);
    const signed = utf8.encode(signatureInput(frame.channel, epoch, frame.sender, frame.client_id,
      envelope.nonce, envelope.ciphertext));
    if (!(await subtle.verify({ name: "Ed25519" }, publicKey, signature, signed))) {
      throw new CryptoError("bad signature");
    }
    verified = true;
  }
  const aad = utf8.encode(messageAad(frame.channel, epoch, frame.sender, frame.client_id));
  return { plaintext: await aesGcmOpen(epochKey, nonce, ciphertext, aad), verified };
}

/** The content inside a plaintext (protocol/messages.md section 1): {kind, body}. */
export function decodeContent(plaintext) {
  let data;
  try {
    data = JSON.parse(utf8Decoder.decode(plaintext));
  } catch (err) {
    throw new CryptoError("the plaintext is not JSON");
  }
  if (!data || typeof data !== "object" || Array.isArray(data) || !["text", "json"].includes(data.kind)) {
    throw new CryptoError("the plaintext is not an AgentChat content object");
  }
  if (data.kind === "text" && typeof data.body !== "string") throw new CryptoError("a text body must be a string");
  return { kind: data.kind, body: data.body };
}

// ------------------------------------------------------------------------------ self-test

/** Check this module against protocol/vectors/crypto.json: {checked, failures, ed25519}. */
export async function selfTest(vectors) {
  const failures = [];
  let checked = 0;
  const check = (ok, what) => {
    checked++;
    if (!ok) failures.push(what);
  };
  const rejects = async (fn, what) => {
    try {
      await fn();
      check(false, `${what}: accepted`);
    } catch (err) {
      check(err instanceof CryptoError, `${what}: ${err}`);
    }
  };

  for (const { hex, text: t } of vectors.base64url.valid) {
    check(b64e(fromHex(hex)) === t && toHex(b64d(t)) === hex, `base64url ${t}`);
  }
  for (const t of vectors.base64url.invalid) await rejects(() => b64d(t), `base64url invalid ${JSON.stringify(t)}`);
  for (const { hex, text: t } of vectors.base58btc.valid) {
    check(b58e(fromHex(hex)) === t && toHex(b58d(t)) === hex, `base58btc ${t}`);
  }
  for (const t of vectors.base58btc.invalid) await rejects(() => b58d(t), `base58btc invalid ${JSON.stringify(t)}`);
  for (const { did, signing_key_hex } of vectors.did.valid) {
    check(toHex(signingKeyFromDid(did)) === signing_key_hex, `did ${did}`);
  }
  for (const did of vectors.did.invalid) await rejects(() => signingKeyFromDid(did), `did invalid ${JSON.stringify(did)}`);

  const dh = vectors.x25519_rfc7748.diffie_hellman;
  const alice = await importX25519Private(fromHex(dh.alice_private_hex), fromHex(dh.alice_public_hex));
  check(toHex(await x25519(alice, fromHex(dh.bob_public_hex))) === dh.shared_secret_hex, "x25519 RFC 7748 6.1");

  for (const v of vectors.wrap) {
    const me = {
      privateKey: await importX25519Private(fromHex(v.inputs.recipient_private_hex), fromHex(v.inputs.recipient_public_hex)),
      publicRaw: fromHex(v.inputs.recipient_public_hex),
    };
    const trace = {};
    const key = await unwrapEpochKey(v.wire, me, v.inputs, trace);
    check(toHex(key) === v.inputs.epoch_key_hex, `wrap: epoch key (${v.description})`);
    check(toHex(trace.shared) === v.intermediate.shared_secret_hex, `wrap: shared secret (${v.description})`);
    check(toHex(trace.salt) === v.intermediate.salt_hex, `wrap: salt (${v.description})`);
    check(toHex(trace.info) === v.intermediate.info_hex, `wrap: info (${v.description})`);
    check(toHex(trace.kek) === v.intermediate.kek_hex, `wrap: kek (${v.description})`);
  }
  const agent = vectors.agent;
  const bob = {
    privateKey: await importX25519Private(fromHex(agent.encryption_private_hex), fromHex(agent.encryption_key_hex)),
    publicRaw: fromHex(agent.encryption_key_hex),
  };
  for (const v of vectors.wrap_invalid) {
    await rejects(() => unwrapEpochKey(v.wire, bob, v), `wrap invalid (${v.description})`);
  }

  const ed25519 = await hasEd25519();
  for (const v of vectors.seal) {
    const i = v.inputs;
    check(messageAad(i.channel, i.epoch, i.sender, i.client_id) === v.intermediate.aad, `seal: aad (${v.description})`);
    check(signatureInput(i.channel, i.epoch, i.sender, i.client_id, v.wire.nonce, v.wire.ciphertext) ===
      v.intermediate.signature_input, `seal: signature input (${v.description})`);
    check(toHex(signingKeyFromDid(i.sender)) === i.sender_signing_key_hex, `seal: sender key (${v.description})`);
    const opened = await openEnvelope(v.wire, await importEpochKey(fromHex(i.epoch_key_hex)),
      { channel: i.channel, sender: i.sender, client_id: i.client_id });
    check(toHex(opened.plaintext) === i.plaintext_hex, `seal: plaintext (${v.description})`);
    check(opened.verified === ed25519, `seal: signature verified (${v.description})`);
  }
  const badKey = await importEpochKey(fromHex(vectors.open_invalid_epoch_key_hex));
  for (const v of vectors.open_invalid) {
    if (v.error === "signature" && !ed25519) continue; // only a signature check can catch these
    const options = v.sender_signing_key_hex === null
      ? { verify: false }
      : { signingKey: fromHex(v.sender_signing_key_hex) };
    try {
      await openEnvelope(v.wire, badKey, v, options);
      check(false, `open invalid (${v.description}): opened`);
    } catch (err) {
      const expected = v.error === "signature" ? "bad signature" : "decryption failed";
      check(err instanceof CryptoError && err.message === expected, `open invalid (${v.description}): ${err}`);
    }
  }
  return { checked, failures, ed25519 };
}
