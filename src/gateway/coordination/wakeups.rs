//! Long-poll wake-ups of one process. Waiters register by aggregation id; a change wakes that
//! id's waiters, whether it happened here or arrived from the shared store's notifications; a
//! reconnect to the shared store wakes every waiter so that each re-reads its record (messages
//! published while disconnected are lost). Entries live only while someone waits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::watch;

/// What wakes the waiters of every aggregation on `farm`: its queue moved, or the one it runs
/// changed (positions and estimates of the others follow).
pub fn farm_topic(farm: &str) -> String {
    format!("farm:{farm}")
}

/// The waiters of this process, by aggregation id (or [`farm_topic`]).
#[derive(Debug, Default)]
pub struct Wakeups {
    ids: Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl Wakeups {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, watch::Sender<u64>>> {
        self.ids.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a waiter for changes of `id` from now on.
    pub fn waiter(self: &Arc<Self>, id: &str) -> Waiter {
        let mut ids = self.lock();
        let rx = match ids.get(id) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = watch::channel(0);
                ids.insert(id.to_owned(), tx);
                rx
            }
        };
        Waiter { id: id.to_owned(), rx, wakeups: self.clone() }
    }

    /// Wakes the waiters of `id`.
    pub fn wake(&self, id: &str) {
        if let Some(tx) = self.lock().get(id) {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Wakes every waiter, so each re-reads what it waits for.
    pub fn wake_all(&self) {
        for tx in self.lock().values() {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Ids someone waits on.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One waiter; dropping it unregisters it.
#[derive(Debug)]
pub struct Waiter {
    id: String,
    rx: watch::Receiver<u64>,
    wakeups: Arc<Wakeups>,
}

impl Waiter {
    /// Resolves at the next wake-up of this waiter's id.
    pub async fn woken(&mut self) {
        // The sender lives while any waiter of the id does, so this only ends by a wake-up.
        let _ = self.rx.changed().await;
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut ids = self.wakeups.lock();
        if ids.get(&self.id).is_some_and(|tx| tx.receiver_count() <= 1) {
            ids.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn woken_within(waiter: &mut Waiter, limit: Duration) -> bool {
        tokio::time::timeout(limit, waiter.woken()).await.is_ok()
    }

    #[tokio::test]
    async fn a_change_wakes_its_waiters_only_and_a_reconnect_wakes_all() {
        let wakeups = Arc::new(Wakeups::default());
        let (mut a1, mut a2, mut b) = (wakeups.waiter("a"), wakeups.waiter("a"), wakeups.waiter("b"));
        wakeups.wake("a");
        assert!(
            woken_within(&mut a1, Duration::from_secs(1)).await && woken_within(&mut a2, Duration::from_secs(1)).await
        );
        assert!(!woken_within(&mut b, Duration::from_millis(50)).await, "b did not change");
        wakeups.wake_all();
        assert!(woken_within(&mut b, Duration::from_secs(1)).await);
        assert_eq!(wakeups.len(), 2);
        drop((a1, a2, b));
        assert!(wakeups.is_empty(), "no entry outlives its waiters");
        wakeups.wake("nobody");
    }
}
