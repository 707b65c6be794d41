//! The `AggregationService` implementation: identify the caller, convert, call the gateway,
//! convert back. No decisions are made here.

use super::convert;
use super::pb::aggregation_service_server::AggregationService;
use super::pb::{
    GetAggregationRequest, GetAggregationResponse, StartAggregationRequest,
    StartAggregationResponse,
};
use crate::domain::validate::{Field, FieldViolation};
use crate::gateway::{Gateway, GatewayError};
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};

/// The metadata key callers identify themselves by for throttling.
pub const CALLER_ID_HEADER: &str = "x-caller-id";
/// Longest accepted caller id.
const MAX_CALLER_ID_LEN: usize = 128;

/// The gRPC face of a [`Gateway`].
pub struct AggregationApi {
    gateway: Arc<Gateway>,
}

impl AggregationApi {
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }
}

#[tonic::async_trait]
impl AggregationService for AggregationApi {
    async fn start_aggregation(
        &self,
        request: Request<StartAggregationRequest>,
    ) -> Result<Response<StartAggregationResponse>, Status> {
        let caller = caller_id(&request);
        let req = convert::start_request(request.into_inner())?;
        let (agg, disposition) = self.gateway.start(&caller, &req)?;
        let aggregation = agg.with_snapshot(|s| convert::aggregation(&agg, s));
        Ok(Response::new(StartAggregationResponse {
            aggregation: Some(aggregation),
            disposition: convert::disposition(disposition) as i32,
        }))
    }

    async fn get_aggregation(
        &self,
        request: Request<GetAggregationRequest>,
    ) -> Result<Response<GetAggregationResponse>, Status> {
        let caller = caller_id(&request);
        let req = request.into_inner();
        let mut violations = Vec::new();
        if req.aggregation_id.is_empty() {
            violations.push(FieldViolation::new(Field::AggregationId, "is required"));
        }
        let wait = match req.wait.map(Duration::try_from) {
            None => Duration::ZERO,
            Some(Ok(d)) => d,
            Some(Err(_)) => {
                violations.push(FieldViolation::new(
                    Field::Wait,
                    "must be a non-negative duration",
                ));
                Duration::ZERO
            }
        };
        if !violations.is_empty() {
            return Err(GatewayError::Invalid(violations).into());
        }
        let page = self
            .gateway
            .get(
                &caller,
                &req.aggregation_id,
                req.page_size,
                &req.page_token,
                wait,
            )
            .await?;
        Ok(Response::new(GetAggregationResponse {
            aggregation: Some(convert::aggregation(&page.aggregation, &page.snapshot)),
            statistics: page
                .rows
                .map(|(rows, range)| rows[range].iter().map(convert::row).collect())
                .unwrap_or_default(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }
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
