//! What happened to each aggregation, for the operator console: its timeline (queued by a
//! caller, joined by others, taken by a holder, running upstream, split into parts, ended),
//! each farm's last terminal aggregations, and the replicas at work.
//!
//! History, never coordination: nothing the gateway decides reads it. Events are written in
//! the background through a bounded channel ([`Activity::record`] never waits: a full channel
//! drops the event and counts it), so the request path and the lifecycle never wait on it, and
//! an unreachable or full store loses history, not work. With the Redis store every replica
//! writes to, and the console of any replica reads, the same log.

mod memory;

pub use memory::MemoryActivity;

use super::clock::Clock;
use super::coordination::StoreError;
use super::record::{AggregationRecord, State};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The most events kept of one aggregation (its first, the Queued one, always among them).
pub const TIMELINE_EVENTS: usize = 64;
/// The terminal aggregations kept of each farm, newest first.
pub const RECENT_PER_FARM: usize = 50;
/// How long an aggregation's timeline is kept after its last event.
pub const TIMELINE_TTL: Duration = Duration::from_secs(3 * 3600);
/// How long a farm's recent list is kept after its last terminal aggregation.
pub const RECENT_TTL: Duration = Duration::from_secs(24 * 3600);
/// A replica not heard from for this long is no longer listed.
pub const REPLICA_SILENCE: Duration = Duration::from_secs(30);
/// How often a replica says it is alive.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// The farms a heartbeat names (it counts them all).
pub const HEARTBEAT_FARMS: usize = 100;
/// Events waiting to be written; beyond it they are dropped (and counted).
const CHANNEL_CAPACITY: usize = 8192;
/// The most events written in one go.
const BATCH: usize = 512;

/// One thing that happened to an aggregation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// When, in milliseconds since the Unix epoch, by the store's clock.
    pub at_ms: u64,
    pub aggregation: String,
    pub farm: String,
    #[serde(flatten)]
    pub what: What,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum What {
    /// A caller's Start queued it (`caller` is `None` for refresh-ahead).
    Queued { caller: Option<String>, trace_id: Option<String> },
    /// Another caller's identical Start joined it.
    Joined { caller: String, trace_id: Option<String> },
    /// A caller's Start was answered with it, COMPLETED at once from the rows of `from`, the
    /// completed result of a larger request.
    Derived { caller: String, from: String },
    /// A replica (`holder`) holds its farm's lease and drives it: the first time, or taking it
    /// over from a holder that stopped.
    Driving { holder: String, trace_id: Option<String> },
    /// The upstream accepted its Start.
    Running { upstream_id: String, estimated_completion_ms: Option<u64> },
    /// The upstream found it too large: it runs as `parts` parts.
    Split { parts: u32 },
    /// Part `part` (from 1) of `parts` was accepted upstream.
    PartStarted { part: u32, parts: u32, upstream_id: String },
    /// It ended: COMPLETED, FAILED or TIMED_OUT.
    Ended {
        state: String,
        rows: u64,
        parts: u32,
        error: Option<String>,
        /// When it was queued and when it last began running (ms since the epoch).
        queued_ms: u64,
        running_since_ms: Option<u64>,
        /// What was predicted for its completion when it began running.
        estimated_completion_ms: Option<u64>,
    },
    /// Its record could not be read, and its farm's holder took it off the queue.
    Discarded { fault: String },
}

/// A replica, as it last said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    /// Its holder name (instance id and process id), as leases and events name it.
    pub id: String,
    pub version: String,
    pub started_ms: u64,
    pub seen_ms: u64,
    /// How many farms' leases it holds, and the first [`HEARTBEAT_FARMS`] of them by id.
    pub farms_held: usize,
    pub farms: Vec<String>,
}

/// Where events are kept: this process, or a shared store.
#[async_trait::async_trait]
pub trait ActivityLog: Send + Sync + 'static {
    /// Adds `events` (in order) to their aggregations' timelines, and the Ended ones to their
    /// farms' recent lists.
    async fn append(&self, events: &[Event]) -> Result<(), StoreError>;

    /// The timeline of `id`, oldest first.
    async fn timeline(&self, id: &str) -> Result<Vec<Event>, StoreError>;

    /// The Ended events of `farm`, newest first, at most `count`.
    async fn recent(&self, farm: &str, count: usize) -> Result<Vec<Event>, StoreError>;

    /// Says that `replica` is alive.
    async fn heartbeat(&self, replica: &Replica) -> Result<(), StoreError>;

    /// The replicas heard from within [`REPLICA_SILENCE`] of `now_ms`.
    async fn replicas(&self, now_ms: u64) -> Result<Vec<Replica>, StoreError>;
}

/// Milliseconds since the Unix epoch.
pub fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The time `ms` milliseconds after the Unix epoch.
pub fn time_of(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Where the gateway records events: a handle on the log and its background writer.
pub struct Activity {
    log: Arc<dyn ActivityLog>,
    sender: mpsc::Sender<Event>,
    clock: Clock,
    dropped: AtomicU64,
    failed: Arc<AtomicU64>,
}

impl Activity {
    /// Records into `log` in the background until `stop` fires; needs a Tokio runtime.
    pub fn new(log: Arc<dyn ActivityLog>, clock: Clock, stop: CancellationToken) -> Self {
        let (sender, receiver) = mpsc::channel(CHANNEL_CAPACITY);
        let failed = Arc::new(AtomicU64::new(0));
        tokio::spawn(write(log.clone(), receiver, failed.clone(), stop));
        Self { log, sender, clock, dropped: AtomicU64::new(0), failed }
    }

    /// Records that `what` happened to `record`'s aggregation, now; never waits.
    pub fn record(&self, record: &AggregationRecord, what: What) {
        self.record_of(&record.id, record.farm_id(), what);
    }

    /// [`Self::record`] by id and farm.
    pub fn record_of(&self, id: &str, farm: &str, what: What) {
        let event = Event { at_ms: millis(self.clock.now()), aggregation: id.to_owned(), farm: farm.to_owned(), what };
        if self.sender.try_send(event).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The log, for the console to read.
    pub fn log(&self) -> &Arc<dyn ActivityLog> {
        &self.log
    }

    /// Events dropped because the writer fell behind, and events the log refused, since start.
    pub fn losses(&self) -> (u64, u64) {
        (self.dropped.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }
}

/// Writes what arrives, in batches, until `stop`; a batch the log refuses is dropped.
async fn write(
    log: Arc<dyn ActivityLog>,
    mut receiver: mpsc::Receiver<Event>,
    failed: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        batch.clear();
        tokio::select! {
            received = receiver.recv_many(&mut batch, BATCH) => if received == 0 { return },
            () = stop.cancelled() => return,
        }
        if let Err(e) = log.append(&batch).await {
            failed.fetch_add(batch.len() as u64, Ordering::Relaxed);
            tracing::debug!(error = %e, events = batch.len(), "activity events not recorded");
        }
    }
}

/// What a holder's write of `after` over `before` tells of the aggregation.
pub fn transition(before: &AggregationRecord, after: &AggregationRecord) -> Vec<What> {
    let mut out = Vec::new();
    if after.split.is_empty()
        && let Some(upstream_id) = after.upstream_id.as_ref().filter(|u| before.upstream_id.as_ref() != Some(*u))
    {
        let estimated_completion_ms = after.estimated_completion.map(millis);
        out.push(What::Running { upstream_id: upstream_id.clone(), estimated_completion_ms });
    }
    if before.split.is_empty() && !after.split.is_empty() {
        out.push(What::Split { parts: after.split.len() as u32 });
    }
    let parts = after.split.len() as u32;
    for (i, part) in after.split.iter().enumerate() {
        let was = before.split.get(i).and_then(|p| p.upstream.as_ref()).map(|(u, _)| u);
        if let Some((upstream_id, _)) = part.upstream.as_ref().filter(|(u, _)| was != Some(u)) {
            out.push(What::PartStarted { part: i as u32 + 1, parts, upstream_id: upstream_id.clone() });
        }
    }
    if after.state.is_terminal() && !before.state.is_terminal() {
        out.push(ended(after));
    }
    out
}

/// The Ended event of a terminal record.
pub fn ended(record: &AggregationRecord) -> What {
    What::Ended {
        state: state_name(record.state).to_owned(),
        rows: record.row_count,
        parts: record.parts,
        error: record.error.as_ref().map(|e| e.message.clone()),
        queued_ms: millis(record.create_time),
        running_since_ms: record.running_since.map(millis),
        estimated_completion_ms: record.estimated_completion.map(millis),
    }
}

/// A state as the console and the API say it.
pub fn state_name(state: State) -> &'static str {
    match state {
        State::Queued => "QUEUED",
        State::Running => "RUNNING",
        State::Completed => "COMPLETED",
        State::Failed => "FAILED",
        State::TimedOut => "TIMED_OUT",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::record::SplitPart;

    fn record() -> AggregationRecord {
        use crate::domain::{AggregationRequest, Resources, Statistic, ids::format_id};
        let request = AggregationRequest {
            farm_id: format_id("farm-", 1, 1),
            resources: Resources::Queues(vec![format_id("queue-", 0, 1)]),
            start_time: chrono::DateTime::UNIX_EPOCH,
            end_time: chrono::DateTime::UNIX_EPOCH + chrono::Duration::days(1),
            timezone: None,
            period: None,
            group_by: Vec::new(),
            statistics: vec![Statistic::Sum],
        };
        let key = crate::gateway::key::CanonicalKey::new(&request);
        AggregationRecord::queued("agg-1".into(), key, UNIX_EPOCH + Duration::from_secs(100))
    }

    #[test]
    fn a_start_accepted_upstream_is_running_and_a_terminal_write_ends_it() {
        let before = record();
        let mut after = before.clone();
        after.state = State::Running;
        after.upstream_id = Some("sa-1".into());
        assert_eq!(
            transition(&before, &after),
            vec![What::Running { upstream_id: "sa-1".into(), estimated_completion_ms: None }]
        );
        let mut done = after.clone();
        done.state = State::Completed;
        done.row_count = 7;
        let events = transition(&after, &done);
        assert!(
            matches!(&events[..], [What::Ended { state, rows: 7, queued_ms: 100_000, .. }] if state == "COMPLETED")
        );
        assert!(transition(&done, &done).is_empty(), "nothing new");
    }

    #[test]
    fn a_split_and_each_part_started_are_told_once() {
        let mut before = record();
        before.state = State::Running;
        let part = SplitPart {
            start_time: chrono::DateTime::UNIX_EPOCH,
            end_time: chrono::DateTime::UNIX_EPOCH,
            resource_ids: None,
            upstream: None,
            done: false,
        };
        let mut split = before.clone();
        split.split = vec![part.clone(), part];
        assert_eq!(transition(&before, &split), vec![What::Split { parts: 2 }]);
        let mut first = split.clone();
        first.split[0].upstream = Some(("sa-a".into(), UNIX_EPOCH));
        assert_eq!(
            transition(&split, &first),
            vec![What::PartStarted { part: 1, parts: 2, upstream_id: "sa-a".into() }]
        );
        assert!(transition(&first, &first).is_empty());
    }

    #[test]
    fn events_read_back_as_written() {
        let event = Event {
            at_ms: 5,
            aggregation: "agg-1".into(),
            farm: "farm-1".into(),
            what: What::Joined { caller: "<b>x</b>".into(), trace_id: None },
        };
        let json = serde_json::to_string(&event).expect("serialises");
        assert!(json.contains(r#""event":"joined""#), "{json}");
        assert_eq!(serde_json::from_str::<Event>(&json).expect("parses"), event);
    }
}
