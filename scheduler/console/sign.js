// What the console signs, byte for byte as the CLI does: requests (RFC 9421 style,
// api/src/signature.rs), decisions on proposals and the digest they sign
// (consensus/src/human/mod.rs). The identity key is imported into WebCrypto as a key
// that cannot be exported, and kept in this browser's IndexedDB; it never leaves it.

const enc = new TextEncoder();

export function b64(bytes) {
  let s = "";
  for (const b of bytes) s += String.fromCharCode(b);
  return btoa(s);
}

export function b64url(bytes) {
  return b64(bytes).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

export function fromB64url(text) {
  if (!/^[A-Za-z0-9_-]*$/.test(text)) throw new Error("not base64url");
  const s = atob(text.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((text.length + 3) % 4));
  return Uint8Array.from(s, (c) => c.charCodeAt(0));
}

export function hex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export async function sha256(bytes) {
  return new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
}

// ---- BLAKE3's key derivation, for inputs of one block -----------------------------

// An identity file keeps a 32-byte seed; the ed25519 key is derived from it with
// BLAKE3's derive_key ("aigrid identity ed25519 v1"), as api/src/identity.rs does.
// WebCrypto has no BLAKE3, so the compression function is here, for inputs of at
// most one 64-byte block (the context string and the seed). A wrong derivation
// cannot go unnoticed: the key must then match the file's public key (checked on
// import by a signature).

const IV = [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
  0x5be0cd19];
const PERMUTATION = [2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8];
const CHUNK_START = 1;
const CHUNK_END = 2;
const ROOT = 8;
const DERIVE_KEY_CONTEXT = 32;
const DERIVE_KEY_MATERIAL = 64;

function compress(cv, m, blockLen, flags) {
  const v = [...cv, IV[0], IV[1], IV[2], IV[3], 0, 0, blockLen, flags];
  const rotr = (x, n) => (x >>> n) | (x << (32 - n));
  const g = (a, b, c, d, x, y) => {
    v[a] = (v[a] + v[b] + x) | 0;
    v[d] = rotr(v[d] ^ v[a], 16);
    v[c] = (v[c] + v[d]) | 0;
    v[b] = rotr(v[b] ^ v[c], 12);
    v[a] = (v[a] + v[b] + y) | 0;
    v[d] = rotr(v[d] ^ v[a], 8);
    v[c] = (v[c] + v[d]) | 0;
    v[b] = rotr(v[b] ^ v[c], 7);
  };
  let w = m;
  for (let round = 0; round < 7; round++) {
    g(0, 4, 8, 12, w[0], w[1]);
    g(1, 5, 9, 13, w[2], w[3]);
    g(2, 6, 10, 14, w[4], w[5]);
    g(3, 7, 11, 15, w[6], w[7]);
    g(0, 5, 10, 15, w[8], w[9]);
    g(1, 6, 11, 12, w[10], w[11]);
    g(2, 7, 8, 13, w[12], w[13]);
    g(3, 4, 9, 14, w[14], w[15]);
    w = PERMUTATION.map((i) => w[i]);
  }
  return v.slice(0, 8).map((x, i) => (x ^ v[i + 8]) >>> 0);
}

// BLAKE3 of `input` (at most 64 bytes) under key words `key` with `mode`'s flag.
function blake3Block(key, input, mode) {
  if (input.length > 64) throw new Error("blake3Block takes one block at most");
  const block = new Uint8Array(64);
  block.set(input);
  const view = new DataView(block.buffer);
  const m = Array.from({ length: 16 }, (_, i) => view.getUint32(4 * i, true));
  return compress(key, m, input.length, CHUNK_START | CHUNK_END | ROOT | mode);
}

function words(bytesOrWords) {
  const out = new Uint8Array(32);
  const view = new DataView(out.buffer);
  bytesOrWords.forEach((x, i) => view.setUint32(4 * i, x, true));
  return out;
}

export function deriveKey(context, material) {
  const contextKey = blake3Block(IV, enc.encode(context), DERIVE_KEY_CONTEXT);
  return words(blake3Block(contextKey, material, DERIVE_KEY_MATERIAL));
}

// ---- the identity key ----------------------------------------------------------

const DB = "aigrid-console";
const STORE = "keys";

function db() {
  return new Promise((resolve, reject) => {
    const open = indexedDB.open(DB, 1);
    open.onupgradeneeded = () => open.result.createObjectStore(STORE);
    open.onsuccess = () => resolve(open.result);
    open.onerror = () => reject(open.error);
  });
}

async function stored(mode, act) {
  const d = await db();
  return new Promise((resolve, reject) => {
    const tx = d.transaction(STORE, mode);
    const req = act(tx.objectStore(STORE));
    tx.oncomplete = () => resolve(req.result);
    tx.onerror = () => reject(tx.error);
  });
}

// Reads an identity file as `aigrid key new` writes it, checks that its secret is
// the key it names, and keeps it. Answers {id, name, publicKey, privateKey}.
export async function importIdentity(text) {
  let file;
  try {
    file = JSON.parse(text);
  } catch (e) {
    throw new Error("this is not an identity file (it is not JSON): " + e.message);
  }
  for (const field of ["name", "id", "public_key", "secret_key"]) {
    if (typeof file[field] !== "string") {
      throw new Error(`this is not an identity file: it has no "${field}"`);
    }
  }
  if (!file.secret_key.startsWith("ed25519:") || !file.public_key.startsWith("ed25519:")) {
    throw new Error(
      "the console signs with ed25519 keys only; a hybrid (ed25519+ml-dsa-65) identity " +
        "decides with `aigrid proposal approve`",
    );
  }
  const fileSeed = fromB64url(file.secret_key.slice("ed25519:".length));
  const pub = fromB64url(file.public_key.slice("ed25519:".length));
  if (fileSeed.length !== 32 || pub.length !== 32) {
    throw new Error("the identity file's keys are not 32 bytes each");
  }
  const seed = deriveKey("aigrid identity ed25519 v1", fileSeed);
  const jwk = { kty: "OKP", crv: "Ed25519", d: b64url(seed), x: b64url(pub) };
  let privateKey;
  try {
    privateKey = await crypto.subtle.importKey("jwk", jwk, { name: "Ed25519" }, false, ["sign"]);
  } catch (e) {
    // Browsers that check the pair refuse it here rather than at the signature below.
    throw new Error(`the secret key does not match the file's public key (${e.name})`);
  }
  const publicKey = await crypto.subtle.importKey("raw", pub, { name: "Ed25519" }, true, [
    "verify",
  ]);
  // WebCrypto does not check that d and x belong together: a signature does.
  const probe = enc.encode("aigrid console key check");
  const sig = await crypto.subtle.sign({ name: "Ed25519" }, privateKey, probe);
  if (!(await crypto.subtle.verify({ name: "Ed25519" }, publicKey, sig, probe))) {
    throw new Error("the secret key does not match the file's public key");
  }
  const identity = { id: file.id, name: file.name, publicKey: file.public_key, privateKey };
  await stored("readwrite", (s) => s.put(identity, "identity"));
  return identity;
}

export async function loadIdentity() {
  return (await stored("readonly", (s) => s.get("identity"))) || null;
}

export async function forgetIdentity() {
  await stored("readwrite", (s) => s.delete("identity"));
}

async function signBytes(identity, bytes) {
  return new Uint8Array(await crypto.subtle.sign({ name: "Ed25519" }, identity.privateKey, bytes));
}

// ---- requests ------------------------------------------------------------------

const COMPONENTS = '("@method" "@path" "@query" "content-digest")';

// The three headers of a signed request for `method` on `target` (path and query,
// as sent) with `body` (bytes).
export async function signRequest(identity, method, target, body) {
  const digest = `sha-256=:${b64(await sha256(body))}:`;
  const nonce = b64url(crypto.getRandomValues(new Uint8Array(16)));
  const created = Math.floor(Date.now() / 1000);
  const params =
    `${COMPONENTS};created=${created};nonce="${nonce}";keyid="${identity.id}";alg="ed25519"`;
  const q = target.indexOf("?");
  const path = (q < 0 ? target : target.slice(0, q)) || "/";
  const query = q < 0 ? "?" : target.slice(q);
  const base =
    `"@method": ${method.toUpperCase()}\n"@path": ${path}\n"@query": ${query}\n` +
    `"content-digest": ${digest}\n"@signature-params": ${params}`;
  const signature = await signBytes(identity, enc.encode(base));
  return {
    "content-digest": digest,
    "signature-input": `aigrid=${params}`,
    signature: `aigrid=:${b64(signature)}:`,
  };
}

// ---- JSON that keeps its numbers as written --------------------------------------

// A number as the server wrote it: the digest is over these characters, and a
// JavaScript number would lose `1.0` and anything past 2^53.
export class Num {
  constructor(raw) {
    this.raw = raw;
  }
  toString() {
    return this.raw;
  }
}

// Parses JSON as JSON.parse does, but numbers become `Num`s.
export function parseExact(text) {
  let i = 0;
  const fail = (what) => {
    throw new Error(`bad JSON at ${i}: ${what}`);
  };
  const ws = () => {
    while (i < text.length && " \t\n\r".includes(text[i])) i++;
  };
  const value = () => {
    ws();
    const c = text[i];
    if (c === "{") {
      i++;
      const out = {};
      ws();
      if (text[i] === "}") {
        i++;
        return out;
      }
      for (;;) {
        ws();
        if (text[i] !== '"') fail("expected a key");
        const k = string();
        ws();
        if (text[i++] !== ":") fail("expected :");
        out[k] = value();
        ws();
        if (text[i] === ",") i++;
        else if (text[i] === "}") {
          i++;
          return out;
        } else fail("expected , or }");
      }
    }
    if (c === "[") {
      i++;
      const out = [];
      ws();
      if (text[i] === "]") {
        i++;
        return out;
      }
      for (;;) {
        out.push(value());
        ws();
        if (text[i] === ",") i++;
        else if (text[i] === "]") {
          i++;
          return out;
        } else fail("expected , or ]");
      }
    }
    if (c === '"') return string();
    for (const [word, v] of [["true", true], ["false", false], ["null", null]]) {
      if (text.startsWith(word, i)) {
        i += word.length;
        return v;
      }
    }
    const m = /^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/.exec(text.slice(i, i + 400));
    if (!m) fail("unexpected character");
    i += m[0].length;
    return new Num(m[0]);
  };
  const string = () => {
    const m = /^"(?:[^"\\\u0000-\u001f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*"/.exec(
      text.slice(i),
    );
    if (!m) fail("bad string");
    i += m[0].length;
    return JSON.parse(m[0]);
  };
  const v = value();
  ws();
  if (i !== text.length) fail("trailing characters");
  return v;
}

// The one encoding the servers hash: keys sorted, no whitespace, strings escaped as
// serde_json escapes them (which is JSON.stringify's way too), numbers as written.
export function canonical(v) {
  if (v instanceof Num) return v.raw;
  if (Array.isArray(v)) return "[" + v.map(canonical).join(",") + "]";
  if (v !== null && typeof v === "object") {
    const keys = Object.keys(v).sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
    return "{" + keys.map((k) => JSON.stringify(k) + ":" + canonical(v[k])).join(",") + "}";
  }
  return JSON.stringify(v);
}

// Pretty JSON for people, numbers as written.
export function pretty(v, indent = "") {
  const inner = indent + "  ";
  if (v instanceof Num) return v.raw;
  if (Array.isArray(v)) {
    if (v.length === 0) return "[]";
    return "[\n" + v.map((x) => inner + pretty(x, inner)).join(",\n") + "\n" + indent + "]";
  }
  if (v !== null && typeof v === "object") {
    const keys = Object.keys(v);
    if (keys.length === 0) return "{}";
    return (
      "{\n" +
      keys.map((k) => inner + JSON.stringify(k) + ": " + pretty(v[k], inner)).join(",\n") +
      "\n" +
      indent +
      "}"
    );
  }
  return JSON.stringify(v);
}

// Rust's sort of String keys is by bytes (UTF-8); JavaScript's by UTF-16 units.
// They differ only past the basic plane, which keys of a payload never use; a key
// that did would fail the digest check and be refused, never signed.

// ---- proposals -----------------------------------------------------------------

const DIGEST_DOMAIN = "aigrid/human-chain/proposal-digest/v1";
const DECISION_DOMAIN = "aigrid/human-chain/decision/v1";

function u64(n) {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, BigInt(String(n)));
  return b;
}

function concat(parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

// Recomputes a proposal's digest from what it shows (read with `parseExact`):
// answers the digest's bytes, or throws saying what does not match.
export async function proposalDigest(p) {
  const payloadHash = await sha256(enc.encode(canonical(p.payload)));
  if (hex(payloadHash) !== p.payload_hash) {
    throw new Error(
      `the payload hashes to ${hex(payloadHash)}, the server says ${p.payload_hash}`,
    );
  }
  const fields = [
    enc.encode(DIGEST_DOMAIN),
    enc.encode(p.cluster_id),
    enc.encode(p.circle),
    u64(p.circle_version),
    enc.encode(p.kind),
    payloadHash,
    u64(p.base_version),
    enc.encode(p.id),
    u64(p.expires_at),
  ];
  const digest = await sha256(concat(fields.flatMap((f) => [u64(f.length), f])));
  if (hex(digest) !== p.digest) {
    throw new Error(`the proposal hashes to ${hex(digest)}, the server says ${p.digest}`);
  }
  return digest;
}

// The body of `POST /api/v1/proposals/{id}/approvals`: `decision` ("approve",
// "reject" or "veto") on the proposal with `digest`, signed.
export async function signDecision(identity, digest, decision) {
  const message = concat([
    enc.encode(DECISION_DOMAIN),
    new Uint8Array([0]),
    enc.encode(decision),
    new Uint8Array([0]),
    digest,
  ]);
  return { decision, digest: hex(digest), signature: b64url(await signBytes(identity, message)) };
}
