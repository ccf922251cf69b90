//! The store a model command works on (`--store FILE`, else what the server
//! announces), and the keys it uses: the publisher's signing key and the owner's
//! key of a model encrypted at rest.

use std::path::{Path, PathBuf};

use aigrid_api::model::StorageInfo;
use aigrid_store::backend::{Backend, BackendConfig};
use aigrid_store::crypto::ModelKey;
use aigrid_store::store::Store;
use anyhow::{anyhow, bail, Context};
use clap::Args;
use ed25519_dalek::SigningKey;
use reqwest::Method;

use crate::client::Client;

/// Where the store's backends are described.
#[derive(Args, Clone, Default)]
pub struct StoreArgs {
    /// The store's backends as a TOML file (as `aigrid server --store` takes);
    /// default: the backends the server announces.
    #[arg(long = "store", env = "AIGRID_STORE")]
    pub store: Option<PathBuf>,
}

/// The backends of a store file or of the server's store.
pub fn store_from(configs: &[BackendConfig]) -> anyhow::Result<Store> {
    if configs.is_empty() {
        bail!("no dispersed store: the server has none configured (start it with --store FILE) and no --store was given");
    }
    // `https://` backends (nodes' data ports) are served under the cluster CA.
    let ca = match crate::client::trusted() {
        Some(aigrid_tls::ApiTrust::CaCert(ca)) => Some(ca),
        _ => None,
    };
    let mut backends = Vec::new();
    for config in configs {
        let backend = Backend::from_config_trusting(config, ca.as_ref().map(|c| c.as_ref()));
        backends.push(backend.map_err(|e| anyhow!("{e}"))?);
    }
    Ok(Store::new(backends))
}

/// The store described by `--store` or announced by the server.
pub async fn open_store(client: &Client, args: &StoreArgs) -> anyhow::Result<(Store, StorageInfo)> {
    let (info, configs) = match &args.store {
        Some(path) => crate::files::read_store_file(path)?,
        None => {
            let info: StorageInfo = client
                .call::<(), _>(Method::GET, "/api/v1/storage", None)
                .await
                .context("asking the server for its store")?;
            let configs = backend_configs(&info);
            (info, configs)
        }
    };
    Ok((store_from(&configs)?, info))
}

/// Backend configurations from what a server announces (no credentials).
pub fn backend_configs(info: &StorageInfo) -> Vec<BackendConfig> {
    info.backends
        .iter()
        .map(|b| BackendConfig {
            name: b.name.clone(),
            url: b.url.clone(),
            attributes: b.attributes.clone(),
            options: Default::default(),
        })
        .collect()
}

/// The publisher key at `path` (or the default place), created on first use; answers
/// where it was created when it was.
pub(super) fn publisher_key(path: Option<&Path>) -> anyhow::Result<(SigningKey, Option<PathBuf>)> {
    let path = match path {
        Some(p) => p.to_path_buf(),
        None => dirs::config_dir()
            .ok_or_else(|| anyhow!("no user config directory; pass --publisher-key FILE"))?
            .join("aigrid")
            .join("publisher.key"),
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let bytes = aigrid_api::auth::unhex::<32>(text.trim()).ok_or_else(|| {
                anyhow!(
                    "{}: not a publisher key (64 hex characters)",
                    path.display()
                )
            })?;
            Ok((SigningKey::from_bytes(&bytes), None))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = SigningKey::from_bytes(&rand::random());
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            aigrid_store::crypto::write_new_key_file(&path, &key.to_bytes())
                .with_context(|| format!("creating {}", path.display()))?;
            Ok((key, Some(path)))
        }
        Err(e) => Err(anyhow!("{}: {e}", path.display())),
    }
}

/// The owner's key at `path`, for a model encrypted at rest.
pub fn read_model_key(path: Option<&Path>) -> anyhow::Result<Option<ModelKey>> {
    path.map(|p| ModelKey::read(p).map_err(|e| anyhow!("{e}")))
        .transpose()
}
