//! The lifecycle span of each aggregation this process started or drives: a trace of its own,
//! linked from every Start that started or joined it here, closed when it ends. Spans are a
//! per-process concern, kept beside the store, never in it.

use super::record::AggregationRecord;
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

/// The open lifecycle spans, by aggregation id.
#[derive(Debug, Default)]
pub struct Spans {
    open: Mutex<HashMap<String, tracing::Span>>,
}

impl Spans {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, tracing::Span>> {
        self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The span of `record`, opened now if this process has none yet.
    pub fn of(&self, record: &AggregationRecord) -> tracing::Span {
        self.lock()
            .entry(record.id.to_string())
            .or_insert_with(|| {
                tracing::info_span!(
                    parent: None,
                    "aggregation",
                    otel.name = "aggregation.lifecycle",
                    aggregation.id = %record.id,
                    farm.id = %record.farm_id(),
                    upstream.aggregation_id = tracing::field::Empty,
                    aggregation.state = tracing::field::Empty,
                    otel.status_code = tracing::field::Empty,
                )
            })
            .clone()
    }

    /// Links the span of `record` from the caller's current span (a Start that started or
    /// joined it).
    pub fn link_from_current(&self, record: &AggregationRecord) {
        let span = self.of(record);
        let caller = crate::telemetry::traces::span_context(&tracing::Span::current());
        if caller.is_valid() {
            tracing_opentelemetry::OpenTelemetrySpanExt::add_link(&span, caller);
        }
    }

    /// Records the final state on the span of `id` and closes it.
    pub fn end(&self, id: &str, state: &'static str, failed: bool) {
        if let Some(span) = self.lock().remove(id) {
            span.record("aggregation.state", state);
            if failed {
                span.record("otel.status_code", "ERROR");
            }
        }
    }

    /// Open spans.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
