//! JSON log lines, each carrying the `trace_id` and `span_id` of the span it was emitted in.
//!
//! Spans that take part in traces declare `trace_id` and `span_id` fields and record them once
//! their OpenTelemetry context is known ([`super::traces::record_ids`]); [`TraceIdsLayer`]
//! keeps them in the span's extensions, and [`JsonLines`] writes the innermost ones.

use serde_json::{Map, Value};
use std::fmt;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// The ids a span recorded.
#[derive(Debug, Clone, Default)]
struct TraceIds {
    trace_id: Option<String>,
    span_id: Option<String>,
}

impl Visit for TraceIds {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record_debug(field, &value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}").trim_matches('"').to_owned();
        match field.name() {
            "trace_id" => self.trace_id = Some(text),
            "span_id" => self.span_id = Some(text),
            _ => {}
        }
    }
}

/// Stores recorded `trace_id`/`span_id` fields in span extensions.
pub struct TraceIdsLayer;

impl<S: Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for TraceIdsLayer {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut ids = TraceIds::default();
        attrs.record(&mut ids);
        if ids.trace_id.is_some()
            && let Some(span) = ctx.span(id)
        {
            span.extensions_mut().insert(ids);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        if let Some(ids) = ext.get_mut::<TraceIds>() {
            values.record(ids);
            return;
        }
        let mut ids = TraceIds::default();
        values.record(&mut ids);
        if ids.trace_id.is_some() || ids.span_id.is_some() {
            ext.insert(ids);
        }
    }
}

/// Collects an event's fields as JSON values.
struct JsonFields<'a>(&'a mut Map<String, Value>);

impl Visit for JsonFields<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}").into());
    }
}

/// One JSON object per line: timestamp, level, target, message and fields, the innermost
/// span's name, and the trace and span ids.
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let mut line = Map::new();
        line.insert("timestamp".into(), chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true).into());
        line.insert("level".into(), event.metadata().level().as_str().into());
        line.insert("target".into(), event.metadata().target().into());
        event.record(&mut JsonFields(&mut line));
        if let Some(scope) = ctx.event_scope() {
            let mut spans = scope.into_iter().peekable();
            if let Some(leaf) = spans.peek() {
                line.insert("span".into(), leaf.name().into());
            }
            if let Some(ids) = spans.find_map(|s| s.extensions().get::<TraceIds>().cloned()) {
                line.insert("trace_id".into(), ids.trace_id.unwrap_or_default().into());
                line.insert("span_id".into(), ids.span_id.unwrap_or_default().into());
            }
        }
        writeln!(writer, "{}", Value::Object(line))
    }
}
