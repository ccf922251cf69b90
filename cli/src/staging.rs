//! How an agent stages the models fleet rollouts send it: the registration read
//! and checked (signature, digest) from the servers, every chunk fetched from the
//! dispersed store and checked against the signed manifest into the node's model
//! cache (the one its model servers read) and kept there, then the model made the
//! node's active version of its name, the version before kept beside it so a
//! revert is a rollout that fetches nothing.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use aigrid_agent::staging::{ModelStager, Staged};
use aigrid_api::ModelAssignment;
use aigrid_store::cache::ChunkCache;
use aigrid_store::peers::Peer;
use aigrid_store::reader::ReaderOptions;
use anyhow::{anyhow, Context};
use serde::{Deserialize, Serialize};

use crate::client::Client;
use crate::model;

/// The cache budget: the model servers' default.
const CACHE_BYTES: u64 = 20 << 30;
/// Where the active version of each model name is recorded, in the cache dir.
const ACTIVE_FILE: &str = "active.json";
/// Longest one chunk may take to come from a peer before another is asked.
const PEER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A node's active and previous version of one model name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Versions {
    active: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    previous: Option<String>,
}

/// Stages into the node's model cache under `cache_dir`.
#[derive(Debug, Clone)]
pub struct StoreStager {
    cache_dir: PathBuf,
    /// Peers are on the grid's own network: no proxy stands between. Replaced by
    /// one presenting the node's certificate once the data port has one.
    http: Arc<std::sync::RwLock<reqwest::Client>>,
    /// One staging at a time per node, so two rollouts never race on the
    /// active-version file.
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl StoreStager {
    /// A stager whose cache is `cache_dir`.
    pub fn new(cache_dir: PathBuf) -> Self {
        StoreStager {
            cache_dir,
            http: Arc::new(std::sync::RwLock::new(
                peer_client(reqwest::Client::builder()).unwrap_or_default(),
            )),
            lock: Arc::new(tokio::sync::Mutex::new(())),
        }
    }
}

impl StoreStager {
    /// Makes the model cache (and its chunks' directory) the model servers'
    /// shared directory, group `gid`, before anything is staged into it. A model
    /// server's start empties a cache that is not yet the group's: without this,
    /// the first one to start after a rollout staged a model would take the
    /// staged chunks and the active-version file with it. `None`: workloads do
    /// not get uids of their own on this node, and nothing is shared by group.
    pub fn share_with(&self, gid: Option<u32>) -> std::io::Result<()> {
        let Some(gid) = gid else {
            return Ok(());
        };
        aigrid_agent::sandbox::make_shared(&self.cache_dir, gid)?;
        aigrid_agent::sandbox::make_shared(
            &self.cache_dir.join(aigrid_store::cache::CHUNKS_DIR),
            gid,
        )
    }

    /// Presents `identity` to peers from now on, and trusts their data ports under
    /// its CA (`https://` peers), wherever they answer.
    pub fn present(&self, identity: &aigrid_tls::NodeIdentity) -> anyhow::Result<()> {
        let config = identity
            .data_client_config()
            .map_err(|e| anyhow!("the peer client's TLS: {e}"))?;
        let client = peer_client(reqwest::Client::builder().tls_backend_preconfigured(config))?;
        *self.http.write().unwrap_or_else(|e| e.into_inner()) = client;
        Ok(())
    }
}

/// A client for peers' data ports from `builder`.
fn peer_client(builder: reqwest::ClientBuilder) -> anyhow::Result<reqwest::Client> {
    builder
        .no_proxy()
        .connect_timeout(std::time::Duration::from_secs(2))
        .build()
        .context("building the peer client")
}

impl ModelStager for StoreStager {
    fn stage(&self, servers: String, model: ModelAssignment) -> Staged {
        let this = self.clone();
        Box::pin(async move {
            let _one = this.lock.lock().await;
            this.stage_now(&servers, &model)
                .await
                .map_err(|e| format!("{e:#}").replace('\n', " "))
        })
    }
}

impl StoreStager {
    async fn stage_now(&self, servers: &str, model: &ModelAssignment) -> anyhow::Result<()> {
        let (digest, name) = (model.digest.as_str(), model.name.as_str());
        let client = Client::new(servers, None)?;
        // Checked to verify and to be the digest asked for, as `pull` does.
        let detail = model::detail(&client, digest).await?;
        let (store, _) = model::open_store(&client, &model::StoreArgs { store: None }).await?;
        let cache = ChunkCache::open(&self.cache_dir, CACHE_BYTES)
            .with_context(|| format!("opening the model cache {}", self.cache_dir.display()))?;
        let options = ReaderOptions {
            cache: Some(Arc::new(cache)),
            ..ReaderOptions::default()
        };
        let reader = store
            .reader(&detail.registration(), options)
            .map_err(|e| anyhow!("model {}: {e}", model::short(digest)))?;
        let peers: Vec<Peer> = model
            .peers
            .iter()
            .map(|p| Peer {
                url: p.url.clone(),
                same_site: p.same_site,
                whole: p.whole,
            })
            .collect();
        let http = self.http.read().unwrap_or_else(|e| e.into_inner()).clone();
        let (fetched, from_peers) = reader
            .stage(&http, &peers, model.origin_share, PEER_TIMEOUT)
            .await
            .map_err(|e| anyhow!("staging model {}: {e}", model::short(digest)))?;
        if !from_peers.dropped.is_empty() {
            tracing::warn!(peers = ?from_peers.dropped, "peers dropped for sending bad chunks");
        }
        let path = self.cache_dir.join(ACTIVE_FILE);
        let mut active: BTreeMap<String, Versions> = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("reading {}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let was = active.get(name).cloned().unwrap_or_default();
        if was.active != digest {
            let previous = (!was.active.is_empty()).then_some(was.active);
            active.insert(
                name.to_owned(),
                Versions {
                    active: digest.to_owned(),
                    previous,
                },
            );
            let tmp = path.with_extension("json.tmp");
            std::fs::write(&tmp, serde_json::to_vec_pretty(&active)?)
                .with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        }
        tracing::info!(
            model = %model::short(digest),
            %name,
            from_store = fetched,
            from_peers = from_peers.bytes,
            "model staged and active"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn what_is_staged_before_the_first_model_server_starts_stays() {
        if !nix::unistd::geteuid().is_root() {
            // Only root hands directories to another group; without per-allocation
            // uids nothing is shared by group.
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let cache = root.path().join(aigrid_agent::model_server::CACHE_DIR);
        // A group other than the agent's own, as a workload range's is.
        let gid = nix::unistd::getegid().as_raw() + 4242;
        let stager = StoreStager::new(cache.clone());
        stager.share_with(Some(gid)).unwrap();
        // What staging writes: chunks and the active-version file.
        let chunk = ChunkCache::open(&cache, 1 << 20).unwrap();
        drop(chunk);
        std::fs::write(cache.join(ACTIVE_FILE), b"{}").unwrap();
        // A model server's start makes the cache shared: it must keep them.
        aigrid_agent::sandbox::make_shared(&cache, gid).unwrap();
        assert!(cache.join(ACTIVE_FILE).exists());
        for dir in [cache.clone(), cache.join(aigrid_store::cache::CHUNKS_DIR)] {
            let meta = std::fs::metadata(&dir).unwrap();
            assert_eq!((meta.gid(), meta.mode() & 0o7777), (gid, 0o2770), "{dir:?}");
        }
    }
}
