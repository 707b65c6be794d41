//! Deterministic synthetic statistics that look like a render studio's.
//!
//! Each requested queue (or fleet) runs a handful of jobs; every job spends compute on one
//! instance type, a licence on one product and a persistent volume. Rows are the distinct
//! projections of that activity onto the `groupBy` fields, times each period bucket. The same
//! request always yields the same rows, in the same order.

use crate::domain::buckets::{Bucket, Buckets, buckets};
use crate::domain::ids::format_id;
use crate::domain::{AggregationRequest, GroupBy, Resources, Statistic, StatisticsRow, Stats, UsageType};
use std::collections::BTreeSet;

const JOBS_PER_RESOURCE: u64 = 6;
const USERS: u64 = 5;
const INSTANCE_TYPES: &[(&str, f64)] =
    &[("c5.4xlarge", 0.68), ("m5.8xlarge", 1.54), ("g4dn.xlarge", 0.53), ("r5.2xlarge", 0.50)];
const LICENSE_PRODUCTS: &[(&str, f64)] =
    &[("maya", 0.86), ("nuke", 0.92), ("houdini", 0.61), ("arnold", 0.30), ("vray", 0.24)];
const VOLUME_USD_PER_HOUR: f64 = 0.02;
const SHOTS: &[&str] = &["sq010_sh0040", "sq020_sh0110", "sq030_sh0080", "sq040_sh0200", "sq050_sh0010"];
const TASKS: &[&str] = &["lighting", "fx_sim", "comp", "lookdev", "layout"];

/// How many rows a request yields, counting at most `limit + 1` so a huge request stays cheap.
pub(super) fn row_count(req: &AggregationRequest, limit: u64) -> u64 {
    let groups = groups(req).len() as u64;
    if groups == 0 {
        return 0;
    }
    let bucket_cap = usize::try_from(limit / groups + 1).unwrap_or(usize::MAX);
    let buckets = bucket_list(req).take(bucket_cap).count() as u64;
    groups.saturating_mul(buckets)
}

/// Every row of a request: buckets in time order, groups in a stable order within each.
pub(super) fn rows(req: &AggregationRequest) -> Vec<StatisticsRow> {
    let groups = groups(req);
    bucket_list(req).flat_map(|bucket| groups.iter().map(move |g| row(req, g, bucket))).collect()
}

fn bucket_list(req: &AggregationRequest) -> Buckets {
    buckets(req.start_time, req.end_time, req.effective_period(), req.effective_timezone())
}

/// One unit of synthetic activity; a group is its projection onto the `groupBy` fields.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
struct Activity {
    queue_id: Option<String>,
    fleet_id: Option<String>,
    job_id: Option<String>,
    job_name: Option<String>,
    user_id: Option<String>,
    usage_type: Option<UsageType>,
    instance_type: Option<usize>,
    license_product: Option<usize>,
}

fn groups(req: &AggregationRequest) -> Vec<Activity> {
    let mut set = BTreeSet::new();
    for activity in activities(req) {
        set.insert(project(activity, &req.group_by));
    }
    set.into_iter().collect()
}

fn activities(req: &AggregationRequest) -> Vec<Activity> {
    let farm = hash(&[req.farm_id.as_bytes()]);
    let mut out = Vec::new();
    for resource in req.resources.ids() {
        let r = hash(&[req.farm_id.as_bytes(), resource.as_bytes()]);
        for j in 0..JOBS_PER_RESOURCE {
            let h = mix(r ^ j);
            let (queue_id, fleet_id) = match &req.resources {
                Resources::Queues(_) => (resource.clone(), format_id("fleet-", farm, mix(farm ^ (h % 2)))),
                Resources::Fleets(_) => (format_id("queue-", farm, mix(farm ^ (h % 3) ^ 0x51)), resource.clone()),
            };
            let job = Activity {
                queue_id: Some(queue_id),
                fleet_id: Some(fleet_id),
                job_id: Some(format_id("job-", r, h)),
                job_name: Some(format!("{}_{}_v{:03}", pick(SHOTS, h), pick(TASKS, h >> 8), 1 + (h >> 16) % 40)),
                user_id: Some(format!(
                    "{:08x}-{:04x}-4000-8000-{:012x}",
                    mix(farm ^ ((h >> 24) % USERS)) as u32,
                    0x1e57,
                    farm & 0xffff_ffff_ffff
                )),
                ..Activity::default()
            };
            out.push(Activity {
                usage_type: Some(UsageType::Compute),
                instance_type: Some(index(INSTANCE_TYPES.len(), h >> 32)),
                ..job.clone()
            });
            out.push(Activity {
                usage_type: Some(UsageType::License),
                license_product: Some(index(LICENSE_PRODUCTS.len(), h >> 40)),
                ..job.clone()
            });
            out.push(Activity { usage_type: Some(UsageType::PersistentVolume), ..job });
        }
    }
    out
}

fn project(a: Activity, group_by: &[GroupBy]) -> Activity {
    let has = |g: GroupBy| group_by.contains(&g);
    Activity {
        queue_id: a.queue_id.filter(|_| has(GroupBy::QueueId)),
        fleet_id: a.fleet_id.filter(|_| has(GroupBy::FleetId)),
        job_name: a.job_name.filter(|_| has(GroupBy::JobId)),
        job_id: a.job_id.filter(|_| has(GroupBy::JobId)),
        user_id: a.user_id.filter(|_| has(GroupBy::UserId)),
        usage_type: a.usage_type.filter(|_| has(GroupBy::UsageType)),
        instance_type: a.instance_type.filter(|_| has(GroupBy::InstanceType)),
        license_product: a.license_product.filter(|_| has(GroupBy::LicenseProduct)),
    }
}

fn row(req: &AggregationRequest, g: &Activity, bucket: Bucket) -> StatisticsRow {
    let seed = hash(&[format!("{g:?}").as_bytes(), &bucket.start.timestamp().to_le_bytes(), req.farm_id.as_bytes()]);
    let count = 1 + (seed % 12) as i32;
    let avg = 600.0 + ((seed >> 8) % 7200) as f64;
    let min = avg * (0.2 + ((seed >> 24) % 70) as f64 / 100.0);
    let max = avg * (1.1 + ((seed >> 32) % 190) as f64 / 100.0);
    let runtime = [min, max, avg, avg * f64::from(count)];
    let rate = match (g.usage_type, g.instance_type, g.license_product) {
        (_, Some(i), _) => INSTANCE_TYPES[i].1,
        (_, _, Some(l)) => LICENSE_PRODUCTS[l].1,
        (Some(UsageType::PersistentVolume), _, _) => VOLUME_USD_PER_HOUR,
        _ => 0.75,
    };
    StatisticsRow {
        queue_id: g.queue_id.clone(),
        fleet_id: g.fleet_id.clone(),
        job_id: g.job_id.clone(),
        job_name: g.job_name.clone(),
        user_id: g.user_id.clone(),
        license_product: g.license_product.map(|l| LICENSE_PRODUCTS[l].0.to_owned()),
        instance_type: g.instance_type.map(|i| INSTANCE_TYPES[i].0.to_owned()),
        usage_type: g.usage_type,
        count,
        runtime_in_seconds: stats(&req.statistics, runtime.map(round2)),
        cost_in_usd: stats(&req.statistics, runtime.map(|s| round2(s / 3600.0 * rate))),
        aggregation_start_time: Some(bucket.start),
        aggregation_end_time: Some(bucket.end),
    }
}

/// Keeps only the requested statistics of `[min, max, avg, sum]`.
fn stats(wanted: &[Statistic], [min, max, avg, sum]: [f64; 4]) -> Stats {
    let has = |s: Statistic| wanted.contains(&s);
    Stats {
        min: has(Statistic::Min).then_some(min),
        max: has(Statistic::Max).then_some(max),
        avg: has(Statistic::Avg).then_some(avg),
        sum: has(Statistic::Sum).then_some(sum),
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn pick<'a>(list: &[&'a str], h: u64) -> &'a str {
    list[index(list.len(), h)]
}

fn index(len: usize, h: u64) -> usize {
    (h % len as u64) as usize
}

/// FNV-1a over the parts, finished with [`mix`]: stable across runs, platforms and releases.
fn hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.iter().chain(std::iter::once(&0xff)) {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    mix(h)
}

/// The splitmix64 finaliser.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Period, ids};
    use chrono::{TimeZone, Utc};

    fn request(group_by: Vec<GroupBy>, queues: u64, days: i64) -> AggregationRequest {
        let start = Utc.with_ymd_and_hms(2026, 2, 1, 0, 0, 0).single().expect("start");
        AggregationRequest {
            farm_id: ids::format_id("farm-", 9, 9),
            resources: Resources::Queues((0..queues).map(|i| ids::format_id("queue-", 0, i)).collect()),
            start_time: start,
            end_time: start + chrono::Duration::days(days),
            timezone: None,
            period: Some(Period::Hourly),
            group_by,
            statistics: vec![Statistic::Sum, Statistic::Avg],
        }
    }

    #[test]
    fn rows_are_groups_times_buckets_and_deterministic() {
        let req = request(vec![GroupBy::QueueId, GroupBy::JobId], 2, 4);
        let rows = rows(&req);
        assert_eq!(rows.len(), 2 * 6 * 96);
        assert_eq!(row_count(&req, 1_000_000), rows.len() as u64);
        assert_eq!(rows, super::rows(&req));
        let first = &rows[0];
        assert!(first.queue_id.is_some() && first.job_id.as_deref().is_some_and(ids::is_job_id));
        assert!(first.job_name.is_some() && first.user_id.is_none() && first.usage_type.is_none());
        assert!(first.cost_in_usd.sum.is_some() && first.cost_in_usd.min.is_none());
        let r = first.runtime_in_seconds;
        assert!(r.sum >= r.avg);
    }

    #[test]
    fn usage_type_grouping_yields_all_three_kinds() {
        let req = request(vec![GroupBy::UsageType], 1, 1);
        let kinds: BTreeSet<_> = rows(&req).iter().filter_map(|r| r.usage_type).collect();
        assert_eq!(kinds.len(), 3);
    }

    #[test]
    fn row_count_stops_early_for_huge_requests() {
        let mut req = request(vec![GroupBy::JobId], 10, 1);
        req.end_time = req.start_time + chrono::Duration::days(365 * 50);
        assert!(row_count(&req, 1000) > 1000);
    }

    /// A result and a request it contains, drawn at random: periods, timezones, windows that
    /// start anywhere, ends cut at bucket boundaries, id and statistic subsets.
    fn superset_and_subset() -> impl proptest::strategy::Strategy<Value = (AggregationRequest, AggregationRequest)> {
        use crate::domain::Timezone;
        use proptest::prelude::*;
        let periods =
            prop_oneof![Just(Period::Hourly), Just(Period::Daily), Just(Period::Weekly), Just(Period::Monthly)];
        let groups = proptest::sample::subsequence(
            vec![GroupBy::QueueId, GroupBy::FleetId, GroupBy::UsageType, GroupBy::UserId, GroupBy::InstanceType],
            1..=2,
        );
        let statistics =
            proptest::sample::subsequence(vec![Statistic::Sum, Statistic::Min, Statistic::Max, Statistic::Avg], 1..=4);
        (periods, -24i32..=28, 0i64..400 * 24 * 60, 1u64..=4, any::<bool>(), groups, statistics, any::<u64>()).prop_map(
            |(period, half_hours, minute, n_ids, fleets, group_by, statistics, pick)| {
                let sign = if half_hours < 0 { '-' } else { '+' };
                let offset = half_hours.unsigned_abs() * 30;
                let tz = Timezone::parse(&format!("UTC{sign}{:02}:{:02}", offset / 60, offset % 60));
                let start = Utc.with_ymd_and_hms(2025, 6, 1, 0, 0, 0).single().expect("a time")
                    + chrono::Duration::minutes(minute);
                let span = match period {
                    Period::Hourly => chrono::Duration::hours(30),
                    Period::Daily => chrono::Duration::days(20),
                    Period::Weekly => chrono::Duration::weeks(8),
                    Period::Monthly => chrono::Duration::days(250),
                };
                let ids: Vec<String> = (0..n_ids).map(|i| ids::format_id("queue-", 7, i)).collect();
                let r = AggregationRequest {
                    farm_id: ids::format_id("farm-", 9, 9),
                    resources: if fleets { Resources::Fleets(ids.clone()) } else { Resources::Queues(ids.clone()) },
                    start_time: start,
                    end_time: start + span,
                    timezone: tz,
                    period: Some(period),
                    group_by: group_by.clone(),
                    statistics: statistics.clone(),
                };
                // The window: between two of the result's ends and inner bucket boundaries.
                let mut ends: Vec<_> = bucket_list(&r).map(|b| b.start).collect();
                ends.push(r.end_time);
                // `ends` holds at least the result's start and end.
                let n = ends.len() as u64;
                let first = pick % (n - 1);
                let last = first + 1 + (pick >> 16) % (n - 1 - first);
                let mut q = r.clone();
                q.start_time = ends[first as usize];
                q.end_time = ends[last as usize];
                let by_id = group_by.contains(if fleets { &GroupBy::FleetId } else { &GroupBy::QueueId });
                if by_id {
                    let keep: Vec<String> = ids
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| (pick >> (32 + i)) & 1 == 1)
                        .map(|(_, id)| id.clone())
                        .collect();
                    let keep = if keep.is_empty() { vec![ids[0].clone()] } else { keep };
                    q.resources = if fleets { Resources::Fleets(keep) } else { Resources::Queues(keep) };
                }
                let stats: Vec<Statistic> = statistics
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| (pick >> (48 + i)) & 1 == 1)
                    .map(|(_, s)| *s)
                    .collect();
                q.statistics = if stats.is_empty() { vec![statistics[0]] } else { stats };
                (r, q)
            },
        )
    }

    /// The emulator answers a request it is asked directly with exactly the rows derived from a
    /// result that contains it (`domain::derive`): its rows depend only on their group, bucket
    /// and farm, never on what else was asked, as the upstream's do.
    #[test]
    fn rows_derived_from_a_containing_result_are_the_rows_asked_directly() {
        use crate::domain::derive::{Derivation, contains};
        let config = proptest::test_runner::Config { cases: 500, failure_persistence: None, ..Default::default() };
        let mut runner = proptest::test_runner::TestRunner::new(config);
        let compared = std::cell::Cell::new(0usize);
        let result = runner.run(&superset_and_subset(), |(r, q)| {
            assert!(contains(&r, &q), "{r:?} contains {q:?}");
            let derivation = Derivation::new(&r, &q);
            let mut derived: Vec<String> =
                rows(&r).iter().filter_map(|row| derivation.row(row)).map(|row| format!("{row:?}")).collect();
            let mut direct: Vec<String> = rows(&q).iter().map(|row| format!("{row:?}")).collect();
            derived.sort();
            direct.sort();
            assert_eq!(derived, direct, "{r:?} → {q:?}");
            compared.set(compared.get() + direct.len());
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}");
        }
        assert!(compared.get() > 10_000, "rows were compared: {}", compared.get());
    }
}
