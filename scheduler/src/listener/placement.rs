//! Placement: which connections a listener serves on another runtime than the one
//! that accepts them (a server's: its replica's thread), read from the first
//! request's head, and which of their requests are handled there.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::http::{Method, Uri};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::watch;

use super::{http, Movable, Proto, Shared};

/// Where a listener serves what it accepted, when not all on the runtime that
/// accepts: a connection whose first request is one `here` picks is served (after
/// its TLS handshake) on the runtime `connections` names, and there the requests
/// `here` picks are handled; its other requests are handled on the accepting
/// runtime, their heads and bodies still read by the connection. Every other
/// connection is served where it was accepted.
#[derive(Clone)]
pub struct Placement {
    /// The runtime a connection established now is served on; `None` (that runtime
    /// stopped) serves it, and all its requests, on the accepting one.
    pub connections: Arc<dyn Fn() -> Option<tokio::runtime::Handle> + Send + Sync>,
    /// Whether a request, by its method, target and the most its body can be
    /// (`None`: unknown), is handled on `connections` too.
    pub here: fn(&Method, &Uri, Option<u64>) -> bool,
}

/// Serves HTTP on `io` where the listener places it: on the placement's runtime
/// when its first request is one the placement picks (an HTTP/1 head read here,
/// within the header timeout), else where it was accepted. A connection that opens
/// with something else (a read, a browser's page, HTTP/2) never waits on the
/// placement's runtime. A connection served there moves its socket there too, so
/// that runtime's thread is woken by the socket itself rather than by the
/// accepting runtime's.
pub(super) async fn placed<I>(
    mut io: I,
    who: (SocketAddr, Option<aigrid_tls::ClientCertificate>),
    proto: Proto,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Movable + Unpin + Send + 'static,
{
    let Some((placement, _)) = &shared.placement else {
        return http(io, who, proto, &shared, shutdown, false).await;
    };
    let within = shared.limits.header_read_timeout;
    let mut head = Vec::new();
    let mut stopping = shutdown.clone();
    let first = tokio::select! {
        first = tokio::time::timeout(within, first_head(&mut io, &mut head)) => first,
        // Shutdown closes a connection with no request in flight at once.
        _ = stopping.wait_for(|stop| *stop) => return,
    };
    let picked = match first {
        Ok(Ok(Some((method, uri, body)))) => (placement.here)(&method, &uri, body),
        Ok(Ok(None)) => false,
        Ok(Err(_)) => return,
        Err(_) => {
            shared.metrics.closed.with_label_values(&["header"]).inc();
            return;
        }
    };
    let runtime = if picked {
        (placement.connections)()
    } else {
        None
    };
    let mut io = Prefixed { head, read: 0, io };
    match runtime {
        None => http(io, who, proto, &shared, shutdown, false).await,
        Some(runtime) => {
            if let Err(e) = io.io.socket().detach() {
                tracing::debug!(remote = %who.0, error = %e, "connection could not be handed over");
                return;
            }
            let _ = runtime
                .spawn(async move {
                    if let Err(e) = io.io.socket().attach() {
                        tracing::debug!(remote = %who.0, error = %e, "connection could not be taken over");
                        return;
                    }
                    http(io, who, proto, &shared, shutdown, true).await
                })
                .await;
        }
    }
}

/// The most of a first request's head read to place its connection.
const FIRST_HEAD_BYTES: usize = 16 << 10;

/// Reads from `io` into `buf` until `buf` holds a whole HTTP/1 request head, and
/// returns its method, target and body length (`None`: chunked, or not known from
/// the head). `None` when the bytes are not an HTTP/1 request head, or none is
/// whole within [`FIRST_HEAD_BYTES`] or before the client stops sending.
async fn first_head<I: AsyncRead + Unpin>(
    io: &mut I,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<(Method, Uri, Option<u64>)>> {
    let mut chunk = [0u8; 4096];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(_)) => {
                let method = req
                    .method
                    .and_then(|m| Method::from_bytes(m.as_bytes()).ok());
                let uri = req.path.and_then(|p| p.parse::<Uri>().ok());
                let (Some(method), Some(uri)) = (method, uri) else {
                    return Ok(None);
                };
                let named = |name: &str| {
                    req.headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                };
                let body = match (named("transfer-encoding"), named("content-length")) {
                    (Some(_), _) => None,
                    (None, Some(length)) => std::str::from_utf8(length.value)
                        .ok()
                        .and_then(|v| v.trim().parse().ok()),
                    (None, None) => Some(0),
                };
                return Ok(Some((method, uri, body)));
            }
            Ok(httparse::Status::Partial) if buf.len() < FIRST_HEAD_BYTES => {}
            Ok(httparse::Status::Partial) | Err(_) => return Ok(None),
        }
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A connection whose first bytes were read already: they are read again first.
struct Prefixed<I> {
    head: Vec<u8>,
    read: usize,
    io: I,
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.read < this.head.len() {
            let n = buf.remaining().min(this.head.len() - this.read);
            buf.put_slice(&this.head[this.read..this.read + n]);
            this.read += n;
            if this.read == this.head.len() {
                this.head = Vec::new();
                this.read = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use axum::Router;
    use tokio::net::TcpListener;

    use super::super::{serve_placed, ListenerLimits, ListenerMetrics};
    use super::*;

    /// A runtime of one thread named `name`, kept running until the sender drops.
    fn named_runtime(name: &str) -> (tokio::runtime::Handle, tokio::sync::oneshot::Sender<()>) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let _ = runtime.block_on(stopped);
            })
            .unwrap();
        (handle, stop)
    }

    fn thread_name() -> String {
        std::thread::current().name().unwrap_or("").to_owned()
    }

    /// Serves `/where` (answering with the name of the thread that handled it) under
    /// `placement` on a fresh port: its address, the shutdown switch, the listener.
    async fn serve_where(
        placement: Placement,
    ) -> (
        SocketAddr,
        watch::Sender<bool>,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let name = || async { thread_name() };
        let app = Router::new().route("/where", axum::routing::get(name).post(name));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shut, shutdown) = watch::channel(false);
        let served = tokio::spawn(serve_placed(
            listener,
            app,
            ListenerLimits::default(),
            None,
            ListenerMetrics::unregistered(),
            shutdown,
            Some(placement),
        ));
        (addr, shut, served)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_placement_serves_the_requests_it_picks_on_its_runtime_and_the_rest_where_accepted() {
        fn small_posts(method: &Method, _: &Uri, body: Option<u64>) -> bool {
            *method == Method::POST && body.is_some_and(|b| b <= 16)
        }
        let (replica, stop) = named_runtime("placed-here");
        let live = Arc::new(AtomicBool::new(true));
        let placement = Placement {
            connections: {
                let live = live.clone();
                Arc::new(move || live.load(Ordering::SeqCst).then(|| replica.clone()))
            },
            here: small_posts,
        };
        let (addr, shut, served) = serve_where(placement).await;
        let url = format!("http://{addr}/where");
        let client = reqwest::Client::new();
        let ask = |req: reqwest::RequestBuilder| async move {
            req.send().await.unwrap().text().await.unwrap()
        };
        assert_eq!(ask(client.post(&url).body("small")).await, "placed-here");
        let accepted = ask(client.get(&url)).await;
        assert_ne!(accepted, "placed-here", "a request it does not pick");
        assert_eq!(
            ask(client.post(&url).body(vec![b'x'; 17])).await,
            accepted,
            "a body larger than it takes"
        );
        // A connection that opens with a request it does not pick is served
        // where accepted, and so are its later writes.
        let reader = reqwest::Client::new();
        assert_eq!(ask(reader.get(&url)).await, accepted);
        assert_eq!(ask(reader.post(&url).body("small")).await, accepted);
        // Once the placement's runtime is gone, a new connection and all its
        // requests are served where accepted.
        live.store(false, Ordering::SeqCst);
        let fresh = reqwest::Client::new();
        assert_eq!(ask(fresh.post(&url).body("small")).await, accepted);
        drop(stop);
        let _ = shut.send(true);
        served.await.unwrap().unwrap();
    }

    /// Sends `request` on `tcp` and reads until the answer's body names a thread
    /// (or the read times out).
    fn exchange(tcp: &mut std::net::TcpStream, request: &[u8]) -> String {
        use std::io::{Read, Write};
        tcp.write_all(request).unwrap();
        let mut answer = Vec::new();
        let mut chunk = [0u8; 1024];
        while !String::from_utf8_lossy(&answer).ends_with("placed-here") {
            match tcp.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
            }
        }
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_placed_connection_is_served_while_the_accepting_runtime_is_busy() {
        let (replica, stop) = named_runtime("placed-here");
        let placement = Placement {
            connections: Arc::new(move || Some(replica.clone())),
            here: |method, _, _| *method == Method::POST,
        };
        let (addr, shut, served) = serve_where(placement).await;
        let post = b"POST /where HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi";
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        assert!(exchange(&mut tcp, post).ends_with("placed-here"));

        // The accepting runtime's only worker is stuck: the connection, served on
        // the placement's runtime, is read and answered there all the same.
        let started = Arc::new(AtomicBool::new(false));
        let released = Arc::new(AtomicBool::new(false));
        let stuck = tokio::spawn({
            let (started, released) = (started.clone(), released.clone());
            async move {
                started.store(true, Ordering::SeqCst);
                let until = std::time::Instant::now() + Duration::from_secs(30);
                while !released.load(Ordering::SeqCst) && std::time::Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        });
        while !started.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let answer = exchange(&mut tcp, post);
        let answered_while_stuck = !released.swap(true, Ordering::SeqCst) && !stuck.is_finished();
        assert!(answer.ends_with("placed-here"), "answer: {answer:?}");
        assert!(answered_while_stuck);
        stuck.await.unwrap();
        drop(tcp);
        drop(stop);
        let _ = shut.send(true);
        served.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_first_head_is_read_whole_and_replayed() {
        async fn head(bytes: &[u8]) -> (Option<(Method, Uri, Option<u64>)>, Vec<u8>) {
            let mut io = bytes;
            let mut buf = Vec::new();
            (first_head(&mut io, &mut buf).await.unwrap(), buf)
        }
        let post = b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";
        let (first, buf) = head(post).await;
        let (method, uri, body) = first.unwrap();
        assert_eq!(
            (method, uri.path(), body),
            (Method::POST, "/api/v1/jobs", Some(5))
        );
        // What was read is read again, then the rest.
        let mut replay = Prefixed {
            head: buf,
            read: 0,
            io: &b" more"[..],
        };
        let mut all = Vec::new();
        replay.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, [&post[..], b" more"].concat());
        let chunked = b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(head(chunked).await.0.unwrap().2, None);
        let bare = b"DELETE /api/v1/jobs/x HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(head(bare).await.0.unwrap().2, Some(0));
        // HTTP/2's preface, a head cut short, and one too large are not placed.
        assert!(head(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.0.is_none());
        assert!(head(b"POST /api/v1/jobs HTTP/1.1\r\nHost:")
            .await
            .0
            .is_none());
        let huge = [
            &b"GET / HTTP/1.1\r\nX: "[..],
            &vec![b'a'; FIRST_HEAD_BYTES + 10],
        ]
        .concat();
        assert!(head(&huge).await.0.is_none());
    }
}
