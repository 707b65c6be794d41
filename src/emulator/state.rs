//! The emulated service's state: aggregations per farm, the one-running rule, expiry, paging,
//! and the per-farm call counters behind `/_emulator/stats`.
//!
//! Time is `tokio::time::Instant`, so unit tests drive it with paused time. The lock is never
//! held across an `.await` or while rows are generated.

use super::EmulatorConfig;
use super::dataset;
use super::error::ApiError;
use super::faults::{Faults, Operation};
use crate::domain::validate::Field;
use crate::domain::{AggregationRequest, AggregationStatus, StatisticsRow};
use base64::Engine as _;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use tokio::time::Instant;

/// The `resourceType` of a missing aggregation.
const AGGREGATION_RESOURCE: &str = "sessions-statistics-aggregation";

/// Per-farm counters, as `/_emulator/stats` reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FarmStats {
    pub start_calls: u64,
    pub get_calls: u64,
    pub throttled_starts: u64,
    /// Starts that created an aggregation (not refused, whether by the one-running rule or by
    /// injected faults).
    pub aggregations_started: u64,
    pub max_in_progress: u64,
    /// Gets of a page after the first (with a `nextToken`) of a COMPLETED aggregation.
    pub page_calls: u64,
    /// The window (`startTime/endTime`, RFC 3339) of each aggregation started, in the order
    /// they started; the last [`STARTS_KEPT`]. What tests of the gateway's queue order read.
    pub started_windows: Vec<String>,
    /// The access key ids its calls were signed with (the first [`KEYS_KEPT`]): which
    /// credentials reached this region for the farm.
    pub access_keys: BTreeSet<String>,
}

/// How many access keys a farm's stats keep.
pub(super) const KEYS_KEPT: usize = 100;

/// How many started windows a farm's stats keep.
pub(super) const STARTS_KEPT: usize = 1000;

/// The body of `/_emulator/stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StatsReport {
    pub farms: BTreeMap<String, FarmStats>,
    /// Every `Host` header the API saw: a client that mangles the endpoint shows here.
    pub hosts: BTreeSet<String>,
    /// The region it answers for.
    pub region: String,
    /// Roles its STS let callers assume, in order (the last [`STARTS_KEPT`]).
    pub assumed_roles: Vec<super::sts::Assumed>,
}

/// One page of a Get.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub status: AggregationStatus,
    pub status_message: Option<String>,
    pub rows: Option<Vec<StatisticsRow>>,
    pub next_token: Option<String>,
}

#[derive(Debug)]
struct Aggregation {
    request: Arc<AggregationRequest>,
    started: Instant,
    /// When it stops being IN_PROGRESS (the duration in force when it started).
    ends: Instant,
    /// The status once IN_PROGRESS is over, with its message.
    outcome: (AggregationStatus, Option<String>),
    rows: Arc<OnceLock<Arc<Vec<StatisticsRow>>>>,
}

#[derive(Debug, Default)]
struct Farm {
    aggregations: HashMap<String, Aggregation>,
    stats: FarmStats,
}

#[derive(Debug, Default)]
struct Inner {
    farms: HashMap<String, Farm>,
    hosts: BTreeSet<String>,
    assumed: Vec<super::sts::Assumed>,
}

/// The emulated Deadline Cloud service.
#[derive(Debug)]
pub struct Emulator {
    config: EmulatorConfig,
    pub(crate) faults: Faults,
    inner: Mutex<Inner>,
}

impl Emulator {
    pub fn new(config: EmulatorConfig) -> Self {
        let faults = Faults::new(config.faults.clone());
        Self { config, faults, inner: Mutex::default() }
    }

    /// Counts one API call for `farm_id` and remembers the `Host` it was sent to.
    pub fn record_call(&self, farm_id: &str, op: Operation, host: Option<&str>) {
        let mut inner = self.lock();
        if let Some(host) = host.filter(|h| !inner.hosts.contains(*h)) {
            inner.hosts.insert(host.to_owned());
        }
        let stats = &mut inner.farms.entry(farm_id.to_owned()).or_default().stats;
        match op {
            Operation::Start => stats.start_calls += 1,
            Operation::Get => stats.get_calls += 1,
        }
    }

    /// Whether it holds `farm_id`: every farm, unless it was given a list.
    pub(super) fn holds(&self, farm_id: &str) -> Result<(), ApiError> {
        if self.config.farms.is_empty() || self.config.farms.iter().any(|f| f == farm_id) {
            return Ok(());
        }
        Err(ApiError::NotFound {
            message: format!("farm {farm_id} does not exist in {}", self.config.region),
            resource_id: farm_id.to_owned(),
            resource_type: "farm",
        })
    }

    /// ListFarms: the farms it holds (or, without a list, the farms seen so far), in id order,
    /// `max_results` of them after the farm `after`.
    pub fn list_farms(&self, max_results: usize, after: Option<&str>) -> (Vec<String>, Option<String>) {
        let mut farms: Vec<String> = if self.config.farms.is_empty() {
            self.lock().farms.keys().cloned().collect()
        } else {
            self.config.farms.clone()
        };
        farms.sort();
        farms.dedup();
        let from = after.map_or(0, |a| farms.partition_point(|f| f.as_str() <= a));
        let page: Vec<String> = farms.iter().skip(from).take(max_results).cloned().collect();
        let next = (from + page.len() < farms.len()).then(|| page.last().cloned()).flatten();
        (page, next)
    }

    /// StartSessionsStatisticsAggregation: the one-running rule, then a new aggregation.
    pub fn start(&self, request: AggregationRequest) -> Result<String, ApiError> {
        self.holds(&request.farm_id)?;
        let now = Instant::now();
        let outcome = self.outcome_for(&request);
        let duration = self.faults.aggregation_duration().unwrap_or(self.config.aggregation_duration);
        let mut inner = self.lock();
        let farm = inner.farms.entry(request.farm_id.clone()).or_default();
        self.prune(farm, now);
        if let Some(running_until) = farm.aggregations.values().map(|a| a.ends).filter(|end| *end > now).max() {
            farm.stats.throttled_starts += 1;
            let wait = running_until - now;
            return Err(ApiError::Throttling {
                message: format!(
                    "an aggregation is already in progress for farm {}; only one may run at a time",
                    request.farm_id
                ),
                retry_after_secs: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
            });
        }
        let id = new_aggregation_id();
        let window = format!("{}/{}", request.start_time.to_rfc3339(), request.end_time.to_rfc3339());
        farm.aggregations.insert(
            id.clone(),
            Aggregation {
                request: Arc::new(request),
                started: now,
                ends: now + duration,
                outcome,
                rows: Arc::default(),
            },
        );
        let running = farm.aggregations.values().filter(|a| a.ends > now).count() as u64;
        farm.stats.max_in_progress = farm.stats.max_in_progress.max(running);
        farm.stats.aggregations_started += 1;
        if farm.stats.started_windows.len() >= STARTS_KEPT {
            farm.stats.started_windows.remove(0);
        }
        farm.stats.started_windows.push(window);
        Ok(id)
    }

    /// GetSessionsStatisticsAggregation: the status and, once COMPLETED, one page of rows.
    pub fn get(
        &self,
        farm_id: &str,
        aggregation_id: &str,
        max_results: usize,
        next_token: Option<&str>,
    ) -> Result<Page, ApiError> {
        self.holds(farm_id)?;
        let now = Instant::now();
        let (request, rows, (status, status_message)) = {
            let mut inner = self.lock();
            let farm = inner.farms.entry(farm_id.to_owned()).or_default();
            self.prune(farm, now);
            let Some(agg) = farm.aggregations.get(aggregation_id) else {
                return Err(ApiError::NotFound {
                    message: format!(
                        "aggregation {aggregation_id} does not exist in farm {farm_id}, or its results have expired"
                    ),
                    resource_id: aggregation_id.to_owned(),
                    resource_type: AGGREGATION_RESOURCE,
                });
            };
            if now < agg.ends {
                return Ok(Page {
                    status: AggregationStatus::InProgress,
                    status_message: None,
                    rows: None,
                    next_token: None,
                });
            }
            let found = (agg.request.clone(), agg.rows.clone(), agg.outcome.clone());
            if next_token.is_some() {
                farm.stats.page_calls += 1;
            }
            found
        };
        let offset = next_token.map(|t| decode_token(t, aggregation_id)).transpose()?.unwrap_or(0);
        if status != AggregationStatus::Completed {
            return Ok(Page { status, status_message, rows: None, next_token: None });
        }
        let all = rows.get_or_init(|| Arc::new(dataset::rows(&request)));
        if offset > all.len() {
            return Err(bad_token("points past the end of the results"));
        }
        let end = all.len().min(offset + max_results);
        Ok(Page {
            status,
            status_message,
            rows: Some(all[offset..end].to_vec()),
            next_token: (end < all.len()).then(|| encode_token(aggregation_id, end)),
        })
    }

    /// The counters and hosts seen so far.
    pub fn stats(&self) -> StatsReport {
        let inner = self.lock();
        StatsReport {
            farms: inner.farms.iter().map(|(id, f)| (id.clone(), f.stats.clone())).collect(),
            hosts: inner.hosts.clone(),
            region: self.config.region.clone(),
            assumed_roles: inner.assumed.clone(),
        }
    }

    /// The region it answers for.
    pub fn region(&self) -> &str {
        &self.config.region
    }

    /// Its STS settings.
    pub fn sts(&self) -> &super::sts::StsConfig {
        &self.config.sts
    }

    /// Remembers that a call for `farm_id` was signed with `access_key`.
    pub(super) fn record_key(&self, farm_id: &str, access_key: &str) {
        let mut inner = self.lock();
        let keys = &mut inner.farms.entry(farm_id.to_owned()).or_default().stats.access_keys;
        if keys.len() < KEYS_KEPT {
            keys.insert(access_key.to_owned());
        }
    }

    /// Remembers a role its STS let a caller assume.
    pub(super) fn record_assumed(&self, assumed: super::sts::Assumed) {
        let mut inner = self.lock();
        if inner.assumed.len() >= STARTS_KEPT {
            inner.assumed.remove(0);
        }
        inner.assumed.push(assumed);
    }

    /// Forgets every aggregation and counter.
    pub fn reset(&self) {
        *self.lock() = Inner::default();
    }

    fn outcome_for(&self, request: &AggregationRequest) -> (AggregationStatus, Option<String>) {
        if let Some(forced) = self.faults.forced_status() {
            return (
                forced.status(),
                Some(format!("aggregation ended {} (forced by the emulator's faults)", forced.status().as_str())),
            );
        }
        let limit = self.config.max_rows;
        let rows = dataset::row_count(request, limit);
        if rows > limit {
            let message = format!(
                "the result is too large (more than {limit} rows); reduce the time range or the number of queues or fleets, or use a longer period"
            );
            return (AggregationStatus::Failed, Some(message));
        }
        (AggregationStatus::Completed, None)
    }

    fn prune(&self, farm: &mut Farm, now: Instant) {
        farm.aggregations.retain(|_, a| now < a.started + self.config.result_validity);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn new_aggregation_id() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn encode_token(aggregation_id: &str, offset: usize) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("v1:{aggregation_id}:{offset}"))
}

fn decode_token(token: &str, aggregation_id: &str) -> Result<usize, ApiError> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad_token("is not a token this service issued"))?;
    let text = String::from_utf8(raw).map_err(|_| bad_token("is not a token this service issued"))?;
    let mut parts = text.splitn(3, ':');
    match (parts.next(), parts.next(), parts.next().and_then(|o| o.parse().ok())) {
        (Some("v1"), Some(id), Some(offset)) if id == aggregation_id => Ok(offset),
        (Some("v1"), Some(_), Some(_)) => Err(bad_token("belongs to another aggregation")),
        _ => Err(bad_token("is not a token this service issued")),
    }
}

fn bad_token(why: &str) -> ApiError {
    ApiError::fields(vec![(super::wire::field_name(Field::NextToken, None), format!("the token {why}"))])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{GroupBy, Period, Resources, Statistic, ids};
    use chrono::{TimeZone, Utc};
    use std::time::Duration;

    fn config() -> EmulatorConfig {
        EmulatorConfig {
            aggregation_duration: Duration::from_secs(2),
            result_validity: Duration::from_secs(60),
            max_rows: 1000,
            ..EmulatorConfig::default()
        }
    }

    fn request(farm: u64, days: i64) -> AggregationRequest {
        let start = Utc.with_ymd_and_hms(2026, 2, 1, 0, 0, 0).single().expect("start");
        AggregationRequest {
            farm_id: ids::format_id("farm-", farm, farm),
            resources: Resources::Queues(vec![ids::format_id("queue-", 0, 1)]),
            start_time: start,
            end_time: start + chrono::Duration::days(days),
            timezone: None,
            period: Some(Period::Hourly),
            group_by: vec![GroupBy::JobId],
            statistics: vec![Statistic::Sum],
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_upstream_fault_lengthens_only_the_aggregations_started_under_it() {
        let emu = Emulator::new(config());
        let farm = |n| request(n, 1).farm_id;
        let before = emu.start(request(1, 1)).expect("starts");
        emu.faults
            .set(crate::emulator::faults::FaultSpec { aggregation_duration_ms: Some(20_000), ..Default::default() });
        let slow = emu.start(request(2, 1)).expect("starts");
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(emu.get(&farm(1), &before, 10, None).map(|p| p.status), Ok(AggregationStatus::Completed));
        assert_eq!(emu.get(&farm(2), &slow, 10, None).map(|p| p.status), Ok(AggregationStatus::InProgress));
        let err = emu.start(request(2, 2)).expect_err("the farm is still busy");
        assert!(matches!(err, ApiError::Throttling { retry_after_secs: 17, .. }), "{err:?}");
        tokio::time::advance(Duration::from_secs(18)).await;
        assert_eq!(emu.get(&farm(2), &slow, 10, None).map(|p| p.status), Ok(AggregationStatus::Completed));
    }

    #[tokio::test(start_paused = true)]
    async fn one_running_aggregation_per_farm_then_completed_then_expired() {
        let emu = Emulator::new(config());
        let farm = request(1, 1).farm_id;
        let id = emu.start(request(1, 1)).expect("first start");
        assert!(ids::is_aggregation_id(&id));
        let err = emu.start(request(1, 2)).expect_err("second start while running");
        assert!(matches!(err, ApiError::Throttling { retry_after_secs: 2, .. }), "{err:?}");
        emu.start(request(2, 1)).expect("another farm is independent");
        assert_eq!(emu.get(&farm, &id, 100, None).map(|p| p.status), Ok(AggregationStatus::InProgress));

        tokio::time::advance(Duration::from_secs(2)).await;
        let page = emu.get(&farm, &id, 100, None).expect("completed");
        assert_eq!(page.status, AggregationStatus::Completed);
        assert_eq!(page.rows.map(|r| r.len()), Some(100));
        emu.start(request(1, 2)).expect("the farm is free again");

        tokio::time::advance(Duration::from_secs(58)).await;
        assert!(matches!(emu.get(&farm, &id, 100, None), Err(ApiError::NotFound { .. })));
        let stats = emu.stats().farms[&farm].clone();
        assert_eq!(
            stats,
            FarmStats {
                start_calls: 0,
                get_calls: 0,
                throttled_starts: 1,
                aggregations_started: 2,
                max_in_progress: 1,
                page_calls: 0,
                started_windows: [request(1, 1), request(1, 2)]
                    .map(|r| format!("{}/{}", r.start_time.to_rfc3339(), r.end_time.to_rfc3339()))
                    .to_vec(),
                access_keys: Default::default(),
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn pages_chain_through_every_row_and_tokens_are_bound() {
        let emu = Emulator::new(config());
        let req = request(3, 1);
        let farm = req.farm_id.clone();
        let id = emu.start(req.clone()).expect("start");
        tokio::time::advance(Duration::from_secs(3)).await;
        let (mut token, mut seen) = (None, Vec::new());
        loop {
            let page = emu.get(&farm, &id, 7, token.as_deref()).expect("page");
            seen.extend(page.rows.unwrap_or_default());
            token = page.next_token;
            if token.is_none() {
                break;
            }
        }
        assert_eq!(seen, dataset::rows(&req));

        let other = emu.start(request(4, 1)).expect("other farm");
        let foreign = encode_token(&other, 1);
        assert!(matches!(emu.get(&farm, &id, 7, Some(&foreign)), Err(ApiError::Validation { .. })));
        assert!(matches!(emu.get(&farm, &id, 7, Some("garbage!")), Err(ApiError::Validation { .. })));
        assert!(
            matches!(emu.get(&farm, &other, 7, None), Err(ApiError::NotFound { .. })),
            "an id of another farm is not found"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn too_large_results_fail_with_a_message() {
        let emu = Emulator::new(config());
        let req = request(5, 30);
        let farm = req.farm_id.clone();
        let id = emu.start(req).expect("start");
        tokio::time::advance(Duration::from_secs(2)).await;
        let page = emu.get(&farm, &id, 100, None).expect("get");
        assert_eq!(page.status, AggregationStatus::Failed);
        assert!(page.status_message.is_some_and(|m| m.contains("too large")));
        assert_eq!(page.rows, None);
    }
}
