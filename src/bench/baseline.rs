//! The baseline: a tonic server exposing the same `GetAggregation` method that returns a
//! pre-encoded response of the same size — no lookup, no throttling, no cache.

use crate::grpc::service::{GET, SERVICE_NAME};
use bytes::{Buf as _, BufMut as _, Bytes};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::net::TcpListener;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Request, Response, Status};

/// Passes bytes through: requests are skipped, responses written as they are.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

#[derive(Debug, Clone, Copy, Default)]
pub struct RawEncoder;

#[derive(Debug, Clone, Copy, Default)]
pub struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = ();
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = ();
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, Status> {
        let n = src.remaining();
        src.advance(n);
        Ok(Some(()))
    }
}

/// Answers every GetAggregation with the same bytes.
#[derive(Debug, Clone)]
pub struct BaselineService {
    response: Bytes,
}

impl BaselineService {
    pub fn new(response: Bytes) -> Self {
        Self { response }
    }
}

impl tonic::server::NamedService for BaselineService {
    const NAME: &'static str = SERVICE_NAME;
}

struct Unary(Bytes);

impl tonic::server::UnaryService<()> for Unary {
    type Response = Bytes;
    type Future = std::future::Ready<Result<Response<Bytes>, Status>>;

    fn call(&mut self, _request: Request<()>) -> Self::Future {
        std::future::ready(Ok(Response::new(self.0.clone())))
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, Infallible>> + Send>>;

impl<B> tower::Service<http::Request<B>> for BaselineService
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let response = self.response.clone();
        Box::pin(async move {
            if req.uri().path() != GET.path {
                return Ok(Status::unimplemented("the baseline serves GetAggregation only").into_http());
            }
            Ok(tonic::server::Grpc::new(RawCodec).unary(Unary(response), req).await)
        })
    }
}

/// Mutual TLS on the baseline: its certificate and key, and the CA its clients' certificates
/// must chain to (PEM).
pub struct Tls {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    pub client_ca: Vec<u8>,
}

/// Serves the baseline on `listener`, with tonic's own TLS when `tls` is given, until
/// `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    response: Bytes,
    tls: Option<Tls>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    // `Server::tcp_nodelay` does not reach an incoming stream given to the server, so the
    // stream sets it, as `Server::serve` would and as the gateway's own listener does: Nagle's
    // algorithm on one side only would make the comparison one of socket options.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        server = server.tls_config(
            ServerTlsConfig::new()
                .identity(Identity::from_pem(tls.cert, tls.key))
                .client_ca_root(Certificate::from_pem(tls.client_ca)),
        )?;
    }
    server.add_service(BaselineService::new(response)).serve_with_incoming_shutdown(incoming, shutdown).await
}
