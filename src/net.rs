//! The listener's own accept loop, in front of tonic. tonic hands its incoming stream to
//! hyper as it is: it ignores its `tcp_nodelay` setting for a stream it did not accept
//! itself, and it has no cap on open connections and no deadline for a connection that
//! never sends a request. Each is here:
//!
//! - `TCP_NODELAY` on every accepted socket: a response written in two parts must not
//!   wait for the peer's delayed ACK (up to 40 ms on Linux for every unary call).
//! - At most `max_connections` open: past it a new connection is closed at once, counted
//!   in [`ConnectionStats`] and logged (at most once a second), so a flood cannot exhaust
//!   file descriptors.
//! - A connection that has not made its first request within `handshake_timeout` (TLS,
//!   the HTTP/2 preface and the first headers) is closed: its reads fail with `TimedOut`,
//!   and hyper drops it.
//! - A failing `accept` (EMFILE, ENFILE, ENOBUFS) backs off, 5 ms doubling to 1 s,
//!   instead of spinning a core.
//!
//! Each connection carries a [`ConnectionInfo`] that tonic puts in every request's
//! extensions (inside `TlsConnectInfo` on a TLS listener): the request layers mark the
//! connection as served and count its long-lived streams there.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, Sleep};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

/// How the accept loop treats connections.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
}

/// Counters of the accept loop, ready to be exported as metrics.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    /// Connections accepted and handed to the server.
    pub accepted: AtomicU64,
    /// Connections closed at once because `max_connections` were open.
    pub refused_over_limit: AtomicU64,
    /// Connections closed because they made no request within the handshake timeout.
    pub handshake_timeouts: AtomicU64,
    /// `accept` failures (file descriptors exhausted and the like).
    pub accept_errors: AtomicU64,
    /// Connections open now.
    pub open: AtomicUsize,
}

/// What one connection shares with the requests it carries.
#[derive(Debug, Default)]
struct ConnectionState {
    /// A request has arrived: the handshake is over.
    served: AtomicBool,
    /// `Health/Watch` streams open on this connection.
    health_watches: AtomicUsize,
    /// Device streams open on this connection.
    device_streams: Arc<AtomicUsize>,
}

/// The connect info of an accepted connection (see the module docs).
#[derive(Clone, Debug)]
pub struct ConnectionInfo {
    pub tcp: TcpConnectInfo,
    state: Arc<ConnectionState>,
}

impl ConnectionInfo {
    /// The connection of a request, on a plaintext or a TLS listener.
    pub fn of(extensions: &http::Extensions) -> Option<&ConnectionInfo> {
        extensions.get::<ConnectionInfo>().or_else(|| {
            extensions
                .get::<TlsConnectInfo<ConnectionInfo>>()
                .map(TlsConnectInfo::get_ref)
        })
    }

    /// Ends the handshake deadline: the connection has made a request.
    pub fn mark_served(&self) {
        self.state.served.store(true, Ordering::Relaxed);
    }

    /// `Health/Watch` streams open on this connection.
    pub fn health_watches(&self) -> &AtomicUsize {
        &self.state.health_watches
    }

    /// Device streams open on this connection.
    pub fn device_streams(&self) -> &Arc<AtomicUsize> {
        &self.state.device_streams
    }

    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.tcp.remote_addr
    }
}

/// An accepted connection: the socket, its connection slot, and its handshake deadline.
pub struct GuardedStream {
    inner: TcpStream,
    info: ConnectionInfo,
    handshake: Option<Pin<Box<Sleep>>>,
    /// The handshake deadline passed: every read fails, so hyper drops the connection.
    timed_out: bool,
    stats: Arc<ConnectionStats>,
    _slot: OwnedSemaphorePermit,
}

impl Drop for GuardedStream {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Connected for GuardedStream {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        self.info.clone()
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.timed_out {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no request within the handshake timeout",
            )));
        }
        if let Some(deadline) = this.handshake.as_mut() {
            if this.info.state.served.load(Ordering::Relaxed) {
                this.handshake = None;
            } else if deadline.as_mut().poll(cx).is_ready() {
                this.handshake = None;
                this.timed_out = true;
                this.stats
                    .handshake_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    peer = ?this.info.remote_addr(),
                    "connection closed: no request within the handshake timeout"
                );
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no request within the handshake timeout",
                )));
            }
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The incoming connections of a listener, for `serve_with_incoming_shutdown`.
pub type Incoming = ReceiverStream<io::Result<GuardedStream>>;

const BACKOFF_START: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
const LOG_EVERY: Duration = Duration::from_secs(1);

/// Starts the accept loop on `listener`. It ends, closing the listener, when the server
/// drops the returned stream.
pub fn accept(
    listener: TcpListener,
    limits: ConnectionLimits,
    stats: Arc<ConnectionStats>,
) -> Incoming {
    let (sender, receiver) = mpsc::channel(256);
    tokio::spawn(accept_loop(listener, limits, stats, sender));
    ReceiverStream::new(receiver)
}

async fn accept_loop(
    listener: TcpListener,
    limits: ConnectionLimits,
    stats: Arc<ConnectionStats>,
    sender: mpsc::Sender<io::Result<GuardedStream>>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut backoff = BACKOFF_START;
    let mut last_refusal_log: Option<Instant> = None;
    let mut last_error_log: Option<Instant> = None;
    let due = |last: &mut Option<Instant>| {
        let now = Instant::now();
        let due = last.is_none_or(|at| now.duration_since(at) >= LOG_EVERY);
        if due {
            *last = Some(now);
        }
        due
    };
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = sender.closed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                backoff = BACKOFF_START;
                accepted
            }
            Err(error) => {
                stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                if due(&mut last_error_log) {
                    tracing::warn!(%error, retry_in = ?backoff, "accept failed");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            let refused = stats.refused_over_limit.fetch_add(1, Ordering::Relaxed) + 1;
            if due(&mut last_refusal_log) {
                tracing::warn!(
                    %peer,
                    max_connections = limits.max_connections,
                    refused_so_far = refused,
                    "connection limit reached: new connections are closed"
                );
            }
            drop(stream);
            continue;
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%peer, %error, "cannot set TCP_NODELAY");
        }
        let info = ConnectionInfo {
            tcp: stream.connect_info(),
            state: Arc::default(),
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        stats.open.fetch_add(1, Ordering::Relaxed);
        let guarded = GuardedStream {
            inner: stream,
            info,
            handshake: Some(Box::pin(tokio::time::sleep(limits.handshake_timeout))),
            timed_out: false,
            stats: stats.clone(),
            _slot: slot,
        };
        if sender.send(Ok(guarded)).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_have_nodelay_and_a_slot() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(ConnectionStats::default());
        let limits = ConnectionLimits {
            max_connections: 1,
            handshake_timeout: Duration::from_secs(5),
        };
        let mut incoming = accept(listener, limits, stats.clone());
        let _first = TcpStream::connect(addr).await.unwrap();
        let accepted = tokio_stream::StreamExt::next(&mut incoming)
            .await
            .unwrap()
            .unwrap();
        assert!(accepted.inner.nodelay().unwrap(), "TCP_NODELAY not set");
        assert_eq!(stats.open.load(Ordering::Relaxed), 1);
        // The second connection finds no slot and is closed at once.
        let mut second = TcpStream::connect(addr).await.unwrap();
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read(&mut second, &mut byte),
        )
        .await
        .expect("closed, not left hanging");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        assert_eq!(stats.refused_over_limit.load(Ordering::Relaxed), 1);
        drop(accepted);
        assert_eq!(stats.open.load(Ordering::Relaxed), 0);
    }
}
