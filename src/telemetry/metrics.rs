//! Prometheus metrics (prometheus-client), named by Prometheus conventions: base units,
//! `_total` counters, `_seconds` histograms, all prefixed `dsg_`.
//!
//! Event counters are updated where things happen; levels (queue depth, cache size, active
//! aggregations) are read from the gateway at scrape time, so they can never drift.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Labels of an RPC's outcome.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub method: &'static str,
    pub code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DispositionLabels {
    /// `started`, `joined` or `cached`.
    pub disposition: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub operation: &'static str,
    pub outcome: &'static str,
    /// The route of the farm (`default` without a routes file): from the file, never from
    /// callers, so bounded.
    pub route: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub operation: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    pub class: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteOutcomeLabels {
    pub route: String,
    pub outcome: &'static str,
}

/// The routes file's metrics (`--upstream-routes`).
struct RouteMetrics {
    /// Farms each route serves now.
    farms: Family<RouteLabels, Gauge>,
    /// Farms claimed by more than one route, served by none.
    conflicts: Gauge,
    discoveries: Family<RouteOutcomeLabels, Counter>,
    reloads: Family<OutcomeLabels, Counter>,
    /// Every route an upstream call was made on: the `route` values of `upstream_calls`.
    seen: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

impl RouteMetrics {
    fn register(registry: &mut Registry) -> Self {
        let farms = Family::<RouteLabels, Gauge>::default();
        registry.register("upstream_route_farms", "farms each route of the routes file serves now", farms.clone());
        let conflicts = Gauge::default();
        registry.register(
            "upstream_route_conflicts",
            "farms claimed by more than one route (listed or discovered): served by none until the routes file is fixed",
            conflicts.clone(),
        );
        let discoveries = Family::<RouteOutcomeLabels, Counter>::default();
        registry.register(
            "upstream_route_discoveries",
            "ListFarms discoveries of discover = true routes, by route and outcome (ok, failed)",
            discoveries.clone(),
        );
        let reloads = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "upstream_routes_reloads",
            "changes of the routes file: put in force (ok) or refused (invalid)",
            reloads.clone(),
        );
        let seen = std::sync::Mutex::new(std::iter::once(crate::upstream::routes::DEFAULT_ROUTE.to_owned()).collect());
        Self { farms, conflicts, discoveries, reloads, seen }
    }
}

/// How many farms get series of their own in the per-farm gauges; the rest are summed under
/// `farm_id="other"`, so a scrape stays small whatever farm ids callers send.
pub const MAX_FARM_SERIES: usize = 50;

/// Levels read from the gateway at scrape time.
#[derive(Debug, Clone, Default)]
pub struct Levels {
    pub active_aggregations: u64,
    pub cache_entries: u64,
    pub cache_bytes: u64,
    pub cache_expirations: u64,
    pub cache_evictions: u64,
    /// Every farm with work (the collector bounds how many get their own series).
    pub farms: Vec<FarmLevel>,
    pub caller_buckets: u64,
    /// Whether the coordination store answers (1) or not (0).
    pub store_up: bool,
    /// A shared store's keys, used and maximum memory bytes (none in memory).
    pub store_memory: Option<[u64; 3]>,
}

/// Queue depth and running count of one farm.
#[derive(Debug, Clone, Default)]
pub struct FarmLevel {
    pub farm_id: String,
    pub queued: u64,
    pub running: u64,
}

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    pub rpc_requests: Family<RpcLabels, Counter>,
    pub rpc_duration: Family<MethodLabels, Histogram>,
    pub dispositions: Family<DispositionLabels, Counter>,
    pub cache_hits: Counter,
    /// Starts answered from the rows of a larger cached result.
    pub derived: Counter,
    pub cache_misses: Counter,
    pub throttled: Family<MethodLabels, Counter>,
    pub upstream_calls: Family<UpstreamLabels, Counter>,
    pub upstream_duration: Family<OperationLabels, Histogram>,
    pub finished: Family<StateLabels, Counter>,
    pub time_to_complete: Histogram,
    /// Aggregations the farm's supervisor ended: `crashed` or `overran`.
    pub abandoned: Family<ReasonLabels, Counter>,
    /// Ids a farm's queue held whose record was `missing` or `unreadable`, taken off it.
    pub store_corrupt: Family<ReasonLabels, Counter>,
    /// Callers' requests let through by this replica's own buckets while the buckets shared
    /// by every replica could not be reached, by method.
    pub caller_limit_fallbacks: Family<MethodLabels, Counter>,
    /// Upstream Starts whose outcome is unknown (timeout, 5xx, lost response).
    pub start_outcome_unknown: Counter,
    /// Upstream aggregations a holder started but could not record under its lease: `left`
    /// with the aggregation for the next holder, `adopted` by it, or `lost` (the store could
    /// not take the offer either: the next holder starts again).
    pub start_offers: Family<OutcomeLabels, Counter>,
    /// Starts refused by a gateway-wide bound: `max_active_aggregations` or `max_farms`.
    pub busy: Family<ReasonLabels, Counter>,
    /// Starts refused by a farm's queue: `farm_queue_full` or `caller_queue_full`.
    pub queue_refused: Family<ReasonLabels, Counter>,
    /// How long aggregations waited on their farm before they started upstream, by the class
    /// they waited in (`interactive`, `batch`, `refresh`).
    pub queue_wait: Family<ClassLabels, Histogram>,
    /// Results whose rows the shared store lost, fetched again from the upstream: `recovered`
    /// or `failed`.
    pub rows_refetched: Family<OutcomeLabels, Counter>,
    /// Calls the authorization policy denied: `unauthenticated`, `farm_not_allowed` or
    /// `priority_not_allowed`.
    pub authz_denied: Family<ReasonLabels, Counter>,
    /// Upstream aggregations run as parts of split ones.
    pub split_parts: Counter,
    /// Refresh-ahead: refreshes `queued`, and those that ended `completed` or `failed`.
    pub refreshes: Family<OutcomeLabels, Counter>,
    /// How far a RUNNING aggregation's predicted completion was from the real one, in seconds.
    pub estimate_error: Histogram,
    /// WatchAggregation streams open now.
    pub watch_streams: Gauge,
    /// GetAggregation long-polls waiting now.
    pub long_polls: Gauge,
    /// Per method: the OK counter and the latency histogram, resolved once.
    rpc_fast: Vec<(&'static str, Counter, Histogram)>,
    routes: RouteMetrics,
    levels: Arc<OnceLock<Box<dyn Fn() -> Levels + Send + Sync>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("dsg");
        let rpc_requests = Family::<RpcLabels, Counter>::default();
        registry.register("rpc_requests", "gRPC requests handled, by method and status code", rpc_requests.clone());
        let rpc_duration = Family::<MethodLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 3.0, 13))
        });
        registry.register_with_unit(
            "rpc_duration",
            "gRPC handling time, long-polls included",
            Unit::Seconds,
            rpc_duration.clone(),
        );
        let dispositions = Family::<DispositionLabels, Counter>::default();
        registry.register(
            "start_dispositions",
            "StartAggregation answers: started, joined or cached",
            dispositions.clone(),
        );
        let cache_hits = Counter::default();
        registry.register("cache_hits", "Starts answered from a valid cached result", cache_hits.clone());
        let derived = Counter::default();
        registry.register(
            "derived",
            "Starts answered from the rows of a valid cached result of a larger request (also counted in cache_hits)",
            derived.clone(),
        );
        let cache_misses = Counter::default();
        registry.register(
            "cache_misses",
            "Starts that found neither a running nor a cached aggregation",
            cache_misses.clone(),
        );
        let throttled = Family::<MethodLabels, Counter>::default();
        registry.register("throttled_requests", "requests refused by a caller's token bucket", throttled.clone());
        let upstream_calls = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_calls",
            "calls to Deadline Cloud, by operation and outcome",
            upstream_calls.clone(),
        );
        let upstream_duration = Family::<OperationLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 15))
        });
        registry.register_with_unit(
            "upstream_call_duration",
            "time of one call to Deadline Cloud",
            Unit::Seconds,
            upstream_duration.clone(),
        );
        let finished = Family::<StateLabels, Counter>::default();
        registry.register("aggregations_finished", "aggregations that reached a terminal state", finished.clone());
        let time_to_complete = Histogram::new(exponential_buckets(0.25, 2.0, 16));
        registry.register_with_unit(
            "aggregation_time_to_complete",
            "time from the first Start to COMPLETED",
            Unit::Seconds,
            time_to_complete.clone(),
        );
        let abandoned = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "aggregations_abandoned",
            "aggregations ended by the farm supervisor: crashed (the task died) or overran (the run limit)",
            abandoned.clone(),
        );
        let store_corrupt = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "store_corrupt",
            "ids in a farm's queue whose record was missing or unreadable, taken off the queue so the farm moves on",
            store_corrupt.clone(),
        );
        let start_outcome_unknown = Counter::default();
        registry.register(
            "upstream_start_outcome_unknown",
            "upstream Starts whose outcome is unknown (timeout, 5xx, lost response)",
            start_outcome_unknown.clone(),
        );
        let caller_limit_fallbacks = Family::<MethodLabels, Counter>::default();
        registry.register(
            "caller_limit_fallbacks",
            "callers' requests let through by this replica's own buckets while the shared ones could not be reached",
            caller_limit_fallbacks.clone(),
        );
        let start_offers = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "upstream_start_offers",
            "upstream aggregations started by a holder that lost its lease: left for the next holder, adopted by it, or lost",
            start_offers.clone(),
        );
        let busy = Family::<ReasonLabels, Counter>::default();
        registry.register("gateway_busy", "Starts refused by a gateway-wide bound, by bound", busy.clone());
        let queue_refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "queue_refused",
            "Starts refused by a farm's queue, by reason (farm_queue_full, caller_queue_full)",
            queue_refused.clone(),
        );
        let queue_wait = Family::<ClassLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.05, 2.0, 18))
        });
        registry.register_with_unit(
            "queue_wait",
            "time from an aggregation's Start to its upstream Start, by the class it waited in",
            Unit::Seconds,
            queue_wait.clone(),
        );
        let rows_refetched = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "rows_refetched",
            "results whose rows the shared store lost, fetched again from the upstream, by outcome",
            rows_refetched.clone(),
        );
        let authz_denied = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "authz_denied",
            "calls the authorization policy denied, by reason (unauthenticated, farm_not_allowed, priority_not_allowed)",
            authz_denied.clone(),
        );
        let split_parts = Counter::default();
        registry.register(
            "split_parts",
            "upstream aggregations run as parts of aggregations split because their result was too large",
            split_parts.clone(),
        );
        let refreshes = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "refreshes",
            "refresh-ahead: popular results re-run before they expire, by outcome (queued, completed, failed)",
            refreshes.clone(),
        );
        let estimate_error = Histogram::new(exponential_buckets(0.1, 2.0, 16));
        registry.register_with_unit(
            "estimate_error",
            "distance between a running aggregation's predicted and actual completion",
            Unit::Seconds,
            estimate_error.clone(),
        );
        let watch_streams = Gauge::default();
        registry.register("watch_streams", "WatchAggregation streams open now", watch_streams.clone());
        let long_polls = Gauge::default();
        registry.register("long_polls", "GetAggregation long-polls waiting now", long_polls.clone());
        for outcome in ["queued", "completed", "failed"] {
            let _ = refreshes.get_or_create(&OutcomeLabels { outcome });
        }
        for reason in ["farm_queue_full", "caller_queue_full"] {
            let _ = queue_refused.get_or_create(&ReasonLabels { reason });
        }
        for class in ["interactive", "batch", "refresh"] {
            let _ = queue_wait.get_or_create(&ClassLabels { class });
        }
        for reason in ["unauthenticated", "farm_not_allowed", "priority_not_allowed"] {
            let _ = authz_denied.get_or_create(&ReasonLabels { reason });
        }
        for outcome in ["recovered", "failed"] {
            let _ = rows_refetched.get_or_create(&OutcomeLabels { outcome });
        }
        for reason in ["crashed", "overran"] {
            let _ = abandoned.get_or_create(&ReasonLabels { reason });
        }
        for reason in ["missing", "unreadable"] {
            let _ = store_corrupt.get_or_create(&ReasonLabels { reason });
        }
        for reason in ["max_active_aggregations", "max_farms"] {
            let _ = busy.get_or_create(&ReasonLabels { reason });
        }
        // Series known in advance start at zero, so every family is exported from the start
        // and rate() sees the first increment.
        let mut rpc_fast = Vec::new();
        for method in ["StartAggregation", "GetAggregation"] {
            let ok = rpc_requests.get_or_create(&RpcLabels { method, code: "OK" }).clone();
            let duration = rpc_duration.get_or_create(&MethodLabels { method }).clone();
            rpc_fast.push((method, ok, duration));
            let _ = throttled.get_or_create(&MethodLabels { method });
        }
        for disposition in ["started", "joined", "cached"] {
            let _ = dispositions.get_or_create(&DispositionLabels { disposition });
        }
        for operation in [crate::upstream::START_OPERATION, crate::upstream::GET_OPERATION] {
            let route = crate::upstream::routes::DEFAULT_ROUTE.to_owned();
            let _ = upstream_calls.get_or_create(&UpstreamLabels { operation, outcome: "ok", route });
            let _ = upstream_duration.get_or_create(&OperationLabels { operation });
        }
        for state in ["COMPLETED", "FAILED", "TIMED_OUT"] {
            let _ = finished.get_or_create(&StateLabels { state });
        }
        let routes = RouteMetrics::register(&mut registry);
        let levels: Arc<OnceLock<Box<dyn Fn() -> Levels + Send + Sync>>> = Arc::default();
        registry.register_collector(Box::new(LevelsCollector(levels.clone())));
        Self {
            registry,
            rpc_requests,
            rpc_duration,
            dispositions,
            cache_hits,
            derived,
            cache_misses,
            throttled,
            upstream_calls,
            upstream_duration,
            finished,
            time_to_complete,
            abandoned,
            store_corrupt,
            start_outcome_unknown,
            caller_limit_fallbacks,
            start_offers,
            busy,
            queue_refused,
            queue_wait,
            rows_refetched,
            authz_denied,
            split_parts,
            refreshes,
            estimate_error,
            watch_streams,
            long_polls,
            rpc_fast,
            routes,
            levels,
        }
    }

    /// Names where scrape-time levels come from; the first call wins.
    pub fn observe_levels(&self, source: impl Fn() -> Levels + Send + Sync + 'static) {
        let _ = self.levels.set(Box::new(source));
    }

    /// Whether the coordination store answered its last check (true before levels are known).
    /// Upstream calls of `operation` so far: answered, throttled, and failed otherwise.
    pub fn upstream_totals(&self, operation: &'static str) -> (u64, u64, u64) {
        const FAILED: [&str; 7] =
            ["invalid", "not_found", "access_denied", "transient", "outcome_unknown", "not_routed", "other"];
        let routes: Vec<String> = self.routes.seen.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect();
        let count = |outcome: &'static str| {
            routes
                .iter()
                .map(|route| {
                    let labels = UpstreamLabels { operation, outcome, route: route.clone() };
                    self.upstream_calls.get(&labels).map_or(0, |c| c.get())
                })
                .sum::<u64>()
        };
        (count("ok"), count("throttled"), FAILED.iter().map(|o| count(o)).sum())
    }

    pub fn store_up(&self) -> bool {
        self.levels.get().is_none_or(|source| source().store_up)
    }

    pub fn rpc(&self, method: &'static str, code: tonic::Code, elapsed: Duration) {
        // The common case skips the families' label lookups.
        if let Some((_, ok, duration)) = self.rpc_fast.iter().find(|(m, _, _)| *m == method) {
            if code == tonic::Code::Ok {
                ok.inc();
            } else {
                self.rpc_requests.get_or_create(&RpcLabels { method, code: code_name(code) }).inc();
            }
            duration.observe(elapsed.as_secs_f64());
            return;
        }
        self.rpc_requests.get_or_create(&RpcLabels { method, code: code_name(code) }).inc();
        self.rpc_duration.get_or_create(&MethodLabels { method }).observe(elapsed.as_secs_f64());
    }

    pub fn upstream(&self, operation: &'static str, outcome: &'static str, route: &str, elapsed: Duration) {
        {
            let mut seen = self.routes.seen.lock().unwrap_or_else(|p| p.into_inner());
            if !seen.contains(route) {
                seen.insert(route.to_owned());
            }
        }
        self.upstream_calls.get_or_create(&UpstreamLabels { operation, outcome, route: route.to_owned() }).inc();
        self.upstream_duration.get_or_create(&OperationLabels { operation }).observe(elapsed.as_secs_f64());
    }

    /// A change of the routes file: `ok` or `invalid`.
    pub fn route_reload(&self, outcome: &'static str) {
        self.routes.reloads.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// A discovering route listed its farms: `ok` or `failed`.
    pub fn route_discovery(&self, route: &str, outcome: &'static str) {
        self.routes.discoveries.get_or_create(&RouteOutcomeLabels { route: route.to_owned(), outcome }).inc();
    }

    /// The routes table as rebuilt: the farms each route serves, and the farms in conflict.
    pub fn route_table(&self, farms: &std::collections::BTreeMap<String, usize>, conflicts: usize) {
        self.routes.farms.clear();
        for (route, n) in farms {
            self.routes.farms.get_or_create(&RouteLabels { route: route.clone() }).set(*n as i64);
        }
        self.routes.conflicts.set(conflicts as i64);
    }

    /// The OpenMetrics text exposition of every metric (what the library writes, `# EOF`
    /// included); served as [`OPENMETRICS_CONTENT_TYPE`].
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// The content type of [`Metrics::encode`]'s output.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Counts one open thing (a long-poll, a watch stream) in a gauge for as long as it lives.
#[derive(Debug)]
pub struct Open(Gauge);

impl Open {
    pub fn count(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The canonical name of a gRPC code, as label value.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FarmLabels {
    farm_id: String,
}

struct LevelsCollector(Arc<OnceLock<Box<dyn Fn() -> Levels + Send + Sync>>>);

impl std::fmt::Debug for LevelsCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LevelsCollector")
    }
}

impl prometheus_client::collector::Collector for LevelsCollector {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric as _;
        let Some(source) = self.0.get() else {
            return Ok(());
        };
        let l = source();
        let gauges = [
            ("aggregations_active", "queued and running aggregations", l.active_aggregations),
            ("cache_entries", "terminal aggregations held in the results cache", l.cache_entries),
            ("cache_bytes", "bytes of rows held in the results cache", l.cache_bytes),
            ("caller_buckets", "callers with a partly used token bucket", l.caller_buckets),
            (
                "store_up",
                "whether the coordination store answered its last check (1) or not (0)",
                u64::from(l.store_up),
            ),
        ];
        let store = l.store_memory.map(|[keys, used, max]| {
            [
                ("store_keys", "keys in the shared store (Redis DBSIZE)", keys),
                ("store_memory_bytes", "memory the shared store uses (Redis used_memory)", used),
                ("store_max_memory_bytes", "memory the shared store may use (Redis maxmemory; 0: no limit)", max),
            ]
        });
        for (name, help, value) in gauges.into_iter().chain(store.into_iter().flatten()) {
            let metric = ConstGauge::new(value as i64);
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)?;
        }
        let counters = [
            ("cache_expirations", "cached results dropped at the end of their validity", l.cache_expirations),
            ("cache_evictions", "cached results dropped to stay within the memory budget", l.cache_evictions),
        ];
        for (name, help, value) in counters {
            let metric = ConstCounter::new(value);
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)?;
        }
        let farms = bounded_farms(l.farms);
        let families = [
            ("farm_queue_depth", "aggregations waiting per farm (the busiest farms; the rest as farm_id=other)", false),
            (
                "farm_running",
                "aggregations running upstream per farm (the busiest farms; the rest as farm_id=other)",
                true,
            ),
        ];
        for (name, help, running) in families {
            let mut family =
                encoder.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Gauge)?;
            for farm in &farms {
                let labels = FarmLabels { farm_id: farm.farm_id.clone() };
                let value = if running { farm.running } else { farm.queued };
                ConstGauge::new(value as i64).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// The [`MAX_FARM_SERIES`] busiest farms, then the rest summed as `other`.
fn bounded_farms(mut farms: Vec<FarmLevel>) -> Vec<FarmLevel> {
    if farms.len() <= MAX_FARM_SERIES {
        return farms;
    }
    farms.sort_unstable_by(|a, b| (b.queued + b.running, &a.farm_id).cmp(&(a.queued + a.running, &b.farm_id)));
    let rest = farms.split_off(MAX_FARM_SERIES);
    let other = rest.into_iter().fold(FarmLevel { farm_id: "other".into(), queued: 0, running: 0 }, |mut o, f| {
        o.queued += f.queued;
        o.running += f.running;
        o
    });
    farms.push(other);
    farms
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_farm_series_are_bounded_and_the_rest_summed() {
        let farms: Vec<FarmLevel> =
            (0..1000u64).map(|n| FarmLevel { farm_id: format!("farm-{n:04}"), queued: n % 7, running: 1 }).collect();
        let bounded = bounded_farms(farms);
        assert_eq!(bounded.len(), MAX_FARM_SERIES + 1);
        assert!(bounded[..MAX_FARM_SERIES].iter().all(|f| f.queued == 6), "the busiest farms are named");
        let other = bounded.last().expect("other");
        assert_eq!(other.farm_id, "other");
        let total: u64 = bounded.iter().map(|f| f.queued + f.running).sum();
        assert_eq!(total, (0..1000u64).map(|n| n % 7 + 1).sum::<u64>(), "nothing is lost in the sum");
    }
}
