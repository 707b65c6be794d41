//! The coordination state behind one async interface of owned records: claim a key (start,
//! join or answer from cache), read an id, and, for the farm's lease holder, take the head of a
//! farm's queue and write the aggregation's next state, fenced by the lease's token.
//!
//! [`MemoryStore`] keeps it in this process, its rows in the [`ResultsCache`]; a store shared
//! by several replicas implements the same [`AggregationStore`] trait. Every write wakes the
//! waiters of the aggregation it changed ([`Wakeups`]).

use super::error::{GatewayError, StoreError};
use super::key::CanonicalKey;
use super::lease::{FarmLeases, Lease, MemoryLeases};
use super::record::{AggregationId, AggregationRecord, Rows, State};
use super::results::{CachedResult, Removal, ResultsCache};
use super::wakeups::Wakeups;
use moka::policy::EvictionPolicy;
use moka::sync::Cache;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

/// How a Start was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Disposition {
    /// A new aggregation was queued.
    Started,
    /// An identical aggregation is queued or running.
    Joined,
    /// An identical aggregation is terminal and still valid.
    Cached,
}

/// What a caller accepts as a cached answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Freshness {
    /// A COMPLETED result is only answered when it stays valid at least this long: time for
    /// the caller to read its pages.
    pub min_remaining: Duration,
    /// A result whose data is older than this is not answered; `None` accepts any valid one.
    pub max_staleness: Option<Duration>,
}

impl Freshness {
    /// Whether the terminal aggregation `r` may answer a Start at `now`.
    pub fn accepts(&self, r: &AggregationRecord, now: SystemTime) -> bool {
        let remaining = r.remaining(now);
        let needed = if r.state == State::Completed { self.min_remaining } else { Duration::ZERO };
        let fresh = match (self.max_staleness, r.data_time) {
            (Some(max), Some(at)) => now.duration_since(at).unwrap_or_default() <= max,
            (Some(_), None) => false,
            (None, _) => true,
        };
        !remaining.is_zero() && remaining >= needed && fresh
    }
}

/// The bounds a claim must respect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Aggregations that may wait per farm behind the one at its head.
    pub queue_capacity: usize,
    /// Queued and running aggregations across all farms.
    pub max_live: usize,
    /// Farms with work at once.
    pub max_farms: usize,
}

/// An aggregation as a claim or a read finds it.
#[derive(Debug, Clone)]
pub enum Found {
    /// Queued or running, with how many aggregations are ahead of it on its farm.
    Active { record: Arc<AggregationRecord>, queue_position: u32 },
    /// Terminal and readable: COMPLETED with its rows, or FAILED / TIMED_OUT (a failure stays
    /// readable after its TTL, so its id still says why).
    Terminal(Arc<CachedResult>),
    /// Its results passed their validity at this time.
    Expired(SystemTime),
    /// Its results were dropped to stay within the memory budget.
    Evicted,
    Unknown,
}

/// What a claim answers with.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub record: Arc<AggregationRecord>,
    /// While QUEUED: how many aggregations are ahead of it on its farm.
    pub queue_position: u32,
    /// For a cached answer, the result itself.
    pub result: Option<Arc<CachedResult>>,
    pub disposition: Disposition,
}

/// Whether a fenced write landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Done,
    /// A newer lease holder exists: the writer must stop.
    Fenced,
}

/// Queue depth and running count of one farm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FarmLoad {
    pub queued: usize,
    pub running: usize,
}

/// Counters for the store's contents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Queued and running aggregations.
    pub active: usize,
    pub cached: u64,
    pub cached_bytes: u64,
    pub keys: usize,
    /// Cached results dropped at the end of their validity, since start.
    pub expirations: u64,
    /// Cached results dropped to stay within the memory budget, since start.
    pub evictions: u64,
    /// Ids remembered after their results went away (to say why).
    pub tombstones: u64,
    pub farms: HashMap<String, FarmLoad>,
}

/// The coordination state of the gateway.
#[async_trait::async_trait]
pub trait AggregationStore: FarmLeases {
    /// Atomically finds the live aggregation for `key` that `freshness` accepts, or queues a
    /// new one named `id` at the back of its farm's queue, within `limits`.
    async fn claim(
        &self,
        key: &CanonicalKey,
        freshness: &Freshness,
        limits: &Limits,
        id: AggregationId,
    ) -> Result<Claimed, GatewayError>;

    /// Looks up an aggregation by id.
    async fn read(&self, id: &str) -> Result<Found, StoreError>;

    /// The aggregation at the head of `farm`'s queue: the one its lease holder drives.
    async fn head(&self, farm: &str) -> Result<Option<Arc<AggregationRecord>>, StoreError>;

    /// Writes the next state of an active aggregation, if `lease` is still current.
    async fn update(&self, lease: &Lease, record: AggregationRecord) -> Result<Written, StoreError>;

    /// Writes a terminal state (and, when COMPLETED, its rows), takes it off its farm's queue
    /// and keeps it until its expiry; if `lease` is still current.
    async fn finish(&self, lease: &Lease, record: AggregationRecord, rows: Option<Rows>)
    -> Result<Written, StoreError>;

    /// Farms with queued or running aggregations.
    async fn farms_with_work(&self) -> Result<Vec<String>, StoreError>;

    /// Drops what has expired.
    async fn housekeeping(&self);

    /// What it holds now.
    fn stats(&self) -> StoreStats;
}

/// Why a finished aggregation disappeared; remembered so Get can say so.
#[derive(Debug, Clone)]
enum Tombstone {
    Expired(SystemTime),
    Evicted,
    /// A FAILED or TIMED_OUT aggregation past its TTL: small (no rows), kept whole.
    Failed(Arc<CachedResult>),
}

impl Tombstone {
    /// Bytes it holds, for the tombstones' budget.
    fn weight(&self) -> u32 {
        let bytes = match self {
            Self::Expired(_) | Self::Evicted => TOMBSTONE_BYTES,
            Self::Failed(r) => r.weight(),
        };
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }

    /// What a result leaves behind when it leaves the cache.
    fn of(result: &Arc<CachedResult>, removal: Option<Removal>) -> Self {
        match (result.record.state, removal) {
            (State::Completed, Some(Removal::Evicted)) => Self::Evicted,
            (State::Completed, _) => Self::Expired(result.record.expire_time.unwrap_or_else(SystemTime::now)),
            _ => Self::Failed(result.clone()),
        }
    }
}

/// How long Get remembers why an id went away.
const TOMBSTONE_TTL: Duration = Duration::from_secs(24 * 3600);
/// The memory budget of tombstones; the least recently used go first.
const TOMBSTONE_BUDGET_BYTES: u64 = 32 * 1024 * 1024;
/// What a plain tombstone costs: its id, the reason and the cache's bookkeeping.
const TOMBSTONE_BYTES: usize = 160;

#[derive(Debug, Default)]
struct Index {
    /// Queued and running aggregations.
    active: HashMap<AggregationId, Arc<AggregationRecord>>,
    /// The aggregation answering each key, active or terminal.
    by_key: HashMap<CanonicalKey, AggregationId>,
    /// Each farm's queue, its head first.
    farms: HashMap<String, VecDeque<AggregationId>>,
}

/// The in-process [`AggregationStore`].
pub struct MemoryStore {
    index: Mutex<Index>,
    results: Arc<ResultsCache>,
    tombstones: Cache<AggregationId, Tombstone>,
    leases: MemoryLeases,
    wakeups: Arc<Wakeups>,
}

impl MemoryStore {
    /// A store whose results (rows included) are held by a cache of `max_bytes`, each for at
    /// least `grace`; its writes wake `wakeups`.
    pub fn new(max_bytes: u64, grace: Duration, wakeups: Arc<Wakeups>) -> Self {
        Self::with_tombstone_budget(max_bytes, grace, wakeups, TOMBSTONE_BUDGET_BYTES)
    }

    fn with_tombstone_budget(max_bytes: u64, grace: Duration, wakeups: Arc<Wakeups>, tombstone_bytes: u64) -> Self {
        let tombstones: Cache<AggregationId, Tombstone> = Cache::builder()
            .max_capacity(tombstone_bytes)
            .weigher(|_, t: &Tombstone| t.weight())
            .eviction_policy(EvictionPolicy::lru())
            .time_to_live(TOMBSTONE_TTL)
            .build();
        let graves = tombstones.clone();
        let results = ResultsCache::new(
            max_bytes,
            grace,
            Box::new(move |result, removal| {
                graves.insert(result.record.id.clone(), Tombstone::of(result, Some(removal)));
            }),
        );
        Self { index: Mutex::default(), results: Arc::new(results), tombstones, leases: MemoryLeases::default(), wakeups }
    }

    /// The results cache: where this store keeps rows, and what Get reads first.
    pub fn results(&self) -> Arc<ResultsCache> {
        self.results.clone()
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// An active aggregation with its place in its farm's queue.
    fn active(index: &Index, record: &Arc<AggregationRecord>) -> Found {
        Found::Active { record: record.clone(), queue_position: Self::position(index, record) }
    }

    /// How many aggregations are ahead of `record` on its farm.
    fn position(index: &Index, record: &AggregationRecord) -> u32 {
        let position = index
            .farms
            .get(record.farm_id())
            .and_then(|q| q.iter().position(|id| *id == record.id))
            .unwrap_or_default();
        u32::try_from(position).unwrap_or(u32::MAX)
    }

    /// Whether `lease` is still the newest of its farm.
    fn fenced(&self, lease: &Lease) -> bool {
        self.leases.newest_token(&lease.farm) != lease.token
    }
}

#[async_trait::async_trait]
impl AggregationStore for MemoryStore {
    async fn claim(
        &self,
        key: &CanonicalKey,
        freshness: &Freshness,
        limits: &Limits,
        id: AggregationId,
    ) -> Result<Claimed, GatewayError> {
        let mut index = self.lock();
        if let Some(existing) = index.by_key.get(key) {
            if let Some(record) = index.active.get(existing) {
                let queue_position = Self::position(&index, record);
                let record = record.clone();
                return Ok(Claimed { record, queue_position, result: None, disposition: Disposition::Joined });
            }
            let now = SystemTime::now();
            let usable = |r: &CachedResult| {
                freshness.accepts(&r.record, now) && (r.record.state != State::Completed || r.rows.is_some())
            };
            if let Some(result) = self.results.get(existing).filter(|r| usable(r)) {
                let record = result.record.clone();
                return Ok(Claimed { record, queue_position: 0, result: Some(result), disposition: Disposition::Cached });
            }
        }
        let farm = key.farm_id();
        if index.active.len() >= limits.max_live {
            return Err(GatewayError::Busy { bound: "max_active_aggregations", limit: limits.max_live });
        }
        if !index.farms.contains_key(farm) && index.farms.len() >= limits.max_farms {
            return Err(GatewayError::Busy { bound: "max_farms", limit: limits.max_farms });
        }
        let waiting = index.farms.get(farm).map_or(0, |q| q.len().saturating_sub(1));
        if index.farms.contains_key(farm) && waiting >= limits.queue_capacity {
            return Err(GatewayError::QueueFull { farm_id: farm.to_owned(), capacity: limits.queue_capacity });
        }
        let record = Arc::new(AggregationRecord::queued(id.clone(), key.clone()));
        let queue = index.farms.entry(farm.to_owned()).or_default();
        queue.push_back(id.clone());
        let position = u32::try_from(queue.len() - 1).unwrap_or(u32::MAX);
        index.active.insert(id.clone(), record.clone());
        index.by_key.insert(key.clone(), id);
        Ok(Claimed { record, queue_position: position, result: None, disposition: Disposition::Started })
    }

    async fn read(&self, id: &str) -> Result<Found, StoreError> {
        // Terminal results first: they are what most Gets ask for. `finish` puts a result into
        // the cache before it takes it out of `active`, so one that finishes between the first
        // two lookups is found by the third.
        if let Some(result) = self.results.get(id) {
            return Ok(terminal(result));
        }
        {
            let index = self.lock();
            if let Some(record) = index.active.get(id) {
                return Ok(Self::active(&index, record));
            }
        }
        if let Some(result) = self.results.get(id) {
            return Ok(terminal(result));
        }
        Ok(match self.tombstones.get(id) {
            Some(Tombstone::Expired(at)) => Found::Expired(at),
            Some(Tombstone::Evicted) => Found::Evicted,
            Some(Tombstone::Failed(result)) => Found::Terminal(result),
            None => Found::Unknown,
        })
    }

    async fn head(&self, farm: &str) -> Result<Option<Arc<AggregationRecord>>, StoreError> {
        let index = self.lock();
        Ok(index.farms.get(farm).and_then(VecDeque::front).and_then(|id| index.active.get(id)).cloned())
    }

    async fn update(&self, lease: &Lease, record: AggregationRecord) -> Result<Written, StoreError> {
        if self.fenced(lease) {
            return Ok(Written::Fenced);
        }
        let id = record.id.clone();
        {
            let mut index = self.lock();
            let Some(slot) = index.active.get_mut(&id) else { return Ok(Written::Fenced) };
            *slot = Arc::new(record);
        }
        self.wakeups.wake(&id);
        Ok(Written::Done)
    }

    async fn finish(
        &self,
        lease: &Lease,
        record: AggregationRecord,
        rows: Option<Rows>,
    ) -> Result<Written, StoreError> {
        if self.fenced(lease) {
            return Ok(Written::Fenced);
        }
        let id = record.id.clone();
        let result = Arc::new(CachedResult::new(Arc::new(record), rows));
        // The cache reports expiry about a second late (its timer wheel's granularity), so the
        // tombstone is laid now and replaced on eviction.
        self.tombstones.insert(id.clone(), Tombstone::of(&result, None));
        {
            let mut index = self.lock();
            if !index.active.contains_key(&id) {
                return Ok(Written::Fenced);
            }
            // Into the cache before out of `active`, so a concurrent reader never sees neither.
            self.results.insert(result.clone());
            index.active.remove(&id);
            let farm = result.record.farm_id();
            if let Some(queue) = index.farms.get_mut(farm) {
                queue.retain(|queued| *queued != id);
                if queue.is_empty() {
                    index.farms.remove(farm);
                }
            }
        }
        self.wakeups.wake(&id);
        Ok(Written::Done)
    }

    async fn farms_with_work(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.lock().farms.keys().cloned().collect())
    }

    async fn housekeeping(&self) {
        self.results.housekeeping();
        self.tombstones.run_pending_tasks();
        let mut index = self.lock();
        let Index { active, by_key, .. } = &mut *index;
        by_key.retain(|_, id| active.contains_key(id) || self.results.contains(id));
    }

    fn stats(&self) -> StoreStats {
        let (cached, cached_bytes, expirations, evictions) = self.results.stats();
        self.tombstones.run_pending_tasks();
        let index = self.lock();
        let farms = index
            .farms
            .iter()
            .map(|(farm, queue)| {
                let running = queue
                    .front()
                    .and_then(|id| index.active.get(id))
                    .map_or(0, |r| usize::from(r.state == State::Running));
                (farm.clone(), FarmLoad { queued: queue.len() - running, running })
            })
            .collect();
        StoreStats {
            active: index.active.len(),
            cached,
            cached_bytes,
            keys: index.by_key.len(),
            expirations,
            evictions,
            tombstones: self.tombstones.entry_count(),
            farms,
        }
    }
}

/// A terminal result as a read finds it: an expired COMPLETED one says when it expired.
fn terminal(result: Arc<CachedResult>) -> Found {
    let r = &result.record;
    if r.state == State::Completed && r.is_expired(SystemTime::now()) {
        return Found::Expired(r.expire_time.unwrap_or_else(SystemTime::now));
    }
    Found::Terminal(result)
}

#[async_trait::async_trait]
impl FarmLeases for MemoryStore {
    async fn acquire(&self, farm: &str, holder: &str, ttl: Duration) -> Result<Option<Lease>, StoreError> {
        self.leases.acquire(farm, holder, ttl).await
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, StoreError> {
        self.leases.renew(lease, ttl).await
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        self.leases.release(lease).await
    }

    async fn is_current(&self, lease: &Lease) -> Result<bool, StoreError> {
        self.leases.is_current(lease).await
    }
}
