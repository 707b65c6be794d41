//! The coordination state behind one narrow interface: which aggregation answers a key, which
//! aggregation an id names, and the results cache with exact per-entry expiry.
//!
//! [`MemoryStore`] keeps it in this process. A store shared by several replicas implements the
//! same [`CoordinationStore`] trait. The per-farm queues live in the scheduler.

use super::aggregation::{Aggregation, AggregationId};
use super::error::GatewayError;
use super::key::CanonicalKey;
use moka::notification::RemovalCause;
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
    Live(Arc<Aggregation>),
    /// Its results passed their validity at this time.
    Expired(SystemTime),
    /// Its results were dropped to stay within the memory budget.
    Evicted,
    Unknown,
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
}

/// The coordination state of the gateway.
pub trait CoordinationStore: Send + Sync + 'static {
    /// Atomically finds the live aggregation for `key`, or registers the one `create` makes
    /// (which may refuse, e.g. when the farm's queue is full).
    fn find_or_insert(
        &self,
        key: &CanonicalKey,
        create: &mut dyn FnMut() -> Result<Arc<Aggregation>, GatewayError>,
    ) -> Result<(Arc<Aggregation>, Disposition), GatewayError>;

    /// Looks up an aggregation by id.
    fn get(&self, id: &str) -> Found;

    /// Moves a terminal aggregation into the results cache, where it stays until its snapshot's
    /// `expire_at` or until the memory budget evicts it.
    fn finish(&self, aggregation: &Arc<Aggregation>);

    /// Drops what has expired and index entries that point nowhere.
    fn housekeeping(&self);

    fn stats(&self) -> StoreStats;
}

/// Why a finished aggregation disappeared; remembered so Get can say so.
#[derive(Debug, Clone, Copy)]
enum Tombstone {
    Expired(SystemTime),
    Evicted,
}

#[derive(Debug, Default)]
struct Index {
    /// Queued and running aggregations.
    active: HashMap<AggregationId, Arc<Aggregation>>,
    /// The aggregation answering each key, active or cached.
    by_key: HashMap<CanonicalKey, AggregationId>,
}

/// The in-process [`CoordinationStore`].
pub struct MemoryStore {
    index: Mutex<Index>,
    results: Cache<AggregationId, Arc<Aggregation>>,
    tombstones: Cache<AggregationId, Tombstone>,
    /// Expirations and evictions, counted by the cache's eviction listener.
    removals: Arc<[AtomicU64; 2]>,
}

/// How long Get remembers why an id went away.
const TOMBSTONE_TTL: Duration = Duration::from_secs(24 * 3600);
/// How many such ids it remembers at most.
const MAX_TOMBSTONES: u64 = 100_000;

impl MemoryStore {
    /// A store whose results cache holds at most `max_bytes` of rows.
    pub fn new(max_bytes: u64) -> Self {
        let tombstones: Cache<AggregationId, Tombstone> =
            Cache::builder().max_capacity(MAX_TOMBSTONES).time_to_live(TOMBSTONE_TTL).build();
        let graves = tombstones.clone();
        let removals: Arc<[AtomicU64; 2]> = Arc::default();
        let counted = removals.clone();
        let results = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_, agg: &Arc<Aggregation>| u32::try_from(agg.weight()).unwrap_or(u32::MAX).max(1))
            .expire_after(ExpireAtSnapshot)
            .eviction_listener(move |id: Arc<AggregationId>, agg: Arc<Aggregation>, cause| {
                let (tomb, counter) = match cause {
                    RemovalCause::Expired => {
                        (Tombstone::Expired(agg.with_snapshot(|s| s.expire_time).unwrap_or_else(SystemTime::now)), 0)
                    }
                    RemovalCause::Size => (Tombstone::Evicted, 1),
                    RemovalCause::Explicit | RemovalCause::Replaced => return,
                };
                counted[counter].fetch_add(1, Ordering::Relaxed);
                graves.insert(AggregationId::clone(&id), tomb);
            })
            .build();
        Self { index: Mutex::default(), results, tombstones, removals }
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A cached aggregation that is still valid.
    fn valid_result(&self, id: &str) -> Option<Arc<Aggregation>> {
        self.results.get(id).filter(|a| !a.with_snapshot(|s| s.is_expired(Instant::now())))
    }
}

impl CoordinationStore for MemoryStore {
    fn find_or_insert(
        &self,
        key: &CanonicalKey,
        create: &mut dyn FnMut() -> Result<Arc<Aggregation>, GatewayError>,
    ) -> Result<(Arc<Aggregation>, Disposition), GatewayError> {
        let mut index = self.lock();
        if let Some(id) = index.by_key.get(key) {
            if let Some(agg) = index.active.get(id) {
                return Ok((agg.clone(), Disposition::Joined));
            }
            if let Some(agg) = self.valid_result(id) {
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
        let cached = || {
            self.results.get(id).map(|agg| match agg.with_snapshot(|s| (s.is_expired(Instant::now()), s.expire_time)) {
                (true, at) => Found::Expired(at.unwrap_or_else(SystemTime::now)),
                (false, _) => Found::Live(agg),
            })
        };
        if let Some(found) = cached() {
            return found;
        }
        if let Some(agg) = self.lock().active.get(id) {
            return Found::Live(agg.clone());
        }
        if let Some(found) = cached() {
            return found;
        }
        match self.tombstones.get(id) {
            Some(Tombstone::Expired(at)) => Found::Expired(at),
            Some(Tombstone::Evicted) => Found::Evicted,
            None => Found::Unknown,
        }
    }

    fn finish(&self, aggregation: &Arc<Aggregation>) {
        // The cache checks expiry exactly on reads but reports it about a second late (its
        // timer wheel's granularity), so the tombstone is laid now and replaced on eviction.
        let expired_at = aggregation.with_snapshot(|s| s.expire_time).unwrap_or_else(SystemTime::now);
        self.tombstones.insert(aggregation.id.clone(), Tombstone::Expired(expired_at));
        let mut index = self.lock();
        // Into the cache before out of `active`, so a concurrent Start never sees neither.
        self.results.insert(aggregation.id.clone(), aggregation.clone());
        index.active.remove(&aggregation.id);
    }

    fn housekeeping(&self) {
        self.results.run_pending_tasks();
        self.tombstones.run_pending_tasks();
        let mut index = self.lock();
        let Index { active, by_key } = &mut *index;
        by_key.retain(|_, id| active.contains_key(id) || self.results.contains_key(id));
    }

    fn stats(&self) -> StoreStats {
        // The cache's counts lag its writes until its pending work runs.
        self.results.run_pending_tasks();
        let index = self.lock();
        StoreStats {
            active: index.active.len(),
            cached: self.results.entry_count(),
            cached_bytes: self.results.weighted_size(),
            keys: index.by_key.len(),
            expirations: self.removals[0].load(Ordering::Relaxed),
            evictions: self.removals[1].load(Ordering::Relaxed),
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
    use crate::gateway::aggregation::State;

    fn key(n: u64) -> CanonicalKey {
        crate::gateway::key::test_key(1, n)
    }

    fn start(store: &MemoryStore, k: &CanonicalKey) -> (Arc<Aggregation>, Disposition) {
        store.find_or_insert(k, &mut || Ok(Arc::new(Aggregation::new(k.clone())))).expect("inserted")
    }

    fn complete(agg: &Aggregation, rows: usize, valid_for: Duration) {
        agg.update(|s| {
            s.state = State::Completed;
            let mut block = crate::gateway::rows::RowBlockBuilder::new(|_, buf| buf.extend_from_slice(&[0; 100]));
            (0..rows).for_each(|_| block.push(&StatisticsRow::default()));
            s.rows = Some(Arc::new(block.finish()));
            s.expire_at = Some(Instant::now() + valid_for);
            s.expire_time = Some(SystemTime::now() + valid_for);
        });
    }

    #[test]
    fn identical_keys_join_then_hit_the_cache_then_start_afresh_after_expiry() {
        let store = MemoryStore::new(1 << 20);
        let k = key(1);
        let (a, d) = start(&store, &k);
        assert_eq!(d, Disposition::Started);
        let (b, d) = start(&store, &k);
        assert_eq!((d, &b.id), (Disposition::Joined, &a.id));

        complete(&a, 3, Duration::from_millis(200));
        store.finish(&a);
        let (c, d) = start(&store, &k);
        assert_eq!((d, &c.id), (Disposition::Cached, &a.id));
        assert!(matches!(store.get(&a.id), Found::Live(_)));

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
        let store = MemoryStore::new(1 << 20);
        let k = key(2);
        let refused =
            store.find_or_insert(&k, &mut || Err(GatewayError::QueueFull { farm_id: "f".into(), capacity: 0 }));
        assert!(refused.is_err());
        assert_eq!(store.stats(), StoreStats::default());
    }

    #[test]
    fn the_memory_budget_evicts_and_get_says_so() {
        let store = MemoryStore::new(64 * 1024);
        let mut ids = Vec::new();
        for n in 0..20 {
            let (agg, _) = start(&store, &key(n));
            complete(&agg, 200, Duration::from_secs(60));
            store.finish(&agg);
            ids.push(agg.id.clone());
        }
        store.housekeeping();
        assert!(store.stats().cached_bytes <= 64 * 1024);
        assert!(ids.iter().any(|id| matches!(store.get(id), Found::Evicted)));
        assert!(matches!(store.get("agg-unknown"), Found::Unknown));
    }
}
