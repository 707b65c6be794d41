//! One aggregation as the gateway tracks it: identity, the request it stands for, and a
//! watched snapshot of its lifecycle (QUEUED → RUNNING → COMPLETED / FAILED / TIMED_OUT).
//!
//! Every caller of the same aggregation shares one `Arc<Aggregation>`; the farm worker is the
//! only writer of its snapshot. Long-polls wait on the watch channel.

use super::key::CanonicalKey;
use bytes::Bytes;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;

/// The gateway's id: `agg-` and 32 hex digits (see [`super::ids`]), unguessable.
pub type AggregationId = Arc<str>;

/// What a cache entry costs beyond its rows: the aggregation, its snapshot, the key's index
/// entry and the cache's own bookkeeping. Counted so that results without rows (FAILED, or
/// zero rows) still weigh what they hold, and the byte budget bounds the number of entries.
pub const ENTRY_OVERHEAD_BYTES: usize = 1024;

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

/// What an aggregation looks like at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub state: State,
    /// While QUEUED: how many aggregations run on the farm before this one.
    pub queue_position: u32,
    pub upstream_id: Option<String>,
    pub status_message: String,
    pub error: Option<Failure>,
    /// Set when COMPLETED.
    pub rows: Option<Rows>,
    /// When the results stop being served: wall-clock for callers, monotonic for the cache.
    pub expire_time: Option<SystemTime>,
    pub expire_at: Option<Instant>,
    /// Since when the aggregation has been RUNNING, restarted when the upstream accepts its
    /// Start: what the farm supervisor's run limit counts from.
    pub running_since: Option<Instant>,
    /// When the data was current: the upstream Start of a COMPLETED result, the end of a
    /// failed one. How stale a cached answer is counts from here.
    pub data_at: Option<Instant>,
    /// The transport's encoding of the aggregation as of this snapshot.
    pub encoded_view: EncodedView,
}

/// The transport's encoding of a snapshot's public view, made by the first reader and shared
/// by the rest: a cached result is read many times and never changes. The gateway never reads
/// it; a changed snapshot starts without one (cloning gives an empty cell, and
/// [`Aggregation::update`] clears it).
#[derive(Debug, Default)]
pub struct EncodedView(OnceLock<Bytes>);

impl Clone for EncodedView {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl EncodedView {
    /// The encoding, made by `encode` if no reader has made it yet.
    pub fn get_or_init(&self, encode: impl FnOnce() -> Bytes) -> Bytes {
        self.0.get_or_init(encode).clone()
    }
}

impl Snapshot {
    fn queued(position: u32) -> Self {
        Self {
            state: State::Queued,
            queue_position: position,
            upstream_id: None,
            status_message: String::new(),
            error: None,
            rows: None,
            expire_time: None,
            expire_at: None,
            data_at: None,
            running_since: None,
            encoded_view: EncodedView::default(),
        }
    }

    pub fn row_count(&self) -> usize {
        self.rows.as_ref().map_or(0, |r| r.len())
    }

    /// Whether the results are past their validity at `now`.
    pub fn is_expired(&self, now: Instant) -> bool {
        self.expire_at.is_some_and(|at| now >= at)
    }
}

/// One aggregation, shared by every caller that started or joined it.
#[derive(Debug)]
pub struct Aggregation {
    pub id: AggregationId,
    pub key: CanonicalKey,
    pub create_time: SystemTime,
    /// When it was created, for the time-to-complete metric.
    pub created: Instant,
    /// Shared snapshots: readers clone an `Arc`, the single writer copies on write.
    snapshot: watch::Sender<Arc<Snapshot>>,
    /// The lifecycle span (a trace of its own, linked from every Start that started or joined
    /// it); taken and closed when the aggregation ends.
    span: Mutex<Option<tracing::Span>>,
}

impl Aggregation {
    /// A new QUEUED aggregation named `id` (minted by [`super::ids::IdMinter`]).
    pub fn new(id: AggregationId, key: CanonicalKey) -> Self {
        let span = tracing::info_span!(
            parent: None,
            "aggregation",
            otel.name = "aggregation.lifecycle",
            aggregation.id = %id,
            farm.id = %key.farm_id(),
            upstream.aggregation_id = tracing::field::Empty,
            aggregation.state = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        Self {
            id,
            key,
            create_time: SystemTime::now(),
            created: Instant::now(),
            snapshot: watch::Sender::new(Arc::new(Snapshot::queued(0))),
            span: Mutex::new(Some(span)),
        }
    }

    /// The lifecycle span while the aggregation is live (a disabled span afterwards).
    pub fn span(&self) -> tracing::Span {
        self.lock_span().clone().unwrap_or_else(tracing::Span::none)
    }

    /// Links the lifecycle span from the caller's current span (a Start that started or
    /// joined this aggregation).
    pub fn link_from_current(&self) {
        if let Some(span) = self.lock_span().as_ref() {
            let caller = crate::telemetry::traces::span_context(&tracing::Span::current());
            if caller.is_valid() {
                tracing_opentelemetry::OpenTelemetrySpanExt::add_link(span, caller);
            }
        }
    }

    /// Records the final state on the lifecycle span and closes it.
    pub(crate) fn end_span(&self, state: &'static str, failed: bool) {
        if let Some(span) = self.lock_span().take() {
            span.record("aggregation.state", state);
            if failed {
                span.record("otel.status_code", "ERROR");
            }
        }
    }

    fn lock_span(&self) -> std::sync::MutexGuard<'_, Option<tracing::Span>> {
        self.span.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn farm_id(&self) -> &str {
        self.key.farm_id()
    }

    /// The current snapshot, shared.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// Reads the current snapshot without copying it.
    pub fn with_snapshot<T>(&self, f: impl FnOnce(&Snapshot) -> T) -> T {
        f(&self.snapshot.borrow())
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut Snapshot)) {
        self.snapshot.send_modify(|s| {
            let s = Arc::make_mut(s);
            f(s);
            s.encoded_view = EncodedView::default();
        });
    }

    /// Sets the snapshot from outside the lifecycle: for benchmarks of the read path only.
    #[doc(hidden)]
    pub fn update_for_bench(&self, f: impl FnOnce(&mut Snapshot)) {
        self.update(f);
    }

    /// A receiver of every change of the snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.subscribe()
    }

    /// Waits until the aggregation is terminal or `limit` has passed, then returns a snapshot.
    pub async fn wait_terminal(&self, limit: Duration) -> Arc<Snapshot> {
        let mut rx = self.snapshot.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|s| s.state.is_terminal())).await;
        self.snapshot()
    }

    /// Bytes held by the entry, for the cache's memory budget: its rows, its messages, its
    /// key and a fixed overhead.
    pub fn weight(&self) -> usize {
        let held = self.with_snapshot(|s| {
            s.rows.as_ref().map_or(0, |rows| rows.heap_bytes())
                + s.status_message.len()
                + s.error.as_ref().map_or(0, |e| e.message.len())
        });
        held + self.key.heap_bytes() + ENTRY_OVERHEAD_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_encoded_view_lasts_as_long_as_its_snapshot() {
        let agg = Aggregation::new("agg-1".into(), super::super::key::test_key(1, 1));
        let first = agg.snapshot();
        assert_eq!(first.encoded_view.get_or_init(|| Bytes::from_static(b"queued")), &b"queued"[..]);
        assert_eq!(agg.snapshot().encoded_view.get_or_init(|| Bytes::from_static(b"again")), &b"queued"[..]);
        agg.update(|s| s.state = State::Running);
        assert_eq!(agg.snapshot().encoded_view.get_or_init(|| Bytes::from_static(b"running")), &b"running"[..]);
        drop(first);
        agg.update(|s| s.queue_position = 0);
        assert_eq!(agg.snapshot().encoded_view.get_or_init(|| Bytes::from_static(b"fresh")), &b"fresh"[..]);
    }
}
