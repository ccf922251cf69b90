//! The identity the tests act as: a fixed key, the admin of every cluster the tests
//! start (`--admin`, or `aigrid up`'s own admin through `AIGRID_IDENTITY`), and
//! signing for requests the tests send by hand.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use aigrid_api::{IdentityKey, KeyAlgorithm, KeyFile};

pub use aigrid_scheduler::testkit::admin_key;

/// A key that is no one's (not known to any cluster).
pub fn stranger_key() -> IdentityKey {
    IdentityKey::from_seed(KeyAlgorithm::Ed25519, [13; 32])
}

/// The admin's public key, as `--admin` takes it.
pub fn admin_public() -> String {
    admin_key().public().to_string()
}

/// Writes `key` as a key file (mode 0600) at `path`.
pub fn write_key_file(path: &Path, name: &str, key: &IdentityKey) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(
        serde_json::to_string(&KeyFile::new(name, key))
            .unwrap()
            .as_bytes(),
    )
    .unwrap();
}

/// The admin's key file, written once per test process.
pub fn admin_identity_file() -> &'static Path {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("aigrid-tests-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("admin.json");
        write_key_file(&path, "tests", &admin_key());
        path
    })
}

pub use aigrid_scheduler::testkit::Sign;
