//! The activity log of one process: bounded in aggregations, farms and events each, every
//! entry forgotten after its TTL.

use super::{
    ActivityLog, Event, RECENT_PER_FARM, RECENT_TTL, REPLICA_SILENCE, Replica, TIMELINE_EVENTS, TIMELINE_TTL, What,
};
use crate::gateway::coordination::StoreError;
use moka::sync::Cache;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

/// The most aggregations whose timelines are kept.
const MAX_TIMELINES: u64 = 50_000;
/// The most farms whose recent lists are kept.
const MAX_FARMS: u64 = 10_000;

type Events = Arc<Mutex<VecDeque<Event>>>;

/// Events in this process's memory.
pub struct MemoryActivity {
    timelines: Cache<String, Events>,
    recent: Cache<String, Events>,
    replica: Mutex<Option<Replica>>,
}

impl Default for MemoryActivity {
    fn default() -> Self {
        Self {
            timelines: Cache::builder().max_capacity(MAX_TIMELINES).time_to_idle(TIMELINE_TTL).build(),
            recent: Cache::builder().max_capacity(MAX_FARMS).time_to_idle(RECENT_TTL).build(),
            replica: Mutex::default(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Adds `event` to a timeline of at most [`TIMELINE_EVENTS`], keeping its first event.
pub(crate) fn push_timeline(events: &mut VecDeque<Event>, event: Event) {
    if events.len() >= TIMELINE_EVENTS {
        events.remove(1);
    }
    events.push_back(event);
}

#[async_trait::async_trait]
impl ActivityLog for MemoryActivity {
    async fn append(&self, events: &[Event]) -> Result<(), StoreError> {
        for event in events {
            let timeline = self.timelines.get_with_by_ref(&event.aggregation, Events::default);
            push_timeline(&mut lock(&timeline), event.clone());
            if matches!(event.what, What::Ended { .. }) {
                let recent = self.recent.get_with_by_ref(&event.farm, Events::default);
                let mut recent = lock(&recent);
                recent.push_front(event.clone());
                recent.truncate(RECENT_PER_FARM);
            }
        }
        Ok(())
    }

    async fn timeline(&self, id: &str) -> Result<Vec<Event>, StoreError> {
        Ok(self.timelines.get(id).map(|t| lock(&t).iter().cloned().collect()).unwrap_or_default())
    }

    async fn recent(&self, farm: &str, count: usize) -> Result<Vec<Event>, StoreError> {
        Ok(self.recent.get(farm).map(|r| lock(&r).iter().take(count).cloned().collect()).unwrap_or_default())
    }

    async fn heartbeat(&self, replica: &Replica) -> Result<(), StoreError> {
        *lock(&self.replica) = Some(replica.clone());
        Ok(())
    }

    async fn replicas(&self, now_ms: u64) -> Result<Vec<Replica>, StoreError> {
        let silence = REPLICA_SILENCE.as_millis() as u64;
        Ok(lock(&self.replica).iter().filter(|r| r.seen_ms + silence >= now_ms).cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, n: u64, what: What) -> Event {
        Event { at_ms: n, aggregation: id.into(), farm: "farm-1".into(), what }
    }

    fn ended(n: u64) -> What {
        What::Ended {
            state: "COMPLETED".into(),
            rows: n,
            parts: 1,
            error: None,
            queued_ms: 0,
            running_since_ms: None,
            estimated_completion_ms: None,
        }
    }

    #[tokio::test]
    async fn a_long_timeline_keeps_its_first_event_and_the_latest() {
        let log = MemoryActivity::default();
        let first = event("agg-1", 0, What::Queued { caller: Some("a".into()), trace_id: None });
        log.append(std::slice::from_ref(&first)).await.expect("appends");
        let joins: Vec<Event> =
            (1..200).map(|n| event("agg-1", n, What::Joined { caller: format!("c{n}"), trace_id: None })).collect();
        log.append(&joins).await.expect("appends");
        let timeline = log.timeline("agg-1").await.expect("reads");
        assert_eq!(timeline.len(), TIMELINE_EVENTS);
        assert_eq!(timeline[0], first);
        assert_eq!(timeline.last().map(|e| e.at_ms), Some(199));
    }

    #[tokio::test]
    async fn a_farms_recent_list_is_its_last_terminal_aggregations_newest_first() {
        let log = MemoryActivity::default();
        let events: Vec<Event> = (0..60).map(|n| event(&format!("agg-{n}"), n, ended(n))).collect();
        log.append(&events).await.expect("appends");
        let recent = log.recent("farm-1", 100).await.expect("reads");
        assert_eq!(recent.len(), RECENT_PER_FARM);
        assert_eq!(recent[0].at_ms, 59);
        assert_eq!(log.recent("farm-1", 3).await.expect("reads").len(), 3);
        assert!(log.recent("farm-2", 3).await.expect("reads").is_empty());
    }
}
