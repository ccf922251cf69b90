//! One request-signature scheme for people, agents and servers, in the manner of
//! HTTP Message Signatures (RFC 9421) with a content digest (RFC 9530).
//!
//! A signed request carries three headers:
//!
//! ```text
//! content-digest: sha-256=:<base64 of SHA-256 of the body>:
//! signature-input: aigrid=("@method" "@path" "@query" "content-digest");created=1700000000;nonce="<base64url>";keyid="<key id>";alg="ed25519"
//! signature: aigrid=:<base64 of the signature>:
//! ```
//!
//! The signature covers the signature base RFC 9421 builds from those components
//! (method, path, query, the body's digest) and the parameters (when it was made, a
//! nonce, which key, which algorithm), so neither the body, the target nor the signer
//! can be swapped. A request is accepted only within [`MAX_CLOCK_SKEW_SECS`] of the
//! server's clock, and a server accepts a nonce once within that window (the nonce
//! memory is the server's; see the scheduler's edge). The key id is an identity's
//! [`IdentityId`] for people, and `node:<node id>` for a node's agent.

use base64::Engine;
use sha2::{Digest, Sha256};

use crate::auth::{AuthError, NodeKey};
use crate::identity::{IdentityId, IdentityKey, KeyAlgorithm};
use crate::ids::NodeId;

/// Header with the body's digest.
pub const CONTENT_DIGEST_HEADER: &str = "content-digest";
/// Header naming what the signature covers and its parameters.
pub const SIGNATURE_INPUT_HEADER: &str = "signature-input";
/// Header with the signature.
pub const SIGNATURE_HEADER: &str = "signature";
/// How far a signature's `created` may be from the server's clock, either way.
pub const MAX_CLOCK_SKEW_SECS: u64 = 120;
/// The label of aigrid's signature in the two signature headers.
const LABEL: &str = "aigrid";
/// The covered components, always these, in this order.
const COMPONENTS: &str = r#"("@method" "@path" "@query" "content-digest")"#;
/// Key ids of node agents start with this.
const NODE_KEY_PREFIX: &str = "node:";
/// Longest key id or nonce accepted.
const MAX_PARAM_LEN: usize = 128;

const STANDARD: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
const URL_SAFE: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Whose key signed a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeyRef {
    /// A person's (or a service's) identity.
    Identity(IdentityId),
    /// A node's agent, with the key it registered.
    Node(NodeId),
}

impl KeyRef {
    /// Reads a key id: `node:<id>` or an identity id.
    pub fn parse(key_id: &str) -> Result<Self, AuthError> {
        if let Some(node) = key_id.strip_prefix(NODE_KEY_PREFIX) {
            if node.is_empty() {
                return Err(AuthError::Malformed("empty node key id"));
            }
            return Ok(KeyRef::Node(NodeId::new(node)));
        }
        let id = IdentityId::new(key_id);
        if !id.is_well_formed() {
            return Err(AuthError::Malformed(
                "key id is neither an identity nor a node",
            ));
        }
        Ok(KeyRef::Identity(id))
    }
}

impl std::fmt::Display for KeyRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyRef::Identity(id) => f.write_str(id.as_str()),
            KeyRef::Node(node) => write!(f, "{NODE_KEY_PREFIX}{node}"),
        }
    }
}

/// Something that signs requests.
pub trait RequestSigner {
    /// The key id requests carry.
    fn key_id(&self) -> String;
    /// The key's algorithm.
    fn algorithm(&self) -> KeyAlgorithm;
    /// Signs the signature base.
    fn sign_message(&self, message: &[u8]) -> Vec<u8>;
}

impl RequestSigner for IdentityKey {
    fn key_id(&self) -> String {
        self.id().0
    }

    fn algorithm(&self) -> KeyAlgorithm {
        IdentityKey::algorithm(self)
    }

    fn sign_message(&self, message: &[u8]) -> Vec<u8> {
        self.sign(message)
    }
}

/// A node's key signing for that node.
#[derive(Debug)]
pub struct NodeSigner<'a> {
    /// The node.
    pub node: &'a NodeId,
    /// Its key.
    pub key: &'a NodeKey,
}

impl RequestSigner for NodeSigner<'_> {
    fn key_id(&self) -> String {
        KeyRef::Node(self.node.clone()).to_string()
    }

    fn algorithm(&self) -> KeyAlgorithm {
        KeyAlgorithm::Ed25519
    }

    fn sign_message(&self, message: &[u8]) -> Vec<u8> {
        self.key.sign_bytes(message)
    }
}

/// The three headers of a signed request, with their values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHeaders {
    /// `content-digest`.
    pub content_digest: String,
    /// `signature-input`.
    pub signature_input: String,
    /// `signature`.
    pub signature: String,
}

impl SignedHeaders {
    /// `(name, value)` pairs, for adding to a request.
    pub fn pairs(&self) -> [(&'static str, &str); 3] {
        [
            (CONTENT_DIGEST_HEADER, &self.content_digest),
            (SIGNATURE_INPUT_HEADER, &self.signature_input),
            (SIGNATURE_HEADER, &self.signature),
        ]
    }
}

/// The `content-digest` value of `body`.
pub fn content_digest(body: &[u8]) -> String {
    format!("sha-256=:{}:", STANDARD.encode(Sha256::digest(body)))
}

/// What a signature says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureParams {
    /// When it was made, Unix seconds.
    pub created: u64,
    /// Random, once per request (base64url).
    pub nonce: String,
    /// Who signed.
    pub key_id: String,
    /// With which kind of key.
    pub algorithm: KeyAlgorithm,
}

impl SignatureParams {
    fn serialize(&self) -> String {
        format!(
            r#"{COMPONENTS};created={};nonce="{}";keyid="{}";alg="{}""#,
            self.created, self.nonce, self.key_id, self.algorithm
        )
    }
}

/// Splits a path-and-query into RFC 9421's `@path` and `@query` values.
fn path_and_query(target: &str) -> (&str, String) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let path = if path.is_empty() { "/" } else { path };
    (path, format!("?{query}"))
}

fn signature_base(method: &str, target: &str, digest: &str, params: &SignatureParams) -> Vec<u8> {
    let (path, query) = path_and_query(target);
    format!(
        "\"@method\": {}\n\"@path\": {path}\n\"@query\": {query}\n\"content-digest\": {digest}\n\"@signature-params\": {}",
        method.to_ascii_uppercase(),
        params.serialize()
    )
    .into_bytes()
}

/// Signs a request: `method`, `target` (the path with its query, as sent), `body`,
/// at `created` (Unix seconds) with a fresh random `nonce`.
pub fn sign_request(
    signer: &dyn RequestSigner,
    method: &str,
    target: &str,
    body: &[u8],
    created: u64,
    nonce: [u8; 16],
) -> SignedHeaders {
    let digest = content_digest(body);
    let params = SignatureParams {
        created,
        nonce: URL_SAFE.encode(nonce),
        key_id: signer.key_id(),
        algorithm: signer.algorithm(),
    };
    let signature = signer.sign_message(&signature_base(method, target, &digest, &params));
    SignedHeaders {
        signature_input: format!("{LABEL}={}", params.serialize()),
        signature: format!("{LABEL}=:{}:", STANDARD.encode(signature)),
        content_digest: digest,
    }
}

/// A request's signature headers, read but not yet checked.
#[derive(Debug, Clone)]
pub struct ParsedSignature {
    /// The parameters, as signed.
    pub params: SignatureParams,
    digest: String,
    signature: Vec<u8>,
}

impl ParsedSignature {
    /// Reads the three headers; any missing or malformed one is refused.
    pub fn parse(
        content_digest: Option<&str>,
        signature_input: Option<&str>,
        signature: Option<&str>,
    ) -> Result<Self, AuthError> {
        let (Some(digest), Some(input), Some(signature)) =
            (content_digest, signature_input, signature)
        else {
            return Err(AuthError::Malformed(
                "the request is not signed (content-digest, signature-input and signature headers)",
            ));
        };
        let params = parse_input(input)?;
        let signature = signature
            .trim()
            .strip_prefix(LABEL)
            .and_then(|s| s.strip_prefix("=:"))
            .and_then(|s| s.strip_suffix(':'))
            .and_then(|s| STANDARD.decode(s).ok())
            .ok_or(AuthError::Malformed("signature is not aigrid=:<base64>:"))?;
        Ok(ParsedSignature {
            params,
            digest: digest.trim().to_owned(),
            signature,
        })
    }

    /// Who claims to have signed.
    pub fn key(&self) -> Result<KeyRef, AuthError> {
        KeyRef::parse(&self.params.key_id)
    }

    /// Checks the signature over this request with `key`, and its age against `now`
    /// (Unix seconds). The nonce is the caller's to remember.
    pub fn verify(
        &self,
        method: &str,
        target: &str,
        body: &[u8],
        key: &crate::identity::PublicKey,
        now: u64,
    ) -> Result<(), AuthError> {
        self.verify_headers(method, target, key, now)?;
        self.verify_body(body)
    }

    /// Checks the signature over the request's method, target and `content-digest`
    /// header with `key`, and its age against `now` (Unix seconds), without the body:
    /// what can be known before the body is read. [`ParsedSignature::verify_body`]
    /// then ties the digest to the body.
    pub fn verify_headers(
        &self,
        method: &str,
        target: &str,
        key: &crate::identity::PublicKey,
        now: u64,
    ) -> Result<(), AuthError> {
        let base = self.signed_base(method, target, key, now)?;
        key.verify(&base, &self.signature)
    }

    /// What [`ParsedSignature::verify_headers`] checks the signature over, once the
    /// signature's age against `now` (Unix seconds) and its algorithm against `key`'s
    /// hold: for a caller that checks the signature itself, with others
    /// ([`crate::identity::verify_all`]).
    pub fn signed_base(
        &self,
        method: &str,
        target: &str,
        key: &crate::identity::PublicKey,
        now: u64,
    ) -> Result<Vec<u8>, AuthError> {
        let skew = now.abs_diff(self.params.created);
        if skew > MAX_CLOCK_SKEW_SECS {
            return Err(AuthError::Stale {
                skew_ms: skew.saturating_mul(1000),
            });
        }
        if key.algorithm() != self.params.algorithm {
            return Err(AuthError::Malformed("alg does not match the signer's key"));
        }
        Ok(signature_base(method, target, &self.digest, &self.params))
    }

    /// Checks that the signed `content-digest` is the body's.
    pub fn verify_body(&self, body: &[u8]) -> Result<(), AuthError> {
        if self.digest != content_digest(body) {
            return Err(AuthError::Malformed(
                "content-digest does not match the body",
            ));
        }
        Ok(())
    }

    /// The signature's bytes: two requests with equal bytes carry one signature.
    pub fn signature_bytes(&self) -> &[u8] {
        &self.signature
    }
}

/// Reads `aigrid=("@method" "@path" "@query" "content-digest");created=..;nonce="..";keyid="..";alg=".."`.
fn parse_input(input: &str) -> Result<SignatureParams, AuthError> {
    const SHAPE: &str = "signature-input must cover (\"@method\" \"@path\" \"@query\" \"content-digest\") with created, nonce, keyid and alg";
    let rest = input
        .trim()
        .strip_prefix(LABEL)
        .and_then(|s| s.strip_prefix('='))
        .and_then(|s| s.strip_prefix(COMPONENTS))
        .ok_or(AuthError::Malformed(SHAPE))?;
    let (mut created, mut nonce, mut key_id, mut algorithm) = (None, None, None, None);
    for param in rest.split(';').skip(1) {
        let (name, value) = param.split_once('=').ok_or(AuthError::Malformed(SHAPE))?;
        let quoted = || {
            value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .filter(|v| {
                    !v.is_empty()
                        && v.len() <= MAX_PARAM_LEN
                        && v.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_.:+".contains(&b))
                })
                .map(str::to_owned)
                .ok_or(AuthError::Malformed(SHAPE))
        };
        let slot_taken = match name {
            "created" => created
                .replace(
                    value
                        .parse::<u64>()
                        .map_err(|_| AuthError::Malformed(SHAPE))?,
                )
                .is_some(),
            "nonce" => nonce.replace(quoted()?).is_some(),
            "keyid" => key_id.replace(quoted()?).is_some(),
            "alg" => algorithm
                .replace(
                    quoted()?
                        .parse::<KeyAlgorithm>()
                        .map_err(|_| AuthError::Malformed("unknown signature alg"))?,
                )
                .is_some(),
            _ => return Err(AuthError::Malformed(SHAPE)),
        };
        if slot_taken {
            return Err(AuthError::Malformed("a signature parameter is repeated"));
        }
    }
    match (created, nonce, key_id, algorithm) {
        (Some(created), Some(nonce), Some(key_id), Some(algorithm)) if nonce.len() >= 16 => {
            Ok(SignatureParams {
                created,
                nonce,
                key_id,
                algorithm,
            })
        }
        _ => Err(AuthError::Malformed(SHAPE)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn signed(key: &IdentityKey, body: &[u8]) -> (ParsedSignature, SignedHeaders) {
        let headers = sign_request(key, "post", "/api/v1/jobs?x=1", body, NOW, [7; 16]);
        let parsed = ParsedSignature::parse(
            Some(&headers.content_digest),
            Some(&headers.signature_input),
            Some(&headers.signature),
        )
        .unwrap();
        (parsed, headers)
    }

    #[test]
    fn a_signature_covers_method_target_body_and_signer() {
        for algorithm in [KeyAlgorithm::Ed25519, KeyAlgorithm::Ed25519MlDsa65] {
            let key = IdentityKey::from_seed(algorithm, [1; 32]);
            let public = key.public();
            let (sig, headers) = signed(&key, b"{}");
            assert!(headers
                .signature_input
                .contains(&format!("alg=\"{algorithm}\"")));
            assert_eq!(sig.key().unwrap(), KeyRef::Identity(key.id()));
            sig.verify("POST", "/api/v1/jobs?x=1", b"{}", &public, NOW + 5)
                .unwrap();
            for (method, target, body) in [
                ("DELETE", "/api/v1/jobs?x=1", &b"{}"[..]),
                ("POST", "/api/v1/jobs?x=2", b"{}"),
                ("POST", "/api/v1/jobs", b"{}"),
                ("POST", "/api/v1/nodes?x=1", b"{}"),
                ("POST", "/api/v1/jobs?x=1", b"{ }"),
            ] {
                assert!(
                    sig.verify(method, target, body, &public, NOW).is_err(),
                    "{method} {target}"
                );
            }
            let other = IdentityKey::from_seed(algorithm, [2; 32]).public();
            assert!(sig
                .verify("POST", "/api/v1/jobs?x=1", b"{}", &other, NOW)
                .is_err());
            assert!(matches!(
                sig.verify("POST", "/api/v1/jobs?x=1", b"{}", &public, NOW + 121),
                Err(AuthError::Stale { .. })
            ));
            assert!(sig
                .verify("POST", "/api/v1/jobs?x=1", b"{}", &public, NOW - 121)
                .is_err());
        }
    }

    #[test]
    fn tampered_parameters_break_the_signature() {
        let key = IdentityKey::from_seed(KeyAlgorithm::Ed25519, [3; 32]);
        let (_, headers) = signed(&key, b"");
        let changed = [
            headers
                .signature_input
                .replace("created=1800000000", "created=1800000001"),
            headers
                .signature_input
                .replace("nonce=\"BwcH", "nonce=\"CAcH"),
        ];
        for input in changed {
            assert_ne!(input, headers.signature_input);
            let sig = ParsedSignature::parse(
                Some(&headers.content_digest),
                Some(&input),
                Some(&headers.signature),
            )
            .unwrap();
            assert_eq!(
                sig.verify("POST", "/api/v1/jobs?x=1", b"", &key.public(), NOW),
                Err(AuthError::BadSignature)
            );
        }
    }

    #[test]
    fn malformed_headers_are_refused() {
        let key = IdentityKey::from_seed(KeyAlgorithm::Ed25519, [3; 32]);
        let (_, h) = signed(&key, b"");
        let d = Some(h.content_digest.as_str());
        let s = Some(h.signature.as_str());
        let cases = [
            h.signature_input.replace("\"@query\" ", ""),
            h.signature_input.replace(";alg=\"ed25519\"", ""),
            h.signature_input.replace("alg=\"ed25519\"", "alg=\"rsa\""),
            format!("{};extra=\"1\"", h.signature_input),
            format!("{};created=5", h.signature_input),
            h.signature_input.replace("aigrid=", "other="),
            h.signature_input.replace("keyid=\"", "keyid=\"a b"),
        ];
        for input in cases {
            assert!(
                ParsedSignature::parse(d, Some(&input), s).is_err(),
                "{input}"
            );
        }
        assert!(ParsedSignature::parse(None, Some(&h.signature_input), s).is_err());
        assert!(ParsedSignature::parse(d, Some(&h.signature_input), Some("aigrid=:!!:")).is_err());
        for bad in ["", "node:", "abc", "NODE:x"] {
            assert!(KeyRef::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            KeyRef::parse("node:gpu-1").unwrap(),
            KeyRef::Node(NodeId::new("gpu-1"))
        );
    }

    #[test]
    fn nodes_sign_with_their_registered_key() {
        let key = NodeKey::from_secret([5; 32]);
        let node = NodeId::new("gpu-1");
        let signer = NodeSigner {
            node: &node,
            key: &key,
        };
        let h = sign_request(
            &signer,
            "GET",
            "/api/v1/nodes/gpu-1/assignments",
            b"",
            NOW,
            [1; 16],
        );
        let sig = ParsedSignature::parse(
            Some(&h.content_digest),
            Some(&h.signature_input),
            Some(&h.signature),
        )
        .unwrap();
        assert_eq!(sig.key().unwrap(), KeyRef::Node(node));
        let public = key.public().into();
        sig.verify("GET", "/api/v1/nodes/gpu-1/assignments", b"", &public, NOW)
            .unwrap();
    }
}
