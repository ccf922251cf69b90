//! A place shards are kept: any `object_store` store (local directories standing in
//! for sites, S3-compatible stores, HTTP shard services), with a name and the
//! attributes placement policies match on.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

/// Why a backend operation failed.
#[derive(Debug, thiserror::Error)]
#[error("backend `{backend}`: {source}")]
pub struct BackendError {
    /// The backend.
    pub backend: String,
    /// What failed.
    #[source]
    pub source: object_store::Error,
}

/// One shard store.
#[derive(Clone)]
pub struct Backend {
    /// Unique among a store's backends; manifests name shard locations by it.
    pub name: String,
    /// Facts placement policies match on (`site`, `country`).
    pub attributes: BTreeMap<String, String>,
    store: Arc<dyn ObjectStore>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Backend({}: {})", self.name, self.store)
    }
}

impl Backend {
    /// A backend over any object store.
    pub fn new(
        name: impl Into<String>,
        attributes: BTreeMap<String, String>,
        store: Arc<dyn ObjectStore>,
    ) -> Self {
        Backend {
            name: name.into(),
            attributes,
            store,
        }
    }

    /// A backend in a local directory (created if missing).
    pub fn local(name: impl Into<String>, dir: &std::path::Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let store = object_store::local::LocalFileSystem::new_with_prefix(dir)
            .map_err(std::io::Error::other)?;
        Ok(Backend::new(name, BTreeMap::new(), Arc::new(store)))
    }

    fn err(&self, source: object_store::Error) -> BackendError {
        BackendError {
            backend: self.name.clone(),
            source,
        }
    }

    /// Stores `bytes` at `path`.
    pub async fn put(&self, path: &str, bytes: Bytes) -> Result<(), BackendError> {
        self.store
            .put(&ObjectPath::from(path), PutPayload::from_bytes(bytes))
            .await
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// The object at `path`, or `None` when it is not there.
    pub async fn get(&self, path: &str) -> Result<Option<Bytes>, BackendError> {
        match self.store.get(&ObjectPath::from(path)).await {
            Ok(found) => found.bytes().await.map(Some).map_err(|e| self.err(e)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Removes the object at `path`; a missing one is not an error.
    pub async fn delete(&self, path: &str) -> Result<(), BackendError> {
        match self.store.delete(&ObjectPath::from(path)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err(e)),
        }
    }
}
