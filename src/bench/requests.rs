//! The gRPC requests that the benchmarks and the integration tests send: one definition for
//! both, so what is measured is what is tested.

use crate::domain::ids::format_id;
use crate::grpc::pb;
use std::time::Duration;

/// The window every request starts at: 2026-10-01T00:00:00Z.
pub const WINDOW_START: i64 = 1_790_812_800;

/// Farm number `n`.
pub fn farm(n: u64) -> String {
    format_id("farm-", 0xfa, n)
}

/// Queue number `n`.
pub fn queue(n: u64) -> String {
    format_id("queue-", 0x9e, n)
}

/// A StartAggregation over queues `0..queues` of farm `farm_n` for `days` days from
/// [`WINDOW_START`], hourly, grouped by `group_by`, with sum and average.
pub fn start_request(farm_n: u64, queues: u64, days: i64, group_by: &[pb::GroupBy]) -> pb::StartAggregationRequest {
    pb::StartAggregationRequest {
        farm_id: farm(farm_n),
        resources: Some(pb::start_aggregation_request::Resources::QueueIds(pb::ResourceIds {
            ids: (0..queues).map(queue).collect(),
        })),
        start_time: Some(prost_types::Timestamp { seconds: WINDOW_START, nanos: 0 }),
        end_time: Some(prost_types::Timestamp { seconds: WINDOW_START + days * 86_400, nanos: 0 }),
        timezone: String::new(),
        period: pb::Period::Hourly as i32,
        group_by: group_by.iter().map(|g| *g as i32).collect(),
        statistics: vec![pb::Statistic::Sum as i32, pb::Statistic::Avg as i32],
        max_staleness: None,
        no_split: false,
        priority: pb::Priority::Unspecified as i32,
        no_derive: false,
    }
}

/// A GetAggregation of one page that long-polls up to `wait`.
pub fn get_request(id: &str, page_size: i32, page_token: &str, wait: Duration) -> pb::GetAggregationRequest {
    pb::GetAggregationRequest {
        aggregation_id: id.to_owned(),
        page_size,
        page_token: page_token.to_owned(),
        wait: prost_types::Duration::try_from(wait).ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_starts_where_it_says() {
        let start = chrono::DateTime::from_timestamp(WINDOW_START, 0).map(|t| t.to_rfc3339());
        assert_eq!(start.as_deref(), Some("2026-10-01T00:00:00+00:00"));
        assert!(crate::domain::ids::is_farm_id(&farm(7)) && crate::domain::ids::is_queue_id(&queue(7)));
    }
}
