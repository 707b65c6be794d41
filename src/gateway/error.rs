//! What the gateway refuses, in its own terms. The gRPC layer maps each variant to a status
//! code with details in one place (`grpc::status`).

use super::coordination::{Bound, ClaimError, StoreError};
use super::record::{Failure, Priority};
use crate::domain::quote::quoted;
use crate::domain::validate::FieldViolation;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The most field violations a refusal's details list.
pub(crate) const MAX_VIOLATIONS: usize = 20;
/// The most its message names; the rest are counted ("and N more"), so the message (and the
/// log line that carries it) stays small.
const MESSAGE_VIOLATIONS: usize = 3;

/// Why the gateway refused a call. Upstream failures of an accepted aggregation are not here:
/// they show in the aggregation's state and error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    #[error("invalid request: {}", describe(.0))]
    Invalid(Vec<FieldViolation>),
    #[error("aggregation {} does not exist", quoted(.id))]
    NotFound { id: String },
    #[error(
        "aggregation {} was held by a gateway process that has since restarted, and its state was lost with it; \
         start the aggregation again",
        quoted(.id)
    )]
    Lost { id: String },
    #[error(
        "aggregation {} was kept in the gateway's shared store, which has since lost its state (it restarted \
         empty, was flushed, or failed over without the data); start the aggregation again",
        quoted(.id)
    )]
    SharedStateLost { id: String },
    #[error("the results of aggregation {} expired", quoted(.id))]
    Expired { id: String, at: SystemTime },
    #[error("the results of aggregation {} were evicted to stay within the cache's memory budget; start it again", quoted(.id))]
    Evicted { id: String },
    #[error(
        "the shared store lost the results of aggregation {}, and the upstream could not give them again ({cause}); \
         start it again",
        quoted(.id)
    )]
    ResultsLost { id: String, cause: RecoveryError },
    #[error("the queue of farm {farm_id} is full ({capacity} aggregations wait already)")]
    QueueFull { farm_id: String, capacity: usize },
    #[error(
        "this caller already has {capacity} aggregations waiting on farm {farm_id}, its share of the farm's queue \
         (--farm-queue-caller-share); retry when one of them has started"
    )]
    CallerQueueFull { farm_id: String, capacity: usize },
    #[error("the caller may not start {} work on farm {farm_id}; ask for batch, or leave priority unspecified", .priority.name())]
    PriorityNotAllowed { farm_id: String, priority: Priority },
    #[error("the gateway holds as much work as it is allowed ({bound} = {limit}); retry later")]
    Busy { bound: Bound, limit: usize },
    #[error("too many {operation} calls from this caller; retry in {retry_after:?}")]
    RateLimited { operation: &'static str, retry_after: Duration },
    #[error("the gateway is shutting down")]
    ShuttingDown,
    /// No route of the routes file serves the farm (or two claim it).
    #[error("farm {farm_id} is not routed to any region: {reason}")]
    FarmNotRouted { farm_id: String, reason: String },
    #[error("{method} needs an authenticated caller, and none was identified")]
    Unauthenticated { method: &'static str },
    #[error("the caller may not call {method} on farm {farm_id}")]
    FarmNotAllowed { farm_id: String, method: &'static str },
    #[error("the gateway's coordination store is unavailable; retry shortly ({0})")]
    StoreUnavailable(StoreError),
    #[error("the gateway's shared store is full and takes no new aggregations until memory frees; retry later ({0})")]
    StoreFull(StoreError),
    #[error(
        "the gateway's shared store holds a record of aggregation {} that this gateway cannot read ({cause}); \
         it was taken off its farm's queue; start the aggregation again",
        quoted(.id)
    )]
    Unreadable { id: String, cause: StoreError },
}

impl GatewayError {
    /// A store error reading aggregation `id`: a record that cannot be read says so (it will
    /// not change by retrying), anything else is the store being unavailable.
    pub(crate) fn reading(id: &str) -> impl FnOnce(StoreError) -> Self + '_ {
        move |e| match e {
            StoreError::Corrupt { .. } => Self::Unreadable { id: id.to_owned(), cause: e },
            e => Self::StoreUnavailable(e),
        }
    }
}

/// Why rows a shared store lost could not be put back.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RecoveryError {
    /// The upstream could not give them again.
    #[error("{}", .0.message)]
    Upstream(Failure),
    /// They were fetched again, but the store could not take them.
    #[error(transparent)]
    Store(StoreError),
    /// A derived result's rows: the result they were cut from is gone too.
    #[error("the result they were derived from, {0}, is gone too")]
    SourceGone(String),
}

impl From<ClaimError> for GatewayError {
    fn from(e: ClaimError) -> Self {
        match e {
            ClaimError::QueueFull { farm_id, capacity } => Self::QueueFull { farm_id, capacity },
            ClaimError::CallerQueueFull { farm_id, capacity } => Self::CallerQueueFull { farm_id, capacity },
            ClaimError::Busy { bound, limit } => Self::Busy { bound, limit },
            ClaimError::NewEpoch => Self::StoreUnavailable(StoreError::Unavailable(Arc::new(e))),
            ClaimError::Store(e @ StoreError::Full(_)) => Self::StoreFull(e),
            ClaimError::Store(e) => Self::StoreUnavailable(e),
        }
    }
}

fn describe(v: &[FieldViolation]) -> String {
    let mut text = v.iter().take(MESSAGE_VIOLATIONS).map(|f| f.description.as_str()).collect::<Vec<_>>().join("; ");
    if v.len() > MESSAGE_VIOLATIONS {
        text.push_str(&format!("; and {} more", v.len() - MESSAGE_VIOLATIONS));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::validate::Field;

    #[test]
    fn a_refusal_names_three_violations_and_counts_the_rest() {
        let many = (0..100).map(|i| FieldViolation::at(Field::QueueIds, i, format!("bad {i}"))).collect();
        let text = GatewayError::Invalid(many).to_string();
        assert_eq!(text, "invalid request: bad 0; bad 1; bad 2; and 97 more");
    }
}
