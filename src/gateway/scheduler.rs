//! Per-farm FIFO queues: distinct aggregations of one farm run upstream strictly one at a time,
//! in arrival order; farms run independently.
//!
//! A farm has a worker task only while it has work: the worker takes the next aggregation,
//! runs it to completion, and removes the farm when its queue is empty. Workers stop when the
//! scheduler's cancellation token fires.

use super::aggregation::Aggregation;
use super::error::GatewayError;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio_util::sync::CancellationToken;

/// Runs one aggregation upstream to a terminal state.
pub trait Runner: Send + Sync + 'static {
    fn run(&self, aggregation: Arc<Aggregation>) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
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

struct Shared {
    farms: Mutex<HashMap<String, FarmQueue>>,
    capacity: usize,
    runner: Arc<dyn Runner>,
    cancel: CancellationToken,
}

/// The per-farm queues and their workers.
#[derive(Clone)]
pub struct FarmScheduler {
    shared: Arc<Shared>,
}

impl FarmScheduler {
    /// `capacity`: how many aggregations may wait per farm (the running one not counted).
    pub fn new(capacity: usize, runner: Arc<dyn Runner>, cancel: CancellationToken) -> Self {
        Self { shared: Arc::new(Shared { farms: Mutex::default(), capacity, runner, cancel }) }
    }

    /// Queues `aggregation` on its farm and sets its queue position.
    pub fn enqueue(&self, aggregation: Arc<Aggregation>) -> Result<(), GatewayError> {
        let farm = aggregation.farm_id().to_owned();
        let mut farms = self.shared.lock();
        let queue = farms.entry(farm.clone()).or_default();
        if queue.waiting.len() >= self.shared.capacity {
            if !queue.running && queue.waiting.is_empty() {
                farms.remove(&farm);
            }
            return Err(GatewayError::QueueFull { farm_id: farm, capacity: self.shared.capacity });
        }
        let position = queue.waiting.len() + usize::from(queue.running);
        aggregation.update(|s| s.queue_position = u32::try_from(position).unwrap_or(u32::MAX));
        queue.waiting.push_back(aggregation);
        if !queue.running {
            queue.running = true;
            tokio::spawn(worker(self.shared.clone(), farm));
        }
        Ok(())
    }

    /// Load per farm with work.
    pub fn load(&self) -> HashMap<String, FarmLoad> {
        self.shared
            .lock()
            .iter()
            .map(|(farm, q)| (farm.clone(), FarmLoad { queued: q.waiting.len(), running: usize::from(q.running) }))
            .collect()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, FarmQueue>> {
        self.farms.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The next aggregation of `farm`, or `None` (and the farm forgotten) when there is none.
    fn next(&self, farm: &str) -> Option<Arc<Aggregation>> {
        let mut farms = self.lock();
        let queue = farms.get_mut(farm)?;
        match queue.waiting.pop_front() {
            Some(next) => {
                for (ahead, waiting) in queue.waiting.iter().enumerate() {
                    waiting.update(|s| s.queue_position = u32::try_from(ahead + 1).unwrap_or(u32::MAX));
                }
                Some(next)
            }
            None => {
                farms.remove(farm);
                None
            }
        }
    }
}

async fn worker(shared: Arc<Shared>, farm: String) {
    while let Some(next) = shared.next(&farm) {
        tokio::select! {
            () = shared.runner.run(next) => {}
            () = shared.cancel.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::aggregation::State;
    use tokio::sync::mpsc;

    /// Records the order of runs and holds each until the test releases it.
    struct Gate {
        started: mpsc::UnboundedSender<Arc<str>>,
        release: tokio::sync::Semaphore,
    }

    impl Runner for Gate {
        fn run(&self, agg: Arc<Aggregation>) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
            Box::pin(async move {
                let _ = self.started.send(agg.id.clone());
                if let Ok(permit) = self.release.acquire().await {
                    permit.forget();
                }
                agg.update(|s| s.state = State::Completed);
            })
        }
    }

    fn aggregation(farm: u64, n: u64) -> Arc<Aggregation> {
        Arc::new(Aggregation::new(crate::gateway::key::test_key(farm, n)))
    }

    #[tokio::test]
    async fn one_at_a_time_per_farm_in_order_and_bounded() {
        let (tx, mut started) = mpsc::unbounded_channel();
        let gate = Arc::new(Gate { started: tx, release: tokio::sync::Semaphore::new(0) });
        let scheduler = FarmScheduler::new(2, gate.clone(), CancellationToken::new());
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

        gate.release.add_permits(1);
        assert_eq!(started.recv().await, Some(b.id.clone()), "FIFO: b runs once a is done");
        assert_eq!(c.snapshot().queue_position, 1);
        gate.release.add_permits(3);
        assert_eq!(started.recv().await, Some(c.id.clone()));
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while !scheduler.load().is_empty() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("idle farms are forgotten");
    }
}
