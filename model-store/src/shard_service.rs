//! The HTTP shard service: a node's disk offered to the dispersed store. It keeps
//! objects as files under one directory and speaks the subset of HTTP/WebDAV that
//! `object_store`'s `HttpStore` uses, so a [`Backend`](crate::backend::Backend) with
//! an `http://host:port/prefix` URL reads and writes it like any other store.
//!
//! | request | answer |
//! |---|---|
//! | `PUT /a/b` | 201 (new) or 204 (replaced), after the bytes are on disk; parents are created, so `MKCOL` is never needed |
//! | `GET /a/b` | 200, or 206 with `Content-Range` for one `Range: bytes=…`; `Content-Length`, `ETag`, `Last-Modified` |
//! | `HEAD /a/b` | the headers of `GET` |
//! | `DELETE /a/b` | 204, or 404 when missing |
//! | `GET /health`, `GET /metrics` | liveness, Prometheus text (so these two are not object names) |
//!
//! Object paths are `/`-separated segments of `A-Z a-z 0-9 - _ . =`, none empty and
//! none starting with `.` (so no `..`, and the service's own `.tmp` stays hidden);
//! anything else is 400 and touches nothing. A PUT is written to a temporary file,
//! fsync'd, renamed into place and the directory fsync'd before it is acknowledged,
//! so an acknowledged shard survives a crash and a reader never sees half of one.
//! Errors are `{"error": {"code", "message"}}`. Conditional headers (`If-Match`, …)
//! are ignored, and list (`PROPFIND`) is not offered: the store's manifests say where
//! every shard is. One service owns its directory.

use std::future::Future;
use std::io::SeekFrom;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures_util::StreamExt;
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How much the service takes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardServiceLimits {
    /// Largest object a PUT may carry; more is 413.
    pub max_body_bytes: u64,
    /// Object requests served at once; more are answered 429 at the door.
    pub max_concurrent_requests: usize,
}

impl Default for ShardServiceLimits {
    fn default() -> Self {
        ShardServiceLimits {
            max_body_bytes: 64 << 20,
            max_concurrent_requests: 256,
        }
    }
}

/// Why the service cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ShardServiceError {
    /// The directory cannot be prepared.
    #[error("shard directory {dir}: {source}")]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The metrics cannot be registered.
    #[error("shard service metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// One shard service over one directory; cheap to clone.
#[derive(Clone)]
pub struct ShardService {
    state: Arc<Shared>,
}

struct Shared {
    root: PathBuf,
    tmp: PathBuf,
    limits: ShardServiceLimits,
    door: Arc<Semaphore>,
    next_tmp: AtomicU64,
    registry: Registry,
    requests: IntCounterVec,
    received_bytes: IntCounter,
    sent_bytes: IntCounter,
}

/// Where temporary files are written, under the root; clients cannot name it.
const TMP_DIR: &str = ".tmp";
/// Longest object path accepted.
const MAX_PATH_LEN: usize = 1024;
/// Bytes read from disk per body chunk of a GET.
const READ_CHUNK: u64 = 256 << 10;

impl ShardService {
    /// A service keeping objects under `dir` (created if missing). Temporary files
    /// left by a crash are removed.
    pub fn new(
        dir: impl Into<PathBuf>,
        limits: ShardServiceLimits,
    ) -> Result<ShardService, ShardServiceError> {
        let root: PathBuf = dir.into();
        let io = |source| ShardServiceError::Dir {
            dir: root.clone(),
            source,
        };
        std::fs::create_dir_all(&root).map_err(io)?;
        let root = root.canonicalize().map_err(io)?;
        let tmp = root.join(TMP_DIR);
        match std::fs::remove_dir_all(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        std::fs::create_dir(&tmp).map_err(io)?;

        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "aigrid_shard_requests_total",
                "Shard service requests answered",
            ),
            &["method", "status"],
        )?;
        let received_bytes = IntCounter::new(
            "aigrid_shard_received_bytes_total",
            "Object bytes stored by PUT",
        )?;
        let sent_bytes = IntCounter::new(
            "aigrid_shard_sent_bytes_total",
            "Object bytes answered to GET",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(received_bytes.clone()))?;
        registry.register(Box::new(sent_bytes.clone()))?;
        Ok(ShardService {
            state: Arc::new(Shared {
                root,
                tmp,
                limits,
                door: Arc::new(Semaphore::new(limits.max_concurrent_requests)),
                next_tmp: AtomicU64::new(0),
                registry,
                requests,
                received_bytes,
                sent_bytes,
            }),
        })
    }

    /// The directory objects live in (canonical).
    pub fn dir(&self) -> &Path {
        &self.state.root
    }

    /// The service's metrics, also served at `/metrics`.
    pub fn registry(&self) -> &Registry {
        &self.state.registry
    }

    /// The service as a router: `/health`, `/metrics`, and objects everywhere else.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/health", get(|| async { "ok" }))
            .route("/metrics", get(metrics))
            .fallback(object)
            .layer(axum::middleware::from_fn_with_state(
                self.state.clone(),
                count,
            ))
            .layer(DefaultBodyLimit::disable())
            .with_state(self.state.clone())
    }

    /// Serves on `listener` until `shutdown` completes, then lets requests in flight
    /// finish.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
    }
}

/// Every way a request fails, with its status and stable code in one place.
#[derive(Debug)]
enum ShardError {
    BadPath(String),
    BadBody(String),
    NotFound,
    MethodNotAllowed(Method),
    Conflict(String),
    TooLarge(u64),
    RangeNotSatisfiable(u64),
    Overloaded,
    Internal(String),
}

impl ShardError {
    fn status(&self) -> StatusCode {
        match self {
            ShardError::BadPath(_) | ShardError::BadBody(_) => StatusCode::BAD_REQUEST,
            ShardError::NotFound => StatusCode::NOT_FOUND,
            ShardError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ShardError::Conflict(_) => StatusCode::CONFLICT,
            ShardError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ShardError::RangeNotSatisfiable(_) => StatusCode::RANGE_NOT_SATISFIABLE,
            ShardError::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            ShardError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ShardError::BadPath(_) => "bad_path",
            ShardError::BadBody(_) => "bad_body",
            ShardError::NotFound => "not_found",
            ShardError::MethodNotAllowed(_) => "method_not_allowed",
            ShardError::Conflict(_) => "conflict",
            ShardError::TooLarge(_) => "too_large",
            ShardError::RangeNotSatisfiable(_) => "range_not_satisfiable",
            ShardError::Overloaded => "overloaded",
            ShardError::Internal(_) => "internal",
        }
    }

    fn message(&self) -> String {
        match self {
            ShardError::BadPath(m) | ShardError::BadBody(m) | ShardError::Conflict(m) => m.clone(),
            ShardError::Internal(m) => m.clone(),
            ShardError::NotFound => "no such object".into(),
            ShardError::MethodNotAllowed(m) => format!(
                "{m} is not offered: objects take GET, HEAD, PUT and DELETE, \
                 and PUT creates parent directories itself"
            ),
            ShardError::TooLarge(limit) => format!("objects are limited to {limit} bytes"),
            ShardError::RangeNotSatisfiable(size) => {
                format!("the range is outside the object's {size} bytes")
            }
            ShardError::Overloaded => "too many requests at once; retry shortly".into(),
        }
    }
}

impl IntoResponse for ShardError {
    fn into_response(self) -> Response {
        if let ShardError::Internal(m) = &self {
            tracing::warn!(error = %m, "shard request failed");
        }
        let body = serde_json::json!({
            "error": {"code": self.code(), "message": self.message()}
        });
        let mut response = (self.status(), axum::Json(body)).into_response();
        let headers = response.headers_mut();
        match self {
            ShardError::MethodNotAllowed(_) => {
                headers.insert(
                    header::ALLOW,
                    HeaderValue::from_static("GET, HEAD, PUT, DELETE"),
                );
            }
            ShardError::RangeNotSatisfiable(size) => {
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    headers.insert(header::CONTENT_RANGE, v);
                }
            }
            ShardError::Overloaded => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}

fn internal(what: &str, e: impl std::fmt::Display) -> ShardError {
    ShardError::Internal(format!("{what}: {e}"))
}

/// The object path a request names: its URL path without the leading `/`, when it
/// is safe to join to the root.
fn object_path(url_path: &str) -> Result<&str, ShardError> {
    let bad = |why: &str| ShardError::BadPath(format!("object path `{url_path}`: {why}"));
    let path = url_path.strip_prefix('/').unwrap_or(url_path);
    if path.is_empty() {
        return Err(bad("empty"));
    }
    if path.len() > MAX_PATH_LEN {
        return Err(bad("too long"));
    }
    for segment in path.split('/') {
        if segment.is_empty() {
            return Err(bad("empty segment"));
        }
        if segment.starts_with('.') {
            return Err(bad("a segment starts with `.`"));
        }
        if !segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'='))
        {
            return Err(bad("only A-Z a-z 0-9 - _ . = are allowed"));
        }
    }
    Ok(path)
}

/// What a `Range` header asks of an object of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
enum RangeAsk {
    /// No usable range: the whole object (RFC 9110 lets a server ignore one it does
    /// not understand, including several ranges at once).
    Whole,
    Part(Range<u64>),
    Unsatisfiable,
}

fn parse_range(header: &str, size: u64) -> RangeAsk {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return RangeAsk::Whole;
    };
    if spec.contains(',') {
        return RangeAsk::Whole;
    }
    let Some((first, last)) = spec.split_once('-') else {
        return RangeAsk::Whole;
    };
    let number = |s: &str| s.trim().parse::<u64>().ok();
    match (first.trim().is_empty(), last.trim().is_empty()) {
        (true, true) => RangeAsk::Whole,
        (true, false) => match number(last) {
            None => RangeAsk::Whole,
            Some(0) => RangeAsk::Unsatisfiable,
            Some(_) if size == 0 => RangeAsk::Unsatisfiable,
            Some(n) => RangeAsk::Part(size.saturating_sub(n)..size),
        },
        (false, open) => {
            let Some(start) = number(first) else {
                return RangeAsk::Whole;
            };
            let end = if open {
                size
            } else {
                match number(last) {
                    Some(last) if last >= start => last.saturating_add(1).min(size),
                    _ => return RangeAsk::Whole,
                }
            };
            if start >= size {
                RangeAsk::Unsatisfiable
            } else {
                RangeAsk::Part(start..end)
            }
        }
    }
}

async fn metrics(State(state): State<Arc<Shared>>) -> Response {
    let mut out = Vec::new();
    match prometheus::Encoder::encode(
        &prometheus::TextEncoder::new(),
        &state.registry.gather(),
        &mut out,
    ) {
        Ok(()) => (
            [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
            Bytes::from(out),
        )
            .into_response(),
        Err(e) => internal("encoding metrics", e).into_response(),
    }
}

/// Counts every answer by method and status.
async fn count(State(state): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let method = match *request.method() {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        _ => "other",
    };
    let response = next.run(request).await;
    state
        .requests
        .with_label_values(&[method, response.status().as_str()])
        .inc();
    response
}

/// Any request outside `/health` and `/metrics`: an object.
async fn object(State(state): State<Arc<Shared>>, request: Request) -> Response {
    let Ok(permit) = state.door.clone().try_acquire_owned() else {
        return ShardError::Overloaded.into_response();
    };
    let (parts, body) = request.into_parts();
    let path = match object_path(parts.uri.path()) {
        Ok(path) => path,
        Err(e) => return e.into_response(),
    };
    let answer = match parts.method {
        Method::GET => read(&state, path, &parts.headers, false, permit).await,
        Method::HEAD => read(&state, path, &parts.headers, true, permit).await,
        Method::PUT => write(&state, path, &parts.headers, body).await,
        Method::DELETE => remove(&state, path).await,
        other => Err(ShardError::MethodNotAllowed(other)),
    };
    answer.unwrap_or_else(IntoResponse::into_response)
}

/// `ETag` and `Last-Modified` of a file.
fn validators(meta: &std::fs::Metadata) -> [(header::HeaderName, HeaderValue); 2] {
    let modified = meta.modified().unwrap_or(UNIX_EPOCH);
    let nanos = modified
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let etag = format!("\"{:x}-{:x}\"", meta.len(), nanos);
    [
        (
            header::ETAG,
            HeaderValue::from_str(&etag).unwrap_or(HeaderValue::from_static("\"0\"")),
        ),
        (
            header::LAST_MODIFIED,
            HeaderValue::from_str(&httpdate::fmt_http_date(modified))
                .unwrap_or(HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT")),
        ),
    ]
}

async fn read(
    state: &Shared,
    path: &str,
    headers: &HeaderMap,
    head: bool,
    permit: OwnedSemaphorePermit,
) -> Result<Response, ShardError> {
    let target = state.root.join(path);
    let mut file = match tokio::fs::File::open(&target).await {
        Ok(file) => file,
        Err(e) if is_missing(&e) => return Err(ShardError::NotFound),
        Err(e) => return Err(internal("opening the object", e)),
    };
    // The open file is the object as it was when opened: a PUT renames a new file
    // over the name and never changes this one.
    let meta = file
        .metadata()
        .await
        .map_err(|e| internal("reading the object's metadata", e))?;
    if !meta.is_file() {
        return Err(ShardError::NotFound);
    }
    let size = meta.len();
    let ask = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map_or(RangeAsk::Whole, |v| parse_range(v, size));
    let (status, range) = match ask {
        RangeAsk::Whole => (StatusCode::OK, 0..size),
        RangeAsk::Part(range) => (StatusCode::PARTIAL_CONTENT, range),
        RangeAsk::Unsatisfiable => return Err(ShardError::RangeNotSatisfiable(size)),
    };
    let len = range.end - range.start;
    let mut response = Response::builder()
        .status(status)
        .header(header::CONTENT_LENGTH, len)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::ACCEPT_RANGES, "bytes");
    for (name, value) in validators(&meta) {
        response = response.header(name, value);
    }
    if status == StatusCode::PARTIAL_CONTENT {
        response = response.header(
            header::CONTENT_RANGE,
            format!("bytes {}-{}/{size}", range.start, range.end - 1),
        );
    }
    let body = if head || len == 0 {
        Body::empty()
    } else {
        file.seek(SeekFrom::Start(range.start))
            .await
            .map_err(|e| internal("seeking in the object", e))?;
        state.sent_bytes.inc_by(len);
        // The permit rides with the body, so a slow reader still counts at the door.
        let chunks = futures_util::stream::try_unfold(
            (file, len, permit),
            |(mut file, left, permit)| async move {
                if left == 0 {
                    return Ok::<_, std::io::Error>(None);
                }
                let want = usize::try_from(left.min(READ_CHUNK)).unwrap_or(usize::MAX);
                let mut buf = vec![0u8; want];
                let got = file.read(&mut buf).await?;
                if got == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the object shrank while being read",
                    ));
                }
                buf.truncate(got);
                Ok(Some((Bytes::from(buf), (file, left - got as u64, permit))))
            },
        );
        Body::from_stream(chunks)
    };
    response
        .body(body)
        .map_err(|e| internal("building the response", e))
}

async fn write(
    state: &Shared,
    path: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ShardError> {
    let limit = state.limits.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ShardError::TooLarge(limit));
    }
    let target = state.root.join(path);
    if tokio::fs::metadata(&target).await.is_ok_and(|m| m.is_dir()) {
        return Err(ShardError::Conflict(format!(
            "`{path}` is a directory of other objects"
        )));
    }
    let n = state.next_tmp.fetch_add(1, Ordering::Relaxed);
    let tmp = state.tmp.join(format!("{}-{n}", std::process::id()));
    let written = receive(&tmp, body, limit).await;
    let placed = match written {
        Ok(len) => {
            let (tmp, root, target) = (tmp.clone(), state.root.clone(), target.clone());
            tokio::task::spawn_blocking(move || place(&tmp, &root, &target).map(|new| (new, len)))
                .await
                .map_err(|e| internal("placing the object", e))
                .and_then(|placed| placed.map_err(|e| place_error(path, e)))
        }
        Err(e) => Err(e),
    };
    let (new, len) = match placed {
        Ok(done) => done,
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
    };
    state.received_bytes.inc_by(len);
    let mut response = Response::builder().status(if new {
        StatusCode::CREATED
    } else {
        StatusCode::NO_CONTENT
    });
    if let Ok(meta) = tokio::fs::metadata(&target).await {
        response = response.header(header::ETAG, validators(&meta)[0].1.clone());
    }
    response
        .body(Body::empty())
        .map_err(|e| internal("building the response", e))
}

/// Streams the body into `tmp` and makes it durable; its length.
async fn receive(tmp: &Path, body: Body, limit: u64) -> Result<u64, ShardError> {
    let mut file = tokio::fs::File::create(tmp)
        .await
        .map_err(|e| internal("creating a temporary file", e))?;
    let mut stream = body.into_data_stream();
    let mut len = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ShardError::BadBody(format!("reading the body: {e}")))?;
        len += chunk.len() as u64;
        if len > limit {
            return Err(ShardError::TooLarge(limit));
        }
        file.write_all(&chunk)
            .await
            .map_err(|e| internal("writing the object", e))?;
    }
    file.sync_all()
        .await
        .map_err(|e| internal("syncing the object", e))?;
    Ok(len)
}

/// Renames the durable `tmp` to `target` and makes the name durable: the parent's
/// directory entry, and the entries of any directories created for it. Whether the
/// object is new.
fn place(tmp: &Path, root: &Path, target: &Path) -> std::io::Result<bool> {
    let parent = target.parent().unwrap_or(root);
    let created = !parent.is_dir();
    if created {
        std::fs::create_dir_all(parent)?;
    }
    let new = !target.exists();
    // A delete may prune the parent while it is empty, between its creation and
    // the rename: make it again and retry.
    let mut tries = 0;
    while let Err(e) = std::fs::rename(tmp, target) {
        tries += 1;
        if e.kind() != std::io::ErrorKind::NotFound || tries >= 3 || !tmp.exists() {
            return Err(e);
        }
        std::fs::create_dir_all(parent)?;
    }
    let created = created || tries > 0;
    let mut dir = parent;
    loop {
        std::fs::File::open(dir)?.sync_all()?;
        if !created || dir == root {
            break;
        }
        dir = dir.parent().unwrap_or(root);
    }
    Ok(new)
}

fn place_error(path: &str, e: std::io::Error) -> ShardError {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::NotADirectory | ErrorKind::AlreadyExists | ErrorKind::IsADirectory => {
            ShardError::Conflict(format!("`{path}` conflicts with an existing object: {e}"))
        }
        _ => internal("placing the object", e),
    }
}

async fn remove(state: &Shared, path: &str) -> Result<Response, ShardError> {
    let target = state.root.join(path);
    match tokio::fs::symlink_metadata(&target).await {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => return Err(ShardError::NotFound),
        Err(e) if is_missing(&e) => return Err(ShardError::NotFound),
        Err(e) => return Err(internal("looking up the object", e)),
    }
    match tokio::fs::remove_file(&target).await {
        Ok(()) => {
            prune(&state.root, &target).await;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ShardError::NotFound),
        Err(e) => Err(internal("removing the object", e)),
    }
}

/// Removes the directories above `removed` that it left empty, up to (not
/// including) `root`, so deleting every object gives the disk back. Stops at the
/// first directory that is not empty (another object is in it, or being placed).
async fn prune(root: &Path, removed: &Path) {
    let mut dir = removed.parent();
    while let Some(d) = dir.filter(|d| *d != root && d.starts_with(root)) {
        if tokio::fs::remove_dir(d).await.is_err() {
            break;
        }
        dir = d.parent();
    }
}

/// Whether an I/O error means the object is not there.
fn is_missing(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_safe_relative_paths_name_objects() {
        assert_eq!(
            object_path("/m/ab12/s-0.shard").unwrap(),
            "m/ab12/s-0.shard"
        );
        assert_eq!(object_path("/a=b_c").unwrap(), "a=b_c");
        for bad in [
            "/",
            "//a",
            "/a//b",
            "/a/",
            "/../etc/passwd",
            "/a/../../b",
            "/.tmp/x",
            "/a/.hidden",
            "/a%2F..",
            "/a b",
            "/a\\b",
        ] {
            let err = object_path(bad).unwrap_err();
            assert_eq!(err.code(), "bad_path", "{bad}");
            assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        }
        assert!(object_path(&format!("/{}", "a".repeat(MAX_PATH_LEN + 1))).is_err());
    }

    #[test]
    fn ranges_follow_rfc_9110() {
        use RangeAsk::*;
        assert_eq!(parse_range("bytes=0-9", 100), Part(0..10));
        assert_eq!(parse_range("bytes=90-200", 100), Part(90..100));
        assert_eq!(parse_range("bytes=95-", 100), Part(95..100));
        assert_eq!(parse_range("bytes=-10", 100), Part(90..100));
        assert_eq!(parse_range("bytes=-1000", 100), Part(0..100));
        assert_eq!(parse_range("bytes=100-", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=100-200", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=-5", 0), Unsatisfiable);
        assert_eq!(parse_range("bytes=5-1", 100), Whole);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Whole);
        assert_eq!(parse_range("items=0-1", 100), Whole);
        assert_eq!(parse_range("bytes=x-1", 100), Whole);
        assert_eq!(parse_range("bytes=-", 100), Whole);
    }

    #[test]
    fn every_error_has_a_status_and_a_stable_code() {
        let errors = [
            ShardError::BadPath("p".into()),
            ShardError::BadBody("b".into()),
            ShardError::NotFound,
            ShardError::MethodNotAllowed(Method::OPTIONS),
            ShardError::Conflict("c".into()),
            ShardError::TooLarge(1),
            ShardError::RangeNotSatisfiable(3),
            ShardError::Overloaded,
            ShardError::Internal("i".into()),
        ];
        let codes: std::collections::BTreeSet<_> = errors.iter().map(ShardError::code).collect();
        assert_eq!(codes.len(), errors.len());
        for e in errors {
            assert!(e.status().is_client_error() || e.status().is_server_error());
            assert!(!e.message().is_empty());
        }
    }
}
