//! The canonical form of a request: what makes two requests "the same aggregation".
//!
//! Order and repeats in the id lists, `group_by` and `statistics` do not matter; times count to
//! the millisecond (what the upstream sees). The upstream documents no defaults for the period
//! and the timezone, so the gateway defines them ([`DEFAULT_PERIOD`], UTC) and fills them in:
//! an omitted field and its default given explicitly are the same key and the same upstream
//! request.

use crate::domain::{AggregationRequest, Period, Resources, Timezone};
use chrono::{DateTime, SubsecRound, Utc};
use std::sync::Arc;

/// The period of a request that names none.
pub const DEFAULT_PERIOD: Period = Period::Daily;

/// The coalescing key: the canonical request itself, cheap to clone, and whether the caller
/// refused a split (`no_split`): such a request is answered by one upstream aggregation or
/// none, so it is not the same aggregation as one that may be split.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CanonicalKey(Arc<AggregationRequest>, bool);

impl CanonicalKey {
    /// Canonicalises a validated request.
    pub fn new(request: &AggregationRequest) -> Self {
        let resources = match &request.resources {
            Resources::Queues(ids) => Resources::Queues(sorted(ids)),
            Resources::Fleets(ids) => Resources::Fleets(sorted(ids)),
        };
        Self(
            Arc::new(AggregationRequest {
                farm_id: request.farm_id.clone(),
                resources,
                start_time: millis(request.start_time),
                end_time: millis(request.end_time),
                timezone: Some(request.timezone.unwrap_or(Timezone::UTC)),
                period: Some(request.period.unwrap_or(DEFAULT_PERIOD)),
                group_by: sorted(&request.group_by),
                statistics: sorted(&request.statistics),
            }),
            false,
        )
    }

    /// The same request, never split: too large upstream, it fails as the upstream said.
    pub fn no_split(self) -> Self {
        Self(self.0, true)
    }

    /// Whether the aggregation may be split when its result is too large.
    pub fn may_split(&self) -> bool {
        !self.1
    }

    /// The request to send upstream.
    pub fn request(&self) -> &AggregationRequest {
        &self.0
    }

    pub fn farm_id(&self) -> &str {
        &self.0.farm_id
    }

    /// Heap bytes the request holds, for the cache's memory budget.
    pub fn heap_bytes(&self) -> usize {
        let r = &self.0;
        std::mem::size_of::<AggregationRequest>()
            + r.farm_id.len()
            + r.resources.ids().iter().map(|id| id.len() + std::mem::size_of::<String>()).sum::<usize>()
            + r.group_by.len()
            + r.statistics.len()
    }
}

fn sorted<T: Ord + Clone>(list: &[T]) -> Vec<T> {
    let mut v = list.to_vec();
    v.sort();
    v.dedup();
    v
}

fn millis(t: DateTime<Utc>) -> DateTime<Utc> {
    t.trunc_subsecs(3)
}

/// A small valid key for unit tests: farm `farm`, queue `queue`, one day.
#[cfg(test)]
pub(crate) fn test_key(farm: u64, queue: u64) -> CanonicalKey {
    use crate::domain::{GroupBy, Statistic, ids::format_id};
    use chrono::TimeZone as _;
    let start = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).single().expect("start");
    CanonicalKey::new(&AggregationRequest {
        farm_id: format_id("farm-", 0, farm),
        resources: Resources::Queues(vec![format_id("queue-", 0, queue)]),
        start_time: start,
        end_time: start + chrono::Duration::days(1),
        timezone: None,
        period: None,
        group_by: vec![GroupBy::QueueId],
        statistics: vec![Statistic::Sum],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{GroupBy, Period, Statistic, ids::format_id};
    use chrono::TimeZone;

    fn request() -> AggregationRequest {
        let start = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).single().expect("start");
        AggregationRequest {
            farm_id: format_id("farm-", 1, 1),
            resources: Resources::Queues(vec![format_id("queue-", 0, 2), format_id("queue-", 0, 1)]),
            start_time: start,
            end_time: start + chrono::Duration::days(1),
            timezone: None,
            period: None,
            group_by: vec![GroupBy::UserId, GroupBy::QueueId],
            statistics: vec![Statistic::Max, Statistic::Sum],
        }
    }

    #[test]
    fn order_and_repeats_do_not_matter() {
        let a = request();
        let mut b = request();
        if let Resources::Queues(ids) = &mut b.resources {
            ids.reverse();
            ids.push(ids[0].clone());
        }
        b.group_by.reverse();
        b.statistics = vec![Statistic::Sum, Statistic::Max, Statistic::Sum];
        b.start_time += chrono::Duration::microseconds(300);
        assert_eq!(CanonicalKey::new(&a), CanonicalKey::new(&b));
    }

    #[test]
    fn an_omitted_period_or_timezone_is_its_default_given_explicitly() {
        let omitted = CanonicalKey::new(&request());
        let mut explicit = request();
        explicit.period = Some(Period::Daily);
        explicit.timezone = Timezone::parse("UTC+00:00");
        assert_eq!(omitted, CanonicalKey::new(&explicit));
        assert_eq!(omitted.request().period, Some(Period::Daily), "sent upstream explicitly");
        assert_eq!(omitted.request().timezone, Some(Timezone::UTC), "sent upstream explicitly");
        let mut hourly = request();
        hourly.period = Some(Period::Hourly);
        assert_ne!(omitted, CanonicalKey::new(&hourly));
    }

    #[test]
    fn anything_else_makes_a_different_key() {
        let base = CanonicalKey::new(&request());
        let mut other = request();
        other.resources = Resources::Fleets(vec![format_id("fleet-", 0, 1)]);
        assert_ne!(base, CanonicalKey::new(&other));
        let mut other = request();
        other.end_time += chrono::Duration::milliseconds(1);
        assert_ne!(base, CanonicalKey::new(&other));
    }
}
