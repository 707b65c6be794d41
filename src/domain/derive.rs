//! Answers derived from a completed result that contains them exactly: when a result `R`
//! answers a request `Q` ([`contains`]), and which of `R`'s rows, trimmed, are `Q`'s
//! ([`Derivation::row`]).
//!
//! `R` contains `Q` when they ask the same farm, resource kind, timezone, period and groups;
//! `Q`'s statistics are among `R`'s; `Q`'s ids are among `R`'s (and, when they differ, every
//! row names its id: the rows are grouped by it); and `Q`'s window lies in `R`'s with every
//! differing end on a bucket boundary, so each of `Q`'s buckets is a whole bucket of `R`.
//! Nothing is rolled up across periods: the upstream does not say how sessions spanning a
//! boundary are counted.

use super::buckets::on_boundary;
use super::{AggregationRequest, GroupBy, Resources, Statistic, StatisticsRow, Stats};
use std::collections::HashSet;

/// Whether `r`'s rows contain `q`'s exactly.
pub(crate) fn contains(r: &AggregationRequest, q: &AggregationRequest) -> bool {
    let (period, tz) = (r.effective_period(), r.effective_timezone());
    let same_shape = r.farm_id == q.farm_id
        && std::mem::discriminant(&r.resources) == std::mem::discriminant(&q.resources)
        && period == q.effective_period()
        && tz == q.effective_timezone()
        && set(&r.group_by) == set(&q.group_by);
    if !same_shape || !set(&q.statistics).is_subset(&set(&r.statistics)) {
        return false;
    }
    let (r_ids, q_ids) = (set(r.resources.ids()), set(q.resources.ids()));
    if !q_ids.is_subset(&r_ids) || (q_ids != r_ids && !q.group_by.contains(&id_group(&q.resources))) {
        return false;
    }
    let inside = r.start_time <= q.start_time && q.end_time <= r.end_time && q.start_time < q.end_time;
    let start_ok = q.start_time == r.start_time || on_boundary(q.start_time, period, tz);
    let end_ok = q.end_time == r.end_time || on_boundary(q.end_time, period, tz);
    inside && start_ok && end_ok
}

/// What a result shares with every request it contains, as an index of results names it:
/// farm, resource kind, timezone, period and the set of groups.
pub(crate) fn family(r: &AggregationRequest) -> String {
    let kind = match r.resources {
        Resources::Queues(_) => "queues",
        Resources::Fleets(_) => "fleets",
    };
    let mut groups: Vec<&str> = r.group_by.iter().map(|g| g.as_str()).collect();
    groups.sort_unstable();
    groups.dedup();
    format!("{}|{kind}|{}|{}|{}", r.farm_id, r.effective_timezone(), r.effective_period().as_str(), groups.join(","))
}

/// The group that names a row's resource id.
fn id_group(resources: &Resources) -> GroupBy {
    match resources {
        Resources::Queues(_) => GroupBy::QueueId,
        Resources::Fleets(_) => GroupBy::FleetId,
    }
}

fn set<T: Eq + std::hash::Hash + Clone>(items: &[T]) -> HashSet<T> {
    items.iter().cloned().collect()
}

/// How `q`'s rows are cut out of a result that contains it.
pub(crate) struct Derivation<'a> {
    q: &'a AggregationRequest,
    /// The ids kept, when only some of the result's are.
    ids: Option<HashSet<&'a str>>,
}

impl<'a> Derivation<'a> {
    /// The derivation of `q` from `r` (which [`contains`] it).
    pub(crate) fn new(r: &AggregationRequest, q: &'a AggregationRequest) -> Self {
        let ids = (set(r.resources.ids()) != set(q.resources.ids()))
            .then(|| q.resources.ids().iter().map(String::as_str).collect());
        Self { q, ids }
    }

    /// `row` of the result as `q`'s, or `None` when it is not one of `q`'s.
    pub(crate) fn row(&self, row: &StatisticsRow) -> Option<StatisticsRow> {
        let (start, end) = (row.aggregation_start_time?, row.aggregation_end_time?);
        if start < self.q.start_time || end > self.q.end_time {
            return None;
        }
        if let Some(ids) = &self.ids {
            let id = match self.q.resources {
                Resources::Queues(_) => row.queue_id.as_deref(),
                Resources::Fleets(_) => row.fleet_id.as_deref(),
            };
            if !id.is_some_and(|id| ids.contains(id)) {
                return None;
            }
        }
        let keep = |s: &Stats| Stats {
            min: s.min.filter(|_| self.q.statistics.contains(&Statistic::Min)),
            max: s.max.filter(|_| self.q.statistics.contains(&Statistic::Max)),
            avg: s.avg.filter(|_| self.q.statistics.contains(&Statistic::Avg)),
            sum: s.sum.filter(|_| self.q.statistics.contains(&Statistic::Sum)),
        };
        Some(StatisticsRow {
            cost_in_usd: keep(&row.cost_in_usd),
            runtime_in_seconds: keep(&row.runtime_in_seconds),
            ..row.clone()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Period, Timezone};
    use chrono::{DateTime, Utc};

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).expect("a time").with_timezone(&Utc)
    }

    /// The farm's week, daily in UTC+02:00, of three queues grouped by queue and usage, with
    /// sum and average.
    fn week() -> AggregationRequest {
        AggregationRequest {
            farm_id: "farm-00000000000000000000000000000001".into(),
            resources: Resources::Queues(vec!["queue-a".into(), "queue-b".into(), "queue-c".into()]),
            start_time: t("2026-03-01T22:00:00Z"),
            end_time: t("2026-03-08T22:00:00Z"),
            timezone: Timezone::parse("UTC+02:00"),
            period: Some(Period::Daily),
            group_by: vec![GroupBy::QueueId, GroupBy::UsageType],
            statistics: vec![Statistic::Sum, Statistic::Avg],
        }
    }

    #[test]
    fn a_result_contains_a_request_of_its_ids_days_and_statistics() {
        let r = week();
        assert!(contains(&r, &r), "itself");
        let mut q = r.clone();
        q.resources = Resources::Queues(vec!["queue-b".into()]);
        q.start_time = t("2026-03-03T22:00:00Z");
        q.end_time = t("2026-03-05T22:00:00Z");
        q.statistics = vec![Statistic::Avg];
        q.group_by = vec![GroupBy::UsageType, GroupBy::QueueId];
        assert!(contains(&r, &q), "one queue, two local days, one statistic, the groups in another order");
    }

    #[test]
    fn what_a_result_does_not_contain() {
        let r = week();
        let not = |change: &dyn Fn(&mut AggregationRequest), why: &str| {
            let mut q = r.clone();
            change(&mut q);
            assert!(!contains(&r, &q), "{why}");
        };
        not(&|q| q.start_time = t("2026-03-03T00:00:00Z"), "a start inside a local day");
        not(&|q| q.end_time = t("2026-03-05T12:00:00Z"), "an end inside a day");
        not(&|q| q.end_time = t("2026-03-09T22:00:00Z"), "a window past the result's");
        not(&|q| q.timezone = None, "another timezone");
        not(&|q| q.period = Some(Period::Hourly), "another period");
        not(&|q| q.statistics = vec![Statistic::Max], "a statistic it lacks");
        not(&|q| q.group_by = vec![GroupBy::QueueId], "other groups");
        not(&|q| q.resources = Resources::Queues(vec!["queue-d".into()]), "an id it lacks");
        not(&|q| q.resources = Resources::Fleets(vec!["queue-a".into()]), "another kind");
        not(&|q| q.farm_id = "farm-00000000000000000000000000000002".into(), "another farm");
        let mut ungrouped = r.clone();
        ungrouped.group_by = vec![GroupBy::UsageType];
        let mut fewer = ungrouped.clone();
        fewer.resources = Resources::Queues(vec!["queue-a".into()]);
        assert!(!contains(&ungrouped, &fewer), "fewer ids whose rows are not grouped by id");
        assert!(contains(&ungrouped, &ungrouped.clone()));
    }

    #[test]
    fn a_derived_row_keeps_its_window_its_ids_and_its_statistics() {
        let r = week();
        let mut q = r.clone();
        q.resources = Resources::Queues(vec!["queue-b".into()]);
        q.start_time = t("2026-03-03T22:00:00Z");
        q.statistics = vec![Statistic::Avg];
        let d = Derivation::new(&r, &q);
        let stats = Stats { min: None, max: None, avg: Some(2.0), sum: Some(8.0) };
        let row = |queue: &str, start: &str, end: &str| StatisticsRow {
            queue_id: Some(queue.into()),
            count: 4,
            cost_in_usd: stats,
            runtime_in_seconds: stats,
            aggregation_start_time: Some(t(start)),
            aggregation_end_time: Some(t(end)),
            ..StatisticsRow::default()
        };
        let kept = d.row(&row("queue-b", "2026-03-04T22:00:00Z", "2026-03-05T22:00:00Z")).expect("one of q's");
        assert_eq!(kept.cost_in_usd, Stats { avg: Some(2.0), ..Stats::default() });
        assert_eq!(kept.count, 4);
        assert!(d.row(&row("queue-a", "2026-03-04T22:00:00Z", "2026-03-05T22:00:00Z")).is_none(), "another queue");
        assert!(d.row(&row("queue-b", "2026-03-02T22:00:00Z", "2026-03-03T22:00:00Z")).is_none(), "before q");
    }
}
