//! Node identity and signed requests: the Zero-OS side of trust. An agent holds an
//! ed25519 key it made itself; it proves it may join with a join token once, and from
//! then on signs every request. Servers keep only public keys and hashed token
//! secrets, so a copy of the Raft log grants nothing.
//!
//! A signature covers the method, the path with its query, the node id, a timestamp
//! and the BLAKE3 hash of the body, so neither the body nor the target can be swapped
//! and an old request cannot be replayed outside the clock-skew window.

use std::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ids::NodeId;
use crate::units::Timestamp;

/// Header naming the node a request is signed by.
pub const NODE_HEADER: &str = "x-aigrid-node";
/// Header carrying the signing time, Unix milliseconds.
pub const TIMESTAMP_HEADER: &str = "x-aigrid-timestamp";
/// Header carrying the base64 ed25519 signature.
pub const SIGNATURE_HEADER: &str = "x-aigrid-signature";
/// How far a request's timestamp may be from the server's clock.
pub const MAX_CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;

/// A node's public key: 32 bytes, written as 64 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(try_from = "String", into = "String")]
#[schema(value_type = String)]
pub struct NodePublicKey([u8; 32]);

impl NodePublicKey {
    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for NodePublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodePublicKey({self})")
    }
}

impl fmt::Display for NodePublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl TryFrom<String> for NodePublicKey {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<NodePublicKey> for String {
    fn from(k: NodePublicKey) -> Self {
        k.to_string()
    }
}

impl std::str::FromStr for NodePublicKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = unhex::<32>(s).ok_or("a public key is 64 hex characters")?;
        VerifyingKey::from_bytes(&bytes).map_err(|_| "not a valid ed25519 public key")?;
        Ok(NodePublicKey(bytes))
    }
}

/// A node's private key. It never prints and never serialises; the agent stores its
/// 32 secret bytes in a file only it may read.
pub struct NodeKey(SigningKey);

impl NodeKey {
    /// The key with these secret bytes.
    pub fn from_secret(bytes: [u8; 32]) -> Self {
        NodeKey(SigningKey::from_bytes(&bytes))
    }

    /// The secret bytes, for storing the key.
    pub fn secret(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The matching public key, which the node registers.
    pub fn public(&self) -> NodePublicKey {
        NodePublicKey(self.0.verifying_key().to_bytes())
    }

    /// Signs one request; the result goes into the three signature headers.
    pub fn sign(&self, request: &RequestToSign<'_>) -> String {
        let sig = self.0.sign(&request.message());
        base64_encode(&sig.to_bytes())
    }
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeKey(public {}, secret redacted)", self.public())
    }
}

/// The parts of a request a signature covers.
#[derive(Debug, Clone, Copy)]
pub struct RequestToSign<'a> {
    /// `GET`, `POST`, ...
    pub method: &'a str,
    /// The path with its query string, as sent (`/api/v1/nodes/n1/assignments?index=3`).
    pub path_and_query: &'a str,
    /// The node signing.
    pub node: &'a NodeId,
    /// When it was signed.
    pub timestamp: Timestamp,
    /// The exact body bytes.
    pub body: &'a [u8],
}

impl RequestToSign<'_> {
    fn message(&self) -> Vec<u8> {
        format!(
            "aigrid-request-v1\n{}\n{}\n{}\n{}\n{}",
            self.method,
            self.path_and_query,
            self.node,
            self.timestamp.as_millis(),
            blake3::hash(self.body).to_hex()
        )
        .into_bytes()
    }

    /// Checks `signature` (base64) against `key` and the timestamp against `now`.
    pub fn verify(
        &self,
        key: &NodePublicKey,
        signature: &str,
        now: Timestamp,
    ) -> Result<(), AuthError> {
        let skew = now.as_millis().abs_diff(self.timestamp.as_millis());
        if skew > MAX_CLOCK_SKEW_MS {
            return Err(AuthError::Stale { skew_ms: skew });
        }
        let bytes = base64_decode(signature)
            .and_then(|b| <[u8; 64]>::try_from(b).ok())
            .ok_or(AuthError::Malformed("signature is not 64 base64 bytes"))?;
        let verifying = VerifyingKey::from_bytes(key.as_bytes())
            .map_err(|_| AuthError::Malformed("stored key is invalid"))?;
        verifying
            .verify(&self.message(), &Signature::from_bytes(&bytes))
            .map_err(|_| AuthError::BadSignature)
    }
}

/// Why a signed request was refused. Every variant answers 401.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// A header is missing or unreadable.
    #[error("malformed request signature: {0}")]
    Malformed(&'static str),
    /// The timestamp is too far from the server's clock (a replay, or a bad clock).
    #[error("request timestamp is {skew_ms} ms from the server's clock")]
    Stale {
        /// How far off it is.
        skew_ms: u64,
    },
    /// The signature does not match the request and key.
    #[error("bad request signature")]
    BadSignature,
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    ::hex::encode(bytes)
}

/// The `N` bytes written as `2N` hex characters (either case) in `s`.
pub fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    ::hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

/// Prefix of every join token, so a leaked one is recognisable in logs and scanners.
pub const JOIN_TOKEN_PREFIX: &str = "aigrid-join";

/// A join token as the operator hands it to a farmer:
/// `aigrid-join.<id>.<secret>.<ca sha256 hex>`. The id names it in listings; only the
/// secret's BLAKE3 hash is stored; the last part pins the cluster's CA, so the agent
/// trusts only servers holding a certificate from it. A token of the older three-part
/// shape (`aigrid-join.<id>.<secret>`) still parses and pins nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Public part: 16 hex characters.
    pub id: String,
    /// Secret part: 64 hex characters.
    pub secret: String,
    /// The cluster CA the token's holder must trust, when the cluster has one.
    pub ca: Option<crate::CaFingerprint>,
}

impl JoinToken {
    /// A token from fresh random bytes.
    pub fn from_random(id: [u8; 8], secret: [u8; 32]) -> Self {
        JoinToken {
            id: hex(&id),
            secret: hex(&secret),
            ca: None,
        }
    }

    /// The same token, pinning the CA with fingerprint `ca`.
    pub fn with_ca(mut self, ca: Option<crate::CaFingerprint>) -> Self {
        self.ca = ca;
        self
    }

    /// The stored form of the secret.
    pub fn secret_hash(&self) -> String {
        hash_secret(&self.secret)
    }
}

/// BLAKE3 of a token secret, hex.
pub fn hash_secret(secret: &str) -> String {
    blake3::hash(secret.as_bytes()).to_hex().to_string()
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{JOIN_TOKEN_PREFIX}.{}.{}", self.id, self.secret)?;
        match &self.ca {
            Some(ca) => write!(f, ".{}", ca.hex()),
            None => Ok(()),
        }
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JoinToken({}, secret redacted)", self.id)
    }
}

impl std::str::FromStr for JoinToken {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const SHAPE: &str =
            "a join token looks like aigrid-join.<16 hex>.<64 hex>.<64 hex CA fingerprint>";
        let mut parts = s.trim().split('.');
        let (Some(JOIN_TOKEN_PREFIX), Some(id), Some(secret), ca, None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(SHAPE);
        };
        unhex::<8>(id).ok_or(SHAPE)?;
        unhex::<32>(secret).ok_or(SHAPE)?;
        let ca = match ca {
            Some(hex) => Some(crate::CaFingerprint(unhex::<32>(hex).ok_or(SHAPE)?)),
            None => None,
        };
        Ok(JoinToken {
            id: id.to_owned(),
            secret: secret.to_owned(),
            ca,
        })
    }
}

/// `POST /api/v1/join-tokens`: how long a new token lives and how often it may be used.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJoinToken {
    /// Lifetime in seconds; 24 hours when absent, at most 365 days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    /// How many nodes may join with it; unlimited when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_uses: Option<u32>,
    /// A note for listings (`rack 4, ghent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Default join-token lifetime.
pub const DEFAULT_TOKEN_TTL_SECS: u64 = 24 * 3600;
/// Longest join-token lifetime.
pub const MAX_TOKEN_TTL_SECS: u64 = 365 * 24 * 3600;

impl CreateJoinToken {
    /// Checks bounds; the first broken rule names its field.
    pub fn validate(&self) -> Result<(), crate::ValidationError> {
        if matches!(self.ttl_secs, Some(t) if t == 0 || t > MAX_TOKEN_TTL_SECS) {
            return Err(crate::ValidationError::new(
                "ttl_secs",
                format!("must be between 1 and {MAX_TOKEN_TTL_SECS}"),
            ));
        }
        if self.max_uses == Some(0) {
            return Err(crate::ValidationError::new(
                "max_uses",
                "must be at least 1",
            ));
        }
        if self.description.as_ref().is_some_and(|d| d.len() > 256) {
            return Err(crate::ValidationError::new(
                "description",
                "at most 256 characters",
            ));
        }
        Ok(())
    }
}

/// A join token as listings show it: never its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JoinTokenInfo {
    /// The token's public id.
    pub id: String,
    /// When it was made.
    pub created_at: Timestamp,
    /// When it stops working.
    pub expires_at: Timestamp,
    /// How many nodes may join with it; unlimited when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_uses: Option<u32>,
    /// How many have.
    pub uses: u32,
    /// The operator's note.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// The answer to `POST /api/v1/join-tokens`: the only time the secret is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CreatedJoinToken {
    /// `aigrid-join.<id>.<secret>.<ca sha256 hex>` (no last part when the cluster has
    /// no CA), for `aigrid agent --join-token`.
    pub token: String,
    /// The token as listings show it.
    #[serde(flatten)]
    pub info: JoinTokenInfo,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request<'a>(body: &'a [u8], node: &'a NodeId) -> RequestToSign<'a> {
        RequestToSign {
            method: "POST",
            path_and_query: "/api/v1/nodes/n1/heartbeat",
            node,
            timestamp: Timestamp::from_millis(1_000_000),
            body,
        }
    }

    #[test]
    fn signatures_cover_every_part() {
        let key = NodeKey::from_secret([7; 32]);
        let node = NodeId::new("n1");
        let req = request(b"{}", &node);
        let sig = key.sign(&req);
        let now = Timestamp::from_millis(1_000_500);
        req.verify(&key.public(), &sig, now).unwrap();

        let other = NodeKey::from_secret([8; 32]).public();
        assert_eq!(req.verify(&other, &sig, now), Err(AuthError::BadSignature));
        let body = request(b"{ }", &node);
        assert_eq!(
            body.verify(&key.public(), &sig, now),
            Err(AuthError::BadSignature)
        );
        let n2 = NodeId::new("n2");
        let who = request(b"{}", &n2);
        assert!(who.verify(&key.public(), &sig, now).is_err());
        let path = RequestToSign {
            path_and_query: "/api/v1/nodes/n1/heartbeat?x=1",
            ..req
        };
        assert!(path.verify(&key.public(), &sig, now).is_err());
        let late = Timestamp::from_millis(1_000_000 + MAX_CLOCK_SKEW_MS + 1);
        assert!(matches!(
            req.verify(&key.public(), &sig, late),
            Err(AuthError::Stale { .. })
        ));
        assert!(matches!(
            req.verify(&key.public(), "not base64!", now),
            Err(AuthError::Malformed(_))
        ));
        // One flipped bit in the signature.
        let mut raw = base64_decode(&sig).unwrap();
        raw[10] ^= 1;
        assert_eq!(
            req.verify(&key.public(), &base64_encode(&raw), now),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn keys_and_tokens_round_trip_and_never_print_secrets() {
        let key = NodeKey::from_secret([3; 32]);
        let public = key.public();
        let text = serde_json::to_string(&public).unwrap();
        assert_eq!(text.len(), 66);
        let back: NodePublicKey = serde_json::from_str(&text).unwrap();
        assert_eq!(back, public);
        assert!(serde_json::from_str::<NodePublicKey>("\"abcd\"").is_err());
        assert!(!format!("{key:?}").contains(&hex(&key.secret())));

        let token = JoinToken::from_random([1; 8], [2; 32]);
        let shown = token.to_string();
        assert!(shown.starts_with("aigrid-join.0101010101010101."));
        let parsed: JoinToken = shown.parse().unwrap();
        assert_eq!(parsed, token);
        assert_eq!(parsed.secret_hash(), hash_secret(&token.secret));
        assert!(!format!("{token:?}").contains(&token.secret));
        for bad in [
            "",
            "aigrid-join.zz.00",
            "other.0101010101010101.00",
            &shown[1..],
        ] {
            assert!(bad.parse::<JoinToken>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_join_token_pins_the_cluster_ca_and_old_tokens_still_parse() {
        let ca = crate::CaFingerprint([7; 32]);
        let token = JoinToken::from_random([1; 8], [2; 32]).with_ca(Some(ca));
        let shown = token.to_string();
        assert!(shown.ends_with(&format!(".{}", "07".repeat(32))), "{shown}");
        let parsed: JoinToken = shown.parse().unwrap();
        assert_eq!(parsed.ca, Some(ca));
        assert_eq!(parsed, token);
        let old = format!("aigrid-join.{}.{}", "01".repeat(8), "02".repeat(32));
        assert_eq!(old.parse::<JoinToken>().unwrap().ca, None);
        for bad in [
            format!("{old}.abcd"),
            format!("{old}.{}.{}", "07".repeat(32), "07".repeat(32)),
        ] {
            assert!(bad.parse::<JoinToken>().is_err(), "{bad}");
        }
    }

    #[test]
    fn token_requests_are_bounded() {
        CreateJoinToken::default().validate().unwrap();
        let zero = CreateJoinToken {
            ttl_secs: Some(0),
            ..Default::default()
        };
        assert_eq!(zero.validate().unwrap_err().field, "ttl_secs");
        let uses = CreateJoinToken {
            max_uses: Some(0),
            ..Default::default()
        };
        assert_eq!(uses.validate().unwrap_err().field, "max_uses");
    }
}
