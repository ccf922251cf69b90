//! Simulated network links for benchmarks that read models from the store: each
//! backend sits behind its own [`Link`] of a fixed bandwidth, and [`Throttled`] wraps
//! a local directory so that its GETs queue on that link however many run at once
//! (object_store's `ThrottledStore` sleeps per request, so concurrent requests would
//! together exceed the link).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aigrid_store::backend::Backend;
use aigrid_store::store::Store;
use async_trait::async_trait;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
};

const MIB: f64 = (1u64 << 20) as f64;

/// One backend's network link: GETs share it one after another at `rate` bytes/s.
#[derive(Debug)]
pub struct Link {
    rate: f64,
    /// Concurrent GETs share the link piece by piece, as flows share a network
    /// link, instead of one after another.
    fair: bool,
    /// When the link has sent everything asked of it so far.
    free_at: Mutex<Instant>,
    /// Bytes reserved on it (sent, or being sent).
    bytes: AtomicU64,
    /// GETs that moved bytes.
    requests: AtomicU64,
    /// Time the link sat idle before a GET came, nanoseconds.
    idle_nanos: AtomicU64,
}

impl Link {
    /// A link of `rate` bytes/s, idle from now.
    pub fn new(rate: f64) -> Arc<Self> {
        Self::make(rate, false)
    }

    /// A link of `rate` bytes/s that concurrent GETs share piece by piece
    /// ([`FAIR_PIECE`] at a time, in turn), each piece delivered when sent.
    pub fn fair(rate: f64) -> Arc<Self> {
        Self::make(rate, true)
    }

    fn make(rate: f64, fair: bool) -> Arc<Self> {
        Arc::new(Link {
            rate,
            fair,
            free_at: Mutex::new(Instant::now()),
            bytes: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            idle_nanos: AtomicU64::new(0),
        })
    }

    /// Reserves the link for `len` bytes after whatever it is already sending;
    /// answers when they start to flow.
    fn reserve(&self, len: u64) -> Instant {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.reserve_piece(len)
    }

    /// As [`Link::reserve`], for one piece of a GET already counted.
    fn reserve_piece(&self, len: u64) -> Instant {
        let now = Instant::now();
        let mut free_at = self.free_at.lock().expect("link lock");
        let start = (*free_at).max(now);
        let idle = now.saturating_duration_since(*free_at).as_nanos();
        self.idle_nanos
            .fetch_add(u64::try_from(idle).unwrap_or(u64::MAX), Ordering::Relaxed);
        *free_at = start + self.duration(len);
        self.bytes.fetch_add(len, Ordering::Relaxed);
        start
    }

    /// Its bandwidth, bytes/s.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Bytes reserved on it so far (sent, or being sent).
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// GETs that moved bytes so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Idle time before GETs came, and after the link's last byte until `end`.
    pub fn idle(&self, end: Instant) -> (Duration, Duration) {
        let free_at = *self.free_at.lock().expect("link lock");
        (
            Duration::from_nanos(self.idle_nanos.load(Ordering::Relaxed)),
            end.saturating_duration_since(free_at),
        )
    }

    fn duration(&self, len: u64) -> Duration {
        Duration::from_secs_f64(len as f64 / self.rate)
    }
}

/// Bytes of a response delivered at once; each piece arrives when the link has sent
/// it. Shards (4 MiB) arrive whole, so collecting them copies nothing; a whole-file
/// download streams in pieces its reader can hash as they come.
const PIECE: usize = 16 << 20;
/// Bytes of a GET sent at a time on a [`Link::fair`] link.
pub const FAIR_PIECE: usize = 64 << 10;

/// An object store whose GETs go through a [`Link`]: a response's bytes are read
/// when the request comes, its whole length is reserved on the link behind what the
/// link is already sending, and each piece of up to 16 MiB is delivered when the link has sent
/// it. Unlike `object_store::throttle::ThrottledStore`, whose per-byte wait applies to
/// each request alone, concurrent GETs share the bandwidth. A GET abandoned half way
/// keeps its reservation: the bytes were on the wire. Everything else is the inner
/// store's, unthrottled.
#[derive(Debug)]
pub struct Throttled {
    inner: LocalFileSystem,
    link: Arc<Link>,
}

impl fmt::Display for Throttled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Throttled({}, {:.0} MiB/s)",
            self.inner,
            self.link.rate / MIB
        )
    }
}

#[async_trait]
impl ObjectStore for Throttled {
    async fn put_opts(
        &self,
        location: &ObjectPath,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &ObjectPath,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &ObjectPath,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let head = options.head;
        let result = self.inner.get_opts(location, options).await?;
        let len = result.range.end - result.range.start;
        if head || len == 0 {
            return Ok(result);
        }
        if self.link.fair {
            return self.fair_get(result).await;
        }
        let start = self.link.reserve(len);
        let GetResult {
            payload,
            meta,
            range,
            attributes,
            extensions,
        } = result;
        let bytes = GetResult {
            payload,
            meta: meta.clone(),
            range: range.clone(),
            attributes: attributes.clone(),
            extensions: extensions.clone(),
        }
        .bytes()
        .await?;
        let link = self.link.clone();
        let pieces = (0..bytes.len())
            .step_by(PIECE)
            .map(move |at| {
                let end = (at + PIECE).min(bytes.len());
                let due = start + link.duration(end as u64);
                (due, bytes.slice(at..end))
            })
            .collect::<Vec<_>>();
        let stream = futures_util::stream::iter(pieces)
            .then(|(due, piece)| async move {
                tokio::time::sleep_until(due.into()).await;
                Ok(piece)
            })
            .boxed();
        Ok(restream((meta, range, attributes, extensions), stream))
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<ObjectPath>>,
    ) -> BoxStream<'static, object_store::Result<ObjectPath>> {
        self.inner.delete_stream(locations)
    }

    fn list(
        &self,
        prefix: Option<&ObjectPath>,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&ObjectPath>,
        offset: &ObjectPath,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(
        &self,
        prefix: Option<&ObjectPath>,
    ) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &ObjectPath,
        to: &ObjectPath,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(
        &self,
        from: &ObjectPath,
        to: &ObjectPath,
        options: RenameOptions,
    ) -> object_store::Result<()> {
        self.inner.rename_opts(from, to, options).await
    }
}

impl Throttled {
    /// A GET on a fair link: each piece reserved when the reader gets to it.
    async fn fair_get(&self, result: GetResult) -> object_store::Result<GetResult> {
        let meta = result.meta.clone();
        let range = result.range.clone();
        let attributes = result.attributes.clone();
        let extensions = result.extensions.clone();
        let bytes = result.bytes().await?;
        self.link.requests.fetch_add(1, Ordering::Relaxed);
        let link = self.link.clone();
        let pieces = (0..bytes.len())
            .step_by(FAIR_PIECE)
            .map(move |at| bytes.slice(at..(at + FAIR_PIECE).min(bytes.len())));
        let stream = futures_util::stream::iter(pieces)
            .then(move |piece| {
                let link = link.clone();
                async move {
                    let start = link.reserve_piece(piece.len() as u64);
                    let due = start + link.duration(piece.len() as u64);
                    tokio::time::sleep_until(due.into()).await;
                    Ok(piece)
                }
            })
            .boxed();
        Ok(restream((meta, range, attributes, extensions), stream))
    }
}

/// What a GET answered about its object.
type Parts = (
    ObjectMeta,
    std::ops::Range<u64>,
    object_store::Attributes,
    object_store::Extensions,
);

/// A GET's result whose body is `stream`.
fn restream(
    (meta, range, attributes, extensions): Parts,
    stream: BoxStream<'static, object_store::Result<bytes::Bytes>>,
) -> GetResult {
    GetResult {
        payload: GetResultPayload::Stream(stream),
        meta,
        range,
        attributes,
        extensions,
    }
}

/// A directory served as an object store behind a fresh link of `rate` bytes/s.
pub fn throttled(dir: &Path, rate: f64) -> object_store::Result<(Arc<Throttled>, Arc<Link>)> {
    let link = Link::new(rate);
    Ok((throttled_behind(dir, link.clone())?, link))
}

/// A directory served as an object store behind `link`, which other stores may
/// share (one origin's uplink in front of several backends).
pub fn throttled_behind(dir: &Path, link: Arc<Link>) -> object_store::Result<Arc<Throttled>> {
    Ok(Arc::new(Throttled {
        inner: LocalFileSystem::new_with_prefix(dir)?,
        link,
    }))
}

/// A store over the pushed backend directories, each behind its own link.
pub fn throttled_store(
    roots: &[PathBuf],
    rate: f64,
) -> object_store::Result<(Store, Vec<Arc<Link>>)> {
    let mut backends = Vec::new();
    let mut links = Vec::new();
    for (i, root) in roots.iter().enumerate() {
        let (store, link) = throttled(root, rate)?;
        backends.push(Backend::new(format!("b{i}"), BTreeMap::new(), store));
        links.push(link);
    }
    Ok((Store::new(backends), links))
}
