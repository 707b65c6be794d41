//! The results cache of one replica: terminal aggregations with their rows, immutable, each
//! until its expiry, within a memory budget that evicts the least recently used first. A
//! finished result is held for a residency grace whatever the budget, so its own long-polls and
//! first pages are served before it can be evicted.
//!
//! With the in-memory store this is where rows live; with a shared store it is the near-cache
//! in front of it, so cache-hit Gets never leave the process.

use crate::gateway::clock::Clock;
use crate::gateway::record::{AggregationId, AggregationRecord, Rows};
use bytes::Bytes;
use dashmap::DashMap;
use moka::notification::RemovalCause;
use moka::policy::EvictionPolicy;
use moka::sync::Cache;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;
use tokio::time::Instant;

/// A terminal aggregation as Get serves it.
#[derive(Debug)]
pub struct CachedResult {
    pub record: Arc<AggregationRecord>,
    /// Set when COMPLETED.
    pub rows: Option<Rows>,
    /// The transport's encoding of the record, made by the first reader.
    pub view: EncodedView,
    /// Reads from the results cache's view, for telling the cache of some of them.
    reads: AtomicU32,
}

impl CachedResult {
    pub fn new(record: Arc<AggregationRecord>, rows: Option<Rows>) -> Self {
        Self { record, rows, view: EncodedView::default(), reads: AtomicU32::new(0) }
    }

    /// Bytes held, for the budget.
    pub fn weight(&self) -> usize {
        self.record.weight() + self.rows.as_ref().map_or(0, |r| r.heap_bytes())
    }
}

/// The transport's encodings of an immutable result, each made by the first reader that needs
/// it and shared by the rest: the record's public view, and the head of each page read (the
/// view and the next page's token). The gateway never reads them.
#[derive(Debug, Default)]
pub struct EncodedView {
    view: OnceLock<Bytes>,
    /// Page heads by where the next page starts (`None`: the last page), for the first
    /// [`PAGE_HEADS_KEPT`] pages read; set once each, read without a lock.
    heads: OnceLock<Box<[PageHead; PAGE_HEADS_KEPT]>>,
}

/// One kept page head: where the next page starts, and the encoded head.
type PageHead = OnceLock<(Option<usize>, Bytes)>;

/// Page heads kept per result (a few hundred bytes each): the pages most read are the first
/// ones of the most popular results; a page beyond these is encoded for each response.
pub(crate) const PAGE_HEADS_KEPT: usize = 16;

impl EncodedView {
    /// The encoding of the view, made by `encode` if no reader has made it yet.
    pub fn get_or_init(&self, encode: impl FnOnce() -> Bytes) -> Bytes {
        self.view.get_or_init(encode).clone()
    }

    /// The head of the page followed by one starting at `next` (`None`: the last page), made by
    /// `encode` if no reader has made it yet.
    pub fn page_head(&self, next: Option<usize>, encode: impl FnOnce() -> Bytes) -> Bytes {
        let slots = self.heads.get_or_init(Default::default);
        for slot in slots.iter() {
            match slot.get() {
                Some((at, head)) if *at == next => return head.clone(),
                Some(_) => {}
                None => {
                    let head = encode();
                    // Another reader may have filled the slot meanwhile: this head is then
                    // just not kept.
                    let _ = slot.set((next, head.clone()));
                    return head;
                }
            }
        }
        encode()
    }
}

/// Why a result left the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// Its validity ended.
    Expired,
    /// The budget needed the room.
    Evicted,
}

type OnRemoved = Box<dyn Fn(&Arc<CachedResult>, Removal) + Send + Sync>;

/// Ids hashed by foldhash rather than SipHash: every cache hit hashes its id, and the ids
/// inserted are the gateway's own, so no caller can choose keys that collide.
type Hasher = foldhash::fast::RandomState;

/// The first read of a result, and one in this many after it, also goes through the budgeted
/// cache, so that its least-recently-used order sees what is read.
const TOUCH_EVERY: u32 = 16;

/// Terminal results by id.
///
/// The budgeted cache (moka: the memory budget, least recently used first out, expiry at each
/// result's validity) decides what is held. A read does not go through it: its bookkeeping of
/// every read (a log of reads, applied in batches) cost a cache hit as much as the rest of the
/// lookup (issue 28). Reads look in `held`, a plain concurrent map of the same results, kept in
/// step by the cache's removal listener; a result's first read and every [`TOUCH_EVERY`]th
/// after it also read the cache, so the order it evicts in is least recently used as of those
/// reads. `held` is only ever a view: a result
/// the cache holds but `held` misses is found in the cache and put back, and housekeeping
/// drops from `held` whatever the cache no longer holds (a removal that raced an insert).
pub struct ResultsCache {
    cache: Cache<AggregationId, Arc<CachedResult>, Hasher>,
    held: Arc<DashMap<AggregationId, Arc<CachedResult>, Hasher>>,
    /// Results within their residency grace, with its end.
    resident: Mutex<HashMap<AggregationId, (Arc<CachedResult>, Instant)>>,
    grace: Duration,
    /// Expirations and evictions so far.
    removals: Arc<[AtomicU64; 2]>,
}

impl std::fmt::Debug for ResultsCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResultsCache").field("entries", &self.cache.entry_count()).finish_non_exhaustive()
    }
}

impl ResultsCache {
    /// At most `max_bytes` (rows plus each entry's overhead), every result held for `grace`
    /// at least; `on_removed` learns of every result that leaves by expiry or eviction.
    pub fn new(max_bytes: u64, grace: Duration, on_removed: OnRemoved) -> Self {
        Self::with_clock(max_bytes, grace, on_removed, Clock::system())
    }

    /// [`Self::new`], each result expiring at its record's `expire_time` by `clock`.
    pub fn with_clock(max_bytes: u64, grace: Duration, on_removed: OnRemoved, clock: Clock) -> Self {
        let removals: Arc<[AtomicU64; 2]> = Arc::default();
        let counted = removals.clone();
        let held: Arc<DashMap<AggregationId, Arc<CachedResult>, Hasher>> = Arc::default();
        let view = held.clone();
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_, r: &Arc<CachedResult>| u32::try_from(r.weight()).unwrap_or(u32::MAX))
            .eviction_policy(EvictionPolicy::lru())
            .expire_after(ExpireAtRecord(clock))
            .eviction_listener(move |id: Arc<AggregationId>, result: Arc<CachedResult>, cause| {
                if cause != RemovalCause::Replaced {
                    view.remove_if(&**id, |_, held| Arc::ptr_eq(held, &result));
                }
                let removal = match cause {
                    RemovalCause::Expired => Removal::Expired,
                    RemovalCause::Size => Removal::Evicted,
                    RemovalCause::Explicit | RemovalCause::Replaced => return,
                };
                counted[usize::from(removal == Removal::Evicted)].fetch_add(1, Ordering::Relaxed);
                on_removed(&result, removal);
            })
            .build_with_hasher(Hasher::default());
        Self { cache, held, resident: Mutex::default(), grace, removals }
    }

    fn residents(&self) -> MutexGuard<'_, HashMap<AggregationId, (Arc<CachedResult>, Instant)>> {
        self.resident.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The most bytes it holds.
    pub fn max_bytes(&self) -> u64 {
        self.cache.policy().max_capacity().unwrap_or(u64::MAX)
    }

    /// The result `id`, if held (expired ones included: the caller decides what expiry means).
    pub fn get(&self, id: &str) -> Option<Arc<CachedResult>> {
        if let Some(held) = self.held.get(id) {
            let result = held.value().clone();
            drop(held);
            if result.reads.fetch_add(1, Ordering::Relaxed) % TOUCH_EVERY == 0 {
                self.cache.get(id);
            }
            return Some(result);
        }
        if let Some(result) = self.cache.get(id) {
            self.held.insert(result.record.id.clone(), result.clone());
            return Some(result);
        }
        self.residents().get(id).map(|(r, _)| r.clone())
    }

    /// Whether `id` is held.
    pub fn contains(&self, id: &str) -> bool {
        self.held.contains_key(id) || self.cache.contains_key(id) || self.residents().contains_key(id)
    }

    pub fn insert(&self, result: Arc<CachedResult>) {
        let id = result.record.id.clone();
        if !self.grace.is_zero() {
            self.residents().insert(id.clone(), (result.clone(), Instant::now() + self.grace));
        }
        // Into the view first: the cache may evict it at once, and its listener then takes it
        // out of the view again.
        self.held.insert(id.clone(), result.clone());
        self.cache.insert(id, result);
    }

    /// Drops what expired, what the view holds that the cache no longer does, and the
    /// residents whose grace is over.
    pub fn housekeeping(&self) {
        self.cache.run_pending_tasks();
        // No lock of the view is held while the cache is asked (its listener takes them).
        let ids: Vec<AggregationId> = self.held.iter().map(|held| held.key().clone()).collect();
        for id in ids.iter().filter(|id| !self.cache.contains_key(&***id)) {
            self.held.remove(&**id);
        }
        let now = Instant::now();
        self.residents().retain(|_, (_, until)| *until > now);
    }

    /// Entries and bytes held by the budgeted cache, expirations and evictions so far.
    pub fn stats(&self) -> (u64, u64, u64, u64) {
        self.cache.run_pending_tasks();
        (
            self.cache.entry_count(),
            self.cache.weighted_size(),
            self.removals[0].load(Ordering::Relaxed),
            self.removals[1].load(Ordering::Relaxed),
        )
    }
}

/// Each result expires exactly at its record's `expire_time`.
struct ExpireAtRecord(Clock);

impl moka::Expiry<AggregationId, Arc<CachedResult>> for ExpireAtRecord {
    fn expire_after_create(
        &self,
        _id: &AggregationId,
        r: &Arc<CachedResult>,
        _now: std::time::Instant,
    ) -> Option<Duration> {
        Some(r.record.remaining(self.0.now()))
    }

    fn expire_after_update(
        &self,
        id: &AggregationId,
        r: &Arc<CachedResult>,
        now: std::time::Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(id, r, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::StatisticsRow;
    use crate::gateway::ids::IdMinter;
    use crate::gateway::record::State;
    use crate::gateway::rows::RowBlockBuilder;
    use std::cell::Cell;
    use std::time::SystemTime;

    /// A COMPLETED result of `rows` rows of 100 bytes, valid for `valid_for` from now.
    fn result(n: u64, rows: usize, valid_for: Duration) -> Arc<CachedResult> {
        let key = crate::gateway::key::test_key(1, n);
        let id = IdMinter::new().mint(key.farm_id());
        let mut record = AggregationRecord::queued(id, key, SystemTime::now());
        record.state = State::Completed;
        record.row_count = rows as u64;
        record.expire_time = Some(SystemTime::now() + valid_for);
        let mut block = RowBlockBuilder::new(|_, buf| buf.extend_from_slice(&[0; 100]));
        (0..rows).for_each(|_| block.push(&StatisticsRow::default()));
        Arc::new(CachedResult::new(Arc::new(record), Some(Arc::new(block.finish()))))
    }

    fn cache(max_bytes: u64) -> (ResultsCache, Arc<AtomicU64>) {
        let removed = Arc::new(AtomicU64::new(0));
        let seen = removed.clone();
        let on_removed = Box::new(move |_: &Arc<CachedResult>, _| {
            seen.fetch_add(1, Ordering::Relaxed);
        });
        (ResultsCache::new(max_bytes, Duration::ZERO, on_removed), removed)
    }

    #[test]
    fn reads_see_what_the_cache_holds_and_nothing_it_evicted_or_expired() {
        const HOUR: Duration = Duration::from_secs(3600);
        let (cache, removed) = cache(150_000);
        let results: Vec<_> = (0..4).map(|n| result(n, 500, HOUR)).collect();
        for r in &results {
            cache.insert(r.clone());
        }
        // Reads of the last two, many (most from the view): they stay recently used.
        for _ in 0..100 {
            for r in &results[2..] {
                assert!(Arc::ptr_eq(&cache.get(&r.record.id).expect("held"), r));
            }
        }
        cache.housekeeping();
        let held: Vec<bool> = results.iter().map(|r| cache.get(&r.record.id).is_some()).collect();
        assert_eq!(held, [false, false, true, true], "the budget holds two; the first two left");
        assert!(!cache.contains(&results[0].record.id));
        assert_eq!(removed.load(Ordering::Relaxed), 2);
        assert_eq!(cache.held.len(), 2, "the view holds what the cache holds");

        // A result whose validity is over leaves the view with the cache.
        let gone = result(9, 10, Duration::ZERO);
        cache.insert(gone.clone());
        std::thread::sleep(Duration::from_millis(5));
        cache.housekeeping();
        assert!(cache.get(&gone.record.id).is_none());
        assert_eq!(cache.held.len(), 2);
    }

    #[test]
    fn the_view_is_mended_from_the_cache_and_never_holds_what_the_cache_lost() {
        let (cache, _) = cache(1 << 30);
        let kept = result(1, 10, Duration::from_secs(3600));
        cache.insert(kept.clone());
        // A removal that raced an insert left the view without it: a read finds it anyway.
        cache.held.remove(&*kept.record.id);
        assert!(Arc::ptr_eq(&cache.get(&kept.record.id).expect("from the cache"), &kept));
        assert!(cache.held.contains_key(&*kept.record.id), "and puts it back in the view");
        // One the cache never held (or no longer does) is dropped from the view by housekeeping.
        let stray = result(2, 10, Duration::from_secs(3600));
        cache.held.insert(stray.record.id.clone(), stray.clone());
        cache.housekeeping();
        assert!(cache.get(&stray.record.id).is_none());
        assert!(cache.get(&kept.record.id).is_some());
    }

    #[test]
    fn a_page_head_is_encoded_once_per_page_for_the_first_pages_read() {
        let view = EncodedView::default();
        let made = Cell::new(0);
        let encode = |next: Option<usize>| {
            made.set(made.get() + 1);
            Bytes::from(format!("head-{next:?}"))
        };
        for _ in 0..3 {
            for next in [Some(100), Some(200), None] {
                assert_eq!(view.page_head(next, || encode(next)), format!("head-{next:?}").as_bytes());
            }
        }
        assert_eq!(made.get(), 3, "each page's head made once");
        // Past the pages kept, a head is made for each read, and still right.
        for next in (0..PAGE_HEADS_KEPT).map(|n| Some(1000 + n)) {
            view.page_head(next, || encode(next));
        }
        made.set(0);
        let beyond = Some(5000);
        assert_eq!(view.page_head(beyond, || encode(beyond)), &b"head-Some(5000)"[..]);
        assert_eq!(view.page_head(beyond, || encode(beyond)), &b"head-Some(5000)"[..]);
        assert_eq!(made.get(), 2);
        assert_eq!(view.page_head(Some(100), || encode(Some(100))), &b"head-Some(100)"[..]);
        assert_eq!(made.get(), 2, "the first pages stay kept");
    }
}
