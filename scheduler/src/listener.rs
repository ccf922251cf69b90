//! The accept loop in front of a server's HTTP surface: every connection is
//! counted, timed and, with a TLS configuration, encrypted, before the router sees
//! a request.
//!
//! What a client cannot do here, whatever it sends:
//! - hold more than [`ListenerLimits::max_connections`] connections open in total,
//!   or more than [`ListenerLimits::max_connections_per_client`] from one address
//!   (an IPv6 client counts by its /64): a connection beyond either is closed as
//!   soon as it is accepted;
//! - keep a connection without sending a whole request head within
//!   [`ListenerLimits::header_read_timeout`] (HTTP/1 applies it again to every
//!   later request, and so to the wait between keep-alive requests); the TLS
//!   handshake has [`ListenerLimits::tls_handshake_timeout`] of its own, and runs in
//!   the connection's task, so a slow one delays nobody else;
//! - pause a request body for longer than [`ListenerLimits::body_read_timeout`]:
//!   reading the body then fails, and the control API answers 408;
//! - keep a connection with no request in flight for longer than
//!   [`ListenerLimits::idle_timeout`].
//!
//! A connection closes lingering: the server sends its FIN and reads what the
//! client still sends for up to [`LINGER`] before letting the socket go, so a
//! client still sending a body the server refused (413) reads the answer instead
//! of a reset. Its slot is held until then.
//!
//! Each request carries `ConnectInfo<SocketAddr>` (the client's address) in its
//! extensions, and, on TLS where the client presented a certificate the
//! configuration verified, [`aigrid_tls::ClientCertificate`]. Shutdown is graceful: the loop stops accepting, every connection
//! finishes its requests in flight and closes, and those still open after
//! [`ListenerLimits::shutdown_grace`] are dropped.
//!
//! With a [`Placement`] ([`serve_placed`]), a connection whose first request is one
//! the placement picks is served on the placement's runtime (a server's: its
//! replica's thread), and there the requests it picks are handled; the rest of
//! that connection's requests, and every other connection, are handled on the
//! accepting runtime.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use aigrid_consensus::socket::MovableTcp;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use parking_lot::Mutex;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::ServiceExt;
use tower_http::timeout::TimeoutBody;

mod placement;

use placement::placed;
pub use placement::Placement;

/// Limits on the connections of one listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Connections open at once; a connection beyond it is closed when accepted.
    pub max_connections: usize,
    /// Connections open at once from one client address (an IPv6 client by its
    /// /64); a connection beyond it is closed when accepted.
    pub max_connections_per_client: usize,
    /// Whether the per-client limits (these connections, the control API's request
    /// rate) apply to loopback clients too. Off by default: loopback clients are
    /// this machine's own roles (`aigrid up`'s agent, a simulated fleet of thousands
    /// of agents, local tools), and the total limit still holds them.
    pub limit_loopback: bool,
    /// Longest wait for a whole request head, from the connection's start (after
    /// TLS) and, on HTTP/1, from the end of the previous request.
    pub header_read_timeout: Duration,
    /// Longest pause while a request body is read.
    pub body_read_timeout: Duration,
    /// How long a connection may stay open with no request in flight.
    pub idle_timeout: Duration,
    /// Longest TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// How long connections get to finish their requests in flight at shutdown.
    pub shutdown_grace: Duration,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        ListenerLimits {
            max_connections: 16_384,
            max_connections_per_client: 256,
            limit_loopback: false,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
            tls_handshake_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(4),
        }
    }
}

impl ListenerLimits {
    /// Checks the limits; the message names the offending one.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_connections == 0 || self.max_connections_per_client == 0 {
            return Err("max connections (in total and per client) must be at least 1".into());
        }
        let timeouts = [
            ("header read timeout", self.header_read_timeout),
            ("body read timeout", self.body_read_timeout),
            ("idle timeout", self.idle_timeout),
            ("TLS handshake timeout", self.tls_handshake_timeout),
        ];
        for (name, value) in timeouts {
            if value < Duration::from_millis(10) {
                return Err(format!("{name} must be at least 10ms"));
            }
        }
        Ok(())
    }

    /// Whether the per-client limits apply to `ip`.
    pub fn limits_client(&self, ip: IpAddr) -> bool {
        self.limit_loopback || !ip.to_canonical().is_loopback()
    }
}

/// The address a client is counted under: an IPv4 address as it is (an IPv4-mapped
/// IPv6 one as IPv4), an IPv6 address by its /64, the smallest block one customer
/// is usually given, so one customer's addresses count as one client.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
    }
}

/// The listener's gauges and counters.
#[derive(Clone)]
pub struct ListenerMetrics {
    open: IntGauge,
    refused: IntCounterVec,
    closed: IntCounterVec,
}

impl ListenerMetrics {
    /// Registers the metrics in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let open = IntGauge::new("aigrid_http_connections", "HTTP connections open")?;
        let refused = IntCounterVec::new(
            Opts::new(
                "aigrid_http_connections_refused_total",
                "HTTP connections closed when accepted, by the limit they were over",
            ),
            &["limit"],
        )?;
        let closed = IntCounterVec::new(
            Opts::new(
                "aigrid_http_connections_timed_out_total",
                "HTTP connections closed by the server for slowness or idleness",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(open.clone()))?;
        registry.register(Box::new(refused.clone()))?;
        registry.register(Box::new(closed.clone()))?;
        Ok(ListenerMetrics {
            open,
            refused,
            closed,
        })
    }

    /// Metrics that go nowhere, for a listener nobody scrapes.
    pub fn unregistered() -> Self {
        Self::register(&Registry::new()).expect("fresh registry")
    }
}

/// Connections open, in total and by client.
struct Slots {
    limits: ListenerLimits,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
    metrics: ListenerMetrics,
}

/// One open connection's place; given back when dropped.
struct Slot {
    slots: Arc<Slots>,
    client: Option<IpAddr>,
}

impl Slots {
    /// A place for a connection from `ip`, or `None` (and the limit it is over
    /// counted) when it must be closed.
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let client = self.limits.limits_client(ip).then(|| client_key(ip));
        let mut open = self.open.lock();
        if open.0 >= self.limits.max_connections {
            drop(open);
            self.metrics.refused.with_label_values(&["total"]).inc();
            return None;
        }
        if let Some(client) = client {
            let n = open.1.entry(client).or_default();
            if *n >= self.limits.max_connections_per_client {
                drop(open);
                self.metrics.refused.with_label_values(&["client"]).inc();
                return None;
            }
            *n += 1;
        }
        open.0 += 1;
        self.metrics.open.inc();
        Some(Slot {
            slots: self.clone(),
            client,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock();
        open.0 -= 1;
        if let Some(client) = self.client {
            if let Some(n) = open.1.get_mut(&client) {
                *n -= 1;
                if *n == 0 {
                    open.1.remove(&client);
                }
            }
        }
        self.slots.metrics.open.dec();
    }
}

/// What one connection's requests have done, for its timers.
struct Activity {
    born: Instant,
    started: AtomicBool,
    in_flight: AtomicUsize,
    /// Milliseconds after `born` of the last request's start or end.
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            born: Instant::now(),
            started: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.born.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.started.store(true, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        InFlight(self.clone())
    }

    /// When the connection counts as idle if nothing happens before.
    fn idle_at(&self, idle: Duration) -> Instant {
        let last = self.born + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            Instant::now() + idle
        } else {
            last + idle
        }
    }
}

/// A request being served; ends when dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What every connection task shares.
struct Shared {
    app: Router,
    limits: ListenerLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// Either protocol, found from the first bytes.
    any: auto::Builder<TokioExecutor>,
    /// HTTP/1 only, when TLS's ALPN said so.
    http1: auto::Builder<TokioExecutor>,
    /// HTTP/2 only, when TLS's ALPN said so.
    http2: auto::Builder<TokioExecutor>,
    metrics: ListenerMetrics,
    /// Where established connections and requests are served, with the
    /// accepting runtime, where the others are.
    placement: Option<(Placement, tokio::runtime::Handle)>,
}

fn builder(limits: &ListenerLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.idle_timeout / 2)
        .keep_alive_timeout(limits.header_read_timeout)
        .max_concurrent_streams(256);
    builder
}

/// Serves `app` on `listener` until `shutdown` turns true, then finishes as the
/// module says. With `tls`, every connection is TLS under that configuration (its
/// ALPN list decides whether HTTP/2 is offered); without, plain HTTP/1 or HTTP/2.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ListenerLimits,
    tls: Option<Arc<rustls::ServerConfig>>,
    metrics: ListenerMetrics,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    serve_placed(listener, app, limits, tls, metrics, shutdown, None).await
}

/// [`serve`], with connections and requests placed as `placement` says.
pub async fn serve_placed(
    listener: TcpListener,
    app: Router,
    limits: ListenerLimits,
    tls: Option<Arc<rustls::ServerConfig>>,
    metrics: ListenerMetrics,
    mut shutdown: watch::Receiver<bool>,
    placement: Option<Placement>,
) -> std::io::Result<()> {
    let accepting = tokio::runtime::Handle::current();
    let any = builder(&limits);
    let shared = Arc::new(Shared {
        app,
        tls: tls.map(tokio_rustls::TlsAcceptor::from),
        http1: any.clone().http1_only(),
        http2: any.clone().http2_only(),
        any,
        limits: limits.clone(),
        metrics: metrics.clone(),
        placement: placement.map(|p| (p, accepting)),
    });
    let slots = Arc::new(Slots {
        limits: limits.clone(),
        open: Mutex::new((0, HashMap::new())),
        metrics,
    });
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let (stream, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, or a connection reset before it was
                // accepted: wait a little rather than spin, and go on.
                tracing::debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(slot) = slots.take(remote.ip()) else {
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let stream = Lingering {
            stream: Some(MovableTcp::new(stream)),
            slot: Some(slot),
        };
        let shared = shared.clone();
        let stop = shutdown.clone();
        connections.spawn(async move {
            connection(stream, remote, shared, stop).await;
        });
    }
    drop(listener);
    let drained = async { while connections.join_next().await.is_some() {} };
    // Each connection drops itself after its grace; this is a backstop.
    let _ = tokio::time::timeout(limits.shutdown_grace + Duration::from_secs(1), drained).await;
    connections.shutdown().await;
    Ok(())
}

/// How long a closing connection reads what its client still sends.
pub const LINGER: Duration = Duration::from_secs(2);
/// The most a closing connection reads (and drops) before letting go.
const LINGER_BYTES: usize = 16 << 20;

/// An accepted connection and its slot; dropped, it closes lingering (see the
/// module) and gives the slot back after.
struct Lingering {
    stream: Option<MovableTcp>,
    slot: Option<Slot>,
}

impl Lingering {
    fn stream(&mut self) -> Pin<&mut MovableTcp> {
        Pin::new(self.socket())
    }
}

/// A connection whose socket can move to the runtime that serves it (see
/// [`aigrid_consensus::socket`]).
trait Movable {
    fn socket(&mut self) -> &mut MovableTcp;
}

impl Movable for Lingering {
    fn socket(&mut self) -> &mut MovableTcp {
        self.stream.as_mut().expect("only taken on drop")
    }
}

impl Movable for tokio_rustls::server::TlsStream<Lingering> {
    fn socket(&mut self) -> &mut MovableTcp {
        self.get_mut().0.socket()
    }
}

impl AsyncRead for Lingering {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.stream().poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.stream().poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.stream().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.stream().poll_shutdown(cx)
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let (Some(stream), slot) = (self.stream.take(), self.slot.take()) else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // Lingers on the runtime the connection ends on, where it is registered.
        let Some(mut stream) = stream.into_live() else {
            return;
        };
        runtime.spawn(async move {
            let _ = stream.shutdown().await;
            let mut buf = vec![0u8; 16 * 1024];
            let mut left = LINGER_BYTES;
            let drain = async {
                while left > 0 {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => left = left.saturating_sub(n),
                    }
                }
            };
            let _ = tokio::time::timeout(LINGER, drain).await;
            drop(slot);
        });
    }
}

/// One connection, from the TLS handshake (if any) to its close.
async fn connection(
    stream: Lingering,
    remote: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) {
    let Some(acceptor) = &shared.tls else {
        return placed(stream, (remote, None), Proto::Any, shared, shutdown).await;
    };
    let handshake = acceptor.accept(stream);
    let tls = match tokio::time::timeout(shared.limits.tls_handshake_timeout, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(%remote, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            shared
                .metrics
                .closed
                .with_label_values(&["tls_handshake"])
                .inc();
            return;
        }
    };
    let proto = match tls.get_ref().1.alpn_protocol() {
        Some(b"h2") => Proto::Http2,
        Some(b"http/1.1") => Proto::Http1,
        _ => Proto::Any,
    };
    let presented = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| aigrid_tls::ClientCertificate(leaf.clone().into_owned()));
    placed(tls, (remote, presented), proto, shared, shutdown).await
}

/// Which protocol a connection speaks.
#[derive(Clone, Copy)]
enum Proto {
    Any,
    Http1,
    Http2,
}

/// Serves HTTP on `io` until the client closes it, a timer closes it, or shutdown;
/// `placed`: on the placement's runtime, which handles only the requests it picks.
async fn http<I>(
    io: I,
    (remote, presented): (SocketAddr, Option<aigrid_tls::ClientCertificate>),
    proto: Proto,
    shared: &Shared,
    mut shutdown: watch::Receiver<bool>,
    placed: bool,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let builder = match proto {
        Proto::Any => &shared.any,
        Proto::Http1 => &shared.http1,
        Proto::Http2 => &shared.http2,
    };
    let activity = Arc::new(Activity::new());
    let body_timeout = shared.limits.body_read_timeout;
    let service = {
        let (app, activity) = (shared.app.clone(), activity.clone());
        let placement = shared.placement.clone().filter(|_| placed);
        hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let in_flight = activity.begin();
            // A request the placement does not keep on the connection's runtime is
            // handled on the accepting one.
            let elsewhere = placement.as_ref().and_then(|(p, accepting)| {
                let most = hyper::body::Body::size_hint(req.body()).upper();
                (!(p.here)(req.method(), req.uri(), most)).then(|| accepting.clone())
            });
            let mut req = req.map(|body| Body::new(TimeoutBody::new(body_timeout, body)));
            req.extensions_mut().insert(ConnectInfo(remote));
            if let Some(cert) = &presented {
                req.extensions_mut().insert(cert.clone());
            }
            let app = app.clone();
            async move {
                let response = match elsewhere {
                    None => app.oneshot(req).await,
                    Some(runtime) => match runtime.spawn(app.oneshot(req)).await {
                        Ok(response) => response,
                        Err(_) => Ok(StatusCode::SERVICE_UNAVAILABLE.into_response()),
                    },
                };
                drop(in_flight);
                response
            }
        })
    };
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let limits = &shared.limits;
    let first_request_by = activity.born + limits.header_read_timeout;
    // When set, the connection was asked to close and is dropped at this instant.
    let mut closing: Option<Instant> = None;
    loop {
        let wake = match closing {
            Some(at) => at,
            None if !activity.started.load(Ordering::Relaxed) => first_request_by,
            None => activity.idle_at(limits.idle_timeout),
        };
        tokio::select! {
            done = conn.as_mut() => {
                if let Err(e) = done {
                    tracing::debug!(%remote, error = %e, "connection ended");
                }
                return;
            }
            _ = shutdown.wait_for(|stop| *stop), if closing.is_none() => {
                conn.as_mut().graceful_shutdown();
                closing = Some(Instant::now() + limits.shutdown_grace);
            }
            _ = tokio::time::sleep_until(wake) => {
                let now = Instant::now();
                if closing.is_some() {
                    shared.metrics.closed.with_label_values(&["close"]).inc();
                    return;
                }
                if !activity.started.load(Ordering::Relaxed) {
                    // No whole request head in time: the client is too slow, or
                    // holding the connection on purpose.
                    shared.metrics.closed.with_label_values(&["header"]).inc();
                    return;
                }
                if activity.idle_at(limits.idle_timeout) <= now {
                    shared.metrics.closed.with_label_values(&["idle"]).inc();
                    conn.as_mut().graceful_shutdown();
                    closing = Some(now + limits.shutdown_grace);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_are_counted_by_address_and_ipv6_by_its_64() {
        let v4: IpAddr = "203.0.113.7".parse().unwrap();
        assert_eq!(client_key(v4), v4);
        let mapped: IpAddr = "::ffff:203.0.113.7".parse().unwrap();
        assert_eq!(client_key(mapped), v4);
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(other));
        assert_eq!(client_key(a), "2001:db8:1:2::".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn slots_hold_the_total_and_per_client_limits_and_come_back() {
        let limits = ListenerLimits {
            max_connections: 3,
            max_connections_per_client: 2,
            ..ListenerLimits::default()
        };
        let slots = Arc::new(Slots {
            limits,
            open: Mutex::new((0, HashMap::new())),
            metrics: ListenerMetrics::unregistered(),
        });
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        let b: IpAddr = "198.51.100.2".parse().unwrap();
        let a1 = slots.take(a).unwrap();
        let _a2 = slots.take(a).unwrap();
        assert!(slots.take(a).is_none(), "a third from one client");
        let _b1 = slots.take(b).unwrap();
        assert!(slots.take(b).is_none(), "a fourth in total");
        drop(a1);
        assert!(
            slots.take(a).is_some(),
            "a slot comes back when its connection closes"
        );
        // Loopback is held by the total only, unless asked.
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(ListenerLimits::default().limits_client("8.8.8.8".parse().unwrap()));
        assert!(!ListenerLimits::default().limits_client(local));
        let strict = ListenerLimits {
            limit_loopback: true,
            ..ListenerLimits::default()
        };
        assert!(strict.limits_client(local));
        assert_eq!(slots.open.lock().1.len(), 2);
    }

    #[test]
    fn limits_are_validated() {
        assert!(ListenerLimits::default().validate().is_ok());
        let zero = ListenerLimits {
            max_connections_per_client: 0,
            ..ListenerLimits::default()
        };
        assert!(zero.validate().unwrap_err().contains("connections"));
        let instant = ListenerLimits {
            header_read_timeout: Duration::ZERO,
            ..ListenerLimits::default()
        };
        assert!(instant.validate().unwrap_err().contains("header"));
    }
}
