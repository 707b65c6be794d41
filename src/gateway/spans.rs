//! The lifecycle span of each aggregation this process started or drives: a trace of its own,
//! linked from every Start that started or joined it here, closed when it ends. Spans are a
//! per-process concern, kept beside the store, never in it.
//!
//! Bounded: with a shared store, an aggregation started here may be driven (and ended) by
//! another replica, so an open span is forgotten after [`SPAN_TTL`], or when [`MAX_SPANS`] are
//! open, the least recently used first; a forgotten span closes without a final state.

use super::record::AggregationRecord;
use moka::sync::Cache;
use std::time::Duration;

/// The most lifecycle spans held open.
const MAX_SPANS: u64 = 50_000;
/// How long a span may stay open without its aggregation ending here.
const SPAN_TTL: Duration = Duration::from_secs(3 * 3600);

/// The open lifecycle spans, by aggregation id.
#[derive(Debug)]
pub(crate) struct Spans {
    open: Cache<String, tracing::Span>,
}

impl Default for Spans {
    fn default() -> Self {
        Self { open: Cache::builder().max_capacity(MAX_SPANS).time_to_live(SPAN_TTL).build() }
    }
}

impl Spans {
    /// The span of `record`, opened now if this process has none yet.
    pub(crate) fn of(&self, record: &AggregationRecord) -> tracing::Span {
        self.open.get_with(record.id.to_string(), || {
            tracing::info_span!(
                parent: None,
                "aggregation",
                otel.name = "aggregation.lifecycle",
                aggregation.id = %record.id,
                farm.id = %record.farm_id(),
                upstream.aggregation_id = tracing::field::Empty,
                upstream.route = tracing::field::Empty,
                aggregation.state = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            )
        })
    }

    /// Links the span of `record` from the caller's current span (a Start that started or
    /// joined it).
    pub(crate) fn link_from_current(&self, record: &AggregationRecord) {
        let span = self.of(record);
        let caller = crate::telemetry::traces::span_context(&tracing::Span::current());
        if caller.is_valid() {
            tracing_opentelemetry::OpenTelemetrySpanExt::add_link(&span, caller);
        }
    }

    /// The trace id of `record`'s lifecycle span here, when traces are exported.
    pub(crate) fn trace_id(&self, record: &AggregationRecord) -> Option<String> {
        crate::telemetry::traces::trace_id(&self.of(record))
    }

    /// Records the final state on the span of `id` and closes it.
    pub(crate) fn end(&self, id: &str, state: &'static str, failed: bool) {
        if let Some(span) = self.open.remove(id) {
            span.record("aggregation.state", state);
            if failed {
                span.record("otel.status_code", "ERROR");
            }
        }
    }

    /// Open spans.
    #[cfg(test)]
    fn len(&self) -> u64 {
        self.open.run_pending_tasks();
        self.open.entry_count()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_span_opens_once_and_closes_at_its_end() {
        let spans = Spans::default();
        let record = AggregationRecord::queued(
            "agg-1".into(),
            crate::gateway::key::test_key(1, 1),
            std::time::SystemTime::now(),
        );
        spans.of(&record);
        spans.of(&record);
        assert_eq!(spans.len(), 1);
        spans.end(&record.id, "COMPLETED", false);
        assert!(spans.is_empty());
    }
}
