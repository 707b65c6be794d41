//! The coordination state behind one narrow interface: which aggregation answers a key, which
//! aggregation an id names, and the results cache with exact per-entry expiry.
//!
//! [`MemoryStore`] keeps it in this process. A store shared by several replicas implements the
//! same [`CoordinationStore`] trait. The per-farm queues live in the scheduler.

use super::aggregation::{Aggregation, AggregationId, Snapshot, State};
use super::error::GatewayError;
use super::key::CanonicalKey;
use moka::notification::RemovalCause;
use moka::policy::EvictionPolicy;
use moka::sync::Cache;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

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

/// What an id names.
#[derive(Debug, Clone)]
pub enum Found {
    /// Queued, running, or terminal and remembered (a FAILED result stays readable after its
    /// TTL, so its id still says why it failed).
    Live(Arc<Aggregation>),
    /// Its results passed their validity at this time.
    Expired(SystemTime),
    /// Its results were dropped to stay within the memory budget.
    Evicted,
    Unknown,
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
    /// Whether the terminal aggregation `s` may answer a Start at `now`.
    fn accepts(&self, s: &Snapshot, now: Instant) -> bool {
        let remaining = s.expire_at.map_or(Duration::ZERO, |at| at.saturating_duration_since(now));
        let needed = if s.state == State::Completed { self.min_remaining } else { Duration::ZERO };
        let fresh = match (self.max_staleness, s.data_at) {
            (Some(max), Some(at)) => now.saturating_duration_since(at) <= max,
            (Some(_), None) => false,
            (None, _) => true,
        };
        !remaining.is_zero() && remaining >= needed && fresh
    }
}

/// Counters for the store's contents.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
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
}

/// The coordination state of the gateway.
pub trait CoordinationStore: Send + Sync + 'static {
    /// Atomically finds the live aggregation for `key` that `freshness` accepts, or registers
    /// the one `create` makes (which may refuse, e.g. when the farm's queue is full).
    fn find_or_insert(
        &self,
        key: &CanonicalKey,
        freshness: &Freshness,
        create: &mut dyn FnMut() -> Result<Arc<Aggregation>, GatewayError>,
    ) -> Result<(Arc<Aggregation>, Disposition), GatewayError>;

    /// Looks up an aggregation by id.
    fn get(&self, id: &str) -> Found;

    /// Moves a terminal aggregation into the results cache, where it stays until its snapshot's
    /// `expire_at` or until the memory budget evicts it (never within its residency grace).
    fn finish(&self, aggregation: &Arc<Aggregation>);

    /// Drops what has expired and index entries that point nowhere.
    fn housekeeping(&self);

    fn stats(&self) -> StoreStats;
}

/// Why a finished aggregation disappeared; remembered so Get can say so.
#[derive(Debug, Clone)]
enum Tombstone {
    Expired(SystemTime),
    Evicted,
    /// A FAILED or TIMED_OUT aggregation past its TTL: small (no rows), kept whole.
    Failed(Arc<Aggregation>),
}

impl Tombstone {
    /// Bytes it holds, for the tombstones' budget.
    fn weight(&self) -> u32 {
        let bytes = match self {
            Self::Expired(_) | Self::Evicted => TOMBSTONE_BYTES,
            Self::Failed(agg) => agg.weight(),
        };
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }

    /// What a result leaves behind when it leaves the cache.
    fn of(agg: &Arc<Aggregation>, evicted: bool) -> Self {
        match agg.with_snapshot(|s| (s.state, s.expire_time)) {
            (State::Completed, _) if evicted => Self::Evicted,
            (State::Completed, at) => Self::Expired(at.unwrap_or_else(SystemTime::now)),
            _ => Self::Failed(agg.clone()),
        }
    }
}

#[derive(Debug, Default)]
struct Index {
    /// Queued and running aggregations.
    active: HashMap<AggregationId, Arc<Aggregation>>,
    /// Terminal aggregations within their residency grace, with its end: held here whatever
    /// the cache's budget does, so a fresh result is never the first thing dropped.
    resident: HashMap<AggregationId, (Arc<Aggregation>, Instant)>,
    /// The aggregation answering each key, active or cached.
    by_key: HashMap<CanonicalKey, AggregationId>,
}

/// The in-process [`CoordinationStore`].
pub struct MemoryStore {
    index: Mutex<Index>,
    results: Cache<AggregationId, Arc<Aggregation>>,
    tombstones: Cache<AggregationId, Tombstone>,
    /// How long a finished result is held regardless of the budget.
    grace: Duration,
    /// Expirations and evictions, counted by the cache's eviction listener.
    removals: Arc<[AtomicU64; 2]>,
}

/// How long Get remembers why an id went away.
const TOMBSTONE_TTL: Duration = Duration::from_secs(24 * 3600);
/// The memory budget of tombstones; the least recently used go first.
const TOMBSTONE_BUDGET_BYTES: u64 = 32 * 1024 * 1024;
/// What a plain tombstone costs: its id, the reason and the cache's bookkeeping.
const TOMBSTONE_BYTES: usize = 160;

impl MemoryStore {
    /// A store whose results cache holds at most `max_bytes` (least recently used results go
    /// first), and which holds each finished result for at least `grace` whatever the budget.
    pub fn new(max_bytes: u64, grace: Duration) -> Self {
        Self::with_tombstone_budget(max_bytes, grace, TOMBSTONE_BUDGET_BYTES)
    }

    fn with_tombstone_budget(max_bytes: u64, grace: Duration, tombstone_bytes: u64) -> Self {
        let tombstones: Cache<AggregationId, Tombstone> = Cache::builder()
            .max_capacity(tombstone_bytes)
            .weigher(|_, t: &Tombstone| t.weight())
            .eviction_policy(EvictionPolicy::lru())
            .time_to_live(TOMBSTONE_TTL)
            .build();
        let graves = tombstones.clone();
        let removals: Arc<[AtomicU64; 2]> = Arc::default();
        let counted = removals.clone();
        let results = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_, agg: &Arc<Aggregation>| u32::try_from(agg.weight()).unwrap_or(u32::MAX))
            .eviction_policy(EvictionPolicy::lru())
            .expire_after(ExpireAtSnapshot)
            .eviction_listener(move |id: Arc<AggregationId>, agg: Arc<Aggregation>, cause| {
                let (tomb, counter) = match cause {
                    RemovalCause::Expired => (Tombstone::of(&agg, false), 0),
                    RemovalCause::Size => (Tombstone::of(&agg, true), 1),
                    RemovalCause::Explicit | RemovalCause::Replaced => return,
                };
                counted[counter].fetch_add(1, Ordering::Relaxed);
                graves.insert(AggregationId::clone(&id), tomb);
            })
            .build();
        Self { index: Mutex::default(), results, tombstones, grace, removals }
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The terminal aggregation `id` from the cache or the residents.
    fn terminal(&self, index: &Index, id: &str) -> Option<Arc<Aggregation>> {
        self.results.get(id).or_else(|| index.resident.get(id).map(|(agg, _)| agg.clone()))
    }
}

impl CoordinationStore for MemoryStore {
    fn find_or_insert(
        &self,
        key: &CanonicalKey,
        freshness: &Freshness,
        create: &mut dyn FnMut() -> Result<Arc<Aggregation>, GatewayError>,
    ) -> Result<(Arc<Aggregation>, Disposition), GatewayError> {
        let mut index = self.lock();
        if let Some(id) = index.by_key.get(key) {
            if let Some(agg) = index.active.get(id) {
                return Ok((agg.clone(), Disposition::Joined));
            }
            let now = Instant::now();
            if let Some(agg) = self.terminal(&index, id).filter(|a| a.with_snapshot(|s| freshness.accepts(s, now))) {
                return Ok((agg, Disposition::Cached));
            }
        }
        let agg = create()?;
        index.active.insert(agg.id.clone(), agg.clone());
        index.by_key.insert(key.clone(), agg.id.clone());
        Ok((agg, Disposition::Started))
    }

    fn get(&self, id: &str) -> Found {
        // Finished results first: they are what most Gets ask for. `finish` puts an aggregation
        // into the cache before it takes it out of `active`, so one that finishes between the
        // first two lookups is found by the third.
        let live = |agg: Arc<Aggregation>| match agg
            .with_snapshot(|s| (s.state == State::Completed && s.is_expired(Instant::now()), s.expire_time))
        {
            (true, at) => Found::Expired(at.unwrap_or_else(SystemTime::now)),
            (false, _) => Found::Live(agg),
        };
        if let Some(agg) = self.results.get(id) {
            return live(agg);
        }
        {
            let index = self.lock();
            if let Some(agg) = index.active.get(id) {
                return Found::Live(agg.clone());
            }
            if let Some(agg) = self.terminal(&index, id) {
                return live(agg);
            }
        }
        match self.tombstones.get(id) {
            Some(Tombstone::Expired(at)) => Found::Expired(at),
            Some(Tombstone::Evicted) => Found::Evicted,
            Some(Tombstone::Failed(agg)) => Found::Live(agg),
            None => Found::Unknown,
        }
    }

    fn finish(&self, aggregation: &Arc<Aggregation>) {
        // The cache checks expiry exactly on reads but reports it about a second late (its
        // timer wheel's granularity), so the tombstone is laid now and replaced on eviction.
        self.tombstones.insert(aggregation.id.clone(), Tombstone::of(aggregation, false));
        let mut index = self.lock();
        // Into the cache before out of `active`, so a concurrent Start never sees neither.
        self.results.insert(aggregation.id.clone(), aggregation.clone());
        if !self.grace.is_zero() {
            index.resident.insert(aggregation.id.clone(), (aggregation.clone(), Instant::now() + self.grace));
        }
        index.active.remove(&aggregation.id);
    }

    fn housekeeping(&self) {
        self.results.run_pending_tasks();
        self.tombstones.run_pending_tasks();
        let now = Instant::now();
        let mut index = self.lock();
        let Index { active, resident, by_key } = &mut *index;
        resident.retain(|_, (_, until)| *until > now);
        by_key.retain(|_, id| active.contains_key(id) || resident.contains_key(id) || self.results.contains_key(id));
    }

    fn stats(&self) -> StoreStats {
        // The caches' counts lag their writes until their pending work runs.
        self.results.run_pending_tasks();
        self.tombstones.run_pending_tasks();
        let index = self.lock();
        StoreStats {
            active: index.active.len(),
            cached: self.results.entry_count(),
            cached_bytes: self.results.weighted_size(),
            keys: index.by_key.len(),
            expirations: self.removals[0].load(Ordering::Relaxed),
            evictions: self.removals[1].load(Ordering::Relaxed),
            tombstones: self.tombstones.entry_count(),
        }
    }
}

/// Each cached aggregation expires exactly at its snapshot's `expire_at`.
struct ExpireAtSnapshot;

impl moka::Expiry<AggregationId, Arc<Aggregation>> for ExpireAtSnapshot {
    fn expire_after_create(&self, _id: &AggregationId, agg: &Arc<Aggregation>, now: Instant) -> Option<Duration> {
        Some(agg.with_snapshot(|s| s.expire_at).map_or(Duration::ZERO, |at| at.saturating_duration_since(now)))
    }

    fn expire_after_update(
        &self,
        id: &AggregationId,
        agg: &Arc<Aggregation>,
        now: Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(id, agg, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::StatisticsRow;
    use crate::gateway::aggregation::{Failure, FailureCode, State};

    fn key(n: u64) -> CanonicalKey {
        crate::gateway::key::test_key(1, n)
    }

    const ANY: Freshness = Freshness { min_remaining: Duration::ZERO, max_staleness: None };

    fn start_with(store: &MemoryStore, k: &CanonicalKey, f: &Freshness) -> (Arc<Aggregation>, Disposition) {
        let minter = crate::gateway::ids::IdMinter::new();
        store.find_or_insert(k, f, &mut || Ok(Arc::new(Aggregation::new(minter.mint(), k.clone())))).expect("inserted")
    }

    fn start(store: &MemoryStore, k: &CanonicalKey) -> (Arc<Aggregation>, Disposition) {
        start_with(store, k, &ANY)
    }

    fn complete(agg: &Aggregation, rows: usize, valid_for: Duration) {
        agg.update(|s| {
            s.state = State::Completed;
            let mut block = crate::gateway::rows::RowBlockBuilder::new(|_, buf| buf.extend_from_slice(&[0; 100]));
            (0..rows).for_each(|_| block.push(&StatisticsRow::default()));
            s.rows = Some(Arc::new(block.finish()));
            s.expire_at = Some(Instant::now() + valid_for);
            s.expire_time = Some(SystemTime::now() + valid_for);
            s.data_at = Some(Instant::now());
        });
    }

    fn fail(agg: &Aggregation, ttl: Duration) {
        agg.update(|s| {
            s.state = State::Failed;
            s.error = Some(Failure { code: FailureCode::Internal, message: "it broke".into() });
            s.expire_at = Some(Instant::now() + ttl);
            s.expire_time = Some(SystemTime::now() + ttl);
            s.data_at = Some(Instant::now());
        });
    }

    fn is_live(found: Found) -> bool {
        matches!(found, Found::Live(_))
    }

    #[test]
    fn identical_keys_join_then_hit_the_cache_then_start_afresh_after_expiry() {
        let store = MemoryStore::new(1 << 20, Duration::ZERO);
        let k = key(1);
        let (a, d) = start(&store, &k);
        assert_eq!(d, Disposition::Started);
        let (b, d) = start(&store, &k);
        assert_eq!((d, &b.id), (Disposition::Joined, &a.id));

        complete(&a, 3, Duration::from_millis(200));
        store.finish(&a);
        let (c, d) = start(&store, &k);
        assert_eq!((d, &c.id), (Disposition::Cached, &a.id));
        assert!(is_live(store.get(&a.id)));

        std::thread::sleep(Duration::from_millis(250));
        assert!(matches!(store.get(&a.id), Found::Expired(_)));
        let (fresh, d) = start(&store, &k);
        assert_eq!(d, Disposition::Started);
        assert_ne!(fresh.id, a.id);
        store.housekeeping();
        assert_eq!(store.stats().keys, 1, "the expired key's index entry is gone, the fresh one stays");
    }

    #[test]
    fn a_refused_creation_leaves_nothing_behind() {
        let store = MemoryStore::new(1 << 20, Duration::ZERO);
        let k = key(2);
        let refused =
            store.find_or_insert(&k, &ANY, &mut || Err(GatewayError::QueueFull { farm_id: "f".into(), capacity: 0 }));
        assert!(refused.is_err());
        assert_eq!(store.stats(), StoreStats::default());
    }

    /// One result of 200 rows of 100 bytes, and the budget that holds exactly two of them.
    fn two_result_budget() -> u64 {
        let (probe, _) = start(&MemoryStore::new(1 << 20, Duration::ZERO), &key(99));
        complete(&probe, 200, Duration::from_secs(60));
        probe.weight() as u64 * 2 + probe.weight() as u64 / 2
    }

    #[test]
    fn the_least_recently_used_result_is_evicted_never_the_fresh_one() {
        let store = MemoryStore::new(two_result_budget(), Duration::ZERO);
        let mut ids = Vec::new();
        for n in 0..3 {
            let (agg, _) = start(&store, &key(n));
            complete(&agg, 200, Duration::from_secs(60));
            store.finish(&agg);
            store.housekeeping();
            ids.push(agg.id.clone());
            if n == 1 {
                assert!(is_live(store.get(&ids[0])), "A is read after B completes: B is now the LRU");
            }
        }
        store.housekeeping();
        assert!(matches!(store.get(&ids[1]), Found::Evicted), "B, the least recently used, is evicted");
        assert!(is_live(store.get(&ids[0])) && is_live(store.get(&ids[2])), "A (read) and C (fresh) stay");
        assert_eq!(store.stats().evictions, 1);
    }

    #[test]
    fn a_result_larger_than_the_budget_is_still_served_within_its_grace() {
        let store = MemoryStore::new(1024, Duration::from_millis(300));
        let (agg, _) = start(&store, &key(1));
        complete(&agg, 200, Duration::from_secs(60));
        store.finish(&agg);
        store.housekeeping();
        assert!(is_live(store.get(&agg.id)), "resident within its grace");
        assert_eq!(start(&store, &key(1)).1, Disposition::Cached);
        std::thread::sleep(Duration::from_millis(350));
        store.housekeeping();
        assert!(matches!(store.get(&agg.id), Found::Evicted), "then the budget wins");
        assert_eq!(start(&store, &key(1)).1, Disposition::Started);
    }

    #[test]
    fn failed_and_empty_results_weigh_what_they_hold() {
        let store = MemoryStore::new(10 * ENTRY_BYTES, Duration::ZERO);
        for n in 0..100 {
            let (agg, _) = start(&store, &key(n));
            fail(&agg, Duration::from_secs(60));
            store.finish(&agg);
        }
        store.housekeeping();
        let stats = store.stats();
        assert!(stats.cached <= 10, "the budget bounds the number of entries: {stats:?}");
        assert!(stats.cached_bytes >= stats.cached * ENTRY_BYTES);
    }
    const ENTRY_BYTES: u64 = crate::gateway::aggregation::ENTRY_OVERHEAD_BYTES as u64;

    #[test]
    fn a_failed_id_still_says_why_after_its_ttl() {
        let store = MemoryStore::new(1 << 20, Duration::ZERO);
        let (agg, _) = start(&store, &key(1));
        fail(&agg, Duration::from_millis(100));
        store.finish(&agg);
        assert_eq!(start(&store, &key(1)).1, Disposition::Cached, "callers see the failure within its TTL");
        std::thread::sleep(Duration::from_millis(150));
        store.housekeeping();
        let Found::Live(seen) = store.get(&agg.id) else { panic!("the failure is remembered") };
        assert_eq!(seen.snapshot().error.as_ref().map(|e| e.message.as_str()), Some("it broke"));
        assert_eq!(start(&store, &key(1)).1, Disposition::Started, "after the TTL a Start retries");
    }

    #[test]
    fn tombstones_keep_the_most_recent_when_full() {
        let store = MemoryStore::with_tombstone_budget(1 << 20, Duration::ZERO, 100 * TOMBSTONE_BYTES as u64);
        let mut ids = Vec::new();
        for n in 0..300 {
            let (agg, _) = start(&store, &key(n));
            complete(&agg, 0, Duration::from_secs(60));
            store.finish(&agg);
            store.tombstones.run_pending_tasks();
            ids.push(agg.id.clone());
        }
        let newest = ids.last().expect("ids");
        assert!(store.tombstones.contains_key(newest), "the newest tombstone is kept");
        assert!(!store.tombstones.contains_key(&ids[0]), "the oldest went");
        assert!(store.stats().tombstones <= 100);
    }

    #[test]
    fn freshness_decides_what_a_cached_result_may_answer() {
        let store = MemoryStore::new(1 << 20, Duration::ZERO);
        let k = key(1);
        let (agg, _) = start(&store, &k);
        complete(&agg, 1, Duration::from_secs(60));
        store.finish(&agg);
        let needs_two_minutes = Freshness { min_remaining: Duration::from_secs(120), max_staleness: None };
        let (again, d) = start_with(&store, &k, &needs_two_minutes);
        assert_eq!(d, Disposition::Started, "60 s left is too little to read it");
        assert!(is_live(store.get(&agg.id)), "the old id keeps working");
        complete(&again, 1, Duration::from_secs(600));
        store.finish(&again);
        std::thread::sleep(Duration::from_millis(30));
        let strict = Freshness { min_remaining: Duration::ZERO, max_staleness: Some(Duration::from_millis(10)) };
        assert_eq!(start_with(&store, &k, &strict).1, Disposition::Started, "older than the caller accepts");
        let lax = Freshness { min_remaining: Duration::ZERO, max_staleness: Some(Duration::from_secs(60)) };
        assert_eq!(start_with(&store, &k, &lax).1, Disposition::Joined, "the fresher one is running");
    }
}
