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
use moka::notification::RemovalCause;
use moka::policy::EvictionPolicy;
use moka::sync::Cache;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
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
}

impl CachedResult {
    pub fn new(record: Arc<AggregationRecord>, rows: Option<Rows>) -> Self {
        Self { record, rows, view: EncodedView::default() }
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

/// Terminal results by id.
pub struct ResultsCache {
    /// Hashed by foldhash rather than SipHash: every cache hit hashes its id, and the ids
    /// inserted are the gateway's own, so no caller can choose keys that collide.
    cache: Cache<AggregationId, Arc<CachedResult>, foldhash::fast::RandomState>,
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
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_, r: &Arc<CachedResult>| u32::try_from(r.weight()).unwrap_or(u32::MAX))
            .eviction_policy(EvictionPolicy::lru())
            .expire_after(ExpireAtRecord(clock))
            .eviction_listener(move |_id: Arc<AggregationId>, result: Arc<CachedResult>, cause| {
                let removal = match cause {
                    RemovalCause::Expired => Removal::Expired,
                    RemovalCause::Size => Removal::Evicted,
                    RemovalCause::Explicit | RemovalCause::Replaced => return,
                };
                counted[usize::from(removal == Removal::Evicted)].fetch_add(1, Ordering::Relaxed);
                on_removed(&result, removal);
            })
            .build_with_hasher(foldhash::fast::RandomState::default());
        Self { cache, resident: Mutex::default(), grace, removals }
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
        self.cache.get(id).or_else(|| self.residents().get(id).map(|(r, _)| r.clone()))
    }

    /// Whether `id` is held.
    pub fn contains(&self, id: &str) -> bool {
        self.cache.contains_key(id) || self.residents().contains_key(id)
    }

    pub fn insert(&self, result: Arc<CachedResult>) {
        let id = result.record.id.clone();
        if !self.grace.is_zero() {
            self.residents().insert(id.clone(), (result.clone(), Instant::now() + self.grace));
        }
        self.cache.insert(id, result);
    }

    /// Drops what expired and the residents whose grace is over.
    pub fn housekeeping(&self) {
        self.cache.run_pending_tasks();
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
    use std::cell::Cell;

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
