//! A place shards are kept: any `object_store` store (local directories standing in
//! for sites, S3-compatible stores, HTTP shard services), with a name and the
//! attributes placement policies match on.
//!
//! A backend is usually built from a [`BackendConfig`] whose URL picks the kind:
//!
//! | url | store |
//! |---|---|
//! | `/abs/dir`, `file:///abs/dir` | a local directory (created if missing) |
//! | `s3://bucket/prefix` | S3 or an S3-compatible store; endpoint, region and credentials from the usual `AWS_*` variables, overridden by `options` |
//! | `http://host:port/prefix`, `https://…` | an [HTTP shard service](crate::shard_service) (or any WebDAV server) |
//!
//! Every backend counts what it moves ([`Backend::stats`]), so callers and tests can
//! see how many bytes a push or a pull really sent.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientConfigKey, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
};
use serde::{Deserialize, Serialize};

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

/// Why a [`BackendConfig`] does not make a backend. Every message names the backend
/// and fits on one line.
#[derive(Debug, thiserror::Error)]
pub enum BackendConfigError {
    /// The name is empty.
    #[error("a backend needs a name (url `{url}`)")]
    EmptyName {
        /// The backend's URL.
        url: String,
    },
    /// The URL does not parse, or does not fit its scheme.
    #[error("backend `{backend}`: bad url `{url}`: {reason}")]
    BadUrl {
        /// The backend.
        backend: String,
        /// The URL as written.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No store speaks this scheme.
    #[error(
        "backend `{backend}`: unsupported url scheme `{scheme}` \
         (use an absolute path, file://, s3://, http:// or https://)"
    )]
    UnknownScheme {
        /// The backend.
        backend: String,
        /// The scheme found.
        scheme: String,
    },
    /// An `options` key the backend's store does not know.
    #[error("backend `{backend}`: unknown option `{key}` for a {kind} backend")]
    UnknownOption {
        /// The backend.
        backend: String,
        /// The key.
        key: String,
        /// `file`, `s3` or `http`.
        kind: &'static str,
    },
    /// The local directory cannot be created.
    #[error("backend `{backend}`: creating {dir}: {source}")]
    Io {
        /// The backend.
        backend: String,
        /// The directory.
        dir: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The store refused its settings.
    #[error("backend `{backend}`: {source}")]
    Store {
        /// The backend.
        backend: String,
        /// What failed.
        #[source]
        source: object_store::Error,
    },
}

/// One backend as written in a store's configuration.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Unique among a store's backends; manifests name shard locations by it.
    pub name: String,
    /// Where the shards live; the scheme picks the store (see the module docs).
    pub url: String,
    /// Facts placement policies match on (`site`, `country`).
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// Store settings that win over the environment: for `s3://` any `object_store`
    /// S3 key (`endpoint`, `region`, `access_key_id`, `secret_access_key`,
    /// `allow_http`, …), for `http(s)://` its client keys (`timeout`,
    /// `connect_timeout`, …). Several S3-compatible sites with different endpoints
    /// need this: one process has only one `AWS_ENDPOINT`. Values may be secrets, so
    /// `Debug` prints only the keys.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

impl fmt::Debug for BackendConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendConfig")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("attributes", &self.attributes)
            .field("options", &self.options.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// What a backend has moved since it was built (shared by its clones). Only
/// operations that succeeded count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// Payload bytes stored.
    pub bytes_put: u64,
    /// Payload bytes read back.
    pub bytes_got: u64,
    /// Objects stored.
    pub puts: u64,
    /// Objects (or ranges of objects) read.
    pub gets: u64,
}

#[derive(Debug, Default)]
struct Counters {
    bytes_put: AtomicU64,
    bytes_got: AtomicU64,
    puts: AtomicU64,
    gets: AtomicU64,
}

/// One shard store.
#[derive(Clone)]
pub struct Backend {
    /// Unique among a store's backends; manifests name shard locations by it.
    pub name: String,
    /// Facts placement policies match on (`site`, `country`).
    pub attributes: BTreeMap<String, String>,
    url: String,
    store: Arc<dyn ObjectStore>,
    counters: Arc<Counters>,
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Backend({}: {})", self.name, self.url)
    }
}

/// Retries for remote stores: enough to ride out a blip, bounded so that a dead
/// endpoint fails in about two seconds instead of object_store's default three
/// minutes (a pull then moves on to another shard).
fn remote_retry() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
        max_retries: 4,
        retry_timeout: Duration::from_secs(10),
    }
}

/// How long a remote store may take to accept a connection, unless `options` says.
const CONNECT_TIMEOUT: &str = "3s";

impl Backend {
    /// A backend over any object store.
    pub fn new(
        name: impl Into<String>,
        attributes: BTreeMap<String, String>,
        store: Arc<dyn ObjectStore>,
    ) -> Self {
        let url = store.to_string();
        Backend {
            name: name.into(),
            attributes,
            url,
            store,
            counters: Arc::default(),
        }
    }

    /// A backend in a local directory (created if missing). Deleting an object
    /// also removes the directories it leaves empty, so removing every model gives
    /// the disk back as it was.
    pub fn local(name: impl Into<String>, dir: &std::path::Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let store = object_store::local::LocalFileSystem::new_with_prefix(dir)
            .map_err(std::io::Error::other)?
            .with_automatic_cleanup(true);
        let mut backend = Backend::new(name, BTreeMap::new(), Arc::new(store));
        backend.url = format!("file://{}", dir.display());
        Ok(backend)
    }

    /// The backend a configuration describes. Builds the client only: nothing is
    /// contacted until the first operation.
    pub fn from_config(config: &BackendConfig) -> Result<Backend, BackendConfigError> {
        Self::from_config_trusting(config, None)
    }

    /// As [`Backend::from_config`], and an `https://` shard service's certificate
    /// may also chain to `ca` (a CA certificate, DER): the cluster CA its data ports
    /// are served under.
    pub fn from_config_trusting(
        config: &BackendConfig,
        ca: Option<&[u8]>,
    ) -> Result<Backend, BackendConfigError> {
        let name = config.name.trim();
        if name.is_empty() {
            return Err(BackendConfigError::EmptyName {
                url: config.url.clone(),
            });
        }
        let bad = |reason: String| BackendConfigError::BadUrl {
            backend: name.to_owned(),
            url: config.url.clone(),
            reason,
        };
        let raw = config.url.trim();
        if raw.starts_with('/') {
            return local_from(name, config, std::path::PathBuf::from(raw));
        }
        let url = url::Url::parse(raw).map_err(|e| bad(e.to_string()))?;
        let (store, display): (Arc<dyn ObjectStore>, String) = match url.scheme() {
            "file" => {
                if url.query().is_some() || url.fragment().is_some() {
                    return Err(bad("a file url takes no query or fragment".into()));
                }
                let dir = url
                    .to_file_path()
                    .map_err(|()| bad("not an absolute local path".into()))?;
                return local_from(name, config, dir);
            }
            "s3" | "s3a" => {
                let bucket = url
                    .host_str()
                    .filter(|b| !b.is_empty())
                    .ok_or_else(|| bad("no bucket".into()))?;
                let mut builder = object_store::aws::AmazonS3Builder::from_env()
                    .with_url(format!("s3://{bucket}"))
                    .with_retry(remote_retry())
                    .with_config(
                        object_store::aws::AmazonS3ConfigKey::Client(
                            ClientConfigKey::ConnectTimeout,
                        ),
                        CONNECT_TIMEOUT,
                    );
                for (key, value) in &config.options {
                    let key = key
                        .to_ascii_lowercase()
                        .parse()
                        .map_err(|_| unknown_option(name, key, "s3"))?;
                    builder = builder.with_config(key, value);
                }
                let store = builder
                    .build()
                    .map_err(|source| BackendConfigError::Store {
                        backend: name.to_owned(),
                        source,
                    })?;
                let prefix = ObjectPath::from_url_path(url.path())
                    .map_err(|e| bad(format!("prefix: {e}")))?;
                let display = format!("s3://{bucket}/{prefix}");
                let store: Arc<dyn ObjectStore> = if prefix.as_ref().is_empty() {
                    Arc::new(store)
                } else {
                    Arc::new(object_store::prefix::PrefixStore::new(store, prefix))
                };
                (store, display)
            }
            "http" | "https" => {
                if url.host_str().is_none_or(str::is_empty) {
                    return Err(bad("no host".into()));
                }
                if url.query().is_some() || url.fragment().is_some() {
                    return Err(bad("a shard service url takes no query or fragment".into()));
                }
                let mut base = url.clone();
                // object_store appends object paths as segments: a trailing slash would
                // put an empty segment in every object's URL.
                let trimmed = base.path().trim_end_matches('/').to_owned();
                base.set_path(&trimmed);
                let mut options = object_store::ClientOptions::new();
                if let Some(der) = ca {
                    let cert = object_store::Certificate::from_der(der)
                        .map_err(|e| bad(format!("the cluster CA certificate: {e}")))?;
                    options = options.with_root_certificate(cert);
                }
                let mut builder = object_store::http::HttpBuilder::new()
                    .with_client_options(options)
                    .with_url(base.as_str())
                    .with_retry(remote_retry())
                    .with_config(ClientConfigKey::ConnectTimeout, CONNECT_TIMEOUT)
                    .with_config(
                        ClientConfigKey::AllowHttp,
                        (url.scheme() == "http").to_string(),
                    );
                for (key, value) in &config.options {
                    let key: ClientConfigKey = key
                        .to_ascii_lowercase()
                        .parse()
                        .map_err(|_| unknown_option(name, key, "http"))?;
                    builder = builder.with_config(key, value);
                }
                let store = builder
                    .build()
                    .map_err(|source| BackendConfigError::Store {
                        backend: name.to_owned(),
                        source,
                    })?;
                // Never show a password that came inside the URL.
                let mut display = base;
                let _ = display.set_password(None);
                (Arc::new(store), display.to_string())
            }
            other => {
                return Err(BackendConfigError::UnknownScheme {
                    backend: name.to_owned(),
                    scheme: other.to_owned(),
                })
            }
        };
        Ok(Backend {
            name: name.to_owned(),
            attributes: config.attributes.clone(),
            url: display,
            store,
            counters: Arc::default(),
        })
    }

    /// Where the backend keeps its objects, for people (never carries a password).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// What this backend and its clones have moved so far.
    pub fn stats(&self) -> BackendStats {
        let c = &self.counters;
        BackendStats {
            bytes_put: c.bytes_put.load(Ordering::Relaxed),
            bytes_got: c.bytes_got.load(Ordering::Relaxed),
            puts: c.puts.load(Ordering::Relaxed),
            gets: c.gets.load(Ordering::Relaxed),
        }
    }

    fn err(&self, source: object_store::Error) -> BackendError {
        BackendError {
            backend: self.name.clone(),
            source,
        }
    }

    fn count_get(&self, bytes: &Bytes) {
        self.counters.gets.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_got
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
    }

    /// Stores `bytes` at `path`.
    pub async fn put(&self, path: &str, bytes: Bytes) -> Result<(), BackendError> {
        let len = bytes.len() as u64;
        self.store
            .put(&ObjectPath::from(path), PutPayload::from_bytes(bytes))
            .await
            .map_err(|e| self.err(e))?;
        self.counters.puts.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes_put.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// The object at `path`, or `None` when it is not there.
    pub async fn get(&self, path: &str) -> Result<Option<Bytes>, BackendError> {
        let bytes = match self.store.get(&ObjectPath::from(path)).await {
            Ok(found) => found.bytes().await.map_err(|e| self.err(e))?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.err(e)),
        };
        self.count_get(&bytes);
        Ok(Some(bytes))
    }

    /// Bytes `range` of the object at `path` (cut short at its end), or `None` when
    /// it is not there. A range starting at or past the end is an error.
    pub async fn get_range(
        &self,
        path: &str,
        range: Range<u64>,
    ) -> Result<Option<Bytes>, BackendError> {
        let bytes = match self.store.get_range(&ObjectPath::from(path), range).await {
            Ok(bytes) => bytes,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.err(e)),
        };
        self.count_get(&bytes);
        Ok(Some(bytes))
    }

    /// The size of the object at `path`, or `None` when it is not there.
    pub async fn head(&self, path: &str) -> Result<Option<u64>, BackendError> {
        match self.store.head(&ObjectPath::from(path)).await {
            Ok(meta) => Ok(Some(meta.size)),
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

fn unknown_option(backend: &str, key: &str, kind: &'static str) -> BackendConfigError {
    BackendConfigError::UnknownOption {
        backend: backend.to_owned(),
        key: key.to_owned(),
        kind,
    }
}

fn local_from(
    name: &str,
    config: &BackendConfig,
    dir: std::path::PathBuf,
) -> Result<Backend, BackendConfigError> {
    if let Some(key) = config.options.keys().next() {
        return Err(unknown_option(name, key, "file"));
    }
    let io = |source| BackendConfigError::Io {
        backend: name.to_owned(),
        dir: dir.display().to_string(),
        source,
    };
    let mut backend = Backend::local(name, &dir).map_err(io)?;
    backend.attributes = config.attributes.clone();
    Ok(backend)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str) -> BackendConfig {
        BackendConfig {
            name: "site-a".into(),
            url: url.into(),
            attributes: BTreeMap::from([("site".into(), "a".into())]),
            options: BTreeMap::new(),
        }
    }

    #[test]
    fn configs_parse_with_defaults_and_refuse_unknown_keys() {
        let c: BackendConfig =
            serde_json::from_str(r#"{"name":"a","url":"s3://bucket/models"}"#).unwrap();
        assert!(c.attributes.is_empty() && c.options.is_empty());
        let err = serde_json::from_str::<BackendConfig>(r#"{"name":"a","url":"/x","bogus":1}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bogus"), "{err}");
        let mut secret = config("s3://b");
        secret
            .options
            .insert("secret_access_key".into(), "hunter2".into());
        let shown = format!("{secret:?}");
        assert!(
            shown.contains("secret_access_key") && !shown.contains("hunter2"),
            "{shown}"
        );
    }

    #[tokio::test]
    async fn local_backends_from_paths_and_file_urls() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        let b = Backend::from_config(&config(plain.to_str().unwrap())).unwrap();
        assert!(plain.is_dir());
        assert_eq!(b.attributes["site"], "a");
        b.put("x/y", Bytes::from_static(b"hello")).await.unwrap();
        assert_eq!(b.head("x/y").await.unwrap(), Some(5));
        assert_eq!(b.head("x/z").await.unwrap(), None);
        assert_eq!(
            b.get_range("x/y", 1..3).await.unwrap().unwrap(),
            Bytes::from_static(b"el")
        );
        assert_eq!(
            b.stats(),
            BackendStats {
                bytes_put: 5,
                bytes_got: 2,
                puts: 1,
                gets: 1
            }
        );

        let url = url::Url::from_directory_path(dir.path().join("viaurl")).unwrap();
        let b = Backend::from_config(&config(url.as_str())).unwrap();
        assert!(dir.path().join("viaurl").is_dir());
        assert!(b.url().starts_with("file:///"), "{}", b.url());

        let err = Backend::from_config(&config("file://host/relative"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("site-a") && err.contains("bad url"), "{err}");
        let mut opts = config(plain.to_str().unwrap());
        opts.options.insert("endpoint".into(), "x".into());
        let err = Backend::from_config(&opts).unwrap_err().to_string();
        assert!(err.contains("unknown option `endpoint`"), "{err}");
    }

    #[test]
    fn remote_backends_build_without_the_network() {
        let mut s3 = config("s3://models/grid/a/");
        s3.options.insert("region".into(), "eu-west-1".into());
        s3.options
            .insert("endpoint".into(), "http://127.0.0.1:1".into());
        s3.options.insert("allow_http".into(), "true".into());
        let b = Backend::from_config(&s3).unwrap();
        assert_eq!(b.url(), "s3://models/grid/a");
        let mut bad = s3.clone();
        bad.options.insert("no_such_key".into(), "1".into());
        let err = Backend::from_config(&bad).unwrap_err().to_string();
        assert!(
            err.contains("unknown option `no_such_key` for a s3"),
            "{err}"
        );

        let b = Backend::from_config(&config("http://user:pw@10.0.0.7:7800/shards/")).unwrap();
        assert_eq!(b.url(), "http://user@10.0.0.7:7800/shards");
        Backend::from_config(&config("https://shards.example.org")).unwrap();
    }

    #[test]
    fn bad_urls_name_the_backend() {
        let err = |url: &str| Backend::from_config(&config(url)).unwrap_err().to_string();
        let e = err("ftp://host/x");
        assert!(
            e.starts_with("backend `site-a`: unsupported url scheme `ftp`"),
            "{e}"
        );
        let e = err("relative/dir");
        assert!(e.starts_with("backend `site-a`: bad url"), "{e}");
        let e = err("s3:///nobucket");
        assert!(e.contains("site-a"), "{e}");
        let e = err("http://");
        assert!(e.contains("site-a"), "{e}");
        assert!(!e.contains('\n'));
        let e = Backend::from_config(&BackendConfig {
            name: " ".into(),
            ..config("/tmp/x")
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("needs a name"), "{e}");
    }

    #[tokio::test]
    async fn a_dead_s3_endpoint_fails_fast_and_clearly() {
        // An endpoint that hangs up on every connection, counting them.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let tries = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = tries.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(stream);
            }
        });
        let mut s3 = config("s3://models/p");
        for (k, v) in [
            ("endpoint", endpoint.as_str()),
            ("allow_http", "true"),
            ("region", "us-east-1"),
            ("access_key_id", "test"),
            ("secret_access_key", "test"),
        ] {
            s3.options.insert(k.into(), v.into());
        }
        let b = Backend::from_config(&s3).unwrap();
        // The guard only keeps a broken build from hanging the suite.
        let err = tokio::time::timeout(
            Duration::from_secs(120),
            b.put("a/b", Bytes::from_static(b"x")),
        )
        .await
        .expect("the put gave up")
        .unwrap_err()
        .to_string();
        // Fast by construction: a bounded number of tries, each with a bounded
        // backoff (`remote_retry`), not object_store's three minutes of them.
        let tries = tries.load(std::sync::atomic::Ordering::SeqCst);
        let allowed = 1 + remote_retry().max_retries;
        assert!((1..=allowed).contains(&tries), "{tries} tries");
        assert!(err.starts_with("backend `site-a`:"), "{err}");
        assert!(b.get("a/b").await.is_err());
        assert_eq!(b.stats(), BackendStats::default());
    }
}
