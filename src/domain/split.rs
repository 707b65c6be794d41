//! Splitting a request whose result is too large for the upstream into two whose rows, put
//! together, are exactly the whole's.
//!
//! - Time is cut only at a bucket boundary of the requested period in the requested timezone
//!   (a day, an ISO week or a month is never cut), at the middle boundary, so the two parts
//!   have about as many buckets each.
//! - When the window is a single bucket, the queue (fleet) ids are halved instead, but only
//!   when the rows are grouped by queue (fleet) id: then no group spans both parts.
//! - Otherwise the request cannot be split.
//!
//! Nothing here runs anything: the gateway's lifecycle asks for halves when the upstream says a
//! result is too large, and merges the parts' rows.

use crate::domain::buckets::buckets;
use crate::domain::{AggregationRequest, GroupBy, Resources};

/// How a request was halved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cut {
    /// At a bucket boundary of the window.
    Time,
    /// Between the two halves of the resource id list.
    Resources,
}

/// Two requests whose rows together are `request`'s, or `None` when it cannot be split (one
/// bucket, and its resource ids cannot be halved without splitting a group).
pub(crate) fn halve(request: &AggregationRequest) -> Option<(Cut, [AggregationRequest; 2])> {
    let inner: Vec<_> =
        buckets(request.start_time, request.end_time, request.effective_period(), request.effective_timezone())
            .skip(1)
            .map(|b| b.start)
            .collect();
    if let Some(cut) = inner.get(inner.len().saturating_sub(1) / 2).copied() {
        let (mut early, mut late) = (request.clone(), request.clone());
        early.end_time = cut;
        late.start_time = cut;
        return Some((Cut::Time, [early, late]));
    }
    let (ids, grouped) = match &request.resources {
        Resources::Queues(ids) => (ids, request.group_by.contains(&GroupBy::QueueId)),
        Resources::Fleets(ids) => (ids, request.group_by.contains(&GroupBy::FleetId)),
    };
    if !grouped || ids.len() < 2 {
        return None;
    }
    let (first, second) = ids.split_at(ids.len() / 2);
    let with = |part: &[String]| {
        let mut r = request.clone();
        r.resources = match &request.resources {
            Resources::Queues(_) => Resources::Queues(part.to_vec()),
            Resources::Fleets(_) => Resources::Fleets(part.to_vec()),
        };
        r
    };
    Some((Cut::Resources, [with(first), with(second)]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::buckets::Bucket;
    use crate::domain::{Period, Statistic, Timezone};
    use chrono::{DateTime, Duration, TimeZone as _, Utc};
    use proptest::prelude::*;

    fn request(
        start: DateTime<Utc>,
        hours: i64,
        period: Period,
        tz: &str,
        queues: usize,
        by: &[GroupBy],
    ) -> AggregationRequest {
        AggregationRequest {
            farm_id: format!("farm-{}", "1".repeat(32)),
            resources: Resources::Queues((0..queues).map(|n| format!("queue-{n:032x}")).collect()),
            start_time: start,
            end_time: start + Duration::hours(hours),
            timezone: Timezone::parse(tz),
            period: Some(period),
            group_by: by.to_vec(),
            statistics: vec![Statistic::Sum],
        }
    }

    fn all(r: &AggregationRequest) -> Vec<Bucket> {
        buckets(r.start_time, r.end_time, r.effective_period(), r.effective_timezone()).collect()
    }

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&Utc)).unwrap_or_default()
    }

    #[test]
    fn a_window_is_cut_at_the_middle_bucket_boundary_in_local_time() {
        // Four local days in UTC-08:00 from a mid-day start: five buckets, cut at the third's start.
        let r = request(t("2026-03-01T12:00:00Z"), 96, Period::Daily, "UTC-08:00", 1, &[]);
        let (cut, [a, b]) = halve(&r).expect("splits");
        assert_eq!(cut, Cut::Time);
        assert_eq!((a.start_time, a.end_time), (r.start_time, t("2026-03-03T08:00:00Z")));
        assert_eq!((b.start_time, b.end_time), (t("2026-03-03T08:00:00Z"), r.end_time));
        let (whole, parts) = (all(&r), [all(&a), all(&b)].concat());
        assert_eq!(whole, parts, "the parts' buckets are the whole's");
    }

    #[test]
    fn a_single_month_is_split_by_queue_only_when_grouped_by_queue() {
        let month = request(t("2026-03-01T00:00:00Z"), 24 * 31, Period::Monthly, "UTC", 5, &[GroupBy::QueueId]);
        let (cut, [a, b]) = halve(&month).expect("by queue");
        assert_eq!(cut, Cut::Resources);
        assert_eq!((a.resources.ids().len(), b.resources.ids().len()), (2, 3));
        assert_eq!([a.resources.ids(), b.resources.ids()].concat(), month.resources.ids().to_vec());
        assert_eq!(a.start_time, month.start_time);
        let ungrouped = request(t("2026-03-01T00:00:00Z"), 24 * 31, Period::Monthly, "UTC", 5, &[GroupBy::UsageType]);
        assert!(halve(&ungrouped).is_none(), "a queue's rows would be summed across both parts");
        let one = request(t("2026-03-01T00:00:00Z"), 24 * 31, Period::Monthly, "UTC", 1, &[GroupBy::QueueId]);
        assert!(halve(&one).is_none(), "one bucket, one queue: nothing left to cut");
    }

    proptest! {
        #[test]
        fn halves_cover_the_whole_exactly_and_never_cut_a_bucket(
            start in 1_700_000_000i64..1_800_000_000,
            hours in 1i64..2_000,
            period in prop::sample::select(vec![Period::Hourly, Period::Daily, Period::Weekly, Period::Monthly]),
            offset in -11i32..=11,
            half in prop::bool::ANY,
            queues in 1usize..8,
        ) {
            let tz = format!("UTC{}{:02}:{}", if offset < 0 { '-' } else { '+' }, offset.abs(), if half { "30" } else { "00" });
            let start = Utc.timestamp_opt(start, 0).single().unwrap_or_default();
            let r = request(start, hours, period, &tz, queues, &[GroupBy::QueueId]);
            match halve(&r) {
                Some((Cut::Time, [a, b])) => {
                    prop_assert_eq!(all(&r), [all(&a), all(&b)].concat());
                    prop_assert!(a.start_time < a.end_time && b.start_time < b.end_time);
                }
                Some((Cut::Resources, [a, b])) => {
                    prop_assert_eq!(all(&r).len(), 1);
                    prop_assert_eq!([a.resources.ids(), b.resources.ids()].concat(), r.resources.ids().to_vec());
                }
                None => prop_assert!(all(&r).len() == 1 && queues == 1),
            }
        }
    }
}
