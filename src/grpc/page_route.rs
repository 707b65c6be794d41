//! GetAggregation served from the cached encoding, without re-encoding the page.
//!
//! tonic encodes every response with prost into a fresh buffer. This route answers
//! GetAggregation itself: it reads the request frame, calls the same
//! [`AggregationApi::get_page`] the generated service would, and sends the response from
//! bytes the gateway already holds: the page's head (view and token, encoded once per page)
//! and the cached rows (a shared [`Bytes`] slice). A response that fits one HTTP/2 frame goes
//! out as one DATA chunk, the two copied into it: a second frame costs both ends more than
//! copying 16 kB does (BENCHMARKS.md, issue 28). A larger one is sent as the head, then the
//! rows themselves, uncopied.
//! StartAggregation is read the same way (its response encoded by prost), so both methods
//! answer malformed input alike: a message that does not decode (bad protobuf, invalid UTF-8
//! in a string field) or is not framed right is INVALID_ARGUMENT, one larger than the limit
//! RESOURCE_EXHAUSTED. Every other method goes to tonic's generated service; the server's
//! layers (timeouts, limits) apply to all alike.

use super::pb::aggregation_service_server::{AggregationService as _, AggregationServiceServer, SERVICE_NAME};
use super::pb::{GetAggregationRequest, StartAggregationRequest};
use super::service::{AggregationApi, GET, START};
use bytes::{BufMut as _, Bytes, BytesMut};
use http_body::Frame;
use http_body_util::BodyExt as _;
use prost::Message as _;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::Status;
use tonic::body::Body;

/// The trailer that ends every response (a name given as text would be parsed each time).
const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// The gRPC frame header: a compression flag and a big-endian length.
const FRAME_HEADER: usize = 5;

/// The aggregation service as the server routes it.
#[derive(Clone)]
pub(crate) struct AggregationRoutes {
    api: Arc<AggregationApi>,
    generated: AggregationServiceServer<AggregationApi>,
    limits: Limits,
}

/// The largest request and response, in bytes.
#[derive(Debug, Clone, Copy)]
struct Limits {
    request: usize,
    response: usize,
}

impl AggregationRoutes {
    /// Serves `api`, refusing requests larger than `max_request_bytes` and responses larger
    /// than `max_response_bytes`.
    pub(crate) fn new(api: AggregationApi, max_request_bytes: usize, max_response_bytes: usize) -> Self {
        let api = Arc::new(api);
        let generated = AggregationServiceServer::from_arc(api.clone())
            .max_decoding_message_size(max_request_bytes)
            .max_encoding_message_size(max_response_bytes);
        Self { api, generated, limits: Limits { request: max_request_bytes, response: max_response_bytes } }
    }
}

impl tonic::server::NamedService for AggregationRoutes {
    const NAME: &'static str = SERVICE_NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, Infallible>> + Send>>;

impl tower::Service<http::Request<Body>> for AggregationRoutes {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let path = request.uri().path();
        let get = path == GET.path;
        if !get && path != START.path {
            return self.generated.call(request);
        }
        let (api, limit) = (self.api.clone(), self.limits);
        Box::pin(async move {
            let answered = if get {
                get_aggregation(&api, request, limit).await
            } else {
                start_aggregation(&api, request, limit).await
            };
            Ok(answered.unwrap_or_else(Status::into_http))
        })
    }
}

async fn start_aggregation(
    api: &AggregationApi,
    request: http::Request<Body>,
    limit: Limits,
) -> Result<http::Response<Body>, Status> {
    let request = read_request::<StartAggregationRequest>(request, limit.request).await?;
    let response = api.start_aggregation(request).await?;
    respond([Bytes::from(response.into_inner().encode_to_vec()), Bytes::new()], limit.response)
}

async fn get_aggregation(
    api: &AggregationApi,
    request: http::Request<Body>,
    limit: Limits,
) -> Result<http::Response<Body>, Status> {
    let request = read_request::<GetAggregationRequest>(request, limit.request).await?;
    respond(api.get_page(request).await?.into_parts(), limit.response)
}

/// The request as tonic would hand it to the service: its metadata and extensions, and its one
/// message decoded; a body that is not a `M` is INVALID_ARGUMENT.
async fn read_request<M: prost::Message + Default>(
    request: http::Request<Body>,
    limit: usize,
) -> Result<tonic::Request<M>, Status> {
    let (parts, body) = request.into_parts();
    let message = M::decode(read_message(body, limit).await?).map_err(|e| {
        let name = std::any::type_name::<M>().rsplit("::").next().unwrap_or_default();
        Status::invalid_argument(format!("the request is not a valid {name}: {e}"))
    })?;
    Ok(tonic::Request::from_http(http::Request::from_parts(parts, message)))
}

/// The one message of a unary request body. A request almost always arrives as one DATA frame:
/// that frame's bytes are the message, not copied; frames after it are joined.
async fn read_message(mut body: Body, limit: usize) -> Result<Bytes, Status> {
    let most = limit.saturating_add(FRAME_HEADER);
    let (mut single, mut joined, mut total) = (None::<Bytes>, BytesMut::new(), 0usize);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Status::cancelled(format!("reading the request failed: {e}")))?;
        let Ok(data) = frame.into_data() else { continue };
        total = total.saturating_add(data.len());
        if total > most {
            return Err(Status::resource_exhausted(format!("the request is larger than {limit} bytes")));
        }
        match single.take() {
            None if joined.is_empty() => single = Some(data),
            None => joined.extend_from_slice(&data),
            Some(first) => {
                joined.extend_from_slice(&first);
                joined.extend_from_slice(&data);
            }
        }
    }
    let body = single.unwrap_or_else(|| joined.freeze());
    let Some(header) = body.get(..FRAME_HEADER) else {
        return Err(Status::invalid_argument("the request holds no gRPC message"));
    };
    if header[0] != 0 {
        return Err(Status::unimplemented("compressed requests are not supported; send them uncompressed"));
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if body.len() - FRAME_HEADER != len {
        return Err(Status::invalid_argument("a unary request must hold exactly one whole gRPC message"));
    }
    Ok(body.slice(FRAME_HEADER..))
}

/// A 200 response whose body is the message in `parts`, framed, then `grpc-status: 0`.
fn respond(parts: [Bytes; 2], limit: usize) -> Result<http::Response<Body>, Status> {
    let len: usize = parts.iter().map(Bytes::len).sum();
    let framed_len = u32::try_from(len).ok().filter(|_| len <= limit).ok_or_else(|| {
        Status::resource_exhausted(format!("the response would be {len} bytes, more than the {limit} allowed"))
    })?;
    let [head, rows] = parts;
    let one_frame = FRAME_HEADER + len <= ONE_FRAME;
    let mut first = BytesMut::with_capacity(FRAME_HEADER + if one_frame { len } else { head.len() });
    first.put_u8(0);
    first.put_u32(framed_len);
    first.put_slice(&head);
    let (head, rows) = if one_frame {
        first.put_slice(&rows);
        (Bytes::new(), first.freeze())
    } else {
        (first.freeze(), rows)
    };
    let mut trailers = http::HeaderMap::new();
    trailers.insert(GRPC_STATUS, http::HeaderValue::from_static("0"));
    let chunks = Chunks { head, rows: (!rows.is_empty()).then_some(rows), trailers: Some(trailers) };
    let mut response = http::Response::new(Body::new(chunks));
    response.headers_mut().insert(http::header::CONTENT_TYPE, tonic::metadata::GRPC_CONTENT_TYPE);
    Ok(response)
}

/// The largest framed response sent as one chunk, copied: HTTP/2's default (and smallest)
/// largest frame. A larger one is split into frames whatever it is sent as.
const ONE_FRAME: usize = 16 * 1024;

/// The largest DATA frame the head of a larger response goes out in. h2 copies a frame smaller than 256 bytes into
/// the connection's write buffer and sends a larger one as a buffer of its own, writing it
/// out before it takes the next frame: a head of 300 bytes in one frame would cost every
/// response a second `writev`. In pieces under the threshold, the head is copied and leaves in
/// the same write as the rows.
const HEAD_PIECE: usize = 240;
const _: () = assert!(HEAD_PIECE < 256, "h2 chains a DATA frame of 256 bytes or more");

/// A body of the framed head (in pieces of at most [`HEAD_PIECE`]), the rows, then trailers;
/// a response of one frame is all "rows".
struct Chunks {
    head: Bytes,
    rows: Option<Bytes>,
    trailers: Option<http::HeaderMap>,
}

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if !this.head.is_empty() {
            let piece = this.head.split_to(this.head.len().min(HEAD_PIECE));
            return Poll::Ready(Some(Ok(Frame::data(piece))));
        }
        Poll::Ready(match this.rows.take() {
            Some(rows) => Some(Ok(Frame::data(rows))),
            None => this.trailers.take().map(|t| Ok(Frame::trailers(t))),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_empty() && self.rows.is_none() && self.trailers.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn frames(response: http::Response<Body>) -> (Vec<Bytes>, Option<http::HeaderMap>) {
        let mut body = response.into_body();
        let (mut data, mut trailers) = (Vec::new(), None);
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("frame");
            match frame.into_data() {
                Ok(d) => data.push(d),
                Err(f) => trailers = f.into_trailers().ok(),
            }
        }
        (data, trailers)
    }

    #[tokio::test]
    async fn a_response_of_one_frame_is_one_framed_chunk_then_status_ok() {
        let rows = Bytes::from_static(b"rows-rows-rows");
        let response = respond([Bytes::from_static(b"head"), rows.clone()], 1024).expect("fits");
        let (data, trailers) = frames(response).await;
        assert_eq!(data.len(), 1, "one DATA chunk");
        assert_eq!(&data[0][..5], &[0, 0, 0, 0, 18]);
        assert_eq!(&data[0][5..], b"headrows-rows-rows");
        assert_eq!(trailers.and_then(|t| t.get("grpc-status").cloned()), Some(http::HeaderValue::from_static("0")));
    }

    #[tokio::test]
    async fn a_larger_response_sends_the_rows_uncopied_after_a_head_in_pieces_h2_copies() {
        let head = Bytes::from(vec![7u8; 600]);
        let rows = Bytes::from(vec![9u8; 20_000]);
        let (data, _) = frames(respond([head, rows.clone()], 1 << 20).expect("fits")).await;
        let sizes: Vec<usize> = data.iter().map(Bytes::len).collect();
        assert_eq!(sizes, [HEAD_PIECE, HEAD_PIECE, 605 - 2 * HEAD_PIECE, 20_000]);
        assert_eq!(data[3].as_ptr(), rows.as_ptr(), "the rows are the cache's bytes, not a copy");
        let all = data.concat();
        assert_eq!(u32::from_be_bytes([all[1], all[2], all[3], all[4]]), 20_600);
        assert!(all[5..605].iter().all(|&b| b == 7) && all[605..].iter().all(|&b| b == 9));
    }

    #[tokio::test]
    async fn oversized_responses_and_malformed_requests_are_refused() {
        let err = respond([Bytes::from_static(b"0123456789"), Bytes::new()], 9).expect_err("too big");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        let body = |b: &'static [u8]| Body::new(http_body_util::Full::new(Bytes::from_static(b)));
        let cases: [(&'static [u8], tonic::Code); 4] = [
            (b"\0\0\0", tonic::Code::InvalidArgument),
            (b"\x01\0\0\0\x01x", tonic::Code::Unimplemented),
            (b"\0\0\0\0\x05xy", tonic::Code::InvalidArgument),
            (
                b"\0\0\0\0\x40xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
                tonic::Code::ResourceExhausted,
            ),
        ];
        for (bytes, code) in cases {
            assert_eq!(read_message(body(bytes), 16).await.expect_err("refused").code(), code, "{bytes:?}");
        }
        assert_eq!(read_message(body(b"\0\0\0\0\x02ab"), 16).await.expect("one message"), &b"ab"[..]);
        // A message in several DATA frames is joined; too many bytes over them all is refused.
        let frames = |parts: &[&'static [u8]]| {
            let frames: Vec<Result<Frame<Bytes>, Infallible>> =
                parts.iter().map(|p| Ok(Frame::data(Bytes::from_static(p)))).collect();
            Body::new(http_body_util::StreamBody::new(tokio_stream::iter(frames)))
        };
        let joined = read_message(frames(&[b"\0\0", b"", b"\0\0\x03a", b"bc"]), 16).await;
        assert_eq!(joined.expect("joined"), &b"abc"[..]);
        let over = read_message(frames(&[b"\0\0\0\0\x11abcdefgh", b"ijklmnopq"]), 16).await;
        assert_eq!(over.expect_err("too large").code(), tonic::Code::ResourceExhausted);
    }
}

#[cfg(test)]
mod sizes {
    use std::sync::Arc;

    struct Nothing;

    #[async_trait::async_trait]
    impl crate::upstream::Upstream for Nothing {
        async fn start(&self, _: &crate::domain::AggregationRequest) -> Result<String, crate::upstream::UpstreamError> {
            Err(crate::upstream::UpstreamError::Other { message: "not here".into() })
        }

        async fn get_page(
            &self,
            _: &str,
            _: &str,
            _: u32,
            _: Option<&str>,
        ) -> Result<crate::upstream::UpstreamPage, crate::upstream::UpstreamError> {
            Err(crate::upstream::UpstreamError::Other { message: "not here".into() })
        }
    }

    /// A long-poll's future lives, allocated, for as long as it waits: 10,000 of them are what
    /// `bench watchers` weighs. Rare paths (rows fetched again from the upstream, an unknown
    /// id) are boxed so they do not inflate every one (they made it 9.6 KB).
    #[tokio::test]
    async fn a_long_polls_future_stays_small() {
        let metrics = Arc::new(crate::telemetry::Metrics::new());
        let gateway = Arc::new(crate::gateway::Gateway::new(
            Default::default(),
            Arc::new(Nothing),
            metrics.clone(),
            crate::grpc::convert::ROW_CODEC,
        ));
        let api = super::AggregationApi::new(gateway, metrics, Default::default());
        let request = http::Request::new(tonic::body::Body::empty());
        let route = super::get_aggregation(&api, request, super::Limits { request: 1024, response: 1024 });
        let size = std::mem::size_of_val(&route);
        assert!(size <= 4096, "the GetAggregation route's future is {size} bytes");
    }
}
