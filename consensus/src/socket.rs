//! A TCP connection that moves from the runtime that accepted it to the one that
//! serves it.
//!
//! A tokio socket stays registered with the reactor of the runtime it was made on:
//! served from another runtime, every time it becomes readable that reactor's
//! thread wakes first and then wakes the serving thread, a second hand-off on
//! every request. A listener whose connections are served on a replica's thread
//! (the peer listener, the control API's placed connections) detaches the socket
//! after its handshake and attaches it on the serving runtime, whose thread then
//! waits on the socket itself.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A TCP connection registered with one runtime at a time, or none while it moves.
#[derive(Debug)]
pub struct MovableTcp(State);

#[derive(Debug)]
enum State {
    /// Registered with the runtime it is polled on.
    Live(TcpStream),
    /// Between runtimes: registered with none.
    Moving(std::net::TcpStream),
    /// Failed to move; every read and write fails.
    Gone,
}

impl MovableTcp {
    /// A connection registered with the runtime `tcp` was made on.
    pub fn new(tcp: TcpStream) -> Self {
        MovableTcp(State::Live(tcp))
    }

    /// Leaves the runtime it is registered with; until [`MovableTcp::attach`], every
    /// read and write fails. On an error the connection is closed.
    pub fn detach(&mut self) -> io::Result<()> {
        if let State::Live(tcp) = std::mem::replace(&mut self.0, State::Gone) {
            self.0 = State::Moving(tcp.into_std()?);
        }
        Ok(())
    }

    /// Registers with the runtime of the calling task (a no-op when registered).
    /// On an error the connection is closed.
    pub fn attach(&mut self) -> io::Result<()> {
        if let State::Moving(tcp) = std::mem::replace(&mut self.0, State::Gone) {
            self.0 = State::Live(TcpStream::from_std(tcp)?);
        }
        Ok(())
    }

    /// The connection as a tokio socket of the calling task's runtime, if it is
    /// still open: attached there first if it was between runtimes.
    pub fn into_live(mut self) -> Option<TcpStream> {
        self.attach().ok()?;
        match self.0 {
            State::Live(tcp) => Some(tcp),
            State::Moving(_) | State::Gone => None,
        }
    }

    fn poll_live<T>(
        &mut self,
        f: impl FnOnce(Pin<&mut TcpStream>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match &mut self.0 {
            State::Live(tcp) => f(Pin::new(tcp)),
            State::Moving(_) | State::Gone => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the connection is not registered with this runtime",
            ))),
        }
    }
}

impl AsyncRead for MovableTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut().poll_live(|tcp| tcp.poll_read(cx, buf))
    }
}

impl AsyncWrite for MovableTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_live(|tcp| tcp.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_live(|tcp| tcp.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_live(|tcp| tcp.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_live(|tcp| tcp.poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    #[tokio::test]
    async fn a_connection_moved_to_another_runtime_is_served_there_after_the_accepting_one_stops() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        client.set_nonblocking(true).unwrap();
        let mut client = TcpStream::from_std(client).unwrap();
        // The accepting runtime lives only as long as the accept: afterwards its
        // reactor is gone, and a socket still registered there could not be served.
        let mut server = std::thread::spawn(move || {
            let accepting = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            accepting.block_on(async move {
                listener.set_nonblocking(true).unwrap();
                let listener = TcpListener::from_std(listener).unwrap();
                let (tcp, _) = listener.accept().await.unwrap();
                let mut moving = MovableTcp::new(tcp);
                moving.detach().unwrap();
                moving
            })
        })
        .join()
        .unwrap();

        // Between runtimes, reading and writing fail rather than hang.
        let mut byte = [0u8; 1];
        let err = server.read(&mut byte).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotConnected);

        let echoed = std::thread::spawn(move || {
            let serving = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            serving.block_on(async move {
                server.attach().unwrap();
                let mut buf = [0u8; 5];
                server.read_exact(&mut buf).await.unwrap();
                server.write_all(&buf).await.unwrap();
                buf
            })
        });
        client.write_all(b"hello").await.unwrap();
        let mut back = [0u8; 5];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"hello");
        assert_eq!(&echoed.join().unwrap(), b"hello");
    }

    #[tokio::test]
    async fn a_moving_connection_becomes_a_socket_of_the_runtime_that_takes_it() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let mut moving = MovableTcp::new(tcp);
        moving.detach().unwrap();
        let mut tcp = moving.into_live().expect("still open");
        client.write_all(b"x").await.unwrap();
        let mut byte = [0u8; 1];
        tcp.read_exact(&mut byte).await.unwrap();
        assert_eq!(&byte, b"x");
    }
}
