//! The coordination state behind one async interface of owned records: claim a key (start,
//! join or answer from cache), read an id, and, for the farm's lease holder, take the head of a
//! farm's queue and write the aggregation's next state, fenced by the lease's token.
//!
//! [`MemoryStore`] keeps it in this process, its rows in the [`ResultsCache`]; a store shared
//! by several replicas implements the same [`AggregationStore`] trait. Every write wakes the
//! waiters of the aggregation it changed ([`Wakeups`]).

use super::error::{GatewayError, StoreError};
use super::estimate::RunModel;
use super::key::CanonicalKey;
use super::lease::{FarmLeases, Lease, MemoryLeases};
use super::record::{AggregationId, AggregationRecord, Rows, State};
use super::results::{CachedResult, Removal, ResultsCache};
use super::wakeups::{Wakeups, farm_topic};
use moka::policy::EvictionPolicy;
use moka::sync::Cache;
use std::collections::{BTreeSet, HashMap, VecDeque};
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
    /// Whether the store answered its last housekeeping (always, in memory).
    pub up: bool,
}

/// The coordination state of the gateway.
#[async_trait::async_trait]
pub trait AggregationStore: Send + Sync + 'static {
    /// The farm leases whose tokens fence this store's writes.
    fn leases(&self) -> &dyn FarmLeases;

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

    /// Puts back the rows of a COMPLETED aggregation that the store lost (fetched again
    /// from the upstream), unless it has them already; rows are immutable, so any replica may
    /// write them and no fence is needed. The result, for this replica's results cache.
    async fn restore_rows(&self, record: Arc<AggregationRecord>, rows: Rows) -> Result<Arc<CachedResult>, StoreError>;

    /// Refresh-ahead: queues a refresh of each COMPLETED result that expires by `due_by`, has
    /// answered at least `min_hits` Starts, still answers its key and has no refresh yet, on a
    /// farm with no callers' work waiting, within `limits`; each named by `mint`. A due result
    /// is refreshed once, whichever replica asks. The refreshes queued.
    ///
    /// A refresh waits behind callers' aggregations (a Start queued later goes before it), is
    /// joined by a Start of its key that the old result no longer answers, and, COMPLETED,
    /// becomes what its key answers.
    async fn start_refreshes(
        &self,
        due_by: SystemTime,
        min_hits: u32,
        limits: &Limits,
        mint: &(dyn Fn() -> AggregationId + Send + Sync),
    ) -> Result<Vec<Arc<AggregationRecord>>, StoreError>;

    /// Farms with queued or running aggregations.
    async fn farms_with_work(&self) -> Result<Vec<String>, StoreError>;

    /// The first `count` aggregations of `farm`'s queue, its head first.
    async fn queue(&self, farm: &str, count: usize) -> Result<Vec<Arc<AggregationRecord>>, StoreError>;

    /// What has been observed of `farm`'s run times, if anything.
    async fn run_model(&self, farm: &str) -> Result<Option<RunModel>, StoreError>;

    /// Adds a run of `size` that took `took` to `farm`'s run model.
    async fn observe_run(&self, farm: &str, size: u64, took: Duration) -> Result<(), StoreError>;

    /// Drops what has expired.
    async fn housekeeping(&self);

    /// What it holds now.
    fn stats(&self) -> StoreStats;

    /// Whether other replicas share this store (and can take a farm over).
    fn shared(&self) -> bool {
        false
    }

    /// The generation of a shared store's state, new after the state was lost (the store
    /// restarted empty); ids are tagged with it. `None`: the state lives and dies with this
    /// process.
    async fn epoch(&self) -> Result<Option<u32>, StoreError> {
        Ok(None)
    }
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
    /// Starts each aggregation answered (started, joined or cached), for refresh-ahead.
    hits: HashMap<AggregationId, u32>,
    /// COMPLETED results by expiry: the candidates for refresh-ahead.
    due: BTreeSet<(SystemTime, AggregationId)>,
    /// Refreshes no caller has joined yet, by the key they renew.
    refreshing: HashMap<CanonicalKey, AggregationId>,
    /// Each farm's observed run times.
    models: HashMap<String, RunModel>,
}

impl Index {
    /// Whether `id` is a refresh no caller has joined.
    fn pending_refresh(&self, id: &AggregationId) -> bool {
        self.active.get(id).is_some_and(|r| r.refresh && self.refreshing.get(&r.key) == Some(id))
    }

    /// Whether `farm` has callers' aggregations queued or running.
    fn caller_backlog(&self, farm: &str) -> bool {
        self.farms.get(farm).is_some_and(|q| q.iter().any(|id| !self.pending_refresh(id)))
    }

    fn hit(&mut self, id: &AggregationId) {
        *self.hits.entry(id.clone()).or_default() += 1;
    }
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
        Self {
            index: Mutex::default(),
            results: Arc::new(results),
            tombstones,
            leases: MemoryLeases::default(),
            wakeups,
        }
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
    fn leases(&self) -> &dyn FarmLeases {
        &self.leases
    }

    async fn claim(
        &self,
        key: &CanonicalKey,
        freshness: &Freshness,
        limits: &Limits,
        id: AggregationId,
    ) -> Result<Claimed, GatewayError> {
        let mut index = self.lock();
        if let Some(existing) = index.by_key.get(key).cloned() {
            if let Some(record) = index.active.get(&existing).cloned() {
                let queue_position = Self::position(&index, &record);
                index.hit(&existing);
                return Ok(Claimed { record, queue_position, result: None, disposition: Disposition::Joined });
            }
            let now = SystemTime::now();
            let usable = |r: &CachedResult| {
                freshness.accepts(&r.record, now) && (r.record.state != State::Completed || r.rows.is_some())
            };
            if let Some(result) = self.results.get(&existing).filter(|r| usable(r)) {
                let record = result.record.clone();
                index.hit(&existing);
                return Ok(Claimed {
                    record,
                    queue_position: 0,
                    result: Some(result),
                    disposition: Disposition::Cached,
                });
            }
        }
        // The old result no longer answers: a refresh of the key under way becomes the
        // caller's aggregation.
        if let Some(refresh) = index.refreshing.remove(key)
            && let Some(record) = index.active.get(&refresh).cloned()
        {
            let queue_position = Self::position(&index, &record);
            index.by_key.insert(key.clone(), refresh.clone());
            index.hit(&refresh);
            return Ok(Claimed { record, queue_position, result: None, disposition: Disposition::Joined });
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
        // Ahead of the refreshes waiting (never ahead of the head, which may be running).
        let before = index
            .farms
            .get(farm)
            .and_then(|q| q.iter().skip(1).position(|queued| index.pending_refresh(queued)).map(|p| p + 1));
        let queue = index.farms.entry(farm.to_owned()).or_default();
        let position = before.unwrap_or(queue.len());
        queue.insert(position, id.clone());
        let position = u32::try_from(position).unwrap_or(u32::MAX);
        index.active.insert(id.clone(), record.clone());
        index.hits.insert(id.clone(), 1);
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
        self.wakeups.wake(&farm_topic(&lease.farm));
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
        {
            let mut index = self.lock();
            if !index.active.contains_key(&id) {
                return Ok(Written::Fenced);
            }
            // The cache reports expiry about a second late (its timer wheel's granularity), so
            // the tombstone is laid now and replaced on eviction.
            self.tombstones.insert(id.clone(), Tombstone::of(&result, None));
            // Into the cache before out of `active`, so a concurrent reader never sees neither.
            self.results.insert(result.clone());
            index.active.remove(&id);
            let r = &result.record;
            if r.state == State::Completed
                && let Some(at) = r.expire_time
            {
                index.due.insert((at, id.clone()));
            }
            if r.refresh {
                if index.refreshing.get(&r.key) == Some(&id) {
                    index.refreshing.remove(&r.key);
                }
                // A completed refresh is what its key answers from now on.
                let superseded = index.by_key.get(&r.key).is_none_or(|old| !index.active.contains_key(old));
                if r.state == State::Completed && superseded {
                    index.by_key.insert(r.key.clone(), id.clone());
                }
            }
            let farm = result.record.farm_id();
            if let Some(queue) = index.farms.get_mut(farm) {
                queue.retain(|queued| *queued != id);
                if queue.is_empty() {
                    index.farms.remove(farm);
                }
            }
        }
        self.wakeups.wake(&id);
        self.wakeups.wake(&farm_topic(&lease.farm));
        Ok(Written::Done)
    }

    async fn restore_rows(&self, record: Arc<AggregationRecord>, rows: Rows) -> Result<Arc<CachedResult>, StoreError> {
        // Never asked here (rows and record live and go together), but harmless: a result
        // like the one finish keeps.
        let result = Arc::new(CachedResult::new(record, Some(rows)));
        self.results.insert(result.clone());
        Ok(result)
    }

    async fn start_refreshes(
        &self,
        due_by: SystemTime,
        min_hits: u32,
        limits: &Limits,
        mint: &(dyn Fn() -> AggregationId + Send + Sync),
    ) -> Result<Vec<Arc<AggregationRecord>>, StoreError> {
        let now = SystemTime::now();
        let mut index = self.lock();
        let candidates: Vec<(SystemTime, AggregationId)> =
            index.due.iter().take_while(|(at, _)| *at <= due_by).cloned().collect();
        let mut queued = Vec::new();
        for entry in candidates {
            let (at, id) = &entry;
            let old = self.results.get(id).map(|r| r.record.clone());
            let Some(old) = old.filter(|_| *at > now) else {
                index.due.remove(&entry);
                continue;
            };
            if index.by_key.get(&old.key) != Some(id) || index.refreshing.contains_key(&old.key) {
                index.due.remove(&entry);
                continue;
            }
            let farm = old.farm_id();
            let new_farm = !index.farms.contains_key(farm);
            if index.hits.get(id).copied().unwrap_or_default() < min_hits
                || index.caller_backlog(farm)
                || (new_farm && index.farms.len() >= limits.max_farms)
            {
                continue;
            }
            if index.active.len() >= limits.max_live {
                break;
            }
            index.due.remove(&entry);
            let refresh = Arc::new(AggregationRecord::refresh_of(mint(), &old));
            index.farms.entry(farm.to_owned()).or_default().push_back(refresh.id.clone());
            index.active.insert(refresh.id.clone(), refresh.clone());
            index.refreshing.insert(old.key.clone(), refresh.id.clone());
            queued.push(refresh);
        }
        Ok(queued)
    }

    async fn farms_with_work(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.lock().farms.keys().cloned().collect())
    }

    async fn queue(&self, farm: &str, count: usize) -> Result<Vec<Arc<AggregationRecord>>, StoreError> {
        let index = self.lock();
        let queue = index.farms.get(farm).into_iter().flatten().take(count);
        Ok(queue.filter_map(|id| index.active.get(id).cloned()).collect())
    }

    async fn run_model(&self, farm: &str) -> Result<Option<RunModel>, StoreError> {
        Ok(self.lock().models.get(farm).copied())
    }

    async fn observe_run(&self, farm: &str, size: u64, took: Duration) -> Result<(), StoreError> {
        let mut index = self.lock();
        let previous = index.models.get(farm).copied();
        index.models.insert(farm.to_owned(), RunModel::observe(previous, size, took));
        Ok(())
    }

    async fn housekeeping(&self) {
        self.results.housekeeping();
        self.tombstones.run_pending_tasks();
        let now = SystemTime::now();
        let mut index = self.lock();
        let Index { active, by_key, hits, due, refreshing, .. } = &mut *index;
        by_key.retain(|_, id| active.contains_key(id) || self.results.contains(id));
        hits.retain(|id, _| active.contains_key(id) || self.results.contains(id));
        refreshing.retain(|_, id| active.contains_key(id));
        while due.first().is_some_and(|(at, _)| *at <= now) {
            due.pop_first();
        }
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
            up: true,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::StatisticsRow;
    use crate::gateway::ids::IdMinter;
    use crate::gateway::record::{ENTRY_OVERHEAD_BYTES, Failure, FailureCode};
    use crate::gateway::rows::RowBlockBuilder;

    fn key(n: u64) -> CanonicalKey {
        crate::gateway::key::test_key(1, n)
    }

    const ANY: Freshness = Freshness { min_remaining: Duration::ZERO, max_staleness: None };
    const ROOMY: Limits = Limits { queue_capacity: 1000, max_live: 1000, max_farms: 1000 };

    fn store(max_bytes: u64, grace: Duration) -> MemoryStore {
        MemoryStore::new(max_bytes, grace, Arc::default())
    }

    async fn start_with(store: &MemoryStore, k: &CanonicalKey, f: &Freshness) -> Claimed {
        store.claim(k, f, &ROOMY, IdMinter::new().mint()).await.expect("claimed")
    }

    async fn start(store: &MemoryStore, k: &CanonicalKey) -> Claimed {
        start_with(store, k, &ANY).await
    }

    /// Ends `claimed` COMPLETED with `rows` rows of 100 bytes, valid for `valid_for`.
    async fn complete(store: &MemoryStore, claimed: &Claimed, rows: usize, valid_for: Duration) {
        let mut r = (*claimed.record).clone();
        r.state = State::Completed;
        r.row_count = rows as u64;
        r.expire_time = Some(SystemTime::now() + valid_for);
        r.data_time = Some(SystemTime::now());
        let mut block = RowBlockBuilder::new(|_, buf| buf.extend_from_slice(&[0; 100]));
        (0..rows).for_each(|_| block.push(&StatisticsRow::default()));
        let lease = Lease {
            farm: r.farm_id().to_owned(),
            holder: "test".into(),
            token: store.leases.newest_token(r.farm_id()),
        };
        assert_eq!(store.finish(&lease, r, Some(Arc::new(block.finish()))).await, Ok(Written::Done));
    }

    async fn fail(store: &MemoryStore, claimed: &Claimed, ttl: Duration) {
        let mut r = (*claimed.record).clone();
        r.state = State::Failed;
        r.error = Some(Failure { code: FailureCode::Internal, message: "it broke".into() });
        r.expire_time = Some(SystemTime::now() + ttl);
        r.data_time = Some(SystemTime::now());
        let lease = Lease {
            farm: r.farm_id().to_owned(),
            holder: "test".into(),
            token: store.leases.newest_token(r.farm_id()),
        };
        assert_eq!(store.finish(&lease, r, None).await, Ok(Written::Done));
    }

    async fn read(store: &MemoryStore, id: &str) -> Found {
        store.read(id).await.expect("memory never fails")
    }

    fn readable(found: &Found) -> bool {
        matches!(found, Found::Active { .. } | Found::Terminal(_))
    }

    #[tokio::test]
    async fn the_least_recently_used_result_is_evicted_never_the_fresh_one() {
        let probe = store(1 << 20, Duration::ZERO);
        let c = start(&probe, &key(99)).await;
        complete(&probe, &c, 200, Duration::from_secs(60)).await;
        let weight = probe.stats().cached_bytes;
        let s = store(weight * 2 + weight / 2, Duration::ZERO);
        let mut ids = Vec::new();
        for n in 0..3 {
            let c = start(&s, &key(n)).await;
            complete(&s, &c, 200, Duration::from_secs(60)).await;
            s.housekeeping().await;
            ids.push(c.record.id.clone());
            if n == 1 {
                assert!(readable(&read(&s, &ids[0]).await), "A is read after B completes: B is now the LRU");
            }
        }
        s.housekeeping().await;
        assert!(matches!(read(&s, &ids[1]).await, Found::Evicted), "B, the least recently used, is evicted");
        assert!(
            readable(&read(&s, &ids[0]).await) && readable(&read(&s, &ids[2]).await),
            "A (read) and C (fresh) stay"
        );
        assert_eq!(s.stats().evictions, 1);
        assert_eq!(start(&s, &key(1)).await.disposition, Disposition::Started, "an evicted result is not CACHED");
    }

    #[tokio::test]
    async fn a_result_larger_than_the_budget_is_still_served_within_its_grace() {
        let s = store(1024, Duration::from_millis(300));
        let c = start(&s, &key(1)).await;
        complete(&s, &c, 200, Duration::from_secs(60)).await;
        s.housekeeping().await;
        assert!(readable(&read(&s, &c.record.id).await), "resident within its grace");
        assert_eq!(start(&s, &key(1)).await.disposition, Disposition::Cached);
        tokio::time::sleep(Duration::from_millis(350)).await;
        s.housekeeping().await;
        assert!(matches!(read(&s, &c.record.id).await, Found::Evicted), "then the budget wins");
    }

    #[tokio::test]
    async fn failed_and_empty_results_weigh_what_they_hold() {
        let bytes = ENTRY_OVERHEAD_BYTES as u64;
        let s = store(10 * bytes, Duration::ZERO);
        for n in 0..100 {
            let c = start(&s, &key(n)).await;
            fail(&s, &c, Duration::from_secs(60)).await;
        }
        s.housekeeping().await;
        let stats = s.stats();
        assert!(stats.cached <= 10, "the budget bounds the number of entries: {stats:?}");
        assert!(stats.cached_bytes >= stats.cached * bytes);
    }

    #[tokio::test]
    async fn a_failed_id_still_says_why_after_its_ttl() {
        let s = store(1 << 20, Duration::ZERO);
        let c = start(&s, &key(1)).await;
        fail(&s, &c, Duration::from_millis(100)).await;
        assert_eq!(start(&s, &key(1)).await.disposition, Disposition::Cached, "callers see the failure within its TTL");
        tokio::time::sleep(Duration::from_millis(150)).await;
        s.housekeeping().await;
        let Found::Terminal(seen) = read(&s, &c.record.id).await else { panic!("the failure is remembered") };
        assert_eq!(seen.record.error.as_ref().map(|e| e.message.as_str()), Some("it broke"));
        assert_eq!(start(&s, &key(1)).await.disposition, Disposition::Started, "after the TTL a Start retries");
    }

    #[tokio::test]
    async fn tombstones_keep_the_most_recent_when_full() {
        let s =
            MemoryStore::with_tombstone_budget(1 << 20, Duration::ZERO, Arc::default(), 100 * TOMBSTONE_BYTES as u64);
        let mut ids = Vec::new();
        for n in 0..300 {
            let c = start(&s, &key(n)).await;
            complete(&s, &c, 0, Duration::from_secs(60)).await;
            s.tombstones.run_pending_tasks();
            ids.push(c.record.id.clone());
        }
        assert!(s.tombstones.contains_key(ids.last().expect("ids")), "the newest tombstone is kept");
        assert!(!s.tombstones.contains_key(&ids[0]), "the oldest went");
        assert!(s.stats().tombstones <= 100);
    }
}
