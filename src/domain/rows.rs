//! A statistics row as the upstream returns it.

use super::request::upstream_enum;
use chrono::{DateTime, Utc};

upstream_enum!(
    /// What a row's usage was spent on.
    UsageType { Compute => "COMPUTE", License => "LICENSE", PersistentVolume => "PERSISTENT_VOLUME" }
);

/// Minimum, maximum, average and sum; only the requested statistics are present.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub avg: Option<f64>,
    pub sum: Option<f64>,
}

/// One row: the values of the grouped-by fields, one period bucket, and its statistics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatisticsRow {
    pub queue_id: Option<String>,
    pub fleet_id: Option<String>,
    pub job_id: Option<String>,
    pub job_name: Option<String>,
    pub user_id: Option<String>,
    pub license_product: Option<String>,
    pub instance_type: Option<String>,
    pub usage_type: Option<UsageType>,
    pub count: i32,
    pub cost_in_usd: Stats,
    pub runtime_in_seconds: Stats,
    pub aggregation_start_time: Option<DateTime<Utc>>,
    pub aggregation_end_time: Option<DateTime<Utc>>,
}
