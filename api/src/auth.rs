//! Node keys and join tokens: the Zero-OS side of trust. An agent holds an ed25519
//! key it made itself; it proves it may join with a join token once, and from then on
//! signs every request with that key (the scheme is [`crate::signature`]'s, the same
//! for people and nodes). Servers keep only public keys and hashed token secrets, so
//! a copy of the Raft log grants nothing.

use std::fmt;

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::units::Timestamp;

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

    /// Whether `signature` is this key's (strict ed25519) over `message`.
    pub fn verify_bytes(&self, message: &[u8], signature: &[u8]) -> bool {
        let Ok(key) = VerifyingKey::from_bytes(&self.0) else {
            return false;
        };
        let Ok(signature) = ed25519_dalek::Signature::from_slice(signature) else {
            return false;
        };
        crate::ed25519::verify_strictly(&key, message, &signature)
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
pub struct NodeKey([u8; 32], crate::ed25519::Signer);

impl NodeKey {
    /// The key with these secret bytes.
    pub fn from_secret(bytes: [u8; 32]) -> Self {
        NodeKey(bytes, crate::ed25519::Signer::from_seed(&bytes))
    }

    /// The secret bytes, for storing the key.
    pub fn secret(&self) -> [u8; 32] {
        self.0
    }

    /// The matching public key, which the node registers.
    pub fn public(&self) -> NodePublicKey {
        NodePublicKey(self.1.public())
    }

    /// Signs `message` (a request's signature base; see [`crate::signature`]).
    pub fn sign_bytes(&self, message: &[u8]) -> Vec<u8> {
        self.1.sign(message).to_vec()
    }
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeKey(public {}, secret redacted)", self.public())
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
    /// The signature's nonce was seen before: a replayed request.
    #[error("request replayed: its nonce was already used")]
    Replayed,
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
