//! The gRPC server: the aggregation service, `grpc.health.v1` and server reflection, with the
//! hardening limits of [`ServerOptions`], served on a listener until a shutdown future
//! resolves.
//!
//! Health (and the readiness flag the admin listener reports) is NOT_SERVING until the server
//! is about to accept, and turns NOT_SERVING again the moment shutdown begins.

use super::listener::{ConnectionLimits, incoming};
use super::page_route::AggregationRoutes;
use super::pb;
use super::pb::aggregation_service_server::AggregationServiceServer;
use super::service::{Access, AggregationApi};
use super::timeout::RequestTimeoutLayer;
use super::tls::ReloadingTls;
use crate::gateway::Gateway;
use crate::telemetry::Metrics;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Why the server could not be built or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("cannot build server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC transport failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Limits that protect the server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Largest response (a page of rows).
    pub max_message_bytes: usize,
    /// Largest request: a sensible one is a few kilobytes, so a hostile one is refused after
    /// reading this much, before anything decodes it.
    pub max_request_bytes: usize,
    pub max_concurrent_streams: u32,
    pub request_timeout: Duration,
    /// HTTP/2 PINGs to a connection after this long without frames; `None`: no PINGs.
    pub http2_keepalive_interval: Option<Duration>,
    pub http2_keepalive_timeout: Duration,
    /// TCP keepalive probes on an idle connection after this long; `None`: none.
    pub tcp_keepalive: Option<Duration>,
    pub max_connection_age: Duration,
    /// Open connections at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// How long a new connection may take to finish its TLS handshake and send its first bytes.
    pub handshake_timeout: Duration,
    /// Streams a client may reset before the server has accepted them, before the connection
    /// is closed (the HTTP/2 rapid-reset attack).
    pub http2_max_pending_accept_reset_streams: usize,
    /// Largest header list (metadata) of a request, in bytes.
    pub http2_max_header_list_size: u32,
}

/// The default of every server limit, for [`ServerOptions::default`] and the command line.
pub mod defaults {
    use std::time::Duration;

    pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
    pub const MAX_REQUEST_BYTES: usize = 256 * 1024;
    pub const MAX_CONCURRENT_STREAMS: u32 = 1024;
    pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(90);
    /// Off: with HTTP/2 PINGs on, hyper reads the clock and takes a lock on every frame
    /// (BENCHMARKS.md, issue 28); TCP keepalive finds a vanished peer without that.
    pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::ZERO;
    pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
    pub const TCP_KEEPALIVE: Duration = Duration::from_secs(30);
    pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(300);
    pub const MAX_CONNECTIONS: usize = 10_000;
    pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    pub const HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
    pub const HTTP2_MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            max_message_bytes: defaults::MAX_MESSAGE_BYTES,
            max_request_bytes: defaults::MAX_REQUEST_BYTES,
            max_concurrent_streams: defaults::MAX_CONCURRENT_STREAMS,
            request_timeout: defaults::REQUEST_TIMEOUT,
            http2_keepalive_interval: None,
            http2_keepalive_timeout: defaults::HTTP2_KEEPALIVE_TIMEOUT,
            tcp_keepalive: Some(defaults::TCP_KEEPALIVE),
            max_connection_age: defaults::MAX_CONNECTION_AGE,
            max_connections: defaults::MAX_CONNECTIONS,
            handshake_timeout: defaults::HANDSHAKE_TIMEOUT,
            http2_max_pending_accept_reset_streams: defaults::HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS,
            http2_max_header_list_size: defaults::HTTP2_MAX_HEADER_LIST_SIZE,
        }
    }
}

/// Binds `addr` (port 0 picks a free one).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr).await.map_err(|source| ServeError::Listen { addr, source })
}

/// What [`serve`] needs besides the listener.
pub struct Serving {
    pub gateway: Arc<Gateway>,
    pub metrics: Arc<Metrics>,
    pub options: ServerOptions,
    /// Set while the server accepts work.
    pub ready: watch::Sender<bool>,
    /// TLS on the listener, when configured.
    pub tls: Option<Arc<ReloadingTls>>,
    /// Who may call what.
    pub access: Access,
}

/// Serves on `listener` until `shutdown` resolves, then lets in-flight RPCs finish.
pub async fn serve(
    listener: TcpListener,
    serving: Serving,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let Serving { gateway, metrics, options, ready, tls, access } = serving;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_not_serving::<AggregationServiceServer<AggregationApi>>().await;
    health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let api = AggregationRoutes::new(
        AggregationApi::new(gateway, metrics, access),
        options.max_request_bytes,
        options.max_message_bytes,
    );
    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .max_concurrent_streams(options.max_concurrent_streams)
        .http2_keepalive_interval(options.http2_keepalive_interval)
        .http2_keepalive_timeout(Some(options.http2_keepalive_timeout))
        .max_connection_age(options.max_connection_age)
        .http2_max_pending_accept_reset_streams(Some(options.http2_max_pending_accept_reset_streams))
        .http2_max_header_list_size(options.http2_max_header_list_size)
        .layer(RequestTimeoutLayer(options.request_timeout))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(api);
    health.set_serving::<AggregationServiceServer<AggregationApi>>().await;
    health.set_service_status("", tonic_health::ServingStatus::Serving).await;
    ready.send_replace(true);
    let draining = async {
        shutdown.await;
        ready.send_replace(false);
        health.set_not_serving::<AggregationServiceServer<AggregationApi>>().await;
        health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    };
    let limits = ConnectionLimits {
        max_connections: options.max_connections,
        handshake_timeout: options.handshake_timeout,
        tcp_keepalive: options.tcp_keepalive,
    };
    router.serve_with_incoming_shutdown(incoming(listener, tls, limits), draining).await?;
    Ok(())
}
