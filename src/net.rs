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
//! - TLS is terminated here (rustls, as tonic would), each handshake in a task of its
//!   own so a slow one holds up no other, and the client certificate rustls verified is
//!   carried in the [`ConnectionInfo`].
//! - The HTTP/2 frames a client sends are read as they pass (after TLS): PING, SETTINGS
//!   and PRIORITY frames, which cost the server work and give the client nothing it
//!   needs many of, draw on a token bucket per connection; a client that overdraws it
//!   (a PING or SETTINGS flood) has its connection closed. HTTP/1.1 connections are not
//!   read this way.
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

use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// How the accept loop treats connections.
#[derive(Clone)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    /// PING, SETTINGS and PRIORITY frames a connection may send; `None`: no limit.
    pub control_frames: Option<FrameBudget>,
    /// Terminate TLS with this (`None`: plaintext).
    pub tls: Option<TlsAcceptor>,
}

/// A token bucket of HTTP/2 control frames: `per_second` refilled, `burst` at most.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FrameBudget {
    pub per_second: u32,
    pub burst: u32,
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
    /// TLS handshakes that failed (or did not finish within the handshake timeout).
    pub tls_failures: AtomicU64,
    /// Connections closed for sending control frames faster than their budget.
    pub control_frame_floods: AtomicU64,
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
    /// The client's certificate chain, leaf first, when it presented one over TLS and
    /// rustls verified it against the client CA.
    peer_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    state: Arc<ConnectionState>,
}

impl ConnectionInfo {
    /// The connection of a request.
    pub fn of(extensions: &http::Extensions) -> Option<&ConnectionInfo> {
        extensions.get::<ConnectionInfo>()
    }

    /// The verified client certificate chain, leaf first.
    pub fn peer_certs(&self) -> Option<&[CertificateDer<'static>]> {
        self.peer_certs.as_deref().map(Vec::as_slice)
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

/// The bytes of a connection: the socket, or TLS over it.
enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// A connection's place among `max_connections`, counted in `open` until it is dropped
/// (with the connection, or with a handshake that failed).
struct Slot {
    stats: Arc<ConnectionStats>,
    _permit: OwnedSemaphorePermit,
}

impl Slot {
    fn new(stats: Arc<ConnectionStats>, permit: OwnedSemaphorePermit) -> Self {
        stats.open.fetch_add(1, Ordering::Relaxed);
        Slot {
            stats,
            _permit: permit,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An accepted connection: its transport, its slot, its handshake deadline, and the
/// control frames it has sent.
pub struct GuardedStream {
    inner: Transport,
    info: ConnectionInfo,
    handshake: Option<Pin<Box<Sleep>>>,
    /// The handshake deadline passed, or the control-frame budget was overdrawn: every
    /// read fails, so hyper drops the connection.
    closed: Option<(io::ErrorKind, &'static str)>,
    frames: FrameScan,
    slot: Slot,
}

impl Connected for GuardedStream {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        self.info.clone()
    }
}

impl GuardedStream {
    fn fail(&mut self, kind: io::ErrorKind, why: &'static str) -> Poll<io::Result<()>> {
        self.closed = Some((kind, why));
        tracing::debug!(peer = ?self.info.remote_addr(), "connection closed: {why}");
        Poll::Ready(Err(io::Error::new(kind, why)))
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some((kind, why)) = this.closed {
            return Poll::Ready(Err(io::Error::new(kind, why)));
        }
        if let Some(deadline) = this.handshake.as_mut() {
            if this.info.state.served.load(Ordering::Relaxed) {
                this.handshake = None;
            } else if deadline.as_mut().poll(cx).is_ready() {
                this.handshake = None;
                this.slot
                    .stats
                    .handshake_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                crate::observe::connection_closed("handshake_timeout");
                return this.fail(
                    io::ErrorKind::TimedOut,
                    "no request within the handshake timeout",
                );
            }
        }
        let before = buf.filled().len();
        let read = match &mut this.inner {
            Transport::Plain(socket) => Pin::new(socket).poll_read(cx, buf),
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        };
        if let Poll::Ready(Ok(())) = read
            && this
                .frames
                .feed(&buf.filled()[before..], Instant::now())
                .is_err()
        {
            this.slot
                .stats
                .control_frame_floods
                .fetch_add(1, Ordering::Relaxed);
            crate::observe::connection_closed("control_frame_flood");
            return this.fail(
                io::ErrorKind::InvalidData,
                "HTTP/2 control frames (PING, SETTINGS, PRIORITY) past the budget",
            );
        }
        read
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().inner {
            Transport::Plain(socket) => Pin::new(socket).poll_write(cx, buf),
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().inner {
            Transport::Plain(socket) => Pin::new(socket).poll_write_vectored(cx, bufs),
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.inner {
            Transport::Plain(socket) => socket.is_write_vectored(),
            Transport::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Transport::Plain(socket) => Pin::new(socket).poll_flush(cx),
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Transport::Plain(socket) => Pin::new(socket).poll_shutdown(cx),
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The client connection preface of HTTP/2 (RFC 9113 section 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Follows the frames of the bytes a client sends: where each frame header is, and
/// whether it is a control frame to charge to the budget.
#[derive(Debug)]
struct FrameScan {
    at: ScanAt,
    budget: Option<(FrameBudget, Bucket)>,
}

#[derive(Debug)]
enum ScanAt {
    /// Matching the preface: this many bytes of it so far.
    Preface(usize),
    /// Inside a frame header: these bytes of it so far.
    Header([u8; 9], usize),
    /// Inside a payload: this many bytes of it left.
    Payload(usize),
    /// Not HTTP/2 (HTTP/1.1), or no budget: nothing to follow.
    Off,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A client overdrew its control-frame budget.
#[derive(Debug)]
struct Flood;

const PING: u8 = 0x6;
const SETTINGS: u8 = 0x4;
const PRIORITY: u8 = 0x2;
const ACK: u8 = 0x1;

impl FrameScan {
    fn new(budget: Option<FrameBudget>, now: Instant) -> Self {
        FrameScan {
            at: if budget.is_some() {
                ScanAt::Preface(0)
            } else {
                ScanAt::Off
            },
            budget: budget.map(|b| {
                (
                    b,
                    Bucket {
                        tokens: f64::from(b.burst),
                        at: now,
                    },
                )
            }),
        }
    }

    fn feed(&mut self, mut bytes: &[u8], now: Instant) -> Result<(), Flood> {
        while !bytes.is_empty() {
            match &mut self.at {
                ScanAt::Off => return Ok(()),
                ScanAt::Preface(matched) => {
                    if bytes[0] != PREFACE[*matched] {
                        self.at = ScanAt::Off;
                        return Ok(());
                    }
                    *matched += 1;
                    bytes = &bytes[1..];
                    if *matched == PREFACE.len() {
                        self.at = ScanAt::Header([0; 9], 0);
                    }
                }
                ScanAt::Header(header, filled) => {
                    let take = (9 - *filled).min(bytes.len());
                    header[*filled..*filled + take].copy_from_slice(&bytes[..take]);
                    *filled += take;
                    bytes = &bytes[take..];
                    if *filled == 9 {
                        let length = usize::from(header[0]) << 16
                            | usize::from(header[1]) << 8
                            | usize::from(header[2]);
                        let (kind, flags) = (header[3], header[4]);
                        let control = match kind {
                            PING | SETTINGS => flags & ACK == 0,
                            PRIORITY => true,
                            _ => false,
                        };
                        if control {
                            self.charge(now)?;
                        }
                        self.at = if length == 0 {
                            ScanAt::Header([0; 9], 0)
                        } else {
                            ScanAt::Payload(length)
                        };
                    }
                }
                ScanAt::Payload(left) => {
                    let take = (*left).min(bytes.len());
                    *left -= take;
                    bytes = &bytes[take..];
                    if *left == 0 {
                        self.at = ScanAt::Header([0; 9], 0);
                    }
                }
            }
        }
        Ok(())
    }

    fn charge(&mut self, now: Instant) -> Result<(), Flood> {
        let Some((budget, bucket)) = &mut self.budget else {
            return Ok(());
        };
        let refill = now.duration_since(bucket.at).as_secs_f64() * f64::from(budget.per_second);
        bucket.tokens = (bucket.tokens + refill).min(f64::from(budget.burst));
        bucket.at = now;
        if bucket.tokens < 1.0 {
            return Err(Flood);
        }
        bucket.tokens -= 1.0;
        Ok(())
    }
}

/// A TLS acceptor for the listener: `cert` and `key` (PEM) as its identity, HTTP/2 by
/// ALPN; with `client_ca`, client certificates signed by it are verified (and
/// optional: a caller without one may still present a bearer key).
pub fn tls_acceptor(
    cert: &[u8],
    key: &[u8],
    client_ca: Option<&[u8]>,
) -> Result<TlsAcceptor, String> {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    use rustls::server::WebPkiClientVerifier;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for certificate in CertificateDer::pem_slice_iter(ca) {
                let certificate = certificate.map_err(|e| format!("client CA: {e}"))?;
                roots
                    .add(certificate)
                    .map_err(|e| format!("client CA: {e}"))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| format!("client CA: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate: {e}"))?;
    if chain.is_empty() {
        return Err("certificate: no PEM certificate in it".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("key: {e}"))?;
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols.push(b"h2".to_vec());
    Ok(TlsAcceptor::from(Arc::new(config)))
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
            crate::observe::connection_closed("over_limit");
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
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let slot = Slot::new(stats.clone(), slot);
        let deadline = Instant::now() + limits.handshake_timeout;
        let tcp = stream.connect_info();
        let Some(acceptor) = limits.tls.clone() else {
            let guarded = guard(Transport::Plain(stream), tcp, None, deadline, &limits, slot);
            if sender.send(Ok(guarded)).await.is_err() {
                return;
            }
            continue;
        };
        // The handshake in a task of its own, within the handshake deadline.
        let (sender, limits) = (sender.clone(), limits.clone());
        tokio::spawn(async move {
            match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let peer_certs = tls.get_ref().1.peer_certificates().map(|chain| {
                        Arc::new(chain.iter().map(|c| c.clone().into_owned()).collect())
                    });
                    let transport = Transport::Tls(Box::new(tls));
                    let guarded = guard(transport, tcp, peer_certs, deadline, &limits, slot);
                    let _ = sender.send(Ok(guarded)).await;
                }
                Ok(Err(error)) => {
                    slot.stats.tls_failures.fetch_add(1, Ordering::Relaxed);
                    crate::observe::connection_closed("tls_failed");
                    tracing::debug!(%peer, %error, "TLS handshake failed");
                }
                Err(_) => {
                    slot.stats.tls_failures.fetch_add(1, Ordering::Relaxed);
                    crate::observe::connection_closed("handshake_timeout");
                    slot.stats
                        .handshake_timeouts
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, "TLS handshake not done within the handshake timeout");
                }
            }
        });
    }
}

fn guard(
    inner: Transport,
    tcp: TcpConnectInfo,
    peer_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    deadline: Instant,
    limits: &ConnectionLimits,
    slot: Slot,
) -> GuardedStream {
    GuardedStream {
        inner,
        info: ConnectionInfo {
            tcp,
            peer_certs,
            state: Arc::default(),
        },
        handshake: Some(Box::pin(tokio::time::sleep_until(deadline))),
        closed: None,
        frames: FrameScan::new(limits.control_frames, Instant::now()),
        slot,
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
            control_frames: None,
            tls: None,
        };
        let mut incoming = accept(listener, limits, stats.clone());
        let _first = TcpStream::connect(addr).await.unwrap();
        let accepted = tokio_stream::StreamExt::next(&mut incoming)
            .await
            .unwrap()
            .unwrap();
        let Transport::Plain(socket) = &accepted.inner else {
            panic!("plaintext")
        };
        assert!(socket.nodelay().unwrap(), "TCP_NODELAY not set");
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

#[cfg(test)]
mod frame_tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let length = payload.len();
        let mut bytes = vec![
            (length >> 16) as u8,
            (length >> 8) as u8,
            length as u8,
            kind,
            flags,
            0,
            0,
            0,
            0,
        ];
        bytes.extend_from_slice(payload);
        bytes
    }

    fn budget(per_second: u32, burst: u32) -> Option<FrameBudget> {
        Some(FrameBudget { per_second, burst })
    }

    #[test]
    fn control_frames_past_the_burst_are_a_flood() {
        let now = Instant::now();
        let mut scan = FrameScan::new(budget(10, 3), now);
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(SETTINGS, 0, &[0; 6]));
        bytes.extend(frame(SETTINGS, ACK, &[]));
        // DATA and HEADERS frames, however many, cost nothing.
        for _ in 0..100 {
            bytes.extend(frame(0x0, 0, b"payload"));
        }
        bytes.extend(frame(PING, 0, &[0; 8]));
        bytes.extend(frame(PING, ACK, &[0; 8]));
        bytes.extend(frame(PRIORITY, 0, &[0; 5]));
        assert!(
            scan.feed(&bytes, now).is_ok(),
            "three control frames: the burst"
        );
        assert!(scan.feed(&frame(PING, 0, &[0; 8]), now).is_err());
    }

    #[test]
    fn the_budget_refills_at_its_rate() {
        let now = Instant::now();
        let mut scan = FrameScan::new(budget(10, 2), now);
        let ping = frame(PING, 0, &[0; 8]);
        scan.feed(PREFACE, now).unwrap();
        scan.feed(&ping, now).unwrap();
        scan.feed(&ping, now).unwrap();
        assert!(scan.feed(&ping, now).is_err());
        let later = now + Duration::from_millis(100);
        assert!(
            scan.feed(&ping, later).is_ok(),
            "one token back after 100 ms"
        );
        assert!(scan.feed(&ping, later).is_err());
    }

    #[test]
    fn frames_split_across_reads_are_followed() {
        let now = Instant::now();
        let mut scan = FrameScan::new(budget(1, 1), now);
        let mut bytes = PREFACE.to_vec();
        // A DATA frame whose payload holds what looks like PING headers.
        bytes.extend(frame(0x0, 0, &frame(PING, 0, &[0; 8]).repeat(10)));
        bytes.extend(frame(PING, 0, &[0; 8]));
        bytes.extend(frame(PING, 0, &[0; 8]));
        let flooded = bytes
            .chunks(5)
            .map(|chunk| scan.feed(chunk, now))
            .position(|r| r.is_err());
        // Only the real second PING overdraws: the first 24 + 126 + 17 bytes pass.
        assert_eq!(flooded, Some((24 + 9 + 170 + 17 + 9) / 5));
    }

    #[test]
    fn http1_and_unlimited_connections_are_not_read() {
        let now = Instant::now();
        let mut http1 = FrameScan::new(budget(1, 1), now);
        let request = b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n".repeat(100);
        assert!(http1.feed(&request, now).is_ok());
        assert!(matches!(http1.at, ScanAt::Off));
        let mut unlimited = FrameScan::new(None, now);
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(PING, 0, &[0; 8]).repeat(10_000));
        assert!(unlimited.feed(&bytes, now).is_ok());
    }
}
