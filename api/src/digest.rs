//! Content digests as types: a model's identity is a [`ModelDigest`] and a chunk's
//! name a [`ChunkDigest`], not any string, so a name, a path or a chunk's digest cannot
//! be passed where a model is meant, nor the other way round.

use std::fmt;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Whether `s` is a BLAKE3 digest in lowercase hex.
pub fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A BLAKE3 digest as a type of its own: 64 lowercase hex characters, serialised as
/// that string and refused on the way in when it is anything else.
macro_rules! blake3_digest {
    ($(#[$meta:meta])* $name:ident, $what:literal) => {
        $(#[$meta])*
        #[derive(
            Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
        )]
        #[serde(try_from = "String", into = "String")]
        #[schema(value_type = String, pattern = "^[0-9a-f]{64}$")]
        pub struct $name(String);

        impl $name {
            /// The digest written in `hex` (any case), or `None` when it is not 64 hex
            /// characters.
            pub fn parse(hex: &str) -> Option<Self> {
                let lower = hex.to_ascii_lowercase();
                is_digest(&lower).then_some($name(lower))
            }

            /// Wraps a BLAKE3 hash.
            pub(crate) fn from_hash(hash: blake3::Hash) -> Self {
                $name(hash.to_hex().to_string())
            }

            /// The digest as lowercase hex.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;

            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }

        impl PartialEq<$name> for String {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }

        impl PartialEq<$name> for &str {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;

            fn try_from(s: String) -> Result<Self, Self::Error> {
                if is_digest(&s) {
                    Ok($name(s))
                } else {
                    Err(format!(
                        concat!("`{}` is not ", $what, " (64 lowercase hex characters)"),
                        s
                    ))
                }
            }
        }

        impl From<$name> for String {
            fn from(d: $name) -> Self {
                d.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::try_from(s.to_owned())
            }
        }
    };
}

blake3_digest!(
    /// A model's identity: the BLAKE3 of its manifest's canonical encoding, 64
    /// lowercase hex characters. Made by [`crate::manifest::Manifest::digest`] or
    /// parsed from text that is checked to be one.
    ModelDigest,
    "a model digest"
);

blake3_digest!(
    /// A chunk's name: the BLAKE3 of its stored bytes (ciphertext when the model is
    /// encrypted at rest), 64 lowercase hex characters. A manifest lists its chunks
    /// by it; the store and the cache find and check chunks by it.
    ChunkDigest,
    "a chunk digest"
);

impl ChunkDigest {
    /// The digest of `stored`, a chunk's bytes as stored.
    pub fn of(stored: &[u8]) -> Self {
        Self::from_hash(blake3::hash(stored))
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

    #[test]
    fn a_chunk_digest_is_the_blake3_of_its_bytes_and_nothing_else() {
        let d = ChunkDigest::of(b"x");
        let hex = blake3::hash(b"x").to_hex().to_string();
        assert_eq!(d, hex);
        assert_eq!(serde_json::to_value(&d).unwrap(), serde_json::json!(hex));
        let back: ChunkDigest = serde_json::from_value(serde_json::json!(hex)).unwrap();
        assert_eq!(back, d);
        let err = serde_json::from_value::<ChunkDigest>(serde_json::json!("abc"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a chunk digest"), "{err}");
    }
}
