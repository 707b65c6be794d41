//! The coordination store of one process: records, farm queues and leases behind a mutex,
//! rows in the [`ResultsCache`], and tombstones that say why an id went away. The rules it
//! follows are [`super::policy`]'s. Every write wakes the waiters of the aggregation it
//! changed and of its farm ([`Wakeups`]).

use super::farm_queue::FarmQueue;
use super::lease::{FarmLeases, Lease, MemoryLeases};
use super::policy::{self, Candidate, Freshness, Limits, Occupancy, Place, RefreshVerdict};
use super::results::{CachedResult, Removal, ResultsCache};
use super::run_model::RunModel;
use super::wakeups::{Wakeups, farm_topic};
use super::{
    AggregationStore, ClaimError, Claimed, Disposition, FarmLoad, Found, Head, QueueFault, StoreError, StoreStats,
    Written,
};
use crate::domain::derive;
use crate::gateway::clock::Clock;
use crate::gateway::key::CanonicalKey;
use crate::gateway::record::{AggregationId, AggregationRecord, Offer, Priority, Rows, State};
use moka::policy::EvictionPolicy;
use moka::sync::Cache;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

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
            // A COMPLETED record always has its expiry.
            (State::Completed, _) => Self::Expired(result.record.expire_time.unwrap_or(SystemTime::UNIX_EPOCH)),
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
    /// Each farm's queue, its head first, in the fair order.
    farms: HashMap<String, FarmQueue>,
    /// Starts each aggregation answered (started, joined or cached), for refresh-ahead.
    hits: HashMap<AggregationId, Hits>,
    /// COMPLETED results by expiry: the candidates for refresh-ahead.
    due: BTreeSet<(SystemTime, AggregationId)>,
    /// COMPLETED results not derived from another, by family (`derive::family`), by start:
    /// where a Start looks for a result that contains it.
    families: HashMap<String, BTreeSet<FamilyEntry>>,
    /// Refreshes no caller has joined yet, by the key they renew.
    refreshing: HashMap<CanonicalKey, AggregationId>,
    /// Each farm's observed run times.
    models: HashMap<String, RunModel>,
    /// Upstream aggregations left by holders that lost their lease, by active aggregation.
    offers: HashMap<AggregationId, Offer>,
}

impl Index {
    /// Whether `id` is a refresh no caller has joined.
    fn pending_refresh(&self, id: &AggregationId) -> bool {
        self.active.get(id).is_some_and(|r| r.refresh && self.refreshing.get(&r.key) == Some(id))
    }

    /// Whether `farm` has callers' aggregations queued or running.
    fn caller_backlog(&self, farm: &str) -> bool {
        self.farms.get(farm).is_some_and(|q| q.ids().any(|id| !self.pending_refresh(id)))
    }

    fn hit(&mut self, id: &AggregationId, caller: &str, now: SystemTime) {
        self.hits.entry(id.clone()).or_default().hit(caller, now);
    }

    /// `caller` joins active `record` with `priority`: a hit, and, the first time this caller
    /// asks for it while it waits, its turn is spent on it and it moves up to the caller's
    /// place if that is earlier ([`policy::joined_place`]). The record as it now is.
    fn join(
        &mut self,
        record: Arc<AggregationRecord>,
        limits: &Limits,
        priority: Priority,
        caller: &str,
        now: SystemTime,
    ) -> Arc<AggregationRecord> {
        let id = &record.id;
        let first_ask = self.hits.get(id).is_none_or(|h| !h.last.contains_key(caller));
        self.hit(id, caller, now);
        let Some(queue) = self.farms.get_mut(record.farm_id()) else { return record };
        let Some(current) = queue.waiting_place(id).filter(|_| first_ask) else { return record };
        let (joiner, next) = queue.place_for(limits, priority, caller);
        queue.charge(joiner, caller, next);
        let Some(better) = policy::joined_place(current, joiner) else { return record };
        queue.move_to(id, better);
        let raised = policy::priority_of(better.class);
        if raised >= record.priority {
            return record;
        }
        let raised = Arc::new(AggregationRecord { priority: raised, ..(*record).clone() });
        self.active.insert(id.clone(), raised.clone());
        raised
    }
}

/// A result in its family's index: its window (ms), expiry and id, in that order.
type FamilyEntry = ((i64, i64), SystemTime, AggregationId);

/// The window of a request, in ms, as the family index keeps it.
fn window(key: &CanonicalKey) -> (i64, i64) {
    let q = key.request();
    (q.start_time.timestamp_millis(), q.end_time.timestamp_millis())
}

/// The hits of one aggregation: each caller counts once per `policy::HIT_WINDOW`.
#[derive(Debug, Default)]
struct Hits {
    count: u32,
    /// When each caller's last counted hit was.
    last: HashMap<String, SystemTime>,
}

impl Hits {
    fn hit(&mut self, caller: &str, now: SystemTime) {
        if policy::counts_as_hit(self.last.get(caller).copied(), now) {
            self.count += 1;
            self.last.insert(caller.to_owned(), now);
        }
    }
}

/// The in-process [`AggregationStore`].
pub struct MemoryStore {
    index: Mutex<Index>,
    results: Arc<ResultsCache>,
    tombstones: Cache<AggregationId, Tombstone>,
    leases: MemoryLeases,
    wakeups: Arc<Wakeups>,
    clock: Clock,
}

impl MemoryStore {
    /// A store whose results (rows included) are held by a cache of `max_bytes`, each for at
    /// least `grace`; its writes wake `wakeups`.
    pub fn new(max_bytes: u64, grace: Duration, wakeups: Arc<Wakeups>) -> Self {
        Self::with_clock(max_bytes, grace, wakeups, Clock::system())
    }

    /// [`Self::new`], reading the time of day from `clock`.
    pub fn with_clock(max_bytes: u64, grace: Duration, wakeups: Arc<Wakeups>, clock: Clock) -> Self {
        Self::with_tombstone_budget(max_bytes, grace, wakeups, clock, TOMBSTONE_BUDGET_BYTES)
    }

    fn with_tombstone_budget(
        max_bytes: u64,
        grace: Duration,
        wakeups: Arc<Wakeups>,
        clock: Clock,
        tombstone_bytes: u64,
    ) -> Self {
        let tombstones: Cache<AggregationId, Tombstone> = Cache::builder()
            .max_capacity(tombstone_bytes)
            .weigher(|_, t: &Tombstone| t.weight())
            .eviction_policy(EvictionPolicy::lru())
            .time_to_live(TOMBSTONE_TTL)
            .build();
        let graves = tombstones.clone();
        let results = ResultsCache::with_clock(
            max_bytes,
            grace,
            Box::new(move |result, removal| {
                graves.insert(result.record.id.clone(), Tombstone::of(result, Some(removal)));
            }),
            clock.clone(),
        );
        Self {
            index: Mutex::default(),
            results: Arc::new(results),
            tombstones,
            leases: MemoryLeases::default(),
            wakeups,
            clock,
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
        let position = index.farms.get(record.farm_id()).and_then(|q| q.position(&record.id)).unwrap_or_default();
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
        caller: &str,
        priority: Priority,
    ) -> Result<Claimed, ClaimError> {
        let now = self.clock.now();
        let mut index = self.lock();
        if let Some(existing) = index.by_key.get(key).cloned() {
            if let Some(record) = index.active.get(&existing).cloned() {
                let record = index.join(record, limits, priority, caller, now);
                let queue_position = Self::position(&index, &record);
                if queue_position > 0 {
                    self.wakeups.wake(&farm_topic(key.farm_id()));
                }
                return Ok(Claimed { record, queue_position, disposition: Disposition::Joined });
            }
            if let Some(result) = self.results.get(&existing)
                && freshness.accepts(&result.record, result.rows.is_some(), now)
            {
                index.hit(&existing, caller, now);
                return Ok(Claimed {
                    record: result.record.clone(),
                    queue_position: 0,
                    disposition: Disposition::Cached,
                });
            }
        }
        // The old result no longer answers: a refresh of the key under way becomes the
        // caller's aggregation.
        if let Some(refresh) = index.refreshing.remove(key)
            && let Some(record) = index.active.get(&refresh).cloned()
        {
            index.by_key.insert(key.clone(), refresh.clone());
            let record = index.join(record, limits, priority, caller, now);
            let queue_position = Self::position(&index, &record);
            self.wakeups.wake(&farm_topic(key.farm_id()));
            return Ok(Claimed { record, queue_position, disposition: Disposition::Joined });
        }
        let farm = key.farm_id();
        let (queued, caller_waiting) = index.farms.get(farm).map_or((0, 0), |q| (q.len(), q.waiting_of(caller)));
        let at = Occupancy { live: index.active.len(), farms: index.farms.len(), queued, caller_waiting };
        policy::admit(at, limits, farm)?;
        let record = Arc::new(AggregationRecord {
            priority,
            ..AggregationRecord::queued(id.clone(), key.clone(), self.clock.now())
        });
        let queue = index.farms.entry(farm.to_owned()).or_default();
        let (place, next) = queue.place_for(limits, priority, caller);
        queue.charge(place, caller, next);
        let position = queue.insert(id.clone(), place, Some(caller));
        index.active.insert(id.clone(), record.clone());
        index.hit(&id, caller, now);
        index.by_key.insert(key.clone(), id);
        if position < queued {
            // Went before others: their positions moved.
            self.wakeups.wake(&farm_topic(farm));
        }
        let queue_position = u32::try_from(position).unwrap_or(u32::MAX);
        Ok(Claimed { record, queue_position, disposition: Disposition::Started })
    }

    async fn read(&self, id: &str) -> Result<Found, StoreError> {
        // Terminal results first: they are what most Gets ask for. `finish` puts a result into
        // the cache before it takes it out of `active`, so one that finishes between the first
        // two lookups is found by the third.
        if let Some(result) = self.results.get(id) {
            return Ok(Found::terminal(result, self.clock.now()));
        }
        {
            let index = self.lock();
            if let Some(record) = index.active.get(id) {
                return Ok(Self::active(&index, record));
            }
        }
        if let Some(result) = self.results.get(id) {
            return Ok(Found::terminal(result, self.clock.now()));
        }
        Ok(match self.tombstones.get(id) {
            Some(Tombstone::Expired(at)) => Found::Expired(at),
            Some(Tombstone::Evicted) => Found::Evicted,
            Some(Tombstone::Failed(result)) => Found::Terminal(result),
            None => Found::Unknown,
        })
    }

    async fn containing(
        &self,
        key: &CanonicalKey,
        freshness: &Freshness,
    ) -> Result<Option<Arc<AggregationRecord>>, StoreError> {
        let (q, now, asked) = (key.request(), self.clock.now(), window(key));
        let valid_from = now + freshness.min_remaining;
        let index = self.lock();
        let Some(family) = index.families.get(&derive::family(q)) else { return Ok(None) };
        // The results that start nearest before the request's start (at or before it).
        let later = ((asked.0.saturating_add(1), i64::MIN), SystemTime::UNIX_EPOCH, AggregationId::from(""));
        let mut covering: Vec<&FamilyEntry> = family
            .range(..later)
            .rev()
            .take(policy::CONTAINING_LOOKED_AT)
            .filter(|(window, at, _)| policy::covers(*window, asked) && *at >= valid_from && *at > now)
            .collect();
        covering.sort_by_key(|entry| std::cmp::Reverse(entry.1));
        Ok(covering
            .into_iter()
            .filter_map(|(.., id)| self.results.get(id))
            .find(|result| {
                freshness.accepts(&result.record, result.rows.is_some(), now)
                    && derive::contains(result.record.key.request(), q)
            })
            .map(|result| result.record.clone()))
    }

    async fn answers(&self, key: &CanonicalKey, freshness: &Freshness) -> Result<bool, StoreError> {
        let index = self.lock();
        let Some(id) = index.by_key.get(key) else { return Ok(false) };
        Ok(index.active.contains_key(id)
            || self.results.get(id).is_some_and(|r| freshness.accepts(&r.record, r.rows.is_some(), self.clock.now())))
    }

    async fn put_derived(&self, record: AggregationRecord, rows: Rows) -> Result<Arc<CachedResult>, StoreError> {
        let result = Arc::new(CachedResult::new(Arc::new(record), Some(rows)));
        let r = &result.record;
        let mut index = self.lock();
        self.tombstones.insert(r.id.clone(), Tombstone::of(&result, None));
        self.results.insert(result.clone());
        let answering = index.by_key.get(&r.key);
        let active = answering.is_some_and(|id| index.active.contains_key(id));
        let answering_expiry = answering.and_then(|id| self.results.get(id)).and_then(|a| a.record.expire_time);
        if let Some(expire) = r.expire_time
            && policy::derived_takes_key(active, answering_expiry, expire)
        {
            index.by_key.insert(r.key.clone(), r.id.clone());
        }
        Ok(result)
    }

    async fn head(&self, farm: &str) -> Result<Head, StoreError> {
        let index = self.lock();
        Ok(match index.farms.get(farm).and_then(FarmQueue::head) {
            None => Head::Empty,
            Some(id) => match index.active.get(id) {
                Some(record) => Head::Ready(record.clone()),
                None => Head::Broken { id: id.to_string(), fault: QueueFault::Missing },
            },
        })
    }

    async fn discard(&self, lease: &Lease, id: &str) -> Result<Written, StoreError> {
        if self.fenced(lease) {
            return Ok(Written::Fenced);
        }
        let mut index = self.lock();
        if let Some(queue) = index.farms.get_mut(&lease.farm) {
            queue.remove(id);
            if queue.is_empty() {
                index.farms.remove(&lease.farm);
            }
        }
        index.active.remove(id);
        index.offers.remove(id);
        Ok(Written::Done)
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

    async fn offer(&self, id: &str, offer: &Offer) -> Result<(), StoreError> {
        let mut index = self.lock();
        if let Some((id, _)) = index.active.get_key_value(id) {
            let id = id.clone();
            index.offers.insert(id, offer.clone());
        }
        Ok(())
    }

    async fn offered(&self, id: &str) -> Result<Option<Offer>, StoreError> {
        Ok(self.lock().offers.get(id).cloned())
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
            index.offers.remove(&id);
            let r = &result.record;
            if r.state == State::Completed
                && let Some(at) = r.expire_time
            {
                index.due.insert((at, id.clone()));
                if r.derived_from.is_none() {
                    let entry = (window(&r.key), at, id.clone());
                    index.families.entry(derive::family(r.key.request())).or_default().insert(entry);
                }
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
                queue.remove(&id);
                if queue.is_empty() {
                    index.farms.remove(farm);
                }
            }
        }
        self.wakeups.wake(&id);
        self.wakeups.wake(&farm_topic(&lease.farm));
        Ok(Written::Done)
    }

    async fn start_refreshes(
        &self,
        due_by: SystemTime,
        min_hits: u32,
        limits: &Limits,
        mint: &(dyn for<'f> Fn(&'f str) -> AggregationId + Send + Sync),
    ) -> Result<Vec<Arc<AggregationRecord>>, StoreError> {
        let now = self.clock.now();
        let mut index = self.lock();
        let candidates: Vec<(SystemTime, AggregationId)> =
            index.due.iter().take_while(|(at, _)| *at <= due_by).cloned().collect();
        let mut queued = Vec::new();
        for entry in candidates {
            let (at, id) = &entry;
            let old = self.results.get(id).map(|r| r.record.clone()).filter(|_| *at > now);
            let answering = old
                .as_ref()
                .is_some_and(|old| index.by_key.get(&old.key) == Some(id) && !index.refreshing.contains_key(&old.key));
            let farm = old.as_ref().map_or_else(String::new, |old| old.farm_id().to_owned());
            let farm = farm.as_str();
            let candidate = Candidate {
                answering,
                hits: index.hits.get(id).map_or(0, |h| h.count),
                caller_backlog: index.caller_backlog(farm),
                farm_has_work: index.farms.contains_key(farm),
                farms: index.farms.len(),
                live: index.active.len(),
            };
            match (policy::refresh_verdict(candidate, min_hits, limits), old) {
                (RefreshVerdict::Queued, Some(old)) => {
                    index.due.remove(&entry);
                    let refresh = Arc::new(AggregationRecord::refresh_of(mint(old.farm_id()), &old, now));
                    index.farms.entry(farm.to_owned()).or_default().insert(refresh.id.clone(), Place::REFRESH, None);
                    index.active.insert(refresh.id.clone(), refresh.clone());
                    index.refreshing.insert(old.key.clone(), refresh.id.clone());
                    queued.push(refresh);
                }
                (RefreshVerdict::Gone | RefreshVerdict::Queued, _) => {
                    index.due.remove(&entry);
                }
                (RefreshVerdict::Live | RefreshVerdict::Epoch, _) => break,
                (RefreshVerdict::Cold | RefreshVerdict::Backlog | RefreshVerdict::Farms, _) => {}
            }
        }
        Ok(queued)
    }

    async fn farms_with_work(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.lock().farms.keys().cloned().collect())
    }

    async fn queue(&self, farm: &str, count: usize) -> Result<Vec<Arc<AggregationRecord>>, StoreError> {
        let index = self.lock();
        let queue = index.farms.get(farm).into_iter().flat_map(FarmQueue::ids).take(count);
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
        let now = self.clock.now();
        let mut index = self.lock();
        let Index { active, by_key, hits, due, refreshing, families, .. } = &mut *index;
        families.retain(|_, results| {
            results.retain(|(_, at, id)| *at > now && self.results.contains(id));
            !results.is_empty()
        });
        by_key.retain(|_, id| active.contains_key(id) || self.results.contains(id));
        hits.retain(|id, _| active.contains_key(id) || self.results.contains(id));
        refreshing.retain(|_, id| active.contains_key(id));
        while due.first().is_some_and(|(at, _)| *at <= now) {
            due.pop_first();
        }
    }

    fn stats(&self) -> StoreStats {
        let (cached, cached_bytes, expirations, evictions) = self.results.stats();
        let index = self.lock();
        let farms = index
            .farms
            .iter()
            .map(|(farm, queue)| {
                let head_running =
                    queue.head().and_then(|id| index.active.get(id)).is_some_and(|r| r.state == State::Running);
                (farm.clone(), FarmLoad::of(queue.len(), head_running))
            })
            .collect();
        StoreStats {
            active: index.active.len(),
            cached,
            cached_bytes,
            expirations,
            evictions,
            farms,
            up: true,
            memory: None,
        }
    }
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
    const ROOMY: Limits =
        Limits { queue_capacity: 1000, max_live: 1000, max_farms: 1000, caller_capacity: 1000, fair: true };

    /// A store on tokio's clock: its tests run on paused time.
    fn store(max_bytes: u64, grace: Duration) -> MemoryStore {
        MemoryStore::with_clock(max_bytes, grace, Arc::default(), Clock::tokio())
    }

    async fn start_with(store: &MemoryStore, k: &CanonicalKey, f: &Freshness) -> Claimed {
        store
            .claim(k, f, &ROOMY, IdMinter::new().mint(k.farm_id()), "caller", Priority::Interactive)
            .await
            .expect("claimed")
    }

    async fn start(store: &MemoryStore, k: &CanonicalKey) -> Claimed {
        start_with(store, k, &ANY).await
    }

    /// Ends `claimed` COMPLETED with `rows` rows of 100 bytes, valid for `valid_for`.
    async fn complete(store: &MemoryStore, claimed: &Claimed, rows: usize, valid_for: Duration) {
        let mut r = (*claimed.record).clone();
        r.state = State::Completed;
        r.row_count = rows as u64;
        r.expire_time = Some(store.clock.now() + valid_for);
        r.data_time = Some(store.clock.now());
        let mut block = RowBlockBuilder::new(|_, buf| buf.extend_from_slice(&[0; 100]));
        (0..rows).for_each(|_| block.push(&StatisticsRow::default()));
        let token = store.leases.newest_token(r.farm_id());
        let lease = Lease::granted(r.farm_id(), "test", token, tokio::time::Instant::now(), Duration::from_secs(60));
        assert!(matches!(store.finish(&lease, r, Some(Arc::new(block.finish()))).await, Ok(Written::Done)));
    }

    async fn fail(store: &MemoryStore, claimed: &Claimed, ttl: Duration) {
        let mut r = (*claimed.record).clone();
        r.state = State::Failed;
        r.error = Some(Failure { code: FailureCode::Internal, message: "it broke".into() });
        r.expire_time = Some(store.clock.now() + ttl);
        r.data_time = Some(store.clock.now());
        let token = store.leases.newest_token(r.farm_id());
        let lease = Lease::granted(r.farm_id(), "test", token, tokio::time::Instant::now(), Duration::from_secs(60));
        assert!(matches!(store.finish(&lease, r, None).await, Ok(Written::Done)));
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

    #[tokio::test(start_paused = true)]
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

    #[tokio::test(start_paused = true)]
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
        let s = MemoryStore::with_tombstone_budget(
            1 << 20,
            Duration::ZERO,
            Arc::default(),
            Clock::system(),
            100 * TOMBSTONE_BYTES as u64,
        );
        let mut ids = Vec::new();
        for n in 0..300 {
            let c = start(&s, &key(n)).await;
            complete(&s, &c, 0, Duration::from_secs(60)).await;
            s.tombstones.run_pending_tasks();
            ids.push(c.record.id.clone());
        }
        assert!(s.tombstones.contains_key(ids.last().expect("ids")), "the newest tombstone is kept");
        assert!(!s.tombstones.contains_key(&ids[0]), "the oldest went");
        assert!(s.tombstones.entry_count() <= 100);
    }
}
