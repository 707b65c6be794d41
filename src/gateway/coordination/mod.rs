//! Coordination: what makes many callers, and many replicas, one gateway. The contract is the
//! [`AggregationStore`] trait of owned records: claim a key (start, join or answer from cache),
//! read an id, and, for a farm's lease holder, take the head of its queue and write the
//! aggregation's next state, fenced by the lease's token.
//!
//! - `policy`: every rule a store follows (freshness, bounds, the fair order of a farm's queue,
//!   refresh eligibility), written once; the Redis scripts mirror it.
//! - `farm_queue`: one farm's queue in the memory store, in that order.
//! - `memory`: the store of one process, its rows in the `results` cache.
//! - [`redis`]: the store shared by replicas through Redis, its Lua scripts in files.
//! - [`lease`]: farm leases with fencing tokens.
//! - `results`: this replica's results cache (where the memory store keeps rows; the Redis
//!   store's near-cache).
//! - [`wakeups`]: this replica's long-poll and watch wake-ups.
//! - `run_model`: each farm's observed run times.
//! - [`pacing`]: where the gateway's upstream calls take their pacing tokens, and where callers'
//!   tokens come from when their limits hold across replicas.
//!
//! [`Coordination`] is what a backend gives the gateway; the gateway never names a backend.
//! Nothing here knows of tonic, the SDK, spans or metrics.

pub(crate) mod farm_queue;
pub mod lease;
pub(crate) mod memory;
pub mod pacing;
pub(crate) mod policy;
pub mod redis;
pub(crate) mod results;
pub(crate) mod run_model;
pub mod wakeups;

pub use lease::{FarmLeases, Lease};
pub use memory::MemoryStore;
pub use policy::{Freshness, Limits};
pub use results::{CachedResult, ResultsCache};
pub use run_model::RunModel;
pub use wakeups::Wakeups;

use super::clock::Clock;
use super::ids::Bucket;
use super::key::CanonicalKey;
use super::rate::{CallerLimits, Rate};
use super::record::{AggregationId, AggregationRecord, Offer, Priority, Rows};
use super::rows::RowBlock;
use pacing::CallerTokens;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

/// How a Start was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Disposition {
    /// A new aggregation was queued.
    Started,
    /// An identical aggregation is queued or running.
    Joined,
    /// An identical aggregation is terminal and still valid.
    Cached,
    /// A valid COMPLETED result of a larger request contains it exactly: a new COMPLETED
    /// aggregation holds its rows, cut out of that result.
    Derived,
}

/// An aggregation as a read finds it.
#[derive(Debug, Clone)]
pub enum Found {
    /// Queued or running, with how many aggregations are ahead of it on its farm.
    Active {
        record: Arc<AggregationRecord>,
        queue_position: u32,
    },
    /// Terminal and readable: COMPLETED with its rows, or FAILED / TIMED_OUT (a failure stays
    /// readable after its TTL, so its id still says why).
    Terminal(Arc<CachedResult>),
    /// Its results passed their validity at this time.
    Expired(SystemTime),
    /// Its results were dropped to stay within the memory budget.
    Evicted,
    /// COMPLETED, but the store lost its rows (a shared store's eviction or failover) while
    /// the record survived: the rows can be fetched again with its upstream id.
    RowsLost(Arc<AggregationRecord>),
    /// COMPLETED, with rows larger than this replica's results cache may hold: read page by
    /// page ([`AggregationStore::rows_page`]), never held whole.
    Large(Arc<AggregationRecord>),
    Unknown,
}

impl Found {
    /// A terminal result as a read finds it at `now`: an expired COMPLETED one says when it
    /// expired.
    pub fn terminal(result: Arc<CachedResult>, now: SystemTime) -> Self {
        match result.record.expired_at(now) {
            Some(at) => Self::Expired(at),
            None => Self::Terminal(result),
        }
    }
}

/// The head of a farm's queue, as its lease holder finds it.
#[derive(Debug, Clone)]
pub enum Head {
    Empty,
    /// The aggregation to drive.
    Ready(Arc<AggregationRecord>),
    /// An id whose record the store lost or cannot read: its holder discards it
    /// ([`AggregationStore::discard`]) so the farm moves on.
    Broken {
        id: String,
        fault: QueueFault,
    },
}

/// What is wrong with an id in a farm's queue.
#[derive(Debug, Clone, thiserror::Error)]
pub enum QueueFault {
    /// Its record is gone (deleted by hand, evicted, lost in a failover).
    #[error("its record is missing")]
    Missing,
    /// Its record cannot be read (written by another version, edited by hand).
    #[error(transparent)]
    Unreadable(StoreError),
}

impl QueueFault {
    /// The fault's name, as metrics label it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Unreadable(_) => "unreadable",
        }
    }
}

/// What a claim answers with.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub record: Arc<AggregationRecord>,
    /// While QUEUED: how many aggregations are ahead of it on its farm.
    pub queue_position: u32,
    pub disposition: Disposition,
}

/// Whether a fenced write landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Done,
    /// A newer lease holder exists, or the aggregation is no longer active: the writer must
    /// stop.
    Fenced,
}

/// Queue depth and running count of one farm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FarmLoad {
    /// Aggregations waiting behind the running one (all of the queue when none runs).
    pub queued: usize,
    /// 1 while the farm's head runs upstream.
    pub running: usize,
}

impl FarmLoad {
    /// A farm whose queue holds `len` aggregations, its head running or not.
    pub fn of(len: usize, head_running: bool) -> Self {
        let running = usize::from(head_running && len > 0);
        Self { queued: len - running, running }
    }
}

/// What a store holds, the same on every store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Queued and running aggregations.
    pub active: usize,
    /// Results in this replica's results cache, and their bytes.
    pub cached: u64,
    pub cached_bytes: u64,
    /// Cached results dropped at the end of their validity, since start.
    pub expirations: u64,
    /// Cached results dropped to stay within the memory budget, since start.
    pub evictions: u64,
    /// Farms with work.
    pub farms: HashMap<String, FarmLoad>,
    /// Whether the store answered its last housekeeping (always, in memory).
    pub up: bool,
    /// A shared store's own memory, as it last said (`None`: in this process).
    pub memory: Option<StoreMemory>,
}

/// What a shared store holds of its own memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreMemory {
    /// Keys in its database (every replica's, under every prefix).
    pub keys: u64,
    /// Bytes it uses (`used_memory`), and may use (`maxmemory`; 0: no limit).
    pub used_bytes: u64,
    pub max_bytes: u64,
}

/// Who else sees a store's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// This process alone: its state lives and dies with it.
    Local,
    /// Every replica on the same store: a farm may be taken over by another replica, and the
    /// state can be lost apart from this process (it then begins a new epoch).
    Shared,
}

/// A gateway-wide bound a claim may meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bound {
    /// `--max-active-aggregations`.
    ActiveAggregations,
    /// `--max-farms`.
    Farms,
}

impl Bound {
    /// The setting's name, as metrics and refusals say it.
    pub fn name(self) -> &'static str {
        match self {
            Self::ActiveAggregations => "max_active_aggregations",
            Self::Farms => "max_farms",
        }
    }
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a claim queued nothing.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClaimError {
    #[error("the queue of farm {farm_id} is full ({capacity} aggregations wait already)")]
    QueueFull { farm_id: String, capacity: usize },
    /// The caller's share of the farm's queue is taken (`--farm-queue-caller-share`).
    #[error("this caller already has {capacity} aggregations waiting on farm {farm_id}, its share of the farm's queue")]
    CallerQueueFull { farm_id: String, capacity: usize },
    #[error("the gateway holds as much work as it is allowed ({bound} = {limit})")]
    Busy { bound: Bound, limit: usize },
    /// The shared store lost its state since the id was minted: mint one in the new epoch.
    #[error("the shared store lost its state and began a new epoch since this replica last looked")]
    NewEpoch,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The cause of a store error, whatever the backend.
pub type Cause = Arc<dyn std::error::Error + Send + Sync>;

/// Why the store could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// It could not be reached, or did not answer in time.
    #[error("the shared store is unavailable: {0}")]
    Unavailable(#[source] Cause),
    /// Its memory is full and it refuses writes that would grow it (`OOM` under `noeviction`).
    #[error("the shared store is full: {0}")]
    Full(#[source] Cause),
    /// A write that guards the one-running rule reached the primary, but not the replicas it
    /// must reach before the gateway acts on it.
    #[error(
        "the shared store took the write, but only {acked} of the {wanted} replicas to wait for acknowledged it within {within:?}"
    )]
    NotReplicated { wanted: u32, acked: u32, within: Duration },
    /// It holds something this gateway cannot read: a record of another version, an edit by hand.
    #[error("the shared store holds {what} that this gateway cannot read")]
    Corrupt {
        what: String,
        #[source]
        source: Option<Cause>,
    },
    /// A script answered something it never answers.
    #[error("the shared store's {script} script answered {answer:?}")]
    UnexpectedAnswer { script: &'static str, answer: String },
    /// A plain URL names a node of a Redis Cluster (or a cluster-mode service: MemoryDB,
    /// ElastiCache Serverless): one connection would reach one shard only.
    #[error(
        "Redis is in cluster mode (cluster_enabled:1) but was given as one server: \
         use a redis-cluster:// (rediss-cluster:// for TLS) URL or --redis-cluster"
    )]
    ClusterMode,
    /// It may evict keys: leases, fences and records must never be evicted.
    #[error("Redis maxmemory-policy is {policy}: it may evict the gateway's leases and records; set it to noeviction")]
    EvictionPolicy { policy: String },
}

impl StoreError {
    /// Whether trying again later may succeed (the store was unreachable, slow or full), as
    /// opposed to an answer that will not change.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Full(_) | Self::NotReplicated { .. })
    }

    pub(crate) fn corrupt(what: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Corrupt { what: what.into(), source: Some(Arc::new(source)) }
    }
}

/// The coordination state of the gateway.
#[async_trait::async_trait]
pub trait AggregationStore: Send + Sync + 'static {
    /// The farm leases whose tokens fence this store's writes.
    fn leases(&self) -> &dyn FarmLeases;

    /// Atomically finds the live aggregation for `key` that `freshness` accepts, or queues a
    /// new one named `id` of `priority` in its farm's queue at its place in the fair order
    /// (`policy::place`, `policy::slot`), within `limits` (`policy::admit`). The aggregation
    /// answering gets a hit for refresh-ahead, once per `caller` (the caller's identity) and
    /// `policy::HIT_WINDOW`; a waiting one that `caller` joins for the first time spends the
    /// caller's turn and moves up to the caller's place if earlier (`policy::joined_place`).
    /// Positions that change wake the farm's topic.
    async fn claim(
        &self,
        key: &CanonicalKey,
        freshness: &Freshness,
        limits: &Limits,
        id: AggregationId,
        caller: &str,
        priority: Priority,
    ) -> Result<Claimed, ClaimError>;

    /// Looks up an aggregation by id.
    async fn read(&self, id: &str) -> Result<Found, StoreError>;

    /// The COMPLETED result that contains `key`'s request exactly (`crate::domain::derive`)
    /// and that `freshness` accepts, the one with the most validity left of the
    /// [`policy::CONTAINING_LOOKED_AT`] of its family that start nearest before the request's
    /// start (at or before it). Found through an index of completed results by family
    /// (`derive::family`: farm, kind, timezone, period, groups) and start, never by a scan of
    /// the store's results. Results derived from another are not
    /// indexed: the one they came from contains all they contain.
    async fn containing(
        &self,
        key: &CanonicalKey,
        freshness: &Freshness,
    ) -> Result<Option<Arc<AggregationRecord>>, StoreError>;

    /// Whether `key` is answered by an active aggregation or by a terminal result `freshness`
    /// accepts: what a claim would join or reuse, which goes before any derived answer.
    async fn answers(&self, key: &CanonicalKey, freshness: &Freshness) -> Result<bool, StoreError>;

    /// Keeps `record`, a COMPLETED aggregation derived from another, with its `rows` until its
    /// expiry, and makes it what its key answers unless the key answers an active aggregation
    /// or a result valid at least as long. Unfenced: it is never in a farm's queue. The
    /// result, for this replica's results cache.
    async fn put_derived(&self, record: AggregationRecord, rows: Rows) -> Result<Arc<CachedResult>, StoreError>;

    /// The aggregation at the head of `farm`'s queue: the one its lease holder drives.
    async fn head(&self, farm: &str) -> Result<Head, StoreError>;

    /// Takes `id`, a [`Head::Broken`], off `lease`'s farm's queue, if `lease` is still current,
    /// so the farm moves on: it no longer counts as active, and a record that cannot be read is
    /// kept (as not active) so its id still answers why, until it expires.
    async fn discard(&self, lease: &Lease, id: &str) -> Result<Written, StoreError>;

    /// The first `count` aggregations of `farm`'s queue, its head first (broken entries left
    /// out).
    async fn queue(&self, farm: &str, count: usize) -> Result<Vec<Arc<AggregationRecord>>, StoreError>;

    /// Farms with queued or running aggregations.
    async fn farms_with_work(&self) -> Result<Vec<String>, StoreError>;

    /// Writes the next state of an active aggregation, if `lease` is still current.
    async fn update(&self, lease: &Lease, record: AggregationRecord) -> Result<Written, StoreError>;

    /// Writes a terminal state (and, when COMPLETED, its rows), takes it off its farm's queue
    /// and keeps it until its expiry; if `lease` is still current.
    async fn finish(&self, lease: &Lease, record: AggregationRecord, rows: Option<Rows>)
    -> Result<Written, StoreError>;

    /// Leaves `offer` with active aggregation `id`, unfenced: the one write a holder makes
    /// after it lost its lease, so that the upstream aggregation its last Start created is
    /// adopted by the farm's next holder, not started a second time ([`Offer`]). Replaces an
    /// earlier offer; nothing when `id` is no longer active.
    async fn offer(&self, id: &str, offer: &Offer) -> Result<(), StoreError>;

    /// The offer left with active aggregation `id`, if any.
    async fn offered(&self, id: &str) -> Result<Option<Offer>, StoreError>;

    /// The rows `range` of a [`Found::Large`] result, read without the rest; `None` when the
    /// store lost them. A store that never answers [`Found::Large`] has none.
    async fn rows_page(&self, record: &AggregationRecord, range: Range<usize>) -> Result<Option<RowBlock>, StoreError> {
        let _ = (record, range);
        Ok(None)
    }

    /// Puts back the rows of a COMPLETED aggregation that the store lost ([`Found::RowsLost`],
    /// fetched again from the upstream), unless it has them already; rows are immutable, so
    /// any replica may write them and no fence is needed. A store that never loses rows keeps
    /// nothing. The result, for this replica's results cache.
    async fn restore_rows(&self, record: Arc<AggregationRecord>, rows: Rows) -> Result<Arc<CachedResult>, StoreError> {
        Ok(Arc::new(CachedResult::new(record, Some(rows))))
    }

    /// Refresh-ahead: queues a refresh of each COMPLETED result that expires by `due_by`, as
    /// `policy::refresh_verdict` says; each named by `mint`. A due result is refreshed once,
    /// whichever replica asks. The refreshes queued.
    ///
    /// A refresh waits behind callers' aggregations (a Start queued later goes before it), is
    /// joined by a Start of its key that the old result no longer answers, and, COMPLETED,
    /// becomes what its key answers.
    async fn start_refreshes(
        &self,
        due_by: SystemTime,
        min_hits: u32,
        limits: &Limits,
        mint: &(dyn for<'f> Fn(&'f str) -> AggregationId + Send + Sync),
    ) -> Result<Vec<Arc<AggregationRecord>>, StoreError>;

    /// What has been observed of `farm`'s run times, if anything.
    async fn run_model(&self, farm: &str) -> Result<Option<RunModel>, StoreError>;

    /// Adds a run of `size` that took `took` to `farm`'s run model ([`RunModel::observe`]).
    async fn observe_run(&self, farm: &str, size: u64, took: Duration) -> Result<(), StoreError>;

    /// Drops what has expired and counts what is held, for [`Self::stats`].
    async fn housekeeping(&self);

    /// What it held at the last housekeeping (the results cache: now).
    fn stats(&self) -> StoreStats;

    /// Who else sees this store's state.
    fn topology(&self) -> Topology {
        Topology::Local
    }

    /// The generation of a shared store's state of `bucket`, new after that state was lost
    /// (the store restarted empty, or failed over); ids of the bucket are tagged with it.
    /// `None`: the state lives and dies with this process.
    async fn epoch(&self, bucket: Bucket) -> Result<Option<u32>, StoreError> {
        let _ = bucket;
        Ok(None)
    }

    /// Starts what the store needs in the background (a shared store: relaying other
    /// replicas' changes to this replica's wake-ups) until `stop` fires.
    fn spawn_background(&self, stop: CancellationToken) {
        let _ = stop;
    }
}

/// What a gateway coordinates through, as a backend builds it: the store, this replica's
/// results cache and wake-ups, and where its upstream pacing tokens come from.
pub struct Coordination {
    pub store: Arc<dyn AggregationStore>,
    /// Where the operator console's history is kept (beside the store, never read by it).
    pub activity: Arc<dyn crate::gateway::activity::ActivityLog>,
    pub results: Arc<ResultsCache>,
    pub wakeups: Arc<Wakeups>,
    /// Where the upstream pacing's buckets are.
    pub upstream_rates: Arc<dyn pacing::UpstreamRates>,
    /// Where callers' Start and Get tokens come from when their limits hold across replicas
    /// (`None`: each replica's own buckets).
    pub caller_start_tokens: Option<Arc<dyn CallerTokens>>,
    pub caller_get_tokens: Option<Arc<dyn CallerTokens>>,
    /// The store's epoch of each bucket when it was connected, in bucket order, which ids are
    /// tagged with (`None`: in this process).
    pub epochs: Option<Vec<u32>>,
    /// The clock every replica on the store reads the time of day from (a shared store's
    /// own; in this process, the one it was built with).
    pub clock: Clock,
}

/// What a backend is built with.
#[derive(Debug, Clone)]
pub struct CoordinationSettings {
    /// The results cache's memory budget, in bytes.
    pub cache_max_bytes: u64,
    /// How long a finished result is held whatever the budget.
    pub result_grace: Duration,
    /// The pacing of upstream Starts and Gets.
    pub upstream_start: Rate,
    pub upstream_get: Rate,
    /// Callers' Start and Get limits, and whether they hold across replicas.
    pub caller_start: Rate,
    pub caller_get: Rate,
    pub caller_limits: CallerLimits,
    /// Where the store reads the time of day.
    pub clock: Clock,
}

impl Coordination {
    /// Everything in this process: the in-memory store (its rows in the results cache) and
    /// pacing buckets of this process.
    pub fn memory(settings: &CoordinationSettings) -> Self {
        let wakeups = Arc::new(Wakeups::default());
        let store = Arc::new(MemoryStore::with_clock(
            settings.cache_max_bytes,
            settings.result_grace,
            wakeups.clone(),
            settings.clock.clone(),
        ));
        Self {
            results: store.results(),
            store,
            activity: Arc::new(crate::gateway::activity::MemoryActivity::default()),
            wakeups,
            upstream_rates: Arc::new(pacing::LocalRates),
            caller_start_tokens: None,
            caller_get_tokens: None,
            epochs: None,
            clock: settings.clock.clone(),
        }
    }

    /// Shared by every replica through the Redis `redis` names: records, queues, leases, rows,
    /// the upstream rates and change notifications; a results cache of this replica in front.
    /// Refuses a Redis that may evict keys.
    pub async fn redis(settings: &CoordinationSettings, redis: &redis::RedisConfig) -> Result<Self, StoreError> {
        let client = redis::RedisClient::connect(redis).await?;
        client.check_not_a_cluster().await?;
        client.check_eviction_policy().await?;
        let epochs = Some(client.epochs().await?);
        let time = redis::time::RedisTime::measure(&client, settings.clock.clone()).await?;
        let clock = time.clock();
        let wakeups = Arc::new(Wakeups::default());
        // The near-cache holds nothing past its budget: a result Redis holds is read again
        // (page by page when larger than the budget), so there is no residency grace.
        let results = Arc::new(ResultsCache::with_clock(
            settings.cache_max_bytes,
            Duration::ZERO,
            Box::new(|_, _| {}),
            clock.clone(),
        ));
        let upstream_rates = Arc::new(client.clone());
        let callers = |operation, rate| match settings.caller_limits {
            CallerLimits::Global => client.caller_tokens(operation, rate).map(|t| Arc::new(t) as Arc<dyn CallerTokens>),
            CallerLimits::Local => None,
        };
        let caller_start_tokens = callers("start", settings.caller_start);
        let caller_get_tokens = callers("get", settings.caller_get);
        let activity = Arc::new(redis::activity::RedisActivity::new(client.clone()));
        let store = Arc::new(redis::RedisStore::new(client, results.clone(), wakeups.clone(), time));
        Ok(Self {
            store,
            activity,
            results,
            wakeups,
            upstream_rates,
            caller_start_tokens,
            caller_get_tokens,
            epochs,
            clock,
        })
    }
}
