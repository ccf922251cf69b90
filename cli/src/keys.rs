//! Identity key files: where they live, making them (mode 0600, never overwritten
//! by accident), reading them, and signing requests with them.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use aigrid_api::signature::{sign_request, SignedHeaders};
use aigrid_api::{IdentityKey, KeyAlgorithm, KeyFile};
use anyhow::{anyhow, bail, Context};

/// The file a client reads its identity from when `--key` does not say:
/// `<config dir>/aigrid/identity.json` (e.g. `~/.config/aigrid/identity.json`).
pub fn default_key_path() -> anyhow::Result<PathBuf> {
    let base = dirs::config_dir().ok_or_else(|| anyhow!("no user config directory; pass --key"))?;
    Ok(base.join("aigrid").join("identity.json"))
}

/// The key file `--key` names, or the default one.
pub fn key_path(flag: Option<&Path>) -> anyhow::Result<PathBuf> {
    match flag {
        Some(p) => Ok(p.to_owned()),
        None => default_key_path(),
    }
}

/// Reads a key file.
pub fn read_key(path: &Path) -> anyhow::Result<(KeyFile, IdentityKey)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the key file {}", path.display()))?;
    let file: KeyFile = serde_json::from_str(&text)
        .with_context(|| format!("{} is not an aigrid key file", path.display()))?;
    let key = file.key().map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok((file, key))
}

/// The key a client signs with: the one `--key` names (which must exist), else the
/// default file if there is one; `None` when there is none, and requests go unsigned
/// (the servers answer 401, saying so).
pub fn client_key(flag: Option<&Path>) -> anyhow::Result<Option<Arc<IdentityKey>>> {
    let path = key_path(flag)?;
    if flag.is_none() && !path.exists() {
        return Ok(None);
    }
    Ok(Some(Arc::new(read_key(&path)?.1)))
}

/// Makes a new identity in `path` (mode 0600; its directory 0700 when made here).
/// Refuses to replace an existing file.
pub fn create_key(path: &Path, name: &str, algorithm: KeyAlgorithm) -> anyhow::Result<KeyFile> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    let mut seed = [0u8; 32];
    rand::fill(&mut seed[..]);
    let key = IdentityKey::from_seed(algorithm, seed);
    let file = KeyFile::new(name, &key);
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => anyhow!(
                "{} exists; it holds an identity already (remove it first to replace it)",
                path.display()
            ),
            _ => anyhow!("creating {}: {e}", path.display()),
        })?;
    let text = serde_json::to_string_pretty(&file)?;
    out.write_all(text.as_bytes())
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(file)
}

/// The key in `path`, made first (named `name`) if the file does not exist yet.
pub fn ensure_key(path: &Path, name: &str) -> anyhow::Result<(KeyFile, IdentityKey)> {
    if !path.exists() {
        create_key(path, name, KeyAlgorithm::Ed25519)?;
    }
    let found = read_key(path)?;
    check_private(path)?;
    Ok(found)
}

/// Refuses a key file others may read.
fn check_private(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)?.permissions().mode();
    if mode & 0o077 != 0 {
        bail!(
            "{} may be read by others (mode {:o}); `chmod 600` it",
            path.display(),
            mode & 0o777
        );
    }
    Ok(())
}

/// Signs one request now, with a fresh nonce.
pub fn sign(key: &IdentityKey, method: &str, target: &str, body: &[u8]) -> SignedHeaders {
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut nonce = [0u8; 16];
    rand::fill(&mut nonce[..]);
    sign_request(key, method, target, body, created, nonce)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_are_private_and_never_replaced() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("identity.json");
        let made = create_key(&path, "alice", KeyAlgorithm::Ed25519MlDsa65).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        let err = create_key(&path, "bob", KeyAlgorithm::Ed25519).unwrap_err();
        assert!(err.to_string().contains("exists"), "{err}");
        let (file, key) = ensure_key(&path, "ignored").unwrap();
        assert_eq!(file, made);
        assert_eq!(key.public(), made.public_key);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(ensure_key(&path, "x").is_err());
        assert!(client_key(Some(&dir.path().join("missing.json"))).is_err());
    }
}
