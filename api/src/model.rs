//! Models as the control plane lists them, and the dispersed store a server tells
//! clients about. The manifest itself (files, chunks, stripes, shards) belongs to the
//! store crate; what crosses the wire here is what every role can read without it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ValidationError;
use crate::units::Timestamp;

/// One line of `GET /api/v1/models`: a registered model without its manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ModelSummary {
    /// The model's identity: BLAKE3 of its canonical manifest, 64 lowercase hex.
    pub digest: String,
    /// The name it was pushed under; several digests may share one name.
    pub name: String,
    /// The publisher's ed25519 public key, hex, whose signature the manifest carries.
    pub publisher: String,
    /// The signatures the manifest carries: `ed25519`, or `ed25519+ml-dsa-65` for a
    /// hybrid-signed one (both verified).
    #[serde(default = "ed25519")]
    pub signature: String,
    /// The circle the model belongs to; none for the admins'.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circle: Option<String>,
    /// Number of files.
    pub files: usize,
    /// Bytes of its files.
    pub size: u64,
    /// Bytes its shards take on the backends, parity included.
    pub stored_bytes: u64,
    /// Data shards per stripe.
    pub k: usize,
    /// Parity shards per stripe: any `m` shards of a stripe may be lost.
    pub m: usize,
    /// True when chunks are encrypted at rest.
    pub encrypted: bool,
    /// Its placement policy as rules (`max 1 per site; country in BE,NL`); empty when
    /// any backend may hold its shards.
    pub policy: String,
    /// When it was registered.
    pub created_at: Timestamp,
    /// Bumped each time its shard locations change (repair, rebalance); 1 on
    /// registration. Send it back as `expected_version` to update safely.
    pub locations_version: u64,
    /// When its shard locations last changed; `created_at` until they do.
    pub locations_updated_at: Timestamp,
    /// What the last scrub of its shards found; none until one has run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<ShardHealth>,
}

/// What one scrub-and-repair of a model's shards found and did, as the repair loop
/// reports it (`PUT /api/v1/models/{digest}/health`). Counts are of shards, found
/// before repairing: `missing + corrupt + unreachable` bad of `shards`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShardHealth {
    /// When the scrub ran.
    pub checked_at: Timestamp,
    /// Shards checked: every shard of every stripe.
    pub shards: u64,
    /// Of those, intact.
    pub healthy: u64,
    /// Absent from the backend that should hold them.
    pub missing: u64,
    /// Present, but not the bytes the manifest names.
    pub corrupt: u64,
    /// On a backend that did not answer, or that the repairing server does not know.
    pub unreachable: u64,
    /// Stripes with fewer than k intact shards: their data is lost.
    pub lost_stripes: u64,
    /// Shards rebuilt from the others and written again.
    pub rebuilt: u64,
    /// Bad shards that could not be rebuilt or placed.
    pub unrepairable: u64,
}

impl ShardHealth {
    /// Whether every shard was intact.
    pub fn is_healthy(&self) -> bool {
        self.healthy == self.shards
    }

    /// Checks that the counts of what was found add up.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let bad = self.missing + self.corrupt + self.unreachable;
        if self.healthy.checked_add(bad) != Some(self.shards) {
            return Err(ValidationError::new(
                "shards",
                "must equal healthy + missing + corrupt + unreachable",
            ));
        }
        if self.lost_stripes > self.shards {
            return Err(ValidationError::new(
                "lost_stripes",
                "cannot exceed the shards checked",
            ));
        }
        Ok(())
    }
}

/// The dispersed store a server was configured with, as `GET /api/v1/storage`
/// answers it: where shards may go and how models are coded by default. Never
/// carries credentials; backends read theirs from their own environment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StorageInfo {
    /// The backends shards may be placed on; empty when the server has no store.
    #[serde(default)]
    pub backends: Vec<StorageBackend>,
    /// Data shards per stripe for new models.
    #[serde(default)]
    pub k: usize,
    /// Parity shards per stripe for new models.
    #[serde(default)]
    pub m: usize,
    /// Default placement rules for new models (`max 1 per site`).
    #[serde(default)]
    pub policy: Vec<String>,
}

/// One backend of a [`StorageInfo`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StorageBackend {
    /// Unique among the store's backends; manifests' locations name backends by it.
    pub name: String,
    /// Where it is: `/var/lib/aigrid/store/site-0` or `file:///…`, `s3://bucket/prefix`,
    /// `http://10.0.0.7:7710/`. Never with a user, password or query.
    pub url: String,
    /// Facts placement policies match on (`site`, `country`).
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

impl StorageInfo {
    /// True when the server was given a store.
    pub fn is_configured(&self) -> bool {
        !self.backends.is_empty()
    }

    /// Checks the rules every configured store obeys: a code of at least 1+1, at
    /// least one backend, unique non-empty names, URLs without credentials.
    /// Whether the policy can place `k+m` shards is the store crate's to say.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.k == 0 {
            return Err(ValidationError::new("k", "must be at least 1"));
        }
        if self.m == 0 {
            return Err(ValidationError::new("m", "must be at least 1"));
        }
        if self.backends.is_empty() {
            return Err(ValidationError::new(
                "backends",
                "at least one backend is needed",
            ));
        }
        let mut names = BTreeSet::new();
        for (i, backend) in self.backends.iter().enumerate() {
            let field = |f: &str| format!("backends[{i}].{f}");
            if backend.name.trim().is_empty() || backend.name.trim() != backend.name {
                return Err(ValidationError::new(
                    field("name"),
                    "must be non-empty, without surrounding spaces",
                ));
            }
            if !names.insert(backend.name.as_str()) {
                return Err(ValidationError::new(
                    field("name"),
                    format!("`{}` names two backends", backend.name),
                ));
            }
            check_url(&backend.url).map_err(|m| ValidationError::new(field("url"), m))?;
        }
        Ok(())
    }
}

/// A backend URL: an absolute path, or `scheme://rest` with no user, password, query
/// or fragment, so the URL can be shown to every client.
fn check_url(url: &str) -> Result<(), String> {
    if url.starts_with('/') {
        return Ok(());
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!(
            "`{url}` is neither an absolute path nor a URL (`scheme://...`)"
        ));
    };
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !scheme_ok {
        return Err(format!("`{url}` has no valid scheme"));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err(format!(
            "`{scheme}://…@…` carries a user or password; {NO_SECRETS}"
        ));
    }
    if rest.contains(['?', '#']) {
        return Err(format!("must not carry a query or fragment; {NO_SECRETS}"));
    }
    Ok(())
}

const NO_SECRETS: &str =
    "URLs are shown to every client, so credentials go in the backend's options or environment";

fn ed25519() -> String {
    crate::manifest::MANIFEST_ED25519.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> StorageInfo {
        StorageInfo {
            backends: (0..3)
                .map(|i| StorageBackend {
                    name: format!("site-{i}"),
                    url: format!("file:///var/lib/aigrid/store/site-{i}"),
                    attributes: BTreeMap::from([("site".into(), format!("s{i}"))]),
                })
                .collect(),
            k: 2,
            m: 1,
            policy: vec!["max 1 per site".into()],
        }
    }

    #[test]
    fn a_store_needs_a_code_unique_names_and_urls_without_secrets() {
        store().validate().unwrap();
        assert!(!StorageInfo::default().is_configured());
        type Edit = Box<dyn Fn(&mut StorageInfo)>;
        let broken: Vec<(Edit, &str)> = vec![
            (Box::new(|s| s.k = 0), "k"),
            (Box::new(|s| s.m = 0), "m"),
            (Box::new(|s| s.backends.clear()), "backends"),
            (
                Box::new(|s| s.backends[1].name = "".into()),
                "backends[1].name",
            ),
            (
                Box::new(|s| s.backends[2].name = "site-0".into()),
                "backends[2].name",
            ),
            (
                Box::new(|s| s.backends[0].url = "var/x".into()),
                "backends[0].url",
            ),
            (
                Box::new(|s| s.backends[0].url = "s3://key:secret@bucket/p".into()),
                "backends[0].url",
            ),
            (
                Box::new(|s| s.backends[0].url = "http://h/p?X-Amz-Signature=1".into()),
                "backends[0].url",
            ),
        ];
        for (edit, field) in broken {
            let mut s = store();
            edit(&mut s);
            assert_eq!(s.validate().unwrap_err().field, field);
        }
        let mut s = store();
        s.backends[0].url = "http://10.0.0.7:7710/shards@v1".into();
        s.backends[1].url = "/srv/aigrid/site-1".into();
        s.validate().unwrap();
    }

    #[test]
    fn storage_info_reads_with_defaults() {
        let s: StorageInfo = serde_json::from_str(r#"{"backends": []}"#).unwrap();
        assert_eq!(s, StorageInfo::default());
        let json = serde_json::to_value(store()).unwrap();
        assert_eq!(json["backends"][0]["attributes"]["site"], "s0");
        assert_eq!(json["policy"][0], "max 1 per site");
    }
}

/// What a model server's `/ready` answers of its load beside its readiness
/// (`{"ready": true, "phase": "ready", "load": {...}}`): the gateways probing it
/// read it, and the leader scales a group on the sum over its replicas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReplicaLoadReport {
    /// Requests being served now.
    pub in_flight: u64,
    /// Requests answered since the server started.
    pub requests: u64,
    /// Tokens generated since the server started.
    pub generated_tokens: u64,
}
