//! An aggregation as the coordination store holds it: an owned record of plain values (ids,
//! the canonical request, state, wall-clock times), which every replica can read and the farm's
//! lease holder rewrites. Nothing in it lives only in one process: spans, wake-ups and encoded
//! views sit beside the store, not in it.

use super::key::CanonicalKey;
use crate::domain::{AggregationRequest, Resources};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The gateway's id: `agg-` and 32 hex digits (see [`super::ids`]), unguessable.
pub type AggregationId = Arc<str>;

/// What a cached entry costs beyond its rows: the record, its index entries and the cache's
/// own bookkeeping. Counted so that results without rows (FAILED, or zero rows) still weigh
/// what they hold, and the byte budget bounds the number of entries.
pub(crate) const ENTRY_OVERHEAD_BYTES: usize = 1024;

/// Where an aggregation is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Queued,
    Running,
    Completed,
    Failed,
    TimedOut,
}

impl State {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::TimedOut)
    }
}

/// How urgently a caller wants an aggregation (the request's `priority`): on a farm, waiting
/// interactive work goes before waiting batch work (`super::coordination::policy::place`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Priority {
    #[default]
    Interactive,
    Batch,
}

impl Priority {
    /// Its name, as metrics, the console and the shared store say it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Interactive => "interactive",
            Self::Batch => "batch",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        [Self::Interactive, Self::Batch].into_iter().find(|p| p.name() == name)
    }
}

/// The canonical code of a failure, in gRPC's vocabulary but free of any transport type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureCode {
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    DeadlineExceeded,
    Unavailable,
    Internal,
}

/// Why an aggregation ended FAILED or TIMED_OUT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: FailureCode,
    pub message: String,
}

/// The results of a completed aggregation, encoded, shared by every reader.
pub type Rows = Arc<super::rows::RowBlock>;

/// One aggregation.
#[derive(Debug, Clone, PartialEq)]
pub struct AggregationRecord {
    pub id: AggregationId,
    /// The canonical request: what the aggregation answers, and what is sent upstream.
    pub key: CanonicalKey,
    pub state: State,
    pub upstream_id: Option<String>,
    pub status_message: String,
    pub error: Option<Failure>,
    pub create_time: SystemTime,
    /// Until when the result is served (terminal states only).
    pub expire_time: Option<SystemTime>,
    /// When the data was current: the upstream Start of a COMPLETED result, the end of a
    /// failed one. How stale a cached answer is counts from here.
    pub data_time: Option<SystemTime>,
    /// Since when it has been RUNNING, restarted when the upstream accepts its Start: what the
    /// farm supervisor's run limit counts from.
    pub running_since: Option<SystemTime>,
    /// COMPLETED: how many rows.
    pub row_count: u64,
    /// COMPLETED: how many upstream aggregations answered it (more than 1 when split).
    pub parts: u32,
    /// Queued by refresh-ahead, not by a caller: it renews the result of the same key, which
    /// keeps answering Starts until this one completes.
    pub refresh: bool,
    /// The class it waits in on its farm: its starter's, raised by an interactive caller that
    /// joins it while it waits.
    pub priority: Priority,
    /// RUNNING: when it is expected to complete, predicted as its upstream Start was accepted
    /// (see `super::estimate`); `None` before anything was observed on its farm.
    pub estimated_completion: Option<SystemTime>,
    /// Run as parts (the upstream found it too large): every part in the order their rows
    /// merge, with its upstream aggregation once started; empty when not split. A holder that
    /// takes over resumes here, and a COMPLETED split result's rows are fetched again part by
    /// part.
    pub split: Vec<SplitPart>,
    /// Answered from the COMPLETED result of a larger request (`crate::domain::derive`):
    /// that result's id. Its rows are that result's, cut to this request; it expires with it.
    pub derived_from: Option<AggregationId>,
}

/// One part of a split aggregation: its window and resources, and its upstream aggregation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitPart {
    pub start_time: chrono::DateTime<chrono::Utc>,
    pub end_time: chrono::DateTime<chrono::Utc>,
    /// The queue (fleet) ids, when the part has only some of the whole's.
    pub resource_ids: Option<Vec<String>>,
    /// Once started: the upstream aggregation, and when the upstream accepted it.
    pub upstream: Option<(String, SystemTime)>,
    /// Its rows are in hand (merged into the result when the last part is).
    pub done: bool,
}

impl SplitPart {
    /// The part `part` of `whole`, not started.
    pub fn of(part: &AggregationRequest, whole: &AggregationRequest) -> Self {
        Self {
            start_time: part.start_time,
            end_time: part.end_time,
            resource_ids: (part.resources != whole.resources).then(|| part.resources.ids().to_vec()),
            upstream: None,
            done: false,
        }
    }

    /// The request this part sends upstream.
    pub fn request(&self, whole: &AggregationRequest) -> AggregationRequest {
        let mut part = whole.clone();
        part.start_time = self.start_time;
        part.end_time = self.end_time;
        if let Some(ids) = &self.resource_ids {
            part.resources = match &whole.resources {
                Resources::Queues(_) => Resources::Queues(ids.clone()),
                Resources::Fleets(_) => Resources::Fleets(ids.clone()),
            };
        }
        part
    }
}

/// An upstream aggregation that a Start created but its holder could not record under its
/// lease: the lease ran out, or a newer holder took the farm, while the upstream was answering
/// the Start. The holder leaves it with the aggregation (unfenced, [`super::coordination::AggregationStore::offer`]),
/// and the farm's holder, before it sends a Start of the same aggregation or part, adopts it
/// instead of starting a second upstream aggregation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// Which Start: the whole aggregation (`None`), or the part at this index of its split,
    /// as the part was then (the offer is adopted only while the part is still that, unstarted).
    pub part: Option<(usize, SplitPart)>,
    pub upstream_id: String,
    /// When the upstream accepted the Start.
    pub started: SystemTime,
}

impl Offer {
    /// Whether this offer is the Start of `part` (`None`: the whole) of `record` that is still
    /// to be sent.
    pub fn fits(&self, record: &AggregationRecord, part: Option<usize>) -> bool {
        match (&self.part, part) {
            (None, None) => record.upstream_id.is_none() && record.split.is_empty(),
            (Some((i, offered)), Some(j)) if *i == j => record.split.get(j).is_some_and(|p| {
                p.upstream.is_none()
                    && (&p.start_time, &p.end_time, &p.resource_ids)
                        == (&offered.start_time, &offered.end_time, &offered.resource_ids)
            }),
            _ => false,
        }
    }
}

impl AggregationRecord {
    /// A new QUEUED aggregation, created at `now`.
    pub fn queued(id: AggregationId, key: CanonicalKey, now: SystemTime) -> Self {
        Self {
            id,
            key,
            state: State::Queued,
            upstream_id: None,
            status_message: String::new(),
            error: None,
            create_time: now,
            expire_time: None,
            data_time: None,
            running_since: None,
            row_count: 0,
            parts: 0,
            refresh: false,
            priority: Priority::Interactive,
            estimated_completion: None,
            split: Vec::new(),
            derived_from: None,
        }
    }

    /// A new QUEUED refresh of the key `of` answers (batch: no caller waits for it).
    pub fn refresh_of(id: AggregationId, of: &AggregationRecord, now: SystemTime) -> Self {
        Self { refresh: true, priority: Priority::Batch, ..Self::queued(id, of.key.clone(), now) }
    }

    /// The class it waited in, as the queue-wait metric labels it.
    pub fn class_name(&self) -> &'static str {
        if self.refresh { "refresh" } else { self.priority.name() }
    }

    pub fn farm_id(&self) -> &str {
        self.key.farm_id()
    }

    /// When a COMPLETED result's validity ended, if it has by `now` (a failure's TTL ends its
    /// answering Starts, never its reading).
    pub fn expired_at(&self, now: SystemTime) -> Option<SystemTime> {
        self.expire_time.filter(|at| self.state == State::Completed && now >= *at)
    }

    /// How long the result stays valid after `now`.
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.expire_time.and_then(|at| at.duration_since(now).ok()).unwrap_or_default()
    }

    /// Bytes the record holds beyond its rows, for the cache's memory budget.
    pub fn weight(&self) -> usize {
        self.status_message.len()
            + self.error.as_ref().map_or(0, |e| e.message.len())
            + self.key.heap_bytes()
            + ENTRY_OVERHEAD_BYTES
    }
}
