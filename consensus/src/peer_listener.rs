//! The peer listener: TCP with mutual TLS under the cluster CA, each connection
//! labelled with the server id its client certificate names.
//!
//! Handshakes run in their own tasks with a deadline, so a slow or silent client
//! holds up no one; connections (handshaking or established) are capped, and one
//! beyond the cap is closed at once. A client whose certificate is not from the CA,
//! or names no server, never reaches HTTP.
//!
//! Accepting and handshaking run on the runtime the listener was made on (the
//! server's); an established connection then moves to the runtime that serves it
//! (the replica's own, see `runtime`), so a stranger's handshakes cost the replica's
//! thread nothing.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::metrics::RaftMetrics;
use crate::socket::MovableTcp;

/// How long a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is on the other end of a peer connection: its address and the server id its
/// certificate names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerConn {
    /// The client's socket address.
    pub remote: SocketAddr,
    /// The server id in the client's certificate (this server's own id for the
    /// listener's local address).
    pub server: u64,
}

impl Connected<IncomingStream<'_, PeerListener>> for PeerConn {
    fn connect_info(stream: IncomingStream<'_, PeerListener>) -> Self {
        *stream.remote_addr()
    }
}

/// A TLS stream holding its share of the connection cap until it closes.
pub struct PeerStream {
    inner: TlsStream<MovableTcp>,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Accepts peer connections whose TLS handshake succeeded with a certificate from
/// the CA naming a server id; for `axum::serve`.
pub struct PeerListener {
    local: PeerConn,
    ready: mpsc::Receiver<(PeerStream, PeerConn)>,
    accepting: tokio::task::JoinHandle<()>,
}

impl PeerListener {
    /// Starts accepting on `listener` for server `self_id`, at most `max_connections`
    /// at once, with `tls` (which must require client certificates). Accepting and
    /// handshaking run on the runtime of the caller; connections are served on the
    /// runtime that calls [`Listener::accept`].
    pub fn new(
        listener: TcpListener,
        self_id: u64,
        tls: Arc<rustls::ServerConfig>,
        max_connections: usize,
        metrics: Arc<RaftMetrics>,
    ) -> io::Result<Self> {
        let local = PeerConn {
            remote: listener.local_addr()?,
            server: self_id,
        };
        let (tx, ready) = mpsc::channel(64);
        let accepting = tokio::spawn(accept_loop(
            listener,
            TlsAcceptor::from(tls),
            Arc::new(Semaphore::new(max_connections.max(1))),
            tx,
            metrics,
        ));
        Ok(PeerListener {
            local,
            ready,
            accepting,
        })
    }
}

impl Drop for PeerListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    slots: Arc<Semaphore>,
    ready: mpsc::Sender<(PeerStream, PeerConn)>,
    metrics: Arc<RaftMetrics>,
) {
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: pause rather than spin.
                tracing::warn!(error = %e, "peer listener accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            metrics.peer_connections_refused.inc();
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, ready, metrics) = (acceptor.clone(), ready.clone(), metrics.clone());
        tokio::spawn(async move {
            let handshake = acceptor.accept(MovableTcp::new(tcp));
            let mut stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    metrics.peer_connections_refused.inc();
                    tracing::debug!(%remote, error = %e, "peer handshake refused");
                    return;
                }
                Err(_) => {
                    metrics.peer_connections_refused.inc();
                    return;
                }
            };
            let server = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(aigrid_tls::server_id_of);
            let Some(server) = server else {
                metrics.peer_connections_refused.inc();
                tracing::debug!(%remote, "peer certificate names no server");
                return;
            };
            let conn = PeerConn { remote, server };
            if let Err(e) = stream.get_mut().0.detach() {
                tracing::debug!(%remote, error = %e, "peer connection could not be handed over");
                return;
            }
            let stream = PeerStream {
                inner: stream,
                _permit: permit,
            };
            let _ = ready.send((stream, conn)).await;
        });
    }
}

impl Listener for PeerListener {
    type Io = PeerStream;
    type Addr = PeerConn;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.ready.recv().await {
                Some((mut stream, conn)) => match stream.inner.get_mut().0.attach() {
                    Ok(()) => return (stream, conn),
                    Err(e) => {
                        tracing::debug!(remote = %conn.remote, error = %e, "peer connection could not be taken over");
                    }
                },
                // The accept loop never ends on its own; it is only aborted on drop.
                None => std::future::pending().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}
