//! Farm workers: distinct aggregations of one farm run upstream strictly one at a time, in
//! arrival order, whichever replica drives the farm; farms run independently.
//!
//! A replica drives a farm only while it holds the farm's lease (renewed at a third of its TTL;
//! the worker stops the moment a renewal fails), so at most one worker anywhere runs a farm's
//! head aggregation. The dispatcher starts a worker when this replica queues work on a farm and,
//! every scan, for any farm with work whose lease is free (another replica's worker died).
//!
//! The worker is a supervisor: it runs each aggregation in a task of its own and, whatever ends
//! that task (a panic, the run limit), makes sure the aggregation ends and the farm moves on.

use super::clock::Clock;
use super::coordination::Lease;
use super::coordination::{AggregationStore, Found, Head, QueueFault, Wakeups};
use super::record::AggregationRecord;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long past the run limit the supervisor waits before it ends a run: the lifecycle's own
/// deadlines (the result validity, the default limit) fall on the same moment and end the
/// aggregation with the more specific reason.
const SUPERVISOR_SLACK: Duration = Duration::from_secs(2);

/// How long giving up the leases at shutdown may take.
const RELEASE_AT_SHUTDOWN: Duration = Duration::from_secs(2);

/// How long a run whose lease was lost may take to stop by itself before it is aborted. It
/// stops at its next write or Start check, at once while it waits or polls; only an upstream
/// Start being answered (bounded by the SDK's operation timeout) is let finish, so that the
/// upstream aggregation it created is recorded, or left for the next holder, never forgotten.
const STOP_AFTER_LOSS: Duration = Duration::from_secs(35);

/// Why the farm's supervisor ended an aggregation its runner did not.
#[derive(Debug, Clone)]
pub(crate) enum Abandoned {
    /// The task driving it panicked (or ended without a terminal state).
    Crashed(String),
    /// It ran longer than the run limit.
    Overran(Duration),
}

/// A boxed future of a runner.
pub(crate) type BoxFuture<T = ()> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ran {
    /// The aggregation is terminal.
    Ended,
    /// The holder stopped before it was (the lease was lost, or ran out while the store could
    /// not be written): the aggregation stays active for the farm's next holder to resume.
    Stopped,
}

/// Runs one aggregation upstream to a terminal state.
pub(crate) trait Runner: Send + Sync + 'static {
    /// Drives `record` (the head of its farm) to a terminal state under `lease`, resuming
    /// where an earlier holder left it.
    fn run(self: Arc<Self>, record: Arc<AggregationRecord>, lease: Lease) -> BoxFuture<Ran>;

    /// Ends an aggregation whose run did not (it crashed, or overran the run limit): it becomes
    /// terminal with a failure that says why, and leaves its farm's queue.
    fn abandon(self: Arc<Self>, id: Arc<str>, lease: Lease, why: Abandoned) -> BoxFuture;

    /// Takes an id whose record is missing or unreadable off its farm's queue, so the farm
    /// moves on; `false` when it could not (the worker stops, and the farm's next holder tries
    /// again).
    fn discard(self: Arc<Self>, id: String, fault: QueueFault, lease: Lease) -> BoxFuture<bool>;
}

/// How workers run.
#[derive(Debug, Clone)]
pub(crate) struct WorkerSettings {
    /// This replica's name, as lease holder.
    pub holder: String,
    /// How long a lease lasts unless renewed.
    pub lease_ttl: Duration,
    /// Longest one aggregation may stay RUNNING (from its `running_since`).
    pub run_limit: Duration,
    /// How often farms with work and a free lease are looked for.
    pub scan_interval: Duration,
    /// Where the run limit's start is compared with the time of day.
    pub clock: Clock,
}

struct Shared {
    store: Arc<dyn AggregationStore>,
    runner: Arc<dyn Runner>,
    wakeups: Arc<Wakeups>,
    settings: WorkerSettings,
    /// Farms with a worker in this process.
    working: Mutex<HashSet<String>>,
    /// The leases this process's workers hold, to give up at shutdown.
    held: Mutex<HashMap<String, Lease>>,
    /// Workers started so far.
    started: std::sync::atomic::AtomicU64,
    /// Set when this replica drains a shared store: workers finish the aggregation they run,
    /// then hand their farms over.
    handing_over: CancellationToken,
    cancel: CancellationToken,
}

/// Starts and keeps farm workers.
#[derive(Clone)]
pub(crate) struct FarmDispatcher {
    shared: Arc<Shared>,
}

impl FarmDispatcher {
    /// Starts the dispatcher's scan; `cancel` stops it and every worker.
    pub(crate) fn new(
        store: Arc<dyn AggregationStore>,
        runner: Arc<dyn Runner>,
        wakeups: Arc<Wakeups>,
        settings: WorkerSettings,
        cancel: CancellationToken,
    ) -> Self {
        let shared = Arc::new(Shared {
            store,
            runner,
            wakeups,
            settings,
            working: Mutex::default(),
            held: Mutex::default(),
            started: 0.into(),
            handing_over: CancellationToken::new(),
            cancel,
        });
        tokio::spawn(scan(shared.clone()));
        Self { shared }
    }

    /// Makes sure `farm` has a worker in this process (it exits at once if another replica
    /// holds the farm's lease).
    pub(crate) fn kick(&self, farm: &str) {
        kick(&self.shared, farm);
    }

    /// Farms with a worker in this process.
    pub(crate) fn working(&self) -> usize {
        self.shared.lock().len()
    }

    /// The farms whose leases this process holds, sorted.
    pub(crate) fn held_farms(&self) -> Vec<String> {
        let held = self.shared.held.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut farms: Vec<String> = held.keys().cloned().collect();
        farms.sort();
        farms
    }

    /// Stops taking new work: each worker finishes the aggregation it runs, then releases its
    /// farm, which another replica takes over at once.
    pub(crate) fn hand_over(&self) {
        self.shared.handing_over.cancel();
    }

    /// Gives up every lease this process's workers hold (after [`Self::new`]'s `cancel`
    /// stopped them), so other replicas take the farms over at once rather than after the
    /// leases' TTL. Bounded: a store that does not answer leaves them to expire.
    pub(crate) async fn release_all(&self) {
        let held: Vec<Lease> = {
            let mut held = self.shared.held.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            held.drain().map(|(_, lease)| lease).collect()
        };
        let mut releases = tokio::task::JoinSet::new();
        for lease in held {
            let store = self.shared.store.clone();
            releases.spawn(async move {
                if let Err(e) = store.leases().release(&lease).await {
                    tracing::warn!(farm = %lease.farm, error = %e, "cannot give the farm's lease up; it expires by itself");
                }
            });
        }
        if tokio::time::timeout(RELEASE_AT_SHUTDOWN, releases.join_all()).await.is_err() {
            tracing::warn!("the store did not take every lease back in time; they expire by themselves");
        }
    }

    /// Workers started so far.
    #[cfg(test)]
    fn workers_started(&self) -> u64 {
        self.shared.started.load(std::sync::atomic::Ordering::Relaxed)
    }
}

fn kick(shared: &Arc<Shared>, farm: &str) {
    if shared.cancel.is_cancelled() || shared.handing_over.is_cancelled() || !shared.lock().insert(farm.to_owned()) {
        return;
    }
    shared.started.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tokio::spawn(worker(shared.clone(), farm.to_owned()));
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HashSet<String>> {
        self.working.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn held(&self) -> MutexGuard<'_, HashMap<String, Lease>> {
        self.held.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Every scan interval: a worker for each farm with work that has none here.
async fn scan(shared: Arc<Shared>) {
    let mut every = crate::every::Every::new(shared.settings.scan_interval, shared.cancel.clone());
    while every.tick().await {
        match shared.store.farms_with_work().await {
            Ok(farms) => farms.iter().for_each(|farm| kick(&shared, farm)),
            Err(e) => tracing::warn!(error = %e, "cannot list farms with work"),
        }
    }
}

/// Drives `farm` while this replica holds its lease and the farm has work.
async fn worker(shared: Arc<Shared>, farm: String) {
    let mut forget = Forget { shared: shared.clone(), farm: farm.clone(), drained: false };
    let s = &shared.settings;
    let lease = match shared.store.leases().acquire(&farm, &s.holder, s.lease_ttl).await {
        Ok(Some(lease)) => lease,
        // Another replica drives the farm; the scan looks again later.
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(farm, error = %e, "cannot take the farm's lease");
            return;
        }
    };
    let _holding = Holding::register(&shared, &lease);
    let lost = shared.cancel.child_token();
    let renewing = tokio::spawn(renew(shared.clone(), lease.clone(), lost.clone()));
    loop {
        if shared.handing_over.is_cancelled() {
            break;
        }
        // A holder that was superseded (paused past its lease) stops before it runs anything.
        if lost.is_cancelled() || !shared.store.leases().is_current(&lease).await.unwrap_or(false) {
            lost.cancel();
            break;
        }
        let head = match shared.store.head(&farm).await {
            Ok(Head::Ready(head)) => head,
            Ok(Head::Empty) => {
                forget.drained = true;
                break;
            }
            Ok(Head::Broken { id, fault }) => {
                if shared.runner.clone().discard(id, fault, lease.clone()).await {
                    continue;
                }
                break;
            }
            Err(e) => {
                tracing::warn!(farm, error = %e, "cannot read the farm's queue");
                break;
            }
        };
        if !supervise(&shared, head, &lease, &lost).await {
            break;
        }
    }
    renewing.abort();
    // Given up unless another holder superseded this one. At shutdown (`lost` fires with
    // `cancel`) the run has stopped by now, and the lease is still this replica's: released
    // here, before `_holding` leaves `held`, so that whichever of this and `release_all` comes
    // second finds it released (else a worker ending first left it to expire unreleased).
    if !lost.is_cancelled() || shared.cancel.is_cancelled() {
        let _ = shared.store.leases().release(&lease).await;
    }
}

/// A lease in [`Shared::held`] while its worker lives.
struct Holding {
    shared: Arc<Shared>,
    lease: Lease,
}

impl Holding {
    fn register(shared: &Arc<Shared>, lease: &Lease) -> Self {
        shared.held().insert(lease.farm.clone(), lease.clone());
        Self { shared: shared.clone(), lease: lease.clone() }
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        let mut held = self.shared.held();
        if held.get(&self.lease.farm) == Some(&self.lease) {
            held.remove(&self.lease.farm);
        }
    }
}

/// When a worker ends, for whatever reason: the farm is free for a new worker here. One that
/// emptied the farm's queue looks once more, and starts a new worker at once if work arrived
/// meanwhile; any other ending waits for the scan (so a farm another replica holds is not
/// tried in a loop).
struct Forget {
    shared: Arc<Shared>,
    farm: String,
    /// The worker held the lease and found the queue empty.
    drained: bool,
}

impl Drop for Forget {
    fn drop(&mut self) {
        self.shared.lock().remove(&self.farm);
        if !self.drained || self.shared.cancel.is_cancelled() {
            return;
        }
        let (shared, farm) = (self.shared.clone(), std::mem::take(&mut self.farm));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if shared.store.head(&farm).await.is_ok_and(|head| !matches!(head, Head::Empty)) {
                    kick(&shared, &farm);
                }
            });
        }
    }
}

/// Renews `lease` at a third of its TTL, and sooner again after a renewal the store could not
/// take, for as long as the lease lasts by this replica's clock; fires `lost` the moment the
/// store says the lease is gone, or it runs out.
async fn renew(shared: Arc<Shared>, lease: Lease, lost: CancellationToken) {
    let ttl = shared.settings.lease_ttl;
    let mut wait = ttl / 3;
    loop {
        tokio::select! {
            () = tokio::time::sleep(wait.min(lease.remaining())) => {}
            () = lost.cancelled() => return,
        }
        let asked = tokio::time::Instant::now();
        match shared.store.leases().renew(&lease, ttl).await {
            Ok(true) => {
                lease.renewed(asked, ttl);
                wait = ttl / 3;
            }
            Ok(false) => {
                tracing::warn!(farm = %lease.farm, "the farm's lease was lost; its worker stops");
                lost.cancel();
                return;
            }
            Err(e) if lease.is_valid() => {
                tracing::warn!(farm = %lease.farm, error = %e, left = ?lease.remaining(), "cannot renew the farm's lease; trying again while it lasts");
                wait = (ttl / 10).max(Duration::from_millis(50));
            }
            Err(e) => {
                tracing::warn!(farm = %lease.farm, error = %e, "the farm's lease ran out unrenewed; its worker stops");
                lost.cancel();
                return;
            }
        }
    }
}

/// Runs one aggregation in a task of its own and makes sure it ends, whatever ends the task.
/// `false` when the worker must stop (shutdown, or the lease was lost).
async fn supervise(
    shared: &Arc<Shared>,
    head: Arc<AggregationRecord>,
    lease: &Lease,
    lost: &CancellationToken,
) -> bool {
    let id = head.id.clone();
    let mut changes = shared.wakeups.waiter(&id);
    let mut task = tokio::spawn(shared.runner.clone().run(head, lease.clone()));
    let _abort_on_drop = AbortOnDrop(task.abort_handle());
    let limit = shared.settings.run_limit + SUPERVISOR_SLACK;
    let ended = loop {
        let running_since = match shared.store.read(&id).await {
            Ok(Found::Active { record, .. }) => record.running_since,
            _ => None,
        };
        let now = shared.settings.clock.now();
        let overdue = async move {
            match running_since.map(|since| since + limit) {
                Some(at) => {
                    let left = at.duration_since(now).unwrap_or_default();
                    tokio::time::sleep(left).await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            joined = &mut task => break Ok(joined),
            () = overdue => break Err(()),
            () = changes.woken() => {}
            () = lost.cancelled() => {
                lease.revoke();
                let patience = if shared.cancel.is_cancelled() { RELEASE_AT_SHUTDOWN } else { STOP_AFTER_LOSS };
                if tokio::time::timeout(patience, &mut task).await.is_err() {
                    tracing::warn!(aggregation = %id, farm = %lease.farm, ?patience, "the run did not stop after its lease was lost; aborting it");
                }
                return false;
            }
        }
    };
    let why = match ended {
        // The aggregation stays active; the farm's next holder resumes it.
        Ok(Ok(Ran::Stopped)) => return false,
        Ok(Ok(Ran::Ended)) => match shared.store.read(&id).await {
            Ok(Found::Active { .. }) => Some(Abandoned::Crashed("it ended without a terminal state".into())),
            _ => None,
        },
        Ok(Err(join)) => Some(Abandoned::Crashed(match join.try_into_panic() {
            Ok(payload) => panic_message(payload.as_ref()),
            Err(_) => "it was cancelled".to_owned(),
        })),
        Err(()) => Some(Abandoned::Overran(shared.settings.run_limit)),
    };
    if let Some(why) = why {
        task.abort();
        shared.runner.clone().abandon(id, lease.clone(), why).await;
    }
    true
}

/// Aborts the run's task when the supervisor goes away (shutdown, or the worker dying).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The text of a panic, bounded.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_owned());
    format!("panicked: {}", crate::domain::quote::quoted(&text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::coordination::{Freshness, Limits, MemoryStore};
    use crate::gateway::ids::IdMinter;

    /// A runner that must never run: the farm belongs to another replica.
    struct Never;

    impl Runner for Never {
        fn run(self: Arc<Self>, _: Arc<AggregationRecord>, _: Lease) -> BoxFuture<Ran> {
            Box::pin(async { panic!("this replica does not hold the farm") })
        }

        fn abandon(self: Arc<Self>, _: Arc<str>, _: Lease, _: Abandoned) -> BoxFuture {
            Box::pin(async {})
        }

        fn discard(self: Arc<Self>, _: String, _: QueueFault, _: Lease) -> BoxFuture<bool> {
            Box::pin(async { false })
        }
    }

    #[tokio::test]
    async fn a_farm_another_replica_holds_is_tried_once_per_scan_not_in_a_loop() {
        let wakeups = Arc::new(Wakeups::default());
        let store = Arc::new(MemoryStore::new(1 << 20, Duration::ZERO, wakeups.clone()));
        let key = crate::gateway::key::test_key(1, 1);
        let limits = Limits { queue_capacity: 10, max_live: 10, max_farms: 10, caller_capacity: 10, fair: true };
        store
            .claim(
                &key,
                &Freshness::default(),
                &limits,
                IdMinter::new().mint(key.farm_id()),
                "caller",
                Default::default(),
            )
            .await
            .expect("claimed");
        let farm = key.farm_id().to_owned();
        let other =
            store.leases().acquire(&farm, "replica-b", Duration::from_secs(60)).await.expect("store").expect("free");
        let settings = WorkerSettings {
            holder: "replica-a".into(),
            lease_ttl: Duration::from_secs(60),
            run_limit: Duration::from_secs(60),
            scan_interval: Duration::from_secs(3600),
            clock: Clock::system(),
        };
        let cancel = CancellationToken::new();
        let dispatcher = FarmDispatcher::new(store.clone(), Arc::new(Never), wakeups, settings, cancel.clone());
        dispatcher.kick(&farm);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(dispatcher.workers_started() <= 2, "{} workers started", dispatcher.workers_started());
        assert_eq!(dispatcher.working(), 0);
        assert!(store.leases().is_current(&other).await.expect("store"), "the other replica keeps its farm");
        cancel.cancel();
    }
}
