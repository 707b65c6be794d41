//! What the gateway refuses, in its own terms. The gRPC layer maps each variant to a status
//! code with details in one place (`grpc::status`).

use crate::domain::validate::FieldViolation;
use std::time::{Duration, SystemTime};

/// Why the gateway refused a call. Upstream failures of an accepted aggregation are not here:
/// they show in the aggregation's state and error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    #[error("invalid request: {}", describe(.0))]
    Invalid(Vec<FieldViolation>),
    #[error("aggregation {id} does not exist")]
    NotFound { id: String },
    #[error("the results of aggregation {id} expired")]
    Expired { id: String, at: SystemTime },
    #[error("the results of aggregation {id} were evicted to stay within the cache's memory budget; start it again")]
    Evicted { id: String },
    #[error("the queue of farm {farm_id} is full ({capacity} aggregations wait already)")]
    QueueFull { farm_id: String, capacity: usize },
    #[error("too many {operation} calls from this caller; retry in {retry_after:?}")]
    RateLimited { operation: &'static str, retry_after: Duration },
    #[error("the gateway is shutting down")]
    ShuttingDown,
}

fn describe(v: &[FieldViolation]) -> String {
    v.iter().map(|f| f.description.as_str()).collect::<Vec<_>>().join("; ")
}
