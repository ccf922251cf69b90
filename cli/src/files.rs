//! The dispersed store's TOML file ([`read_store_file`]: unknown keys are an error) that
//! `aigrid server --store`, `aigrid up --store` and the model commands read, and the
//! embedded default store of `aigrid up` ([`local_store`]).

use std::collections::BTreeMap;
use std::path::Path;

use aigrid_api::{StorageBackend, StorageInfo};
use aigrid_store::backend::BackendConfig;
use aigrid_store::placement::{Place, Policy};
use anyhow::{anyhow, Context};
use serde::Deserialize;

/// Reads a TOML file into `T`, whose unknown keys are an error.
fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading store file {}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        anyhow!(
            "store file {}: {}",
            path.display(),
            e.to_string().replace('\n', " ")
        )
    })
}

/// A dispersed store's file, as written:
///
/// ```toml
/// k = 4
/// m = 2
/// policy = ["max 1 per site"]
/// [[backends]]
/// name = "site-0"
/// url = "file:///var/lib/aigrid/store/site-0"
/// attributes = { site = "a", country = "BE" }
/// ```
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreFile {
    k: usize,
    m: usize,
    #[serde(default)]
    policy: Vec<String>,
    #[serde(default)]
    backends: Vec<BackendConfig>,
}

/// What clients are told about a backend: its name, URL and attributes, never its
/// options (they may hold credentials).
fn told(b: &BackendConfig) -> StorageBackend {
    StorageBackend {
        name: b.name.clone(),
        url: b.url.clone(),
        attributes: b.attributes.clone(),
    }
}

/// Reads and checks a dispersed store's TOML file: what clients may be told about it
/// ([`StorageInfo`]: no credentials) and each backend's full configuration (its
/// `options` may hold credentials). Checked once here: k and m at least 1 and
/// within the codec's shard limit, backend names unique and non-empty, URLs without
/// credentials, the policy readable and able to place the k+m shards of a stripe on
/// the backends.
pub fn read_store_file(path: &Path) -> anyhow::Result<(StorageInfo, Vec<BackendConfig>)> {
    let file: StoreFile = read_toml(path)?;
    let context = |e: &dyn std::fmt::Display| anyhow!("store file {}: {e}", path.display());
    let info = StorageInfo {
        backends: file.backends.iter().map(told).collect(),
        k: file.k,
        m: file.m,
        policy: file.policy,
    };
    info.validate().map_err(|e| context(&e))?;
    let shards = info.k + info.m;
    if shards > aigrid_store::codec::MAX_SHARDS {
        return Err(context(&format!(
            "k+m = {shards} exceeds the codec's {} shards per stripe",
            aigrid_store::codec::MAX_SHARDS
        )));
    }
    let policy = Policy::parse(&info.policy).map_err(|e| context(&e))?;
    let attributes: Vec<_> = info.backends.iter().map(|b| &b.attributes).collect();
    policy
        .place(&attributes, shards, &[], 0)
        .map_err(|e| context(&e))?;
    Ok((info, file.backends))
}

/// The embedded default store: six local directories standing in for six sites,
/// coded 4+2, at most one shard of a stripe per site.
pub fn local_store(dir: &Path) -> anyhow::Result<(StorageInfo, Vec<BackendConfig>)> {
    let mut backends = Vec::new();
    for i in 0..6 {
        let path = dir.join(format!("site-{i}"));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        let path = path
            .canonicalize()
            .with_context(|| format!("resolving {}", path.display()))?;
        backends.push(BackendConfig {
            name: format!("site-{i}"),
            url: path.display().to_string(),
            attributes: BTreeMap::from([("site".to_owned(), format!("site-{i}"))]),
            options: BTreeMap::new(),
        });
    }
    let info = StorageInfo {
        backends: backends.iter().map(told).collect(),
        k: 4,
        m: 2,
        policy: vec!["max 1 per site".to_owned()],
    };
    Ok((info, backends))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const STORE: &str = r#"
k = 2
m = 1
policy = ["max 1 per site"]
[[backends]]
name = "site-0"
url = "file:///var/lib/aigrid/store/site-0"
attributes = { site = "a", country = "BE" }
[[backends]]
name = "site-1"
url = "s3://models/site-1"
attributes = { site = "b", country = "NL" }
options = { endpoint = "http://10.0.0.2:9000", secret_access_key = "hunter2" }
[[backends]]
name = "site-2"
url = "http://10.0.0.3:7710/"
attributes = { site = "c", country = "BE" }
"#;

    #[test]
    fn a_store_file_is_read_checked_and_told_without_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.toml");
        std::fs::write(&path, STORE).unwrap();
        let (info, configs) = read_store_file(&path).unwrap();
        assert_eq!((info.k, info.m), (2, 1));
        assert_eq!(info.policy, ["max 1 per site"]);
        assert_eq!(info.backends.len(), 3);
        assert_eq!(info.backends[0].attributes["country"], "BE");
        assert_eq!(configs[1].options["endpoint"], "http://10.0.0.2:9000");
        let told = serde_json::to_string(&info).unwrap();
        assert!(
            !told.contains("hunter2") && !told.contains("options"),
            "{told}"
        );
        assert_eq!(read_store_file(&path).unwrap().0, info);

        for (edit, has) in [
            (STORE.replace("k = 2", "k = 0"), "k: must be at least 1"),
            (STORE.replace("m = 1", "m = 0"), "m: must be at least 1"),
            (STORE.replace("k = 2", "k = 300"), "exceeds"),
            (STORE.replace("site-2", "site-0"), "names two backends"),
            (STORE.replace(r#""site-1""#, r#""""#), "backends[1].name"),
            (
                STORE.replace("s3://models", "s3://key:secret@models"),
                "user or password",
            ),
            (
                STORE.replace("max 1 per site", "at most one"),
                "invalid placement policy",
            ),
            (
                STORE.replace("max 1 per site", "country = BE"),
                "needs 3 distinct backends",
            ),
            (STORE.replace("k = 2", "k = 2\nbogus = 1"), "bogus"),
        ] {
            std::fs::write(&path, &edit).unwrap();
            let err = format!("{:#}", read_store_file(&path).unwrap_err());
            assert!(err.contains(has), "`{err}` lacks `{has}`");
            assert!(err.contains("store.toml"), "{err}");
        }
    }
}
