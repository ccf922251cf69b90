//! The node's identity: the id it registers under and the ed25519 key that signs
//! every request it makes. Both are made on first start and kept in the data dir,
//! so a restarted agent is the same node to the servers.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use aigrid_api::auth::{hex, unhex};
use aigrid_api::{NodeId, NodeKey};
use serde::{Deserialize, Serialize};

/// File in the data dir holding the identity.
pub const IDENTITY_FILE: &str = "identity.json";

/// A node id and its key.
#[derive(Debug)]
pub struct Identity {
    /// The id the node registers under.
    pub node_id: NodeId,
    /// Its private key.
    pub key: NodeKey,
}

/// Why the identity could not be read or made.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not an identity this agent wrote.
    #[error("{path}: not a node identity: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// `--node-id` names another node than the data dir holds.
    #[error("the data dir belongs to node `{stored}`, not `{wanted}`; use another --data-dir")]
    OtherNode {
        /// The id in the data dir.
        stored: String,
        /// The id asked for.
        wanted: String,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    node_id: NodeId,
    secret_key: String,
}

impl Identity {
    /// An identity from a node id and secret bytes (the fleet simulation derives
    /// them).
    pub fn new(node_id: NodeId, secret: [u8; 32]) -> Self {
        Identity {
            node_id,
            key: NodeKey::from_secret(secret),
        }
    }

    /// Reads the identity in `data_dir`, or makes one: the id is `wanted`, or the
    /// host name with a random suffix so two agents on one host differ. The file is
    /// written readable by the agent's user only, and atomically.
    pub fn load_or_create(
        data_dir: &Path,
        wanted: Option<&str>,
        hostname: &str,
    ) -> Result<Self, IdentityError> {
        let path = data_dir.join(IDENTITY_FILE);
        let io = |source| IdentityError::Io {
            path: path.clone(),
            source,
        };
        match fs::read(&path) {
            Ok(bytes) => {
                let corrupt = |reason: String| IdentityError::Corrupt {
                    path: path.clone(),
                    reason,
                };
                let stored: Stored =
                    serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
                let secret = unhex::<32>(&stored.secret_key)
                    .ok_or_else(|| corrupt("secret_key is not 64 hex characters".into()))?;
                if let Some(wanted) = wanted {
                    if wanted != stored.node_id.as_str() {
                        return Err(IdentityError::OtherNode {
                            stored: stored.node_id.to_string(),
                            wanted: wanted.to_owned(),
                        });
                    }
                }
                Ok(Identity::new(stored.node_id, secret))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::create_dir_all(data_dir).map_err(io)?;
                let node_id = match wanted {
                    Some(id) => NodeId::new(id),
                    None => NodeId::new(format!(
                        "{}-{}",
                        id_safe(hostname),
                        hex(&rand::random::<[u8; 4]>())
                    )),
                };
                let identity = Identity::new(node_id, rand::random());
                let stored = Stored {
                    node_id: identity.node_id.clone(),
                    secret_key: hex(&identity.key.secret()),
                };
                let json = serde_json::to_vec_pretty(&stored).expect("serialisable");
                write_private(&path, &json).map_err(io)?;
                Ok(identity)
            }
            Err(e) => Err(io(e)),
        }
    }
}

/// A host name cut down to what node ids allow.
fn id_safe(hostname: &str) -> String {
    let cleaned: String = hostname
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(100)
        .collect();
    if cleaned.is_empty() {
        "node".to_owned()
    } else {
        cleaned
    }
}

/// Writes `bytes` to `path` through a temporary file created with mode 0600, synced
/// before the rename so a crash leaves the old file or the new one.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn an_identity_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = Identity::load_or_create(dir.path(), None, "gpu box #1").unwrap();
        assert!(first.node_id.as_str().starts_with("gpu-box--1-"));
        let again = Identity::load_or_create(dir.path(), None, "other").unwrap();
        assert_eq!(again.node_id, first.node_id);
        assert_eq!(again.key.public(), first.key.public());
        let mode = fs::metadata(dir.path().join(IDENTITY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let err = Identity::load_or_create(dir.path(), Some("n2"), "h").unwrap_err();
        assert!(matches!(err, IdentityError::OtherNode { .. }), "{err}");

        let named = tempfile::tempdir().unwrap();
        let id = Identity::load_or_create(named.path(), Some("n2"), "h").unwrap();
        assert_eq!(id.node_id.as_str(), "n2");
        assert_ne!(id.key.public(), first.key.public());

        fs::write(named.path().join(IDENTITY_FILE), b"{}").unwrap();
        assert!(matches!(
            Identity::load_or_create(named.path(), None, "h"),
            Err(IdentityError::Corrupt { .. })
        ));
    }
}
