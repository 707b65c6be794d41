//! The `AggregationService` implementation: identify the caller, convert, call the gateway,
//! convert back. No decisions are made here.
//!
//! Each RPC runs in a server span that follows the OpenTelemetry RPC conventions and is a child
//! of the caller's span when the request carries W3C trace context; each is counted and timed.

use super::convert;
use super::pb::aggregation_service_server::AggregationService;
use super::pb::{GetAggregationRequest, GetAggregationResponse, StartAggregationRequest, StartAggregationResponse};
use super::wire::EncodedRows;
use crate::domain::validate::{Field, FieldViolation};
use crate::gateway::{Gateway, GatewayError};
use crate::telemetry::{Metrics, traces};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

/// The metadata key callers identify themselves by for throttling.
pub const CALLER_ID_HEADER: &str = "x-caller-id";
/// Longest accepted caller id.
const MAX_CALLER_ID_LEN: usize = 128;
/// The full name of the service, as spans and metrics name it.
pub use super::pb::aggregation_service_server::SERVICE_NAME;

/// The gRPC face of a [`Gateway`].
pub struct AggregationApi {
    gateway: Arc<Gateway>,
    metrics: Arc<Metrics>,
}

impl AggregationApi {
    pub fn new(gateway: Arc<Gateway>, metrics: Arc<Metrics>) -> Self {
        Self { gateway, metrics }
    }

    /// Runs one RPC inside its server span, then counts and times it.
    async fn observe<T>(
        &self,
        method: &'static str,
        metadata: &tonic::metadata::MetadataMap,
        caller: &str,
        rpc: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let span = tracing::info_span!(
            "rpc",
            otel.name = %format!("{SERVICE_NAME}/{method}"),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = SERVICE_NAME,
            rpc.method = method,
            rpc.grpc.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            caller = caller,
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
        );
        if !span.is_disabled() {
            traces::adopt_remote_parent(&span, metadata);
            traces::record_ids(&span);
        }
        let begin = Instant::now();
        let result = rpc.instrument(span.clone()).await;
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
            span.in_scope(|| tracing::info!(code = ?status.code(), status_message = status.message(), "rpc refused"));
        }
        self.metrics.rpc(method, code, begin.elapsed());
        result
    }
}

#[tonic::async_trait]
impl AggregationService for AggregationApi {
    async fn start_aggregation(
        &self,
        request: Request<StartAggregationRequest>,
    ) -> Result<Response<StartAggregationResponse>, Status> {
        let caller = caller_id(&request);
        let (metadata, _, message) = request.into_parts();
        self.observe("StartAggregation", &metadata, &caller, async {
            let req = convert::start_request(message)?;
            let (agg, disposition) = self.gateway.start(&caller, &req)?;
            let aggregation = agg.with_snapshot(|s| convert::aggregation(&agg, s));
            Ok(Response::new(StartAggregationResponse {
                aggregation: Some(aggregation),
                disposition: convert::disposition(disposition) as i32,
            }))
        })
        .await
    }

    async fn get_aggregation(
        &self,
        request: Request<GetAggregationRequest>,
    ) -> Result<Response<GetAggregationResponse>, Status> {
        let caller = caller_id(&request);
        let (metadata, _, req) = request.into_parts();
        self.observe("GetAggregation", &metadata, &caller, async {
            let wait = wait(&req)?;
            let page = self.gateway.get(&caller, &req.aggregation_id, req.page_size, &req.page_token, wait).await?;
            Ok(Response::new(GetAggregationResponse {
                aggregation: Some(convert::aggregation(&page.aggregation, &page.snapshot)),
                statistics: Vec::new(),
                next_page_token: page.next_page_token.unwrap_or_default(),
                encoded_statistics: page.rows.map(|(rows, range)| EncodedRows { rows, range }),
            }))
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

/// `x-caller-id` when the caller sends a sensible one, else the peer's IP address.
fn caller_id<T>(request: &Request<T>) -> String {
    let named = request
        .metadata()
        .get(CALLER_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= MAX_CALLER_ID_LEN);
    match (named, request.remote_addr()) {
        (Some(id), _) => format!("id:{id}"),
        (None, Some(addr)) => format!("ip:{}", addr.ip()),
        (None, None) => "unknown".to_owned(),
    }
}
