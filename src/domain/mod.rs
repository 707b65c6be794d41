//! The upstream's vocabulary, free of any transport: identifiers, the aggregation request and its
//! validation, the period buckets rows are reported in, the statistics rows, the aggregation
//! status, and the rules on requests themselves: splitting one that is too large (`split`) and
//! answering one from a result that contains it (`derive`).
//!
//! Both the emulator (REST-JSON) and the gateway (gRPC) convert their wire types into these and
//! render `validate::FieldViolation`s in their own field naming. Nothing here may know of HTTP,
//! tonic or the AWS SDK.

pub(crate) mod buckets;
pub(crate) mod derive;
pub mod ids;
pub(crate) mod quote;
pub(crate) mod request;
pub(crate) mod rows;
pub(crate) mod split;
pub(crate) mod timezone;
pub(crate) mod validate;

pub use request::{AggregationRequest, GroupBy, Period, Resources, Statistic};
pub use rows::{StatisticsRow, Stats, UsageType};
pub use timezone::Timezone;

/// The status of an upstream aggregation, as `GetSessionsStatisticsAggregation` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AggregationStatus {
    InProgress,
    Completed,
    Failed,
    Timeout,
}

impl AggregationStatus {
    /// The upstream's enum string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InProgress => "IN_PROGRESS",
            Self::Completed => "COMPLETED",
            Self::Failed => "FAILED",
            Self::Timeout => "TIMEOUT",
        }
    }

    /// Parses the upstream's enum string.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "IN_PROGRESS" => Self::InProgress,
            "COMPLETED" => Self::Completed,
            "FAILED" => Self::Failed,
            "TIMEOUT" => Self::Timeout,
            _ => return None,
        })
    }

    /// Whether the aggregation has stopped changing.
    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::InProgress)
    }
}
