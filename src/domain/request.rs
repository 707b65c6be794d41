//! A validated aggregation request and the upstream's enums.

use super::Timezone;
use chrono::{DateTime, Utc};

/// Generates an enum with its upstream string form (`as_str`/`parse`) and the list of values.
macro_rules! upstream_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $s:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($variant),+ }

        impl $name {
            /// Every value, in the model's order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The upstream's enum string.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $s),+ }
            }

            /// Parses the upstream's enum string.
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($s => Some($name::$variant),)+ _ => None }
            }
        }
    };
}
pub(crate) use upstream_enum;

upstream_enum!(
    /// The bucket size of an aggregation.
    Period { Hourly => "HOURLY", Daily => "DAILY", Weekly => "WEEKLY", Monthly => "MONTHLY" }
);

upstream_enum!(
    /// A field the statistics are grouped by.
    GroupBy {
        QueueId => "QUEUE_ID",
        FleetId => "FLEET_ID",
        JobId => "JOB_ID",
        UserId => "USER_ID",
        UsageType => "USAGE_TYPE",
        InstanceType => "INSTANCE_TYPE",
        LicenseProduct => "LICENSE_PRODUCT",
    }
);

upstream_enum!(
    /// A statistic computed over cost and runtime.
    Statistic { Sum => "SUM", Min => "MIN", Max => "MAX", Avg => "AVG" }
);

impl Period {
    /// What the upstream uses when a request names no period.
    pub const UPSTREAM_DEFAULT: Period = Period::Daily;
}

/// The queues or the fleets an aggregation covers: the model's tagged union.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Resources {
    Queues(Vec<String>),
    Fleets(Vec<String>),
}

impl Resources {
    /// The ids, whichever kind they are.
    pub fn ids(&self) -> &[String] {
        match self {
            Self::Queues(ids) | Self::Fleets(ids) => ids,
        }
    }
}

/// A request that passed `super::validate`: every field within the model's limits.
///
/// Lists hold no duplicates; their order is the caller's (the gateway's canonical key sorts).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AggregationRequest {
    pub farm_id: String,
    pub resources: Resources,
    pub start_time: DateTime<Utc>,
    pub end_time: DateTime<Utc>,
    /// `None`: the upstream default (UTC).
    pub timezone: Option<Timezone>,
    /// `None`: the upstream default ([`Period::UPSTREAM_DEFAULT`]).
    pub period: Option<Period>,
    pub group_by: Vec<GroupBy>,
    pub statistics: Vec<Statistic>,
}

impl AggregationRequest {
    /// The timezone the upstream will bucket in.
    pub fn effective_timezone(&self) -> Timezone {
        self.timezone.unwrap_or(Timezone::UTC)
    }

    /// The period the upstream will bucket by.
    pub fn effective_period(&self) -> Period {
        self.period.unwrap_or(Period::UPSTREAM_DEFAULT)
    }
}
