//! Request validation per the upstream model: every rule, every bad field reported at once.
//!
//! Transports fill a [`RequestDraft`] (adding their own parse failures, such as an unknown enum
//! value) and render the resulting [`FieldViolation`]s in their own field naming.
//!
//! Hostile input costs almost nothing: a list longer than [`MAX_LIST_ITEMS`] is refused before
//! any of its items is looked at, every check is linear, and a caller's value is only ever
//! quoted by a short prefix.

use super::quote::quoted;
use super::{AggregationRequest, GroupBy, Period, Resources, Statistic, Timezone, ids};
use chrono::{DateTime, Utc};
use std::collections::HashSet;
use std::hash::Hash;

/// Most queue or fleet ids one aggregation may name.
pub(crate) const MAX_RESOURCE_IDS: usize = 10;
/// Most `groupBy` fields.
pub(crate) const MAX_GROUP_BY: usize = 2;
/// Most statistics.
pub(crate) const MAX_STATISTICS: usize = 4;
/// Most items a list may hold, repeats included: beyond it a list is refused whole, before
/// any item is checked.
pub(crate) const MAX_LIST_ITEMS: usize = 100;

/// The refusal of a list longer than [`MAX_LIST_ITEMS`], or `None` when it is not.
pub(crate) fn oversized_list(field: Field, len: usize) -> Option<FieldViolation> {
    (len > MAX_LIST_ITEMS)
        .then(|| FieldViolation::new(field, format!("has {len} values; at most {MAX_LIST_ITEMS} are accepted")))
}

/// A request field, named by each transport in its own convention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    FarmId,
    ResourceIds,
    QueueIds,
    FleetIds,
    StartTime,
    EndTime,
    Timezone,
    Period,
    GroupBy,
    Statistics,
    AggregationId,
    MaxResults,
    NextToken,
    /// The gateway's long-poll duration.
    Wait,
    /// The gateway's freshness bound on cached answers.
    MaxStaleness,
    /// The gateway's priority class.
    Priority,
}

/// One broken rule: which field (and which element of a list), and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: Field,
    pub index: Option<usize>,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: Field, description: impl Into<String>) -> Self {
        Self { field, index: None, description: description.into() }
    }

    pub fn at(field: Field, index: usize, description: impl Into<String>) -> Self {
        Self { field, index: Some(index), description: description.into() }
    }
}

/// An aggregation request as a transport decoded it, not yet checked.
#[derive(Debug, Clone, Default)]
pub(crate) struct RequestDraft {
    pub farm_id: String,
    pub queue_ids: Option<Vec<String>>,
    pub fleet_ids: Option<Vec<String>>,
    pub start_time: Option<DateTime<Utc>>,
    pub end_time: Option<DateTime<Utc>>,
    /// `None` for the upstream default; `Some("")` is a violation.
    pub timezone: Option<String>,
    pub period: Option<Period>,
    pub group_by: Vec<GroupBy>,
    pub statistics: Vec<Statistic>,
    /// What the transport already found wrong while decoding (unknown enum values, bad times).
    pub violations: Vec<FieldViolation>,
}

impl RequestDraft {
    /// Checks every rule of the model; on success, lists are free of duplicates.
    pub(crate) fn validate(self) -> Result<AggregationRequest, Vec<FieldViolation>> {
        let mut v = self.violations;
        check_farm_id(&self.farm_id, &mut v);
        let resources = check_resources(self.queue_ids, self.fleet_ids, &mut v);
        let window = check_window(self.start_time, self.end_time, &mut v);
        let timezone = self.timezone.and_then(|tz| {
            let parsed = Timezone::parse(&tz);
            if parsed.is_none() {
                v.push(FieldViolation::new(
                    Field::Timezone,
                    format!("'{}' must look like UTC+08:00 (UTC[-+][01][0-9]:(30|00))", quoted(&tz)),
                ));
            }
            parsed
        });
        let group_by = dedup_counted(self.group_by, Field::GroupBy, MAX_GROUP_BY, &mut v);
        let statistics = dedup_counted(self.statistics, Field::Statistics, MAX_STATISTICS, &mut v);
        match (v.is_empty(), resources, window) {
            (true, Some(resources), Some((start_time, end_time))) => Ok(AggregationRequest {
                farm_id: self.farm_id,
                resources,
                start_time,
                end_time,
                timezone,
                period: self.period,
                group_by,
                statistics,
            }),
            _ => Err(v),
        }
    }
}

/// Reports a farm id that is missing or off the model's pattern.
pub(crate) fn check_farm_id(farm_id: &str, v: &mut Vec<FieldViolation>) {
    if farm_id.is_empty() {
        v.push(FieldViolation::new(Field::FarmId, "is required"));
    } else if !ids::is_farm_id(farm_id) {
        v.push(FieldViolation::new(Field::FarmId, format!("'{}' must match farm-[0-9a-f]{{32}}", quoted(farm_id))));
    }
}

fn check_resources(
    queues: Option<Vec<String>>,
    fleets: Option<Vec<String>>,
    v: &mut Vec<FieldViolation>,
) -> Option<Resources> {
    match (queues, fleets) {
        (Some(_), Some(_)) => {
            v.push(FieldViolation::new(Field::ResourceIds, "give queue ids or fleet ids, not both"));
            None
        }
        (None, None) => {
            v.push(FieldViolation::new(Field::ResourceIds, "queue ids or fleet ids are required"));
            None
        }
        (Some(q), None) => check_ids(q, Field::QueueIds, "queue-", ids::is_queue_id, v).map(Resources::Queues),
        (None, Some(f)) => check_ids(f, Field::FleetIds, "fleet-", ids::is_fleet_id, v).map(Resources::Fleets),
    }
}

fn check_ids(
    list: Vec<String>,
    field: Field,
    prefix: &str,
    valid: fn(&str) -> bool,
    v: &mut Vec<FieldViolation>,
) -> Option<Vec<String>> {
    if let Some(refusal) = oversized_list(field, list.len()) {
        v.push(refusal);
        return None;
    }
    let before = v.len();
    for (i, id) in list.iter().enumerate() {
        if !valid(id) {
            v.push(FieldViolation::at(field, i, format!("'{}' must match {prefix}[0-9a-f]{{32}}", quoted(id))));
        }
    }
    let unique = dedup_counted(list, field, MAX_RESOURCE_IDS, v);
    (v.len() == before).then_some(unique)
}

fn check_window(
    start: Option<DateTime<Utc>>,
    end: Option<DateTime<Utc>>,
    v: &mut Vec<FieldViolation>,
) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    for (field, value) in [(Field::StartTime, start), (Field::EndTime, end)] {
        if value.is_none() && !v.iter().any(|x| x.field == field) {
            v.push(FieldViolation::new(field, "is required"));
        }
    }
    let (start, end) = (start?, end?);
    if start >= end {
        v.push(FieldViolation::new(Field::EndTime, format!("must be after the start time ({})", start.to_rfc3339())));
        return None;
    }
    Some((start, end))
}

/// Drops repeats (keeping first occurrences in order) and checks `1..=max` distinct values;
/// linear in the list's length.
fn dedup_counted<T: Eq + Hash + Clone>(list: Vec<T>, field: Field, max: usize, v: &mut Vec<FieldViolation>) -> Vec<T> {
    let mut seen: HashSet<T> = HashSet::with_capacity(list.len());
    let unique: Vec<T> = list.into_iter().filter(|item| seen.insert(item.clone())).collect();
    if unique.is_empty() {
        v.push(FieldViolation::new(field, format!("needs 1 to {max} values")));
    } else if unique.len() > max {
        v.push(FieldViolation::new(field, format!("has {} distinct values; at most {max} are allowed", unique.len())));
    }
    unique
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn good() -> RequestDraft {
        RequestDraft {
            farm_id: ids::format_id("farm-", 1, 1),
            queue_ids: Some(vec![ids::format_id("queue-", 1, 2)]),
            start_time: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).single(),
            end_time: Utc.with_ymd_and_hms(2026, 1, 2, 0, 0, 0).single(),
            group_by: vec![GroupBy::QueueId],
            statistics: vec![Statistic::Sum],
            ..Default::default()
        }
    }

    fn fields(err: Vec<FieldViolation>) -> Vec<(Field, Option<usize>)> {
        err.into_iter().map(|f| (f.field, f.index)).collect()
    }

    #[test]
    fn a_good_request_passes_and_loses_duplicates() {
        let mut d = good();
        d.statistics = vec![Statistic::Sum, Statistic::Avg, Statistic::Sum];
        d.timezone = Some("UTC-05:30".into());
        let r = d.validate().expect("valid");
        assert_eq!(r.statistics, vec![Statistic::Sum, Statistic::Avg]);
        assert_eq!(r.timezone.map(|t| t.offset_minutes()), Some(-330));
    }

    #[test]
    fn every_bad_field_is_reported() {
        let mut d = good();
        d.farm_id = "farm-x".into();
        d.queue_ids = Some(vec![ids::format_id("queue-", 1, 2), "queue-nope".into()]);
        d.timezone = Some("UTC+8".into());
        d.group_by = vec![GroupBy::QueueId, GroupBy::JobId, GroupBy::UserId];
        d.statistics = vec![];
        d.end_time = d.start_time;
        let err = d.validate().expect_err("invalid");
        assert_eq!(
            fields(err),
            vec![
                (Field::FarmId, None),
                (Field::QueueIds, Some(1)),
                (Field::EndTime, None),
                (Field::Timezone, None),
                (Field::GroupBy, None),
                (Field::Statistics, None),
            ]
        );
    }

    #[test]
    fn resources_are_one_kind_and_at_most_ten() {
        let mut d = good();
        d.fleet_ids = Some(vec![ids::format_id("fleet-", 1, 1)]);
        assert_eq!(fields(d.validate().expect_err("both")), vec![(Field::ResourceIds, None)]);

        let mut d = good();
        d.queue_ids = None;
        assert_eq!(fields(d.validate().expect_err("neither")), vec![(Field::ResourceIds, None)]);

        let mut d = good();
        d.queue_ids = Some((0..11).map(|i| ids::format_id("queue-", 0, i)).collect());
        assert_eq!(fields(d.validate().expect_err("eleven")), vec![(Field::QueueIds, None)]);

        let mut d = good();
        d.queue_ids = Some((0..11).map(|i| ids::format_id("queue-", 0, i % 10)).collect());
        assert_eq!(d.validate().expect("ten distinct").resources.ids().len(), 10);
    }

    #[test]
    fn huge_lists_are_refused_before_their_items_are_looked_at() {
        let mut d = good();
        d.queue_ids = Some((0..100_000).map(|i| format!("queue-{i}")).collect());
        let begin = std::time::Instant::now();
        let err = d.validate().expect_err("too many");
        assert_eq!(fields(err.clone()), vec![(Field::QueueIds, None)], "one violation, not 100,000");
        assert!(err[0].description.contains("100000 values"), "{}", err[0].description);
        assert!(begin.elapsed() < std::time::Duration::from_secs(1));

        let mut d = good();
        d.queue_ids = Some(vec![ids::format_id("queue-", 1, 2); MAX_LIST_ITEMS]);
        assert_eq!(d.validate().expect("repeats within the limit are fine").resources.ids().len(), 1);
    }

    #[test]
    fn caller_values_are_quoted_by_a_short_prefix() {
        let mut d = good();
        d.farm_id = "f".repeat(3000);
        d.timezone = Some("z".repeat(3000));
        for violation in d.validate().expect_err("invalid") {
            assert!(violation.description.len() < 200, "{}", violation.description);
        }
    }

    #[test]
    fn missing_times_are_required() {
        let mut d = good();
        d.start_time = None;
        d.end_time = None;
        assert_eq!(fields(d.validate().expect_err("no times")), vec![(Field::StartTime, None), (Field::EndTime, None)]);
    }
}
