//! The cluster's certificate authority as the wire sees it: the SHA-256 fingerprint
//! of its certificate, which join tokens carry so that a new agent or client trusts
//! only servers holding a certificate from that CA.

use std::fmt;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// How a fingerprint is written: `sha256:<64 hex>`.
pub const FINGERPRINT_PREFIX: &str = "sha256:";

/// The SHA-256 of a CA certificate's DER bytes, written `sha256:<64 lowercase hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(try_from = "String", into = "String")]
#[schema(value_type = String, example = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08")]
pub struct CaFingerprint(pub [u8; 32]);

impl CaFingerprint {
    /// The 64 hex characters, without the `sha256:` prefix.
    pub fn hex(&self) -> String {
        crate::auth::hex(&self.0)
    }
}

impl fmt::Display for CaFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{FINGERPRINT_PREFIX}{}", self.hex())
    }
}

impl fmt::Debug for CaFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaFingerprint({self})")
    }
}

impl std::str::FromStr for CaFingerprint {
    type Err = &'static str;

    /// `sha256:<64 hex>`, or the 64 hex characters alone.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let hex = s.strip_prefix(FINGERPRINT_PREFIX).unwrap_or(s);
        crate::auth::unhex::<32>(hex)
            .map(CaFingerprint)
            .ok_or("a CA fingerprint is sha256:<64 hex characters>")
    }
}

impl TryFrom<String> for CaFingerprint {
    type Error = &'static str;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<CaFingerprint> for String {
    fn from(f: CaFingerprint) -> Self {
        f.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_print_and_parse() {
        let f = CaFingerprint([0xab; 32]);
        let text = f.to_string();
        assert_eq!(text, format!("sha256:{}", "ab".repeat(32)));
        assert_eq!(text.parse::<CaFingerprint>().unwrap(), f);
        assert_eq!("AB".repeat(32).parse::<CaFingerprint>().unwrap(), f);
        assert!("sha256:abcd".parse::<CaFingerprint>().is_err());
        assert!("md5:".parse::<CaFingerprint>().is_err());
        let json = serde_json::to_string(&f).unwrap();
        assert_eq!(serde_json::from_str::<CaFingerprint>(&json).unwrap(), f);
    }
}
