//! Registered models as the control plane answers them, never trusted: a digest
//! prefix resolved, and every registration checked to be the model asked for.

use aigrid_api::model::ModelSummary;
use aigrid_store::manifest::{Locations, Registration, SignedManifest};
use anyhow::{anyhow, bail};
use reqwest::Method;
use serde::{Deserialize, Serialize};

use crate::client::Client;

/// `GET /api/v1/models/{digest}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelDetail {
    /// The listing line.
    pub summary: ModelSummary,
    /// The signed manifest.
    pub manifest: SignedManifest,
    /// Where its shards are.
    pub locations: Locations,
}

impl ModelDetail {
    /// The signed manifest with its shard locations.
    pub fn registration(&self) -> Registration {
        Registration {
            manifest: self.manifest.clone(),
            locations: self.locations.clone(),
            circle: self.summary.circle.clone(),
        }
    }
}

/// The full digest a user means by `text`: itself, or the one registered digest it
/// is a prefix of.
pub async fn resolve(client: &Client, text: &str) -> anyhow::Result<String> {
    let text = text.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_hexdigit()) || text.len() > 64 {
        bail!("`{text}` is not a model digest (64 hex characters, or a prefix of one)");
    }
    let text = text.to_ascii_lowercase();
    if text.len() == 64 {
        return Ok(text);
    }
    if text.len() < 6 {
        bail!("digest prefix `{text}` is too short: give at least 6 characters");
    }
    let all: Vec<ModelSummary> = client
        .call::<(), _>(Method::GET, "/api/v1/models", None)
        .await?;
    let found: Vec<&ModelSummary> = all.iter().filter(|m| m.digest.starts_with(&text)).collect();
    match found.as_slice() {
        [one] => Ok(one.digest.clone()),
        [] => bail!("no registered model's digest starts with `{text}`"),
        _ => bail!(
            "`{text}` matches {} models: give more of the digest",
            found.len()
        ),
    }
}

/// Checks that `registration` is the model `digest` names: signed, consistent, and
/// hashing to that digest. The server (or anyone between) could otherwise answer
/// another model's, or its own, self-signed manifest.
fn check_registration(registration: &Registration, digest: &str) -> anyhow::Result<()> {
    let got = registration.verify().map_err(|e| {
        anyhow!(
            "the server's registration of model {} does not verify: {e}",
            short(digest)
        )
    })?;
    if got != digest {
        bail!(
            "asked the server for model {} but it answered model {}",
            short(digest),
            short(&got)
        );
    }
    Ok(())
}

/// The first 16 characters of a digest, as listings show it.
pub fn short(digest: &str) -> &str {
    digest.get(..16).unwrap_or(digest)
}

/// The registration of model `digest`, as the server answers it, unchecked.
async fn detail_unchecked(client: &Client, digest: &str) -> anyhow::Result<ModelDetail> {
    client
        .call::<(), _>(Method::GET, &format!("/api/v1/models/{digest}"), None)
        .await
}

/// The registration of model `digest`, checked to be that model.
pub async fn detail(client: &Client, digest: &str) -> anyhow::Result<ModelDetail> {
    let detail = detail_unchecked(client, digest).await?;
    check_registration(&detail.registration(), digest)?;
    Ok(detail)
}

/// Every registered model's registration as the server answers it, with the digest
/// it was listed under; a model removed meanwhile is left out.
pub(super) async fn all_details_unchecked(
    client: &Client,
) -> anyhow::Result<Vec<(String, ModelDetail)>> {
    let all: Vec<ModelSummary> = client
        .call::<(), _>(Method::GET, "/api/v1/models", None)
        .await?;
    let mut out = Vec::new();
    for m in all {
        match detail_unchecked(client, &m.digest).await {
            Ok(d) => out.push((m.digest, d)),
            // Removed meanwhile.
            Err(e) if e.to_string().contains("not_found") => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// The chunks every registered model uses, verified or not: what a node's chunk
/// cache may keep. A model that does not verify still keeps its chunks, as its
/// registration keeps its shards.
pub async fn registered_chunks(
    client: &Client,
) -> anyhow::Result<std::collections::HashSet<aigrid_api::ChunkDigest>> {
    let mut chunks = std::collections::HashSet::new();
    for (_, detail) in all_details_unchecked(client).await? {
        for stripe in &detail.manifest.manifest.stripes {
            chunks.extend(stripe.chunks.iter().map(|c| c.blake3.clone()));
        }
    }
    Ok(chunks)
}

/// Every registered model that verifies as the digest it is listed under; one that
/// does not is skipped with a one-line warning.
pub(super) async fn all_details(client: &Client) -> anyhow::Result<Vec<ModelDetail>> {
    let mut out = Vec::new();
    for (digest, d) in all_details_unchecked(client).await? {
        match check_registration(&d.registration(), &digest) {
            Ok(()) => out.push(d),
            Err(e) => eprintln!("warning: {e}; skipping it"),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use aigrid_store::codec::CODEC_NAME;
    use aigrid_store::manifest::{
        ChunkRef, CodecInfo, FileEntry, Manifest, Stripe, MANIFEST_FORMAT,
    };
    use aigrid_store::placement::Policy;
    use ed25519_dalek::SigningKey;

    use super::*;

    fn hex(data: &[u8]) -> String {
        blake3::hash(data).to_hex().to_string()
    }

    /// A one-file, one-stripe model under `name`, signed by `key`.
    fn registration(name: &str, key: u8) -> Registration {
        let chunk = ChunkRef {
            blake3: aigrid_api::ChunkDigest::of(name.as_bytes()),
            len: 4,
        };
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            name: name.into(),
            codec: CodecInfo {
                name: CODEC_NAME.into(),
                k: 2,
                m: 1,
            },
            chunk_size: 4,
            policy: Policy::default(),
            encryption: None,
            files: vec![FileEntry {
                path: "config.json".into(),
                size: 4,
                chunks: vec![chunk.clone()],
            }],
            stripes: vec![Stripe {
                chunks: vec![chunk],
                len: 4,
                shard_len: 2,
                shards: (0..3u8).map(|i| hex(&[i])).collect(),
            }],
        };
        Registration {
            manifest: SignedManifest::sign(manifest, &SigningKey::from_bytes(&[key; 32])),
            locations: Locations {
                stripes: vec![(0..3).map(|i| format!("b{i}")).collect()],
            },
            circle: None,
        }
    }

    #[test]
    fn a_registration_must_be_the_model_asked_for() {
        let wanted = registration("wanted", 1);
        let digest = wanted.manifest.manifest.digest();
        check_registration(&wanted, &digest).unwrap();
        // Another model, validly self-signed by someone else: refused, in one line.
        let other = registration("other", 2);
        let err = check_registration(&other, &digest).unwrap_err().to_string();
        assert!(err.contains("answered model"), "{err}");
        assert!(!err.contains('\n'), "{err}");
        // The model asked for, altered after signing.
        let mut altered = wanted.clone();
        altered.manifest.manifest.name = "renamed".into();
        let err = check_registration(&altered, &digest)
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not verify"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }
}
