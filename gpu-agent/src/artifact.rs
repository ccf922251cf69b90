//! Task artifacts, pinned by BLAKE3 digest.
//!
//! An artifact is fetched into a content-addressed cache (`<cache>/<blake3 hex>`)
//! through a temporary file while it is hashed, so bytes that do not hash to the
//! declared digest never land under a digest's name, and a task whose artifact does
//! not verify never starts. A cached file is hashed again before every use: one bit
//! flipped on disk is caught as surely as one flipped in transit. Verified files are
//! hard-linked (or copied, across file systems) into the task's directory.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use aigrid_api::Artifact;
use futures_util::StreamExt;
use tempfile::NamedTempFile;
use tokio::io::AsyncWriteExt;

/// Largest artifact accepted: 64 GiB.
pub const MAX_ARTIFACT_BYTES: u64 = 64 << 30;

/// Why an artifact cannot be used. The messages are one line and start with the
/// reason code the control plane shows (`digest_mismatch`, `artifact_fetch_failed`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArtifactError {
    /// The bytes hash to something other than the declared digest.
    #[error("digest_mismatch: artifact `{source_url}`: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The artifact's source.
        source_url: String,
        /// The declared digest.
        expected: String,
        /// The digest of the bytes fetched.
        actual: String,
    },
    /// No fetcher for this kind of source on this node.
    #[error("artifact_fetch_failed: unsupported source `{0}`")]
    Unsupported(String),
    /// The artifact could not be fetched or stored.
    #[error("artifact_fetch_failed: artifact `{source_url}`: {detail}")]
    Fetch {
        /// The artifact's source.
        source_url: String,
        /// What went wrong.
        detail: String,
    },
}

impl ArtifactError {
    fn fetch(artifact: &Artifact, detail: impl std::fmt::Display) -> Self {
        ArtifactError::Fetch {
            source_url: artifact.source.clone(),
            detail: one_line(&detail.to_string()),
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Where an artifact comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    Local(PathBuf),
    Http(reqwest::Url),
}

fn parse_source(artifact: &Artifact) -> Result<Source, ArtifactError> {
    let s = artifact.source.as_str();
    if s.starts_with('/') {
        return Ok(Source::Local(PathBuf::from(s)));
    }
    let unsupported = || ArtifactError::Unsupported(artifact.source.clone());
    let url = reqwest::Url::parse(s).map_err(|_| unsupported())?;
    match url.scheme() {
        "file" => url
            .to_file_path()
            .map(Source::Local)
            .map_err(|()| unsupported()),
        "http" | "https" => Ok(Source::Http(url)),
        _ => Err(unsupported()),
    }
}

/// The name an artifact gets in the task directory: the last segment of its
/// source's path.
pub fn file_name(source: &str) -> Option<String> {
    let path = match reqwest::Url::parse(source) {
        Ok(url) if url.scheme() != "file" => url.path().to_owned(),
        Ok(url) => url.to_file_path().ok()?.to_string_lossy().into_owned(),
        Err(_) => source.to_owned(),
    };
    let name = path.rsplit('/').next()?;
    (!name.is_empty() && name != "." && name != "..").then(|| name.to_owned())
}

fn check_digest(artifact: &Artifact) -> Result<(), ArtifactError> {
    let d = &artifact.blake3;
    if d.len() == 64
        && d.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(ArtifactError::fetch(
            artifact,
            format!("`{d}` is not a BLAKE3 digest (64 lowercase hex characters)"),
        ))
    }
}

/// BLAKE3 of a file and its length, read in a streaming way. Blocking: call it from
/// a blocking thread.
pub fn hash_file(path: &Path) -> io::Result<(blake3::Hash, u64)> {
    let mut hasher = blake3::Hasher::new();
    let len = copy_hashing(
        &mut File::open(path)?,
        &mut io::sink(),
        &mut hasher,
        u64::MAX,
    )?;
    Ok((hasher.finalize(), len))
}

/// Copies at most `limit` bytes (an error past it) while hashing them.
fn copy_hashing(
    from: &mut impl Read,
    to: &mut impl Write,
    hasher: &mut blake3::Hasher,
    limit: u64,
) -> io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        total += n as u64;
        if total > limit {
            return Err(too_large());
        }
        hasher.update(&buf[..n]);
        to.write_all(&buf[..n])?;
    }
}

fn too_large() -> io::Error {
    io::Error::other(format!(
        "larger than the {} GiB artifact limit",
        MAX_ARTIFACT_BYTES >> 30
    ))
}

/// The verified artifact cache of one node.
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    dir: PathBuf,
    http: reqwest::Client,
}

impl ArtifactStore {
    /// A cache in `dir` (created on first use), fetching http(s) sources with `http`.
    pub fn new(dir: PathBuf, http: reqwest::Client) -> Self {
        ArtifactStore { dir, http }
    }

    /// Fetches and verifies `artifact`, then links it into `into` under its file
    /// name, answering the placed path.
    pub async fn place(&self, artifact: &Artifact, into: &Path) -> Result<PathBuf, ArtifactError> {
        let name = file_name(&artifact.source)
            .ok_or_else(|| ArtifactError::fetch(artifact, "its source names no file"))?;
        let cached = self.fetch(artifact).await?;
        let dest = into.join(name);
        let (a, d) = (artifact.clone(), dest.clone());
        blocking(move || link_or_copy(&cached, &d).map_err(|e| ArtifactError::fetch(&a, e)))
            .await?;
        Ok(dest)
    }

    /// Answers the path of a verified copy of `artifact` in the cache, fetching it
    /// when the cache has none (or a damaged one).
    pub async fn fetch(&self, artifact: &Artifact) -> Result<PathBuf, ArtifactError> {
        check_digest(artifact)?;
        let source = parse_source(artifact)?;
        let cached = self.dir.join(&artifact.blake3);
        let (a, path, dir) = (artifact.clone(), cached.clone(), self.dir.clone());
        let hit = blocking(move || {
            fs::create_dir_all(&dir).map_err(|e| ArtifactError::fetch(&a, e))?;
            match hash_file(&path) {
                Ok((hash, _)) if hash.to_hex().as_str() == a.blake3 => Ok(true),
                Ok((hash, _)) => {
                    tracing::warn!(
                        artifact = %a.source,
                        path = %path.display(),
                        actual = %hash.to_hex(),
                        "cached artifact is damaged; fetching it again"
                    );
                    fs::remove_file(&path).map_err(|e| ArtifactError::fetch(&a, e))?;
                    Ok(false)
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(ArtifactError::fetch(&a, e)),
            }
        })
        .await?;
        if hit {
            return Ok(cached);
        }
        let temp = match source {
            Source::Local(path) => {
                let (a, dir) = (artifact.clone(), self.dir.clone());
                blocking(move || fetch_local(&a, &path, &dir)).await?
            }
            Source::Http(url) => self.fetch_http(artifact, url).await?,
        };
        let a = artifact.clone();
        blocking(move || {
            let file = temp
                .persist(&cached)
                .map_err(|e| ArtifactError::fetch(&a, e.error))?;
            let _ = file.set_permissions(fs::Permissions::from_mode(0o555));
            Ok(cached)
        })
        .await
    }

    async fn fetch_http(
        &self,
        artifact: &Artifact,
        url: reqwest::Url,
    ) -> Result<NamedTempFile, ArtifactError> {
        let err = |e: &dyn std::error::Error| ArtifactError::fetch(artifact, error_chain(e));
        let response = self
            .http
            .get(url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| err(&e))?;
        if response.content_length().unwrap_or(0) > MAX_ARTIFACT_BYTES {
            return Err(err(&too_large()));
        }
        let temp = NamedTempFile::new_in(&self.dir).map_err(|e| err(&e))?;
        let mut file = tokio::fs::File::from_std(temp.reopen().map_err(|e| err(&e))?);
        let mut hasher = blake3::Hasher::new();
        let mut total = 0u64;
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| err(&e))?;
            total += chunk.len() as u64;
            if total > MAX_ARTIFACT_BYTES {
                return Err(err(&too_large()));
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(|e| err(&e))?;
        }
        file.sync_all().await.map_err(|e| err(&e))?;
        verify(artifact, hasher.finalize())?;
        Ok(temp)
    }
}

/// Copies a local file into a temporary file in `cache_dir`, verifying it.
fn fetch_local(
    artifact: &Artifact,
    path: &Path,
    cache_dir: &Path,
) -> Result<NamedTempFile, ArtifactError> {
    let err = |e: io::Error| ArtifactError::fetch(artifact, e);
    let mut from = File::open(path).map_err(err)?;
    if from.metadata().map_err(err)?.len() > MAX_ARTIFACT_BYTES {
        return Err(err(too_large()));
    }
    let mut temp = NamedTempFile::new_in(cache_dir).map_err(err)?;
    let mut hasher = blake3::Hasher::new();
    copy_hashing(
        &mut from,
        temp.as_file_mut(),
        &mut hasher,
        MAX_ARTIFACT_BYTES,
    )
    .map_err(err)?;
    verify(artifact, hasher.finalize())?;
    temp.as_file().sync_all().map_err(err)?;
    Ok(temp)
}

fn verify(artifact: &Artifact, actual: blake3::Hash) -> Result<(), ArtifactError> {
    let actual = actual.to_hex();
    if actual.as_str() == artifact.blake3 {
        Ok(())
    } else {
        Err(ArtifactError::DigestMismatch {
            source_url: artifact.source.clone(),
            expected: artifact.blake3.clone(),
            actual: actual.to_string(),
        })
    }
}

fn link_or_copy(from: &Path, to: &Path) -> io::Result<()> {
    match fs::remove_file(to) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    if fs::hard_link(from, to).is_err() {
        fs::copy(from, to)?;
    }
    Ok(())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Runs file work (hashing, copying) on a blocking thread, off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ArtifactError> + Send + 'static,
) -> Result<T, ArtifactError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(ArtifactError::Fetch {
            source_url: String::new(),
            detail: format!("interrupted: {e}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn artifact(source: &Path, content: &[u8]) -> Artifact {
        Artifact {
            source: format!("file://{}", source.display()),
            blake3: blake3::hash(content).to_hex().to_string(),
        }
    }

    fn store(dir: &Path) -> ArtifactStore {
        ArtifactStore::new(dir.join("cache"), reqwest::Client::new())
    }

    #[test]
    fn sources_and_names() {
        let a = |s: &str| Artifact {
            source: s.into(),
            blake3: String::new(),
        };
        assert_eq!(
            parse_source(&a("/srv/w.bin")),
            Ok(Source::Local("/srv/w.bin".into()))
        );
        assert_eq!(
            parse_source(&a("file:///srv/my%20w.bin")),
            Ok(Source::Local("/srv/my w.bin".into()))
        );
        assert!(matches!(
            parse_source(&a("https://x.test/a.bin")),
            Ok(Source::Http(_))
        ));
        let err = parse_source(&a("b3:0123")).unwrap_err().to_string();
        assert_eq!(err, "artifact_fetch_failed: unsupported source `b3:0123`");
        assert!(parse_source(&a("relative/path")).is_err());
        assert_eq!(
            file_name("https://x.test/m/w.bin?sig=1").as_deref(),
            Some("w.bin")
        );
        assert_eq!(file_name("/srv/data.txt").as_deref(), Some("data.txt"));
        assert_eq!(file_name("https://x.test/"), None);
        assert_eq!(file_name("/srv/.."), None);
    }

    #[tokio::test]
    async fn verified_artifact_is_placed() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("data.txt");
        fs::write(&src, b"hello weights").unwrap();
        let task_dir = dir.path().join("local");
        fs::create_dir(&task_dir).unwrap();
        let placed = store(dir.path())
            .place(&artifact(&src, b"hello weights"), &task_dir)
            .await
            .unwrap();
        assert_eq!(placed, task_dir.join("data.txt"));
        assert_eq!(fs::read(&placed).unwrap(), b"hello weights");
    }

    #[tokio::test]
    async fn one_flipped_bit_is_refused_and_not_cached() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("data.txt");
        let good = b"hello weights".to_vec();
        let mut flipped = good.clone();
        flipped[3] ^= 0x01;
        fs::write(&src, &flipped).unwrap();
        let task_dir = dir.path().join("local");
        fs::create_dir(&task_dir).unwrap();
        let wanted = artifact(&src, &good);
        let err = store(dir.path())
            .place(&wanted, &task_dir)
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("digest_mismatch: artifact `file://"),
            "{text}"
        );
        assert!(text.contains(&wanted.blake3), "{text}");
        assert!(
            text.contains(blake3::hash(&flipped).to_hex().as_str()),
            "{text}"
        );
        assert!(!task_dir.join("data.txt").exists());
        let cached: Vec<_> = fs::read_dir(dir.path().join("cache")).unwrap().collect();
        assert!(cached.is_empty(), "nothing unverified is left in the cache");
    }

    #[tokio::test]
    async fn cache_hits_are_verified_again() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("data.txt");
        fs::write(&src, b"hello weights").unwrap();
        let wanted = artifact(&src, b"hello weights");
        let store = store(dir.path());
        let cached = store.fetch(&wanted).await.unwrap();
        assert_eq!(cached, dir.path().join("cache").join(&wanted.blake3));

        // Damage the cached copy; with the source intact it is fetched again.
        let mut perms = fs::metadata(&cached).unwrap().permissions();
        perms.set_mode(0o644);
        fs::set_permissions(&cached, perms.clone()).unwrap();
        let mut bytes = fs::read(&cached).unwrap();
        bytes[0] ^= 0x80;
        fs::write(&cached, &bytes).unwrap();
        store.fetch(&wanted).await.unwrap();
        assert_eq!(fs::read(&cached).unwrap(), b"hello weights");

        // Damage it again with the source gone: refused, never used.
        fs::set_permissions(&cached, perms).unwrap();
        fs::write(&cached, &bytes).unwrap();
        fs::remove_file(&src).unwrap();
        let err = store.fetch(&wanted).await.unwrap_err().to_string();
        assert!(err.starts_with("artifact_fetch_failed: "), "{err}");
        assert!(!cached.exists());
    }

    #[tokio::test]
    async fn malformed_digest_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let wanted = Artifact {
            source: "/etc/hostname".into(),
            blake3: "ABC".into(),
        };
        let err = store(dir.path())
            .fetch(&wanted)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("artifact_fetch_failed: "), "{err}");
    }
}
