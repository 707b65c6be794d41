//! The gateway's core, free of any transport: coalescing on a canonical key, coordination
//! (the store, the results cache, wake-ups), per-farm queues driven under leases, caller
//! throttling and long-polls.
//!
//! - [`activity`]: what happened to each aggregation, for the operator console (history,
//!   written in the background, never read by the core).
//! - [`clock`]: the one wall clock, injected (tokio's paused time in tests).
//! - `config`: every setting of the core, its default, and the checks across settings.
//! - [`key`]: what makes two requests the same aggregation.
//! - `record`: one aggregation as the store holds it (owned values, no live objects).
//! - [`ids`]: minting aggregation ids that say which process made them.
//! - `derived`: answers cut out of a cached result that contains the request.
//! - [`coordination`]: the store of records and farm queues with its rules, in memory or in
//!   Redis; leases with fencing tokens; the results cache; wake-ups; run models.
//! - `scheduler`: farm workers, one per farm anywhere, holding the farm's lease.
//! - `lifecycle`: driving one aggregation upstream to a terminal state.
//! - [`rate`]: rates with a burst, as callers' limits and our upstream pacing are set.
//! - [`throttle`]: token buckets for callers (this replica's, or shared by every replica).
//! - `spans`: the lifecycle span of each aggregation, per process.
//! - [`refresh`]: refresh-ahead, popular results re-run before they expire.
//! - `estimate`: predicted start and completion times from observed run times.
//! - `watch`: one source per watched aggregation, feeding all its watchers.
//! - [`inspect`]: read-only views of farms, queues and aggregations for the operator console.
//! - [`paging`], [`backoff`], [`rows`], `error`: helpers and the refusals callers can see.
//!
//! A Start validates nothing itself (the transport hands it a validated request), takes a
//! caller token, and claims the key: joins, reuses or queues; it never waits on the upstream.

pub mod activity;
pub mod backoff;
pub mod clock;
pub(crate) mod config;
pub mod coordination;
mod derived;
pub(crate) mod error;
pub(crate) mod estimate;
pub mod ids;
pub mod inspect;
pub mod key;
pub(crate) mod lifecycle;
pub mod paging;
pub mod rate;
pub(crate) mod record;
pub mod refresh;
pub mod rows;
pub(crate) mod scheduler;
pub(crate) mod spans;
pub mod throttle;
pub(crate) mod watch;

pub use config::{GatewayConfig, defaults};
pub use coordination::{CachedResult, Coordination, Disposition, Freshness, StoreError};
pub use error::GatewayError;
pub use record::{AggregationId, AggregationRecord, Failure, FailureCode, Offer, Priority, Rows, SplitPart, State};

use crate::domain::AggregationRequest;
use crate::telemetry::Metrics;
use crate::telemetry::metrics::{DispositionLabels, FarmLevel, Levels, MethodLabels};
use crate::upstream::Upstream;
use coordination::pacing::RoutePacers;
use coordination::{
    AggregationStore, ClaimError, FarmLoad, Found, Limits, ResultsCache, StoreStats, Topology, Wakeups,
};
use error::RecoveryError;
use ids::{Bucket, IdMinter, Origin};
use key::CanonicalKey;
use lifecycle::UpstreamRunner;
use scheduler::{FarmDispatcher, WorkerSettings};
use spans::Spans;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use throttle::{CallerBuckets, Granted};
use tokio_util::sync::{CancellationToken, DropGuard};

/// How often farms with work and no worker are looked for.
const SCAN_INTERVAL: Duration = Duration::from_secs(1);
/// Ids whose lost rows were fetched again, remembered for a few seconds so readers who waited
/// on the same fetch share its answer (after a success, later ones find the rows in the results
/// cache).
const REFETCHES_REMEMBERED: u64 = 1024;

/// How often a long-poll re-reads its aggregation even without a wake-up (a lost notification
/// never strands a waiter).
const RECHECK_INTERVAL: Duration = Duration::from_secs(5);

/// One page of an aggregation, as Get answers it.
#[derive(Debug, Clone)]
pub struct Page {
    pub record: Arc<AggregationRecord>,
    /// While QUEUED: how many aggregations run on the farm before this one.
    pub queue_position: u32,
    /// A terminal result, with the shared encoding of its view.
    pub result: Option<Arc<CachedResult>>,
    /// The rows of this page: a range of the shared results.
    pub rows: Option<(Rows, Range<usize>)>,
    /// Where the next page starts, when there is one (its token: [`Page::next_page_token`]).
    pub next_offset: Option<usize>,
    /// While QUEUED or RUNNING: the predicted times.
    pub estimate: estimate::Estimate,
}

impl Page {
    /// The token of the next page, when there is one.
    pub fn next_page_token(&self) -> Option<String> {
        self.next_offset.map(|at| paging::encode(&self.record.id, at))
    }
}

/// How a caller wants a Start answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StartOptions {
    /// A cached result whose data is older than this is not reused.
    pub max_staleness: Option<Duration>,
    /// A result too large upstream is not split.
    pub no_split: bool,
    /// The class it waits in on its farm.
    pub priority: Priority,
    /// A larger cached result is not used to answer it.
    pub no_derive: bool,
}

/// What a Start answered.
#[derive(Debug, Clone)]
pub struct Started {
    pub record: Arc<AggregationRecord>,
    pub queue_position: u32,
    pub disposition: Disposition,
    /// STARTED or JOINED: the predicted times.
    pub estimate: estimate::Estimate,
}

/// What the gateway holds right now, for metrics and tests.
#[derive(Debug, Clone, Default)]
pub struct GatewayStats {
    pub store: StoreStats,
    pub farms: HashMap<String, FarmLoad>,
    pub start_callers: usize,
    pub get_callers: usize,
}

/// The gateway core. Dropping it stops its background work.
pub struct Gateway {
    store: Arc<dyn AggregationStore>,
    results: Arc<ResultsCache>,
    wakeups: Arc<Wakeups>,
    dispatcher: FarmDispatcher,
    runner: Arc<UpstreamRunner>,
    /// Rows being fetched again after the shared store lost them, one fetch per id.
    refetches: moka::future::Cache<AggregationId, Result<Arc<CachedResult>, RecoveryError>>,
    spans: Arc<Spans>,
    activity: Arc<activity::Activity>,
    ids: Arc<IdMinter>,
    limits: Limits,
    min_remaining_validity: Duration,
    /// `--derive`: answers derived from a larger cached result.
    derive: bool,
    /// How rows are encoded, and read back to derive answers.
    codec: rows::RowCodec,
    start_buckets: Arc<Option<CallerBuckets>>,
    get_buckets: Arc<Option<CallerBuckets>>,
    max_wait: Duration,
    metrics: Arc<Metrics>,
    /// The sources of WatchAggregation streams.
    watches: Arc<watch::Watches>,
    /// The least time between two upstream Starts, for estimates.
    start_gap: Duration,
    clock: clock::Clock,
    /// Set once a drain began: Starts are refused, running work goes on.
    draining: CancellationToken,
    cancel: CancellationToken,
    _stop_on_drop: DropGuard,
}

impl Gateway {
    /// Builds the gateway over `upstream` with the in-memory store, reporting to `metrics` and
    /// keeping results as `codec` encodes them, and starts its background work; needs a Tokio
    /// runtime.
    pub fn new(
        config: GatewayConfig,
        upstream: Arc<dyn Upstream>,
        metrics: Arc<Metrics>,
        codec: rows::RowCodec,
    ) -> Self {
        let coordination = Coordination::memory(&config.coordination());
        Self::with_store(config, coordination, upstream, metrics, codec)
    }

    /// Builds the gateway on `coordination`: the store, this replica's results cache and
    /// wake-ups, and where the upstream pacing tokens come from.
    pub fn with_store(
        config: GatewayConfig,
        coordination: Coordination,
        upstream: Arc<dyn Upstream>,
        metrics: Arc<Metrics>,
        codec: rows::RowCodec,
    ) -> Self {
        let Coordination {
            store,
            activity,
            results,
            wakeups,
            upstream_rates,
            caller_start_tokens,
            caller_get_tokens,
            epochs,
            clock,
        } = coordination;
        // Every wall-clock reading is the store's: the same on every replica.
        let config = GatewayConfig { clock, ..config };
        let cancel = CancellationToken::new();
        store.spawn_background(cancel.clone());
        let spans = Arc::new(Spans::default());
        let activity = Arc::new(activity::Activity::new(activity, config.clock.clone(), cancel.clone()));
        let runner = Arc::new(UpstreamRunner {
            activity: activity.clone(),
            upstream,
            store: store.clone(),
            pacers: RoutePacers::new(upstream_rates, config.upstream_start, config.upstream_get),
            config: config.lifecycle.clone(),
            metrics: metrics.clone(),
            encoder: codec.encode,
            spans: spans.clone(),
            clock: config.clock.clone(),
        });
        let settings = WorkerSettings {
            holder: format!("{}-{}", config.instance_id, std::process::id()),
            lease_ttl: config.lease_ttl,
            run_limit: config.run_limit.unwrap_or(config.lifecycle.result_validity),
            scan_interval: SCAN_INTERVAL,
            clock: config.clock.clone(),
        };
        let settings_holder = settings.holder.clone();
        let dispatcher = FarmDispatcher::new(store.clone(), runner.clone(), wakeups.clone(), settings, cancel.clone());
        let start_gap = config.upstream_start.interval_and_burst().map_or(Duration::ZERO, |(gap, _)| gap);
        let watches = Arc::new(watch::Watches::new(
            store.clone(),
            wakeups.clone(),
            start_gap,
            config.clock.clone(),
            cancel.clone(),
        ));
        let gateway = Self {
            store,
            results,
            wakeups,
            dispatcher,
            runner,
            refetches: moka::future::Cache::builder()
                .max_capacity(REFETCHES_REMEMBERED)
                .time_to_live(Duration::from_secs(10))
                .build(),
            spans,
            activity,
            ids: Arc::new(match epochs {
                Some(epochs) => IdMinter::per_bucket(|b| epochs.get(b.index()).copied().unwrap_or_default()),
                None => IdMinter::new(),
            }),
            limits: Limits {
                queue_capacity: config.farm_queue_capacity,
                max_live: config.max_active_aggregations,
                max_farms: config.max_farms,
                caller_capacity: Limits::caller_capacity(config.farm_queue_capacity, config.farm_queue_caller_share),
                fair: config.fair_queueing,
            },
            min_remaining_validity: config.min_remaining_validity,
            derive: config.derive,
            codec,
            start_buckets: Arc::new(CallerBuckets::shared(config.caller_start, caller_start_tokens)),
            get_buckets: Arc::new(CallerBuckets::shared(config.caller_get, caller_get_tokens)),
            max_wait: config.max_wait,
            metrics,
            watches,
            start_gap,
            clock: config.clock.clone(),
            draining: CancellationToken::new(),
            _stop_on_drop: cancel.clone().drop_guard(),
            cancel,
        };
        gateway.metrics.observe_levels(gateway.levels_source());
        let refresher = refresh::Refresher {
            store: gateway.store.clone(),
            ids: gateway.ids.clone(),
            dispatcher: gateway.dispatcher.clone(),
            metrics: gateway.metrics.clone(),
            activity: gateway.activity.clone(),
            limits: gateway.limits,
            config: config.refresh,
            every: config.housekeeping_interval,
            clock: config.clock.clone(),
            stop: gateway.draining.clone(),
        };
        tokio::spawn(refresher.run());
        tokio::spawn(heartbeat(
            gateway.activity.clone(),
            gateway.dispatcher.clone(),
            settings_holder,
            gateway.clock.clone(),
            gateway.cancel.clone(),
        ));
        tokio::spawn(housekeeping(
            gateway.store.clone(),
            gateway.ids.clone(),
            [gateway.start_buckets.clone(), gateway.get_buckets.clone()],
            config.housekeeping_interval,
            gateway.cancel.clone(),
        ));
        gateway
    }

    /// A scrape-time view of the gateway's levels that does not keep the gateway alive.
    fn levels_source(&self) -> impl Fn() -> Levels + Send + Sync + 'static {
        let store = Arc::downgrade(&self.store);
        let buckets = [Arc::downgrade(&self.start_buckets), Arc::downgrade(&self.get_buckets)];
        move || {
            let Some(store) = store.upgrade() else {
                return Levels::default();
            };
            let s = store.stats();
            Levels {
                active_aggregations: s.active as u64,
                cache_entries: s.cached,
                cache_bytes: s.cached_bytes,
                cache_expirations: s.expirations,
                cache_evictions: s.evictions,
                farms: s
                    .farms
                    .into_iter()
                    .map(|(farm_id, l)| FarmLevel { farm_id, queued: l.queued as u64, running: l.running as u64 })
                    .collect(),
                store_up: s.up,
                store_memory: s.memory.map(|m| [m.keys, m.used_bytes, m.max_bytes]),
                caller_buckets: buckets
                    .iter()
                    .filter_map(std::sync::Weak::upgrade)
                    .map(|b| b.as_ref().as_ref().map_or(0, |b| b.len() as u64))
                    .sum(),
            }
        }
    }

    /// Starts, joins or reuses the aggregation for `request` as `options` say.
    pub async fn start(
        &self,
        caller: &str,
        request: &AggregationRequest,
        options: StartOptions,
    ) -> Result<Started, GatewayError> {
        let StartOptions { max_staleness, no_split, priority, no_derive } = options;
        if self.draining.is_cancelled() || self.cancel.is_cancelled() {
            return Err(GatewayError::ShuttingDown);
        }
        self.take_token(&self.start_buckets, caller, "StartAggregation").await?;
        if let Err(not_routed) = self.runner.upstream.route(&request.farm_id) {
            return Err(GatewayError::FarmNotRouted { farm_id: request.farm_id.clone(), reason: not_routed.message });
        }
        let key = if no_split { CanonicalKey::new(request).no_split() } else { CanonicalKey::new(request) };
        let freshness = Freshness { min_remaining: self.min_remaining_validity, max_staleness };
        if self.derive
            && !no_derive
            && let Some(started) = self.derived(caller, &key, &freshness, priority).await
        {
            return Ok(started);
        }
        let farm = key.farm_id();
        let mut claimed = self.store.claim(&key, &freshness, &self.limits, self.ids.mint(farm), caller, priority).await;
        if let Err(ClaimError::NewEpoch) = claimed {
            // The shared store lost the farm's bucket's state since this replica last looked:
            // its ids are minted in the new epoch from now on.
            refresh_epoch(self.store.as_ref(), &self.ids, Bucket::of_farm(farm)).await;
            claimed = self.store.claim(&key, &freshness, &self.limits, self.ids.mint(farm), caller, priority).await;
        }
        let claimed = claimed.inspect_err(|e| {
            use crate::telemetry::metrics::ReasonLabels;
            let (family, reason) = match e {
                ClaimError::Busy { bound, .. } => (&self.metrics.busy, bound.name()),
                ClaimError::QueueFull { .. } => (&self.metrics.queue_refused, "farm_queue_full"),
                ClaimError::CallerQueueFull { .. } => (&self.metrics.queue_refused, "caller_queue_full"),
                ClaimError::NewEpoch | ClaimError::Store(_) => return,
            };
            family.get_or_create(&ReasonLabels { reason }).inc();
        })?;
        let label = match claimed.disposition {
            Disposition::Started => {
                self.metrics.cache_misses.inc();
                self.dispatcher.kick(key.farm_id());
                "started"
            }
            Disposition::Joined => "joined",
            // Claims answer neither: a derived answer is given before the claim.
            Disposition::Cached | Disposition::Derived => {
                self.metrics.cache_hits.inc();
                "cached"
            }
        };
        self.metrics.dispositions.get_or_create(&DispositionLabels { disposition: label }).inc();
        if claimed.disposition != Disposition::Cached {
            self.spans.link_from_current(&claimed.record);
            let (caller, trace_id) = (caller.to_owned(), self.spans.trace_id(&claimed.record));
            let what = match claimed.disposition {
                Disposition::Started => activity::What::Queued { caller: Some(caller), trace_id },
                _ => activity::What::Joined { caller, trace_id },
            };
            self.activity.record(&claimed.record, what);
        }
        tracing::debug!(aggregation = %claimed.record.id, disposition = ?claimed.disposition, "start answered");
        let estimate = match claimed.disposition {
            Disposition::Cached | Disposition::Derived => estimate::Estimate::default(),
            Disposition::Started | Disposition::Joined => {
                self.estimate_of(&claimed.record, claimed.queue_position).await
            }
        };
        Ok(Started {
            record: claimed.record,
            queue_position: claimed.queue_position,
            disposition: claimed.disposition,
            estimate,
        })
    }

    /// Reads an aggregation and one page of its rows, waiting up to `wait` (capped by the
    /// configured maximum) for it to become terminal. `may_read` is asked about the
    /// aggregation's farm before anything of it is answered or waited for.
    pub async fn get(
        &self,
        caller: &str,
        id: &str,
        page_size: i32,
        page_token: &str,
        wait: Duration,
        may_read: &(dyn Fn(&str) -> Result<(), GatewayError> + Sync),
    ) -> Result<Page, GatewayError> {
        self.take_token(&self.get_buckets, caller, "GetAggregation").await?;
        let size = paging::page_size(page_size)?;
        let offset = if page_token.is_empty() { 0 } else { paging::decode(page_token, id)? };
        // The hot path: a terminal result held by this replica. Its expiry is checked by the
        // cheap reading: a few milliseconds early at worst.
        if let Some(result) = self.results.get(id) {
            may_read(result.record.farm_id())?;
            return terminal_page(id, result, offset, size, self.clock.now_or_later());
        }
        // Boxed: the reads and the long-poll hold a large state that a cache hit, whose future
        // every Get allocates, would otherwise carry too.
        Box::pin(self.read_or_wait(id, offset, size, wait, may_read)).await
    }

    /// [`Self::get`] of an aggregation this replica holds no terminal result of: read from the
    /// store, waiting up to `wait` for it to become terminal.
    async fn read_or_wait(
        &self,
        id: &str,
        offset: usize,
        size: usize,
        wait: Duration,
        may_read: &(dyn Fn(&str) -> Result<(), GatewayError> + Sync),
    ) -> Result<Page, GatewayError> {
        let wait = wait.min(self.max_wait);
        let deadline = tokio::time::Instant::now() + wait;
        let mut waiter = (!wait.is_zero()).then(|| self.wakeups.waiter(id));
        let _waiting = waiter.as_ref().map(|_| crate::telemetry::metrics::Open::count(&self.metrics.long_polls));
        loop {
            let found = self.store.read(id).await.map_err(GatewayError::reading(id))?;
            let (record, queue_position) = match found {
                Found::Terminal(result) => {
                    may_read(result.record.farm_id())?;
                    return terminal_page(id, result, offset, size, self.clock.now());
                }
                Found::Active { record, queue_position } => {
                    may_read(record.farm_id())?;
                    (record, queue_position)
                }
                Found::Expired(at) => return Err(GatewayError::Expired { id: id.to_owned(), at }),
                Found::Evicted => return Err(GatewayError::Evicted { id: id.to_owned() }),
                Found::RowsLost(record) => {
                    may_read(record.farm_id())?;
                    // Boxed: a rare path whose future (upstream calls) would otherwise
                    // weigh on every long-poll's.
                    let result = Box::pin(self.recover_rows(record)).await?;
                    return terminal_page(id, result, offset, size, self.clock.now());
                }
                Found::Large(record) => {
                    may_read(record.farm_id())?;
                    return Box::pin(self.large_page(id, record, offset, size)).await;
                }
                Found::Unknown => return Err(Box::pin(self.unknown(id)).await),
            };
            let now = tokio::time::Instant::now();
            let Some(waiter) = waiter.as_mut().filter(|_| now < deadline) else {
                return Ok(self.active_page(record, queue_position).await);
            };
            tokio::select! {
                () = waiter.woken() => {}
                () = tokio::time::sleep_until(deadline.min(now + RECHECK_INTERVAL)) => {}
                () = self.cancel.cancelled() => return Ok(self.active_page(record, queue_position).await),
            }
        }
    }

    /// Follows an aggregation: its current view at once, then each change, until it is
    /// terminal. Throttled and authorized (`may_read`) as a Get.
    pub async fn watch(
        &self,
        caller: &str,
        id: &str,
        may_read: &(dyn Fn(&str) -> Result<(), GatewayError> + Sync),
    ) -> Result<tokio::sync::watch::Receiver<watch::View>, GatewayError> {
        self.take_token(&self.get_buckets, caller, "WatchAggregation").await?;
        if let Some(result) = self.results.get(id) {
            may_read(result.record.farm_id())?;
            return Ok(self.watches.subscribe(watch::View::terminal(result.record.clone())));
        }
        let found = self.store.read(id).await.map_err(GatewayError::reading(id))?;
        match &found {
            Found::Active { record, .. } | Found::RowsLost(record) | Found::Large(record) => {
                may_read(record.farm_id())?;
            }
            Found::Terminal(result) => may_read(result.record.farm_id())?,
            Found::Expired(at) => return Err(GatewayError::Expired { id: id.to_owned(), at: *at }),
            Found::Evicted => return Err(GatewayError::Evicted { id: id.to_owned() }),
            Found::Unknown => return Err(self.unknown(id).await),
        }
        match watch::view_of(self.store.as_ref(), found, self.start_gap, self.clock.now())
            .await
            .map_err(GatewayError::StoreUnavailable)?
        {
            Some(view) => Ok(self.watches.subscribe(view)),
            None => Err(GatewayError::NotFound { id: id.to_owned() }),
        }
    }

    /// The refusal for an id the store does not know: never made, or made in a state since lost.
    async fn unknown(&self, id: &str) -> GatewayError {
        let shared = self.store.topology() == Topology::Shared;
        if shared && let Some(bucket) = Bucket::of_id(id) {
            // The store may have lost the bucket's state since housekeeping last looked.
            refresh_epoch(self.store.as_ref(), &self.ids, bucket).await;
        }
        match self.ids.origin(id) {
            Origin::Elsewhere if shared => GatewayError::SharedStateLost { id: id.to_owned() },
            Origin::Elsewhere => GatewayError::Lost { id: id.to_owned() },
            Origin::Ours | Origin::Malformed => GatewayError::NotFound { id: id.to_owned() },
        }
    }

    /// A page of a queued or running aggregation: its state and predicted times.
    async fn active_page(&self, record: Arc<AggregationRecord>, queue_position: u32) -> Page {
        let estimate = self.estimate_of(&record, queue_position).await;
        Page { record, queue_position, estimate, result: None, rows: None, next_offset: None }
    }

    /// The estimate of an active aggregation (none when the store cannot say).
    async fn estimate_of(&self, record: &AggregationRecord, queue_position: u32) -> estimate::Estimate {
        estimate::of(self.store.as_ref(), record, queue_position, self.start_gap, self.clock.now())
            .await
            .unwrap_or_default()
    }

    /// The rows of a COMPLETED aggregation that the shared store lost, fetched again from the
    /// upstream with the recorded upstream id and put back; concurrent readers of one id on
    /// this replica share one fetch.
    async fn recover_rows(&self, record: Arc<AggregationRecord>) -> Result<Arc<CachedResult>, GatewayError> {
        if let Some(source) = record.derived_from.clone() {
            return self.recover_derived(record, &source).await;
        }
        let id = record.id.clone();
        let (runner, store, metrics) = (self.runner.clone(), self.store.clone(), self.metrics.clone());
        let fetch = async move {
            tracing::warn!(aggregation = %record.id, upstream = ?record.upstream_id, "the shared store lost the rows of a completed aggregation; fetching them again");
            let fetched = match runner.refetch(&record).await {
                Ok(rows) => store.restore_rows(record, Arc::new(rows)).await.map_err(RecoveryError::Store),
                Err(failure) => Err(RecoveryError::Upstream(failure)),
            };
            let outcome = if fetched.is_ok() { "recovered" } else { "failed" };
            metrics.rows_refetched.get_or_create(&crate::telemetry::metrics::OutcomeLabels { outcome }).inc();
            fetched
        };
        // A failure is remembered as long as a success, so callers polling a lost result do
        // not each cost a round of upstream calls.
        self.refetches.get_with(id.clone(), fetch).await.map_err(|cause| {
            tracing::warn!(aggregation = %id, %cause, "could not fetch the lost rows again");
            GatewayError::ResultsLost { id: id.to_string(), cause }
        })
    }

    /// Aggregations watched in this process: one source each, whatever the watchers.
    pub fn watch_sources(&self) -> usize {
        self.watches.sources()
    }

    /// Begins a drain: Starts are refused from now on, while queued and running aggregations
    /// go on and long-polls keep waiting for them.
    ///
    /// With a shared store, each farm worker finishes the aggregation it runs and hands its
    /// farm over to another replica; alone, the queues keep being worked.
    pub fn begin_drain(&self) {
        self.draining.cancel();
        if self.store.topology() == Topology::Shared {
            self.dispatcher.hand_over();
        }
    }

    /// Resolves once this replica's work is done: with a shared store, when it drives no farm;
    /// alone, when no aggregation is queued or running.
    pub async fn drained(&self) {
        let busy = || match self.store.topology() {
            Topology::Shared => self.dispatcher.working() > 0,
            Topology::Local => self.store.stats().active > 0,
        };
        while busy() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops farm workers and housekeeping, and makes long-polls return at once with the
    /// state they see.
    pub fn shutdown(&self) {
        self.draining.cancel();
        self.cancel.cancel();
    }

    /// After [`Self::shutdown`]: gives up the farm leases this replica still holds (its
    /// workers were stopped mid-aggregation), so other replicas resume those aggregations at
    /// once.
    pub async fn release_farms(&self) {
        self.dispatcher.release_all().await;
    }

    async fn take_token(
        &self,
        buckets: &Option<CallerBuckets>,
        caller: &str,
        operation: &'static str,
    ) -> Result<(), GatewayError> {
        let Some(b) = buckets else { return Ok(()) };
        match b.check(caller).await {
            Ok(Granted::Local | Granted::Shared) => Ok(()),
            Ok(Granted::Fallback) => {
                self.metrics.caller_limit_fallbacks.get_or_create(&MethodLabels { method: operation }).inc();
                Ok(())
            }
            Err(retry_after) => {
                self.metrics.throttled.get_or_create(&MethodLabels { method: operation }).inc();
                Err(GatewayError::RateLimited { operation, retry_after })
            }
        }
    }

    pub fn stats(&self) -> GatewayStats {
        let store = self.store.stats();
        GatewayStats {
            farms: store.farms.clone(),
            store,
            start_callers: self.start_buckets.as_ref().as_ref().map_or(0, CallerBuckets::len),
            get_callers: self.get_buckets.as_ref().as_ref().map_or(0, CallerBuckets::len),
        }
    }
}

/// Follows a shared store's epoch of `bucket`: after its state was lost, new ids carry the new
/// one.
async fn refresh_epoch(store: &dyn AggregationStore, ids: &IdMinter, bucket: Bucket) {
    if let Ok(Some(epoch)) = store.epoch(bucket).await {
        ids.retag(bucket, epoch);
    }
}

/// Buckets whose epoch housekeeping looks at each round: every bucket within
/// `Bucket::COUNT / EPOCHS_PER_ROUND` rounds (a lost state is also noticed by the next claim or
/// Get of its bucket).
const EPOCHS_PER_ROUND: usize = 8;

/// A page of a terminal result; an expired COMPLETED one is refused.
impl Gateway {
    /// A page of a result too large for this replica's results cache, read from the store
    /// alone (its rows gone meanwhile: fetched again from the upstream, as a lost result's).
    async fn large_page(
        &self,
        id: &str,
        record: Arc<AggregationRecord>,
        offset: usize,
        size: usize,
    ) -> Result<Page, GatewayError> {
        if let Some(at) = record.expired_at(self.clock.now()) {
            return Err(GatewayError::Expired { id: id.to_owned(), at });
        }
        let total = usize::try_from(record.row_count).unwrap_or(usize::MAX);
        if offset > total {
            return Err(paging::past_the_end());
        }
        let end = total.min(offset + size);
        let Some(rows) = self.store.rows_page(&record, offset..end).await.map_err(GatewayError::reading(id))? else {
            let result = self.recover_rows(record).await?;
            return terminal_page(id, result, offset, size, self.clock.now());
        };
        let next_offset = (end < total).then_some(end);
        let range = 0..rows.len();
        let result = Arc::new(CachedResult::new(record.clone(), None));
        Ok(Page {
            record,
            queue_position: 0,
            result: Some(result),
            rows: Some((Arc::new(rows), range)),
            next_offset,
            estimate: Default::default(),
        })
    }
}

fn terminal_page(
    id: &str,
    result: Arc<CachedResult>,
    offset: usize,
    size: usize,
    now: SystemTime,
) -> Result<Page, GatewayError> {
    let record = result.record.clone();
    if let Some(at) = record.expired_at(now) {
        return Err(GatewayError::Expired { id: id.to_owned(), at });
    }
    let (rows, next_offset) = match &result.rows {
        Some(all) => {
            if offset > all.len() {
                return Err(paging::past_the_end());
            }
            let end = all.len().min(offset + size);
            (Some((all.clone(), offset..end)), (end < all.len()).then_some(end))
        }
        None => (None, None),
    };
    Ok(Page { record, queue_position: 0, result: Some(result), rows, next_offset, estimate: Default::default() })
}

/// Says every [`activity::HEARTBEAT_INTERVAL`] that this replica is alive, and which farms it
/// holds, for the operator console.
async fn heartbeat(
    activity: Arc<activity::Activity>,
    dispatcher: FarmDispatcher,
    id: String,
    clock: clock::Clock,
    cancel: CancellationToken,
) {
    let started_ms = activity::millis(clock.now());
    let mut every = crate::every::Every::new(activity::HEARTBEAT_INTERVAL, cancel);
    while every.tick().await {
        let held = dispatcher.held_farms();
        let replica = activity::Replica {
            id: id.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_ms,
            seen_ms: activity::millis(clock.now()),
            farms_held: held.len(),
            farms: held.into_iter().take(activity::HEARTBEAT_FARMS).collect(),
        };
        if let Err(e) = activity.log().heartbeat(&replica).await {
            tracing::debug!(error = %e, "heartbeat not recorded");
        }
    }
}

async fn housekeeping(
    store: Arc<dyn AggregationStore>,
    ids: Arc<IdMinter>,
    buckets: [Arc<Option<CallerBuckets>>; 2],
    every: Duration,
    cancel: CancellationToken,
) {
    let mut every = crate::every::Every::new(every, cancel);
    let mut round = 0;
    while every.tick().await {
        store.housekeeping().await;
        for bucket in Bucket::all().skip(round % usize::from(Bucket::COUNT)).take(EPOCHS_PER_ROUND) {
            refresh_epoch(store.as_ref(), &ids, bucket).await;
        }
        round += EPOCHS_PER_ROUND;
        for b in buckets.iter().filter_map(|b| b.as_ref().as_ref()) {
            b.housekeeping();
        }
    }
}
