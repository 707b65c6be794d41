//! The gateway's view of the upstream: start an aggregation, get one page of it.
//!
//! [`Upstream`] is the seam: [`sdk::SdkUpstream`] speaks to Deadline Cloud (or the emulator)
//! through `aws-sdk-deadline`; unit tests put in-memory fakes behind it. Errors arrive as the
//! small [`UpstreamError`] enum, never as SDK types.

mod host_prefix;
pub mod routed;
pub mod routes;
pub mod sdk;

/// The upstream's operations, as spans and metrics name them.
pub const START_OPERATION: &str = "StartSessionsStatisticsAggregation";
pub const GET_OPERATION: &str = "GetSessionsStatisticsAggregation";

use crate::domain::{AggregationRequest, AggregationStatus, StatisticsRow};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

/// The name of the route that serves a farm: the `route` label of the upstream metrics, the
/// upstream pacing's bucket. `default` without a routes file.
pub type RouteName = Arc<str>;

static DEFAULT_ROUTE_NAME: LazyLock<RouteName> = LazyLock::new(|| routes::DEFAULT_ROUTE.into());

/// The route of an upstream that has one: `default`.
pub fn default_route() -> RouteName {
    DEFAULT_ROUTE_NAME.clone()
}

/// No route serves a farm: the routes file names it nowhere (and has no `[default]`), or two
/// routes claim it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct NotRouted {
    pub message: String,
}

impl NotRouted {
    pub fn into_error(self) -> UpstreamError {
        UpstreamError::NotRouted { message: self.message }
    }
}

/// One page of a `GetSessionsStatisticsAggregation` answer.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamPage {
    pub status: AggregationStatus,
    pub status_message: Option<String>,
    pub rows: Vec<StatisticsRow>,
    /// `Some` while more pages follow.
    pub next_token: Option<String>,
}

/// One field the upstream rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidField {
    pub name: String,
    pub message: String,
}

/// What can go wrong upstream, in the gateway's terms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// ThrottlingException: a rate quota, or an aggregation already running on the farm.
    #[error("upstream throttled the request: {message}")]
    Throttled { message: String, retry_after: Option<Duration> },
    /// ValidationException, with the fields it names.
    #[error("upstream rejected the request as invalid: {message}")]
    Invalid { message: String, fields: Vec<InvalidField> },
    /// ResourceNotFoundException: an unknown farm or aggregation, or expired results.
    #[error("upstream resource not found: {message}")]
    NotFound { message: String },
    /// AccessDeniedException.
    #[error("upstream denied access: {message}")]
    AccessDenied { message: String },
    /// Worth retrying later, and certainly not carried out: the connection was refused.
    #[error("upstream unavailable: {message}")]
    Transient { message: String, retry_after: Option<Duration> },
    /// Worth retrying later, but the request may have been carried out: a timeout, a 5xx
    /// (InternalServerErrorException), a connection lost before the response was read. For a
    /// Start this means an upstream aggregation may be running.
    #[error("upstream outcome unknown: {message}")]
    OutcomeUnknown { message: String, retry_after: Option<Duration> },
    /// No route serves the farm (it was unrouted after its aggregation was queued).
    #[error("{message}")]
    NotRouted { message: String },
    /// Anything else: a response that could not be understood, a misconfigured client.
    #[error("upstream call failed: {message}")]
    Other { message: String },
}

/// The two upstream operations the gateway needs.
#[async_trait::async_trait]
pub trait Upstream: Send + Sync + 'static {
    /// `StartSessionsStatisticsAggregation`; returns the upstream aggregation id. Never retried
    /// blindly: a lost response may mean the aggregation is running.
    async fn start(&self, request: &AggregationRequest) -> Result<String, UpstreamError>;

    /// One page of `GetSessionsStatisticsAggregation` (`max_results` 1..=100).
    async fn get_page(
        &self,
        farm_id: &str,
        aggregation_id: &str,
        max_results: u32,
        next_token: Option<&str>,
    ) -> Result<UpstreamPage, UpstreamError>;

    /// The route that serves `farm_id`; the gateway asks before it queues a Start, and paces
    /// and labels upstream calls by it.
    fn route(&self, farm_id: &str) -> Result<RouteName, NotRouted> {
        let _ = farm_id;
        Ok(default_route())
    }
}

impl UpstreamPage {
    /// Whether the upstream ended the aggregation (FAILED or TIMEOUT) because its result is too
    /// large, as its status message says: the one place the gateway decides it. A TIMEOUT that
    /// does not say why is not: it may be the upstream's own trouble, and splitting would
    /// multiply it.
    pub fn too_large(&self) -> bool {
        let ended = matches!(self.status, AggregationStatus::Failed | AggregationStatus::Timeout);
        let message = self.status_message.as_deref().unwrap_or_default().to_ascii_lowercase();
        ended && ["too large", "too many", "exceed", "reduce the"].iter().any(|w| message.contains(w))
    }
}

impl UpstreamError {
    /// The upstream's own word on when to retry, for the errors worth retrying; `None` for the
    /// rest.
    pub fn retryable(&self) -> Option<Option<Duration>> {
        match self {
            Self::Throttled { retry_after, .. }
            | Self::Transient { retry_after, .. }
            | Self::OutcomeUnknown { retry_after, .. } => Some(*retry_after),
            Self::Invalid { .. }
            | Self::NotFound { .. }
            | Self::AccessDenied { .. }
            | Self::NotRouted { .. }
            | Self::Other { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(status: AggregationStatus, message: &str) -> UpstreamPage {
        UpstreamPage { status, status_message: Some(message.into()), rows: Vec::new(), next_token: None }
    }

    #[test]
    fn only_an_ending_that_says_so_is_too_large() {
        assert!(ended(AggregationStatus::Failed, "Result too large; reduce the time range").too_large());
        assert!(ended(AggregationStatus::Timeout, "The query would exceed the row limit").too_large());
        assert!(!ended(AggregationStatus::Timeout, "The aggregation timed out").too_large(), "a bare timeout");
        assert!(!ended(AggregationStatus::Failed, "Internal error").too_large());
        assert!(!ended(AggregationStatus::Completed, "too large").too_large(), "a completed one is not");
    }
}
