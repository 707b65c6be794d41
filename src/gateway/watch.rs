//! Watching aggregations: every watcher of one aggregation in this process is fed by one
//! source, a task that re-reads the aggregation from the store when it (or anything on its
//! farm: the queue moved, the head started) changes, and publishes what a watcher sees only
//! when that differs from the last. Watchers never read the store or the upstream themselves,
//! so their number costs memory, not store or upstream calls.
//!
//! A source ends when its aggregation is terminal (after publishing it), when its last watcher
//! goes, when the aggregation can no longer be read, or when the gateway shuts down; its
//! watchers' channels then close after the latest state.

use super::clock::Clock;
use super::coordination::wakeups::{Waiter, Wakeups, farm_topic};
use super::coordination::{AggregationStore, Found};
use super::estimate::Estimate;
use super::record::{AggregationId, AggregationRecord};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often a source re-reads its aggregation even without a wake-up (a lost notification
/// never strands a watcher, and estimates of a late aggregation move on).
const RECHECK_INTERVAL: Duration = Duration::from_secs(5);

/// An aggregation as its watchers see it.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    pub record: Arc<AggregationRecord>,
    /// While QUEUED: how many aggregations are ahead of it on its farm.
    pub queue_position: u32,
    pub estimate: Estimate,
}

impl View {
    pub fn is_terminal(&self) -> bool {
        self.record.state.is_terminal()
    }

    /// A terminal aggregation's view: nothing to predict.
    pub fn terminal(record: Arc<AggregationRecord>) -> Self {
        Self { record, queue_position: 0, estimate: Estimate::default() }
    }
}

/// What a read found, as a watcher sees it (upstream Starts paced `start_gap` apart): `None`
/// when it cannot be read any more.
pub(crate) async fn view_of(
    store: &dyn AggregationStore,
    found: Found,
    start_gap: Duration,
    now: std::time::SystemTime,
) -> Result<Option<View>, super::StoreError> {
    Ok(match found {
        Found::Active { record, queue_position } => {
            let estimate = super::estimate::of(store, &record, queue_position, start_gap, now).await?;
            Some(View { record, queue_position, estimate })
        }
        Found::Terminal(result) => Some(View::terminal(result.record.clone())),
        Found::RowsLost(record) | Found::Large(record) => Some(View::terminal(record)),
        Found::Expired(_) | Found::Evicted | Found::Unknown => None,
    })
}

/// The sources of this process, by aggregation id.
pub(crate) struct Watches {
    store: Arc<dyn AggregationStore>,
    wakeups: Arc<Wakeups>,
    sources: Mutex<HashMap<AggregationId, watch::Sender<View>>>,
    /// The least time between two upstream Starts (the gateway's pacing).
    start_gap: Duration,
    clock: Clock,
    cancel: CancellationToken,
}

impl Watches {
    /// Sources read `store`, are woken through `wakeups`, predict with upstream Starts paced
    /// `start_gap` apart, and end when `cancel` fires.
    pub(crate) fn new(
        store: Arc<dyn AggregationStore>,
        wakeups: Arc<Wakeups>,
        start_gap: Duration,
        clock: Clock,
        cancel: CancellationToken,
    ) -> Self {
        Self { store, wakeups, sources: Mutex::default(), start_gap, clock, cancel }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<AggregationId, watch::Sender<View>>> {
        self.sources.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sources running now (aggregations watched in this process).
    pub(crate) fn sources(&self) -> usize {
        self.lock().len()
    }

    /// A watcher of the aggregation `first` shows: its current state at once, then each
    /// change. A terminal one is sent and the channel closes.
    pub(crate) fn subscribe(self: &Arc<Self>, first: View) -> watch::Receiver<View> {
        if first.is_terminal() || self.cancel.is_cancelled() {
            return watch::channel(first).1;
        }
        let id = first.record.id.clone();
        let mut sources = self.lock();
        if let Some(source) = sources.get(&id) {
            return source.subscribe();
        }
        let farm = first.record.farm_id().to_owned();
        let (tx, rx) = watch::channel(first);
        // Registered before the source's first read, so no change falls in between.
        let wakes = [self.wakeups.waiter(&id), self.wakeups.waiter(&farm_topic(&farm))];
        sources.insert(id.clone(), tx.clone());
        tokio::spawn(self.clone().feed(id, tx, wakes));
        rx
    }

    /// One aggregation's source: reads it on every wake-up and publishes each change.
    async fn feed(self: Arc<Self>, id: AggregationId, tx: watch::Sender<View>, wakes: [Waiter; 2]) {
        let [mut own, mut farm] = wakes;
        loop {
            match self.store.read(&id).await {
                Ok(found) => match view_of(self.store.as_ref(), found, self.start_gap, self.clock.now()).await {
                    Ok(Some(view)) => {
                        let terminal = view.is_terminal();
                        tx.send_if_modified(|seen| {
                            let changed = *seen != view;
                            *seen = view;
                            changed
                        });
                        if terminal {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => tracing::debug!(aggregation = %id, error = %e, "watch: cannot read; retrying"),
                },
                Err(e) => tracing::debug!(aggregation = %id, error = %e, "watch: cannot read; retrying"),
            }
            tokio::select! {
                () = own.woken() => {}
                () = farm.woken() => {}
                () = tokio::time::sleep(RECHECK_INTERVAL) => {}
                () = tx.closed() => {
                    // The last watcher went; one that arrives meanwhile keeps the source.
                    if tx.receiver_count() == 0 && self.remove_if_unwatched(&id, &tx) {
                        return;
                    }
                }
                () = self.cancel.cancelled() => break,
            }
        }
        self.remove(&id, &tx);
    }

    /// Removes the source of `id` if nobody watches it; whether it did.
    fn remove_if_unwatched(&self, id: &AggregationId, tx: &watch::Sender<View>) -> bool {
        let mut sources = self.lock();
        if tx.receiver_count() > 0 {
            return false;
        }
        if sources.get(id).is_some_and(|s| s.same_channel(tx)) {
            sources.remove(id);
        }
        true
    }

    fn remove(&self, id: &AggregationId, tx: &watch::Sender<View>) {
        let mut sources = self.lock();
        if sources.get(id).is_some_and(|s| s.same_channel(tx)) {
            sources.remove(id);
        }
    }
}
