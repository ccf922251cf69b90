//! Content digests as types: a model's identity is a [`ModelDigest`], not any string,
//! so a name, a path or a chunk hash cannot be passed where a model is meant.

use std::fmt;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Whether `s` is a BLAKE3 digest in lowercase hex.
pub fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A model's identity: the BLAKE3 of its manifest's canonical encoding, 64 lowercase
/// hex characters. Made by [`crate::manifest::Manifest::digest`] or parsed from text
/// that is checked to be one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(try_from = "String", into = "String")]
#[schema(value_type = String, pattern = "^[0-9a-f]{64}$")]
pub struct ModelDigest(String);

impl ModelDigest {
    /// The digest written in `hex` (any case), or `None` when it is not 64 hex
    /// characters.
    pub fn parse(hex: &str) -> Option<Self> {
        let lower = hex.to_ascii_lowercase();
        is_digest(&lower).then_some(ModelDigest(lower))
    }

    /// Wraps the hex of a BLAKE3 hash.
    pub(crate) fn from_hash(hash: blake3::Hash) -> Self {
        ModelDigest(hash.to_hex().to_string())
    }

    /// The digest as lowercase hex.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ModelDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::ops::Deref for ModelDigest {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for ModelDigest {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for ModelDigest {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for ModelDigest {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for ModelDigest {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<String> for ModelDigest {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

impl PartialEq<ModelDigest> for String {
    fn eq(&self, other: &ModelDigest) -> bool {
        *self == other.0
    }
}

impl PartialEq<ModelDigest> for &str {
    fn eq(&self, other: &ModelDigest) -> bool {
        *self == other.0
    }
}

impl TryFrom<String> for ModelDigest {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        if is_digest(&s) {
            Ok(ModelDigest(s))
        } else {
            Err(format!(
                "`{s}` is not a model digest (64 lowercase hex characters)"
            ))
        }
    }
}

impl From<ModelDigest> for String {
    fn from(d: ModelDigest) -> Self {
        d.0
    }
}

impl std::str::FromStr for ModelDigest {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::try_from(s.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_lowercase_hex_of_the_right_length_is_a_digest() {
        let hex = blake3::hash(b"x").to_hex().to_string();
        let d: ModelDigest = serde_json::from_value(serde_json::json!(hex)).unwrap();
        assert_eq!(d, hex);
        assert_eq!(serde_json::to_value(&d).unwrap(), serde_json::json!(hex));
        assert_eq!(ModelDigest::parse(&hex.to_uppercase()), Some(d.clone()));
        for bad in [
            "",
            "abc",
            &hex[1..],
            &hex.to_uppercase(),
            &format!("{}g", &hex[1..]),
        ] {
            assert!(
                serde_json::from_value::<ModelDigest>(serde_json::json!(bad)).is_err(),
                "{bad}"
            );
        }
        assert_eq!(ModelDigest::parse("nope"), None);
    }
}
