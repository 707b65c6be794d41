//! The `AggregationService` implementation: identify the caller, convert, call the gateway,
//! convert back. No decisions are made here.
//!
//! Each RPC runs in a server span that follows the OpenTelemetry RPC conventions and is a child
//! of the caller's span when the request carries W3C trace context; each is counted and timed.

use super::authz::Authorizer;
use super::convert;
use super::identity::{IdentitySource, bucket_key};
use super::listener::PeerInfo;
use super::pb::aggregation_service_server::AggregationService;
use super::pb::{
    GetAggregationRequest, GetAggregationResponse, StartAggregationRequest, StartAggregationResponse,
    WatchAggregationRequest,
};
use super::wire::{self, EncodedRows};
use crate::domain::validate::{Field, FieldViolation};
use crate::gateway::{Gateway, GatewayError, StartOptions};
use crate::telemetry::{Metrics, traces};
use std::future::Future;
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tonic::metadata::{Ascii, MetadataKey};
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

pub use super::identity::CALLER_ID_HEADER;
/// The full name of the service, as spans and metrics name it.
pub use super::pb::aggregation_service_server::SERVICE_NAME;

pub use super::methods::{GET, Method, START, WATCH};

/// The server span of one RPC, following the OpenTelemetry RPC conventions, at `level`.
macro_rules! rpc_span {
    ($level:expr, $method:expr, $caller:expr) => {
        tracing::span!(
            $level,
            "rpc",
            otel.name = $method.full_name,
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = SERVICE_NAME,
            rpc.method = $method.name,
            rpc.grpc.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            caller = $caller.bucket.as_str(),
            enduser.id = $caller.identity.as_deref().unwrap_or_default(),
        )
    };
}

/// Who may call: where identities come from, and the policy, if any.
#[derive(Clone)]
pub struct Access {
    pub identity_source: IdentitySource,
    /// `None`: every caller may call anything.
    pub authorizer: Option<Arc<Authorizer>>,
}

impl Default for Access {
    fn default() -> Self {
        Self { identity_source: IdentitySource::Header, authorizer: None }
    }
}

/// The caller of one RPC.
struct Caller {
    /// Who it is, as the identity source says.
    identity: Option<Arc<str>>,
    /// The key of its token buckets: the identity, else the peer's address.
    bucket: String,
}

/// The gRPC face of a [`Gateway`].
pub struct AggregationApi {
    gateway: Arc<Gateway>,
    metrics: Arc<Metrics>,
    access: Access,
    /// Times each RPC by the CPU's time counter where it is invariant (two counter reads, no
    /// system clock call), else by the monotonic clock.
    timer: quanta::Clock,
}

impl AggregationApi {
    pub fn new(gateway: Arc<Gateway>, metrics: Arc<Metrics>, access: Access) -> Self {
        Self { gateway, metrics, access, timer: quanta::Clock::new() }
    }

    fn caller<T>(&self, request: &Request<T>) -> Caller {
        let peer = request.extensions().get::<PeerInfo>();
        let identity = self.access.identity_source.identify(request.metadata(), peer);
        Caller { bucket: bucket_key(identity.as_deref(), peer), identity }
    }

    /// Refuses a caller without an identity, when a policy is in force.
    fn authenticated(&self, caller: &Caller, method: Method) -> Result<(), GatewayError> {
        match &self.access.authorizer {
            Some(a) => a.require_identity(caller.identity.as_deref(), method),
            None => Ok(()),
        }
    }

    /// Whether the caller may call `method` on `farm`.
    fn authorized(&self, caller: &Caller, method: Method, farm: &str) -> Result<(), GatewayError> {
        match &self.access.authorizer {
            Some(a) => a.check(caller.identity.as_deref(), method, farm),
            None => Ok(()),
        }
    }

    /// Runs one RPC inside its server span, then counts and times it.
    async fn observe<T>(
        &self,
        method: Method,
        metadata: &tonic::metadata::MetadataMap,
        caller: &Caller,
        rpc: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        // A span per RPC is worth its cost when it is exported (sampled before it is made) or
        // debug logs are on; otherwise nothing would read it, and a cache hit would pay for it.
        let span = if traces::rpc_sampled(metadata, method.full_name) {
            rpc_span!(tracing::Level::INFO, method, caller)
        } else {
            rpc_span!(tracing::Level::DEBUG, method, caller)
        };
        if !span.is_disabled() {
            traces::adopt_remote_parent(&span, metadata);
        }
        let begin = self.timer.raw();
        let result = if span.is_disabled() { rpc.await } else { rpc.instrument(span.clone()).await };
        let code = result.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok);
        span.record("rpc.grpc.status_code", code as i64);
        if matches!(
            code,
            tonic::Code::Unknown
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Unimplemented
                | tonic::Code::Internal
                | tonic::Code::Unavailable
                | tonic::Code::DataLoss
        ) {
            span.record("otel.status_code", "ERROR");
        }
        if let Err(status) = &result {
            // Without a span to take it from, the line names the caller's trace itself.
            let trace_id = if span.is_disabled() { traces::remote_trace_id(metadata) } else { None };
            span.in_scope(|| {
                tracing::info!(
                    rpc.method = method.name,
                    caller = caller.bucket.as_str(),
                    enduser.id = caller.identity.as_deref().unwrap_or_default(),
                    code = ?status.code(),
                    status_message = status.message(),
                    trace_id,
                    "rpc refused"
                );
            });
        }
        self.metrics.rpc(method.name, code, self.timer.delta(begin, self.timer.raw()));
        result
    }
}

#[tonic::async_trait]
impl AggregationService for AggregationApi {
    async fn start_aggregation(
        &self,
        request: Request<StartAggregationRequest>,
    ) -> Result<Response<StartAggregationResponse>, Status> {
        let caller = self.caller(&request);
        let (metadata, _, message) = request.into_parts();
        self.observe(START, &metadata, &caller, async {
            self.authenticated(&caller, START)?;
            let req = convert::start_request(message)?;
            self.authorized(&caller, START, &req.request.farm_id)?;
            let priority = match &self.access.authorizer {
                Some(a) => a.start_priority(caller.identity.as_deref(), &req.request.farm_id, req.priority)?,
                None => req.priority.unwrap_or_default(),
            };
            let options = StartOptions {
                max_staleness: req.max_staleness,
                no_split: req.no_split,
                priority,
                no_derive: req.no_derive,
            };
            let started = self.gateway.start(&caller.bucket, &req.request, options).await?;
            Ok(Response::new(StartAggregationResponse {
                aggregation: Some(convert::estimated(&started.record, started.queue_position, &started.estimate)),
                disposition: convert::disposition(started.disposition) as i32,
            }))
        })
        .await
    }

    async fn get_aggregation(
        &self,
        request: Request<GetAggregationRequest>,
    ) -> Result<Response<GetAggregationResponse>, Status> {
        self.get_page(request).await.map(Response::new)
    }

    type WatchAggregationStream = Watching;

    async fn watch_aggregation(&self, request: Request<WatchAggregationRequest>) -> Result<Response<Watching>, Status> {
        let caller = self.caller(&request);
        let (metadata, _, req) = request.into_parts();
        self.observe(WATCH, &metadata, &caller, async {
            self.authenticated(&caller, WATCH)?;
            if req.aggregation_id.is_empty() {
                return Err(
                    GatewayError::Invalid(vec![FieldViolation::new(Field::AggregationId, "is required")]).into()
                );
            }
            // Ends with the latest state shortly before the caller's deadline, as a long-poll.
            let ends = caller_timeout(&metadata).map(|t| tokio::time::Instant::now() + within_deadline(t, Some(t)));
            let may_read = |farm: &str| self.authorized(&caller, WATCH, farm);
            let views = self.gateway.watch(&caller.bucket, &req.aggregation_id, &may_read).await?;
            Ok(Response::new(Watching::new(views, ends, &self.metrics.watch_streams)))
        })
        .await
    }
}

/// The stream of one WatchAggregation: the aggregation at once, then at each change; it ends
/// after the terminal state, at the caller's deadline, or when its source closes (shutdown).
pub struct Watching {
    views: tokio_stream::wrappers::WatchStream<crate::gateway::watch::View>,
    ends: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    done: bool,
    _open: crate::telemetry::metrics::Open,
}

impl Watching {
    fn new(
        views: tokio::sync::watch::Receiver<crate::gateway::watch::View>,
        ends: Option<tokio::time::Instant>,
        open: &prometheus_client::metrics::gauge::Gauge,
    ) -> Self {
        Self {
            views: tokio_stream::wrappers::WatchStream::new(views),
            ends: ends.map(|at| Box::pin(tokio::time::sleep_until(at))),
            done: false,
            _open: crate::telemetry::metrics::Open::count(open),
        }
    }
}

impl tokio_stream::Stream for Watching {
    type Item = Result<super::pb::Aggregation, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if self.done {
            return Poll::Ready(None);
        }
        if let Some(ends) = self.ends.as_mut()
            && ends.as_mut().poll(cx).is_ready()
        {
            self.done = true;
            return Poll::Ready(None);
        }
        match std::pin::Pin::new(&mut self.views).poll_next(cx) {
            Poll::Ready(Some(view)) => {
                self.done = view.is_terminal();
                Poll::Ready(Some(Ok(convert::estimated(&view.record, view.queue_position, &view.estimate))))
            }
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AggregationApi {
    /// GetAggregation, whether tonic's generated route or `super::page_route` serves it.
    pub async fn get_page(&self, request: Request<GetAggregationRequest>) -> Result<GetAggregationResponse, Status> {
        let caller = self.caller(&request);
        let (metadata, _, req) = request.into_parts();
        self.observe(GET, &metadata, &caller, async {
            self.authenticated(&caller, GET)?;
            let wait = within_deadline(wait(&req)?, caller_timeout(&metadata));
            let may_read = |farm: &str| self.authorized(&caller, GET, farm);
            let page = self
                .gateway
                .get(&caller.bucket, &req.aggregation_id, req.page_size, &req.page_token, wait, &may_read)
                .await?;
            let view =
                || wire::encode_aggregation(&convert::estimated(&page.record, page.queue_position, &page.estimate));
            let head = |view: &bytes::Bytes| wire::encode_head(view, page.next_page_token().as_deref());
            // A terminal result never changes: its view and each page's head are encoded once
            // and shared.
            let head = match &page.result {
                Some(result) => result.view.page_head(page.next_offset, || head(&result.view.get_or_init(view))),
                None => head(&view()),
            };
            Ok(GetAggregationResponse {
                aggregation: None,
                encoded_head: Some(head),
                statistics: Vec::new(),
                next_page_token: String::new(),
                encoded_statistics: page.rows.map(|(rows, range)| EncodedRows { rows, range }),
            })
        })
        .await
    }
}

/// Checks the id and reads the long-poll duration of a Get.
fn wait(req: &GetAggregationRequest) -> Result<Duration, GatewayError> {
    let mut violations = Vec::new();
    if req.aggregation_id.is_empty() {
        violations.push(FieldViolation::new(Field::AggregationId, "is required"));
    }
    let wait = match req.wait.map(Duration::try_from) {
        None => Duration::ZERO,
        Some(Ok(d)) => d,
        Some(Err(_)) => {
            violations.push(FieldViolation::new(Field::Wait, "must be a non-negative duration"));
            Duration::ZERO
        }
    };
    if violations.is_empty() { Ok(wait) } else { Err(GatewayError::Invalid(violations)) }
}

/// How long before the caller's own deadline a long-poll returns what it has.
const DEADLINE_MARGIN: Duration = Duration::from_millis(500);

/// A long-poll of `wait`, ended shortly before the caller's `timeout` (its `grpc-timeout`), so
/// the caller gets the current state instead of DEADLINE_EXCEEDED.
fn within_deadline(wait: Duration, timeout: Option<Duration>) -> Duration {
    match timeout {
        Some(t) => wait.min(t.saturating_sub(DEADLINE_MARGIN.min(t / 10))),
        None => wait,
    }
}

/// The caller's deadline as its `grpc-timeout` header states it: at most eight digits and a
/// unit (`H`, `M`, `S`, `m`, `u`, `n`).
fn caller_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    static GRPC_TIMEOUT: LazyLock<MetadataKey<Ascii>> = LazyLock::new(|| MetadataKey::from_static("grpc-timeout"));
    let text = metadata.get(&*GRPC_TIMEOUT)?.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_polls_end_shortly_before_the_callers_deadline() {
        let mut metadata = tonic::metadata::MetadataMap::new();
        assert_eq!(caller_timeout(&metadata), None);
        for (header, want) in [("10S", 10_000), ("1500m", 1_500), ("2M", 120_000), ("1H", 3_600_000)] {
            metadata.insert("grpc-timeout", header.parse().expect("ascii"));
            assert_eq!(caller_timeout(&metadata), Some(Duration::from_millis(want)), "{header}");
        }
        for bad in ["", "S", "10", "123456789S", "10x", "-1S"] {
            metadata.insert("grpc-timeout", bad.parse().expect("ascii"));
            assert_eq!(caller_timeout(&metadata), None, "{bad:?}");
        }
        let thirty = Duration::from_secs(30);
        assert_eq!(within_deadline(thirty, Some(Duration::from_secs(10))), Duration::from_millis(9_500));
        assert_eq!(within_deadline(thirty, Some(Duration::from_secs(1))), Duration::from_millis(900));
        assert_eq!(within_deadline(thirty, None), thirty);
        assert_eq!(within_deadline(Duration::from_secs(2), Some(Duration::from_secs(10))), Duration::from_secs(2));
    }

    #[test]
    fn method_full_names_follow_the_generated_service_name() {
        for m in [START, GET, WATCH] {
            assert_eq!(m.full_name, format!("{SERVICE_NAME}/{}", m.name));
            assert_eq!(m.path, format!("/{}", m.full_name));
        }
    }
}
