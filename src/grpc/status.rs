//! The one mapping from the gateway's refusals to gRPC statuses with rich details
//! (`google.rpc.BadRequest`, `RetryInfo`, `ErrorInfo`).

use super::convert::field_name;
use crate::domain::quote::quoted;
use crate::gateway::GatewayError;
use crate::gateway::error::MAX_VIOLATIONS;
use std::collections::HashMap;
use std::time::Duration;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

/// The `ErrorInfo.domain` of every error this service raises.
pub(crate) const ERROR_DOMAIN: &str = "deadline-stats-gateway";
/// What a full farm queue tells callers to wait.
const QUEUE_FULL_RETRY: Duration = Duration::from_secs(5);
/// What an unreachable coordination store tells callers to wait.
const STORE_RETRY: Duration = Duration::from_secs(1);
/// What a busy gateway tells callers to wait.
const BUSY_RETRY: Duration = Duration::from_secs(10);

impl From<GatewayError> for Status {
    fn from(err: GatewayError) -> Status {
        let message = err.to_string();
        let mut details = ErrorDetails::new();
        let code = match err {
            GatewayError::Invalid(violations) => {
                let v: Vec<FieldViolation> = violations
                    .into_iter()
                    .take(MAX_VIOLATIONS)
                    .map(|f| FieldViolation::new(field_name(f.field, f.index), f.description))
                    .collect();
                details.set_bad_request(v);
                Code::InvalidArgument
            }
            GatewayError::NotFound { id } => {
                details.set_error_info("AGGREGATION_NOT_FOUND", ERROR_DOMAIN, meta([("aggregation_id", quoted(&id))]));
                Code::NotFound
            }
            GatewayError::Lost { id } => {
                details.set_error_info("AGGREGATION_LOST", ERROR_DOMAIN, meta([("aggregation_id", quoted(&id))]));
                Code::NotFound
            }
            GatewayError::SharedStateLost { id } => {
                details.set_error_info(
                    "AGGREGATION_LOST",
                    ERROR_DOMAIN,
                    meta([("aggregation_id", quoted(&id)), ("cause", "shared_state_lost".to_owned())]),
                );
                Code::NotFound
            }
            GatewayError::Expired { id, at } => {
                let at = chrono::DateTime::<chrono::Utc>::from(at).to_rfc3339();
                details.set_error_info(
                    "AGGREGATION_EXPIRED",
                    ERROR_DOMAIN,
                    meta([("aggregation_id", quoted(&id)), ("expire_time", at)]),
                );
                Code::NotFound
            }
            GatewayError::Evicted { id } => {
                details.set_error_info("AGGREGATION_EVICTED", ERROR_DOMAIN, meta([("aggregation_id", quoted(&id))]));
                Code::NotFound
            }
            GatewayError::ResultsLost { id, cause } => {
                details.set_error_info(
                    "AGGREGATION_EVICTED",
                    ERROR_DOMAIN,
                    meta([("aggregation_id", quoted(&id)), ("cause", quoted(&cause.to_string()))]),
                );
                Code::NotFound
            }
            GatewayError::Busy { bound, limit } => {
                details.set_retry_info(Some(BUSY_RETRY));
                details.set_error_info(
                    "GATEWAY_BUSY",
                    ERROR_DOMAIN,
                    meta([("bound", bound.name().to_owned()), ("limit", limit.to_string())]),
                );
                Code::ResourceExhausted
            }
            GatewayError::QueueFull { farm_id, capacity } => {
                details.set_retry_info(Some(QUEUE_FULL_RETRY));
                details.set_error_info(
                    "FARM_QUEUE_FULL",
                    ERROR_DOMAIN,
                    meta([("farm_id", farm_id), ("capacity", capacity.to_string())]),
                );
                Code::ResourceExhausted
            }
            GatewayError::CallerQueueFull { farm_id, capacity } => {
                details.set_retry_info(Some(QUEUE_FULL_RETRY));
                details.set_error_info(
                    "CALLER_QUEUE_FULL",
                    ERROR_DOMAIN,
                    meta([("farm_id", farm_id), ("capacity", capacity.to_string())]),
                );
                Code::ResourceExhausted
            }
            GatewayError::PriorityNotAllowed { farm_id, priority } => {
                details.set_error_info(
                    "PRIORITY_NOT_ALLOWED",
                    ERROR_DOMAIN,
                    meta([("farm_id", quoted(&farm_id)), ("priority", priority.name().to_owned())]),
                );
                Code::PermissionDenied
            }
            GatewayError::RateLimited { operation, retry_after } => {
                details.set_retry_info(Some(retry_after));
                details.set_error_info("RATE_LIMITED", ERROR_DOMAIN, meta([("method", operation.to_owned())]));
                Code::ResourceExhausted
            }
            GatewayError::ShuttingDown => Code::Unavailable,
            GatewayError::FarmNotRouted { farm_id, .. } => {
                details.set_error_info("FARM_NOT_ROUTED", ERROR_DOMAIN, meta([("farm_id", quoted(&farm_id))]));
                Code::FailedPrecondition
            }
            GatewayError::Unauthenticated { method } => {
                details.set_error_info("UNAUTHENTICATED", ERROR_DOMAIN, meta([("method", method.to_owned())]));
                Code::Unauthenticated
            }
            GatewayError::FarmNotAllowed { farm_id, method } => {
                details.set_error_info(
                    "FARM_NOT_ALLOWED",
                    ERROR_DOMAIN,
                    meta([("farm_id", quoted(&farm_id)), ("method", method.to_owned())]),
                );
                Code::PermissionDenied
            }
            GatewayError::Unreadable { id, cause } => {
                details.set_error_info(
                    "AGGREGATION_UNREADABLE",
                    ERROR_DOMAIN,
                    meta([("aggregation_id", quoted(&id)), ("cause", quoted(&cause.to_string()))]),
                );
                Code::Internal
            }
            GatewayError::StoreFull(_) => {
                details.set_retry_info(Some(BUSY_RETRY));
                details.set_error_info("STORE_FULL", ERROR_DOMAIN, HashMap::new());
                Code::ResourceExhausted
            }
            GatewayError::StoreUnavailable(_) => {
                details.set_retry_info(Some(STORE_RETRY));
                details.set_error_info("STORE_UNAVAILABLE", ERROR_DOMAIN, HashMap::new());
                Code::Unavailable
            }
        };
        Status::with_error_details(code, message, details)
    }
}

fn meta<const N: usize>(pairs: [(&str, String); N]) -> HashMap<String, String> {
    pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}
