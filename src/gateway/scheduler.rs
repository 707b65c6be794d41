//! Per-farm FIFO queues: distinct aggregations of one farm run upstream strictly one at a time,
//! in arrival order; farms run independently.
//!
//! A farm has a worker task only while it has work. The worker is a supervisor: it runs each
//! aggregation in a task of its own and, whatever ends that task (a panic, the run limit), makes
//! sure the aggregation ends and the farm moves on to its next one. If the worker itself dies,
//! its guard hands the farm to a fresh worker. Workers stop when the scheduler's cancellation
//! token fires.
//!
//! The scheduler also holds the gateway-wide bounds: live (queued + running) aggregations and
//! farms with work.

use super::aggregation::Aggregation;
use super::error::GatewayError;
use super::lifecycle::Abandoned;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long past the run limit the supervisor waits before it ends a run: the lifecycle's own
/// deadlines (the result validity, the default limit) fall on the same moment and end the
/// aggregation with the more specific reason.
const SUPERVISOR_SLACK: Duration = Duration::from_secs(2);

/// The future of one aggregation's run.
pub type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Runs one aggregation upstream to a terminal state.
pub trait Runner: Send + Sync + 'static {
    /// Drives `aggregation` to a terminal state and hands it to the store.
    fn run(self: Arc<Self>, aggregation: Arc<Aggregation>) -> BoxFuture;

    /// Ends an aggregation whose run did not (it crashed, or overran the run limit): the
    /// aggregation becomes terminal with a failure that says why, and the store learns of it.
    fn abandon(&self, aggregation: &Arc<Aggregation>, why: Abandoned);
}

/// The scheduler's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Aggregations that may wait per farm behind the running one.
    pub queue_capacity: usize,
    /// Queued and running aggregations across all farms.
    pub max_live: usize,
    /// Farms with work at once.
    pub max_farms: usize,
    /// Longest one aggregation may stay RUNNING (counted from its `running_since`) before its
    /// supervisor ends it.
    pub run_limit: Duration,
}

#[derive(Default)]
struct FarmQueue {
    waiting: VecDeque<Arc<Aggregation>>,
    running: bool,
}

/// Queue depth and running count of one farm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FarmLoad {
    pub queued: usize,
    pub running: usize,
}

#[derive(Default)]
struct Farms {
    queues: HashMap<String, FarmQueue>,
    /// Queued plus running, over every farm.
    live: usize,
}

struct Shared {
    farms: Mutex<Farms>,
    limits: Limits,
    runner: Arc<dyn Runner>,
    cancel: CancellationToken,
}

/// The per-farm queues and their workers.
#[derive(Clone)]
pub struct FarmScheduler {
    shared: Arc<Shared>,
}

impl FarmScheduler {
    pub fn new(limits: Limits, runner: Arc<dyn Runner>, cancel: CancellationToken) -> Self {
        Self { shared: Arc::new(Shared { farms: Mutex::default(), limits, runner, cancel }) }
    }

    /// Queues `aggregation` on its farm and sets its queue position, or refuses when the farm's
    /// queue or a gateway-wide bound is full.
    pub fn enqueue(&self, aggregation: Arc<Aggregation>) -> Result<(), GatewayError> {
        let limits = self.shared.limits;
        let farm = aggregation.farm_id();
        let mut farms = self.shared.lock();
        if farms.live >= limits.max_live {
            return Err(GatewayError::Busy { bound: "max_active_aggregations", limit: limits.max_live });
        }
        if !farms.queues.contains_key(farm) && farms.queues.len() >= limits.max_farms {
            return Err(GatewayError::Busy { bound: "max_farms", limit: limits.max_farms });
        }
        let queue = farms.queues.entry(farm.to_owned()).or_default();
        if queue.waiting.len() >= limits.queue_capacity {
            let idle = !queue.running && queue.waiting.is_empty();
            if idle {
                farms.queues.remove(farm);
            }
            return Err(GatewayError::QueueFull { farm_id: farm.to_owned(), capacity: limits.queue_capacity });
        }
        let position = queue.waiting.len() + usize::from(queue.running);
        aggregation.update(|s| s.queue_position = u32::try_from(position).unwrap_or(u32::MAX));
        queue.waiting.push_back(aggregation.clone());
        let start_worker = !queue.running;
        queue.running = true;
        farms.live += 1;
        if start_worker {
            tokio::spawn(worker(self.shared.clone(), farm.to_owned()));
        }
        Ok(())
    }

    /// Load per farm with work.
    pub fn load(&self) -> HashMap<String, FarmLoad> {
        self.shared
            .lock()
            .queues
            .iter()
            .map(|(farm, q)| (farm.clone(), FarmLoad { queued: q.waiting.len(), running: usize::from(q.running) }))
            .collect()
    }

    /// Queued plus running aggregations over every farm.
    pub fn live(&self) -> usize {
        self.shared.lock().live
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Farms> {
        self.farms.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The next aggregation of `farm`, or `None` (and the farm forgotten) when there is none.
    fn next(&self, farm: &str) -> Option<Arc<Aggregation>> {
        let mut farms = self.lock();
        let queue = farms.queues.get_mut(farm)?;
        match queue.waiting.pop_front() {
            Some(next) => {
                for (ahead, waiting) in queue.waiting.iter().enumerate() {
                    waiting.update(|s| s.queue_position = u32::try_from(ahead + 1).unwrap_or(u32::MAX));
                }
                Some(next)
            }
            None => {
                farms.queues.remove(farm);
                None
            }
        }
    }

    /// One aggregation is over: it no longer counts as live.
    fn done(&self) {
        let mut farms = self.lock();
        farms.live = farms.live.saturating_sub(1);
    }

    /// Runs one aggregation in a task of its own and makes sure it ends, whatever ends the task.
    /// `false` when the scheduler was cancelled meanwhile.
    async fn supervise(&self, next: Arc<Aggregation>) -> bool {
        let mut task = tokio::spawn(self.runner.clone().run(next.clone()));
        let abort = task.abort_handle();
        let _abort_on_drop = AbortOnDrop(abort.clone());
        let mut changes = next.subscribe();
        let ended = loop {
            let deadline =
                next.with_snapshot(|s| s.running_since).map(|at| at + self.limits.run_limit + SUPERVISOR_SLACK);
            let overdue = async move {
                match deadline {
                    Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                joined = &mut task => break Ok(joined),
                () = overdue => break Err(()),
                Ok(()) = changes.changed() => {}
                () = self.cancel.cancelled() => return false,
            }
        };
        match ended {
            Ok(Ok(())) => {
                if !next.with_snapshot(|s| s.state.is_terminal()) {
                    self.runner.abandon(&next, Abandoned::Crashed("it ended without a terminal state".into()));
                }
            }
            Ok(Err(join)) => {
                let cause = match join.try_into_panic() {
                    Ok(payload) => panic_message(payload.as_ref()),
                    Err(_) => "it was cancelled".to_owned(),
                };
                self.runner.abandon(&next, Abandoned::Crashed(cause));
            }
            Err(_) => {
                abort.abort();
                self.runner.abandon(&next, Abandoned::Overran(self.limits.run_limit));
            }
        }
        true
    }
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

async fn worker(shared: Arc<Shared>, farm: String) {
    let mut guard = WorkerGuard { shared: shared.clone(), farm, current: None, clean_exit: false };
    while let Some(next) = shared.next(&guard.farm) {
        guard.current = Some(next.clone());
        if !shared.supervise(next).await {
            guard.clean_exit = true;
            return;
        }
        guard.current = None;
        shared.done();
    }
    guard.clean_exit = true;
}

/// Keeps a farm moving if its worker dies: the aggregation it held is ended and a fresh worker
/// takes over the queue.
struct WorkerGuard {
    shared: Arc<Shared>,
    farm: String,
    current: Option<Arc<Aggregation>>,
    clean_exit: bool,
}

impl Drop for WorkerGuard {
    fn drop(&mut self) {
        if self.clean_exit || self.shared.cancel.is_cancelled() {
            return;
        }
        tracing::error!(farm = %self.farm, "a farm worker died; a new one takes over its queue");
        if let Some(agg) = self.current.take() {
            self.shared.runner.abandon(&agg, Abandoned::Crashed("its farm worker died".into()));
            self.shared.done();
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(worker(self.shared.clone(), std::mem::take(&mut self.farm)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::aggregation::State;
    use tokio::sync::mpsc;

    /// Records the order of runs and holds each until the test releases it; an aggregation of
    /// queue 666 panics, one of queue 777 never ends.
    struct Gate {
        started: mpsc::UnboundedSender<Arc<str>>,
        release: tokio::sync::Semaphore,
        abandoned: Mutex<Vec<(Arc<str>, String)>>,
    }

    impl Gate {
        fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<Arc<str>>) {
            let (tx, rx) = mpsc::unbounded_channel();
            let gate = Self { started: tx, release: tokio::sync::Semaphore::new(0), abandoned: Mutex::default() };
            (Arc::new(gate), rx)
        }
    }

    impl Runner for Gate {
        fn run(self: Arc<Self>, agg: Arc<Aggregation>) -> BoxFuture {
            Box::pin(async move {
                let _ = self.started.send(agg.id.clone());
                let queue = agg.key.request().resources.ids()[0].clone();
                assert!(!queue.ends_with("666"), "a bug in the runner");
                if queue.ends_with("777") {
                    agg.update(|s| {
                        s.state = State::Running;
                        s.running_since = Some(std::time::Instant::now());
                    });
                    std::future::pending::<()>().await;
                }
                if let Ok(permit) = self.release.acquire().await {
                    permit.forget();
                }
                agg.update(|s| s.state = State::Completed);
            })
        }

        fn abandon(&self, agg: &Arc<Aggregation>, why: Abandoned) {
            agg.update(|s| s.state = State::Failed);
            self.abandoned.lock().expect("lock").push((agg.id.clone(), format!("{why:?}")));
        }
    }

    fn aggregation(farm: u64, n: u64) -> Arc<Aggregation> {
        let id = crate::gateway::ids::IdMinter::new().mint();
        Arc::new(Aggregation::new(id, crate::gateway::key::test_key(farm, n)))
    }

    fn limits(queue_capacity: usize) -> Limits {
        Limits { queue_capacity, max_live: 1000, max_farms: 1000, run_limit: Duration::from_secs(3600) }
    }

    async fn idle(scheduler: &FarmScheduler) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while !scheduler.load().is_empty() || scheduler.live() > 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("idle farms are forgotten");
    }

    #[tokio::test]
    async fn one_at_a_time_per_farm_in_order_and_bounded() {
        let (gate, mut started) = Gate::new();
        let scheduler = FarmScheduler::new(limits(2), gate.clone(), CancellationToken::new());
        let (a, b, c, d) = (aggregation(1, 1), aggregation(1, 2), aggregation(1, 3), aggregation(1, 4));
        scheduler.enqueue(a.clone()).expect("room");
        assert_eq!(started.recv().await, Some(a.id.clone()));
        for agg in [&b, &c] {
            scheduler.enqueue(agg.clone()).expect("room");
        }
        assert_eq!((b.snapshot().queue_position, c.snapshot().queue_position), (1, 2));
        assert!(matches!(scheduler.enqueue(d.clone()), Err(GatewayError::QueueFull { capacity: 2, .. })));

        let other = aggregation(2, 1);
        scheduler.enqueue(other.clone()).expect("another farm");
        assert_eq!(started.recv().await, Some(other.id.clone()), "farms are independent");
        assert_eq!(scheduler.live(), 4);

        gate.release.add_permits(1);
        assert_eq!(started.recv().await, Some(b.id.clone()), "FIFO: b runs once a is done");
        assert_eq!(c.snapshot().queue_position, 1);
        gate.release.add_permits(3);
        assert_eq!(started.recv().await, Some(c.id.clone()));
        idle(&scheduler).await;
    }

    #[tokio::test]
    async fn a_panicking_run_ends_failed_and_the_farm_moves_on() {
        let (gate, mut started) = Gate::new();
        let scheduler = FarmScheduler::new(limits(10), gate.clone(), CancellationToken::new());
        let (bad, good) = (aggregation(1, 0x666), aggregation(1, 1));
        scheduler.enqueue(bad.clone()).expect("room");
        scheduler.enqueue(good.clone()).expect("room");
        assert_eq!(started.recv().await, Some(bad.id.clone()));
        assert_eq!(started.recv().await, Some(good.id.clone()), "the next aggregation runs");
        gate.release.add_permits(1);
        idle(&scheduler).await;
        assert_eq!(good.snapshot().state, State::Completed);
        let abandoned = gate.abandoned.lock().expect("lock").clone();
        assert_eq!(abandoned.len(), 1);
        assert_eq!(abandoned[0].0, bad.id);
        assert!(abandoned[0].1.contains("a bug in the runner"), "{abandoned:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_over_the_limit_is_ended_and_the_farm_moves_on() {
        let (gate, mut started) = Gate::new();
        let mut l = limits(10);
        l.run_limit = Duration::from_secs(60);
        let scheduler = FarmScheduler::new(l, gate.clone(), CancellationToken::new());
        let (stuck, next) = (aggregation(1, 0x777), aggregation(1, 1));
        scheduler.enqueue(stuck.clone()).expect("room");
        scheduler.enqueue(next.clone()).expect("room");
        assert_eq!(started.recv().await, Some(stuck.id.clone()));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(stuck.snapshot().state, State::Running, "within its limit and the slack");
        tokio::time::advance(SUPERVISOR_SLACK).await;
        assert_eq!(started.recv().await, Some(next.id.clone()));
        let abandoned = gate.abandoned.lock().expect("lock").clone();
        assert!(abandoned[0].1.contains("Overran"), "{abandoned:?}");
        gate.release.add_permits(1);
        idle(&scheduler).await;
    }

    #[tokio::test]
    async fn gateway_wide_bounds_refuse_with_busy() {
        let (gate, _started) = Gate::new();
        let l = Limits { queue_capacity: 10, max_live: 3, max_farms: 2, run_limit: Duration::from_secs(60) };
        let scheduler = FarmScheduler::new(l, gate.clone(), CancellationToken::new());
        scheduler.enqueue(aggregation(1, 1)).expect("room");
        scheduler.enqueue(aggregation(2, 1)).expect("room");
        let err = scheduler.enqueue(aggregation(3, 1)).expect_err("a third farm");
        assert!(matches!(err, GatewayError::Busy { bound: "max_farms", limit: 2 }), "{err:?}");
        scheduler.enqueue(aggregation(1, 2)).expect("a known farm has room");
        let err = scheduler.enqueue(aggregation(2, 2)).expect_err("three live");
        assert!(matches!(err, GatewayError::Busy { bound: "max_active_aggregations", limit: 3 }), "{err:?}");
        gate.release.add_permits(3);
        idle(&scheduler).await;
        scheduler.enqueue(aggregation(3, 1)).expect("room again");
        gate.release.add_permits(1);
        idle(&scheduler).await;
    }
}
