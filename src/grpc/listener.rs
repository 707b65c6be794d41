//! The gRPC listener's connections: accepted, bounded, TLS-terminated when configured, and
//! handed to the server with what is known of the peer.
//!
//! - At most `max_connections` are open at once; one more is closed as soon as it is accepted
//!   (the kernel backlog is not a queue anyone should wait in).
//! - A failing `accept` (out of file descriptors, most often) backs off from 5 ms to 1 s
//!   instead of spinning on the error.
//! - A TLS handshake runs in a task of its own, so a slow one never holds up the next
//!   connection, and must finish within the handshake timeout; so must the first bytes of the
//!   HTTP/2 preface after it: a socket that never speaks is closed.

use super::tls::{ReloadingTls, certificate_identity};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;

/// What the server knows of a connection's peer; in every request's extensions.
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    pub remote_addr: Option<SocketAddr>,
    /// The identity of a verified client certificate (mutual TLS).
    pub certificate_identity: Option<Arc<str>>,
}

/// Bounds of the listener.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectionLimits {
    pub max_connections: usize,
    /// How long a new connection may take to finish its TLS handshake, and then to send its
    /// first bytes.
    pub handshake_timeout: Duration,
    /// TCP keepalive on each connection: probes after this long idle, a dead peer's
    /// connection closed after three unanswered ones.
    pub tcp_keepalive: Option<Duration>,
}

/// One accepted connection.
pub(crate) struct Conn {
    io: Io,
    info: PeerInfo,
    /// Until the peer's first bytes arrive: when it must have spoken by.
    first_read_by: Option<Pin<Box<tokio::time::Sleep>>>,
    _slot: OwnedSemaphorePermit,
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let polled = match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        if let Some(deadline) = this.first_read_by.as_mut() {
            if buf.filled().len() > before || matches!(polled, Poll::Ready(Err(_))) {
                this.first_read_by = None;
            } else if polled.is_pending() && deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the peer sent nothing in time")));
            }
        }
        polled
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, data),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, data),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Accepts on `listener` (terminating TLS with `tls` when given) until the returned stream is
/// dropped, within `limits`.
pub(crate) fn incoming(
    listener: TcpListener,
    tls: Option<Arc<ReloadingTls>>,
    limits: ConnectionLimits,
) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(accept_loop(listener, tls, limits, tx));
    ReceiverStream::new(rx)
}

/// Probes a connection idle for `idle`, then every third of it; three unanswered close it.
fn keep_alive(stream: &TcpStream, idle: Duration, peer: SocketAddr) {
    let probes = socket2::TcpKeepalive::new().with_time(idle).with_interval((idle / 3).max(Duration::from_secs(1)));
    #[cfg(any(target_os = "linux", target_os = "macos", target_os = "freebsd"))]
    let probes = probes.with_retries(3);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&probes) {
        tracing::debug!(peer = %peer, error = %e, "cannot set TCP keepalive");
    }
}

const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

async fn accept_loop(
    listener: TcpListener,
    tls: Option<Arc<ReloadingTls>>,
    limits: ConnectionLimits,
    tx: mpsc::Sender<io::Result<Conn>>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut backoff = ACCEPT_BACKOFF_FIRST;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = tx.closed() => return,
        };
        let (stream, remote_addr) = match accepted {
            Ok(ok) => {
                backoff = ACCEPT_BACKOFF_FIRST;
                ok
            }
            Err(e) => {
                if backoff == ACCEPT_BACKOFF_FIRST {
                    tracing::warn!(error = %e, "accept failed; backing off");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(peer = %remote_addr, max = limits.max_connections, "connection refused: at --max-connections");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        if let Some(idle) = limits.tcp_keepalive {
            keep_alive(&stream, idle, remote_addr);
        }
        let info = PeerInfo { remote_addr: Some(remote_addr), certificate_identity: None };
        let first_read_by = Some(Box::pin(tokio::time::sleep(limits.handshake_timeout)));
        match &tls {
            None => {
                let conn = Conn { io: Io::Plain(stream), info, first_read_by, _slot: slot };
                if tx.send(Ok(conn)).await.is_err() {
                    return;
                }
            }
            Some(tls) => {
                let (tls, tx) = (tls.clone(), tx.clone());
                tokio::spawn(async move {
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
                    let handshake = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(stream)).await;
                    let stream = match handshake {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %remote_addr, error = %e, "TLS handshake refused");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(peer = %remote_addr, "TLS handshake timed out");
                            return;
                        }
                    };
                    let identity = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|certs| certs.first())
                        .and_then(certificate_identity)
                        .map(Arc::from);
                    let info = PeerInfo { certificate_identity: identity, ..info };
                    let conn = Conn { io: Io::Tls(Box::new(stream)), info, first_read_by, _slot: slot };
                    let _ = tx.send(Ok(conn)).await;
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt as _;

    /// The server side of one connection accepted with `tcp_keepalive`.
    async fn accepted(tcp_keepalive: Option<Duration>) -> (Conn, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let addr = listener.local_addr().expect("an address");
        let limits = ConnectionLimits { max_connections: 4, handshake_timeout: Duration::from_secs(10), tcp_keepalive };
        let mut conns = incoming(listener, None, limits);
        let client = TcpStream::connect(addr).await.expect("connects");
        let conn = conns.next().await.expect("a connection").expect("accepted");
        (conn, client)
    }

    #[tokio::test]
    async fn accepted_connections_probe_an_idle_peer_with_tcp_keepalive() {
        let (conn, _client) = accepted(Some(Duration::from_secs(30))).await;
        let Io::Plain(stream) = &conn.io else { panic!("a plain connection") };
        let socket = socket2::SockRef::from(stream);
        assert!(socket.keepalive().expect("SO_KEEPALIVE"));
        assert_eq!(socket.tcp_keepalive_time().expect("TCP_KEEPIDLE"), Duration::from_secs(30));
        assert_eq!(socket.tcp_keepalive_interval().expect("TCP_KEEPINTVL"), Duration::from_secs(10));
        assert_eq!(socket.tcp_keepalive_retries().expect("TCP_KEEPCNT"), 3);

        let (conn, _client) = accepted(None).await;
        let Io::Plain(stream) = &conn.io else { panic!("a plain connection") };
        assert!(!socket2::SockRef::from(stream).keepalive().expect("SO_KEEPALIVE"), "off when not asked for");
    }
}
