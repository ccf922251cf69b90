//! Where a model's files come from: a local directory, or a registered model read
//! through the dispersed store's verified lazy reader (every byte checked against the
//! signed manifest before it is returned).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use aigrid_store::reader::Reader;
use bytes::Bytes;

use crate::ServingError;

/// A model's files.
#[derive(Clone)]
pub enum ModelSource {
    /// A model directory on local disk.
    Dir(PathBuf),
    /// A registered model in the dispersed store.
    Store(Arc<Reader>),
}

impl std::fmt::Debug for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelSource::Dir(dir) => write!(f, "directory {}", dir.display()),
            ModelSource::Store(reader) => write!(f, "model {}", reader.digest()),
        }
    }
}

impl ModelSource {
    /// The model's identity: the manifest digest, or the directory's path.
    pub fn id(&self) -> String {
        match self {
            ModelSource::Dir(dir) => dir.display().to_string(),
            ModelSource::Store(reader) => reader.digest().to_string(),
        }
    }

    /// Every file with its size, sorted by path.
    pub fn files(&self) -> Result<Vec<(String, u64)>, ServingError> {
        match self {
            ModelSource::Dir(dir) => {
                let mut out = Vec::new();
                list_dir(dir, dir, &mut out)?;
                out.sort();
                Ok(out)
            }
            ModelSource::Store(reader) => Ok(reader
                .manifest()
                .files
                .iter()
                .map(|f| (f.path.clone(), f.size))
                .collect()),
        }
    }

    /// A whole file, verified when it comes from the store.
    pub async fn read(&self, path: &str) -> Result<Bytes, ServingError> {
        match self {
            ModelSource::Dir(dir) => {
                let full = dir.join(path);
                tokio::fs::read(&full)
                    .await
                    .map(Bytes::from)
                    .map_err(|source| ServingError::Io {
                        path: full.display().to_string(),
                        source,
                    })
            }
            ModelSource::Store(reader) => Ok(reader.read_file(path).await?),
        }
    }

    /// A file if `files` (the model's listing, from [`ModelSource::files`]) has it.
    pub async fn read_optional(
        &self,
        files: &[(String, u64)],
        path: &str,
    ) -> Result<Option<Bytes>, ServingError> {
        if files.iter().any(|(p, _)| p == path) {
            self.read(path).await.map(Some)
        } else {
            Ok(None)
        }
    }
}

fn list_dir(root: &Path, dir: &Path, out: &mut Vec<(String, u64)>) -> Result<(), ServingError> {
    let io = |source, path: &Path| ServingError::Io {
        path: path.display().to_string(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(|e| io(e, dir))? {
        let entry = entry.map_err(|e| io(e, dir))?;
        let path = entry.path();
        // Follow links: model caches link files to blobs.
        let meta = std::fs::metadata(&path).map_err(|e| io(e, &path))?;
        if meta.is_dir() {
            list_dir(root, &path, out)?;
        } else {
            let rel = path
                .strip_prefix(root)
                .expect("walked under the root")
                .to_string_lossy()
                .replace('\\', "/");
            out.push((rel, meta.len()));
        }
    }
    Ok(())
}
