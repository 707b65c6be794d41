//! Trace plumbing: the tracer provider (OTLP/gRPC exporter only when an endpoint is configured
//! by the standard `OTEL_*` variables) and W3C trace-context extraction from gRPC metadata.

use opentelemetry::propagation::Extractor;
use opentelemetry::trace::{SpanContext, TraceContextExt as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::sync::atomic::{AtomicBool, Ordering};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The variables that turn the exporter on.
const ENDPOINT_VARS: [&str; 2] = ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"];

/// Set once [`provider`] has built an exporter.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported: per-request spans are only worth making when they are.
pub(crate) fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The tracer provider: sampler from `OTEL_TRACES_SAMPLER`, resource from `OTEL_SERVICE_NAME`
/// and `OTEL_RESOURCE_ATTRIBUTES`, and a batch OTLP/gRPC exporter when an endpoint is set.
///
/// Without an exporter no span is recorded (nothing would read it), but spans still get trace
/// and span ids, continuing the caller's trace, so log lines can be correlated.
pub(crate) fn provider() -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    let mut builder = SdkTracerProvider::builder().with_resource(resource());
    if ENDPOINT_VARS.iter().any(|v| std::env::var(v).is_ok_and(|s| !s.trim().is_empty())) {
        let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().build()?;
        let processor = opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
        builder = builder.with_span_processor(processor);
        EXPORTING.store(true, Ordering::Relaxed);
    } else {
        builder = builder.with_sampler(opentelemetry_sdk::trace::Sampler::AlwaysOff);
    }
    Ok(builder.build())
}

fn resource() -> Resource {
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|s| !s.is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|s| s.contains("service.name="));
    let builder = Resource::builder();
    let builder = if named { builder } else { builder.with_service_name(env!("CARGO_PKG_NAME")) };
    builder.with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))).build()
}

/// Reads W3C `traceparent`/`tracestate` from gRPC metadata.
struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// The caller's span named in `metadata` (W3C `traceparent`/`tracestate`), if it names a valid one.
fn remote_parent(metadata: &tonic::metadata::MetadataMap) -> Option<opentelemetry::Context> {
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&MetadataExtractor(metadata)));
    parent.span().span_context().is_valid().then_some(parent)
}

/// The trace id of the caller's span named in `metadata`, if any.
pub(crate) fn remote_trace_id(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    remote_parent(metadata).map(|parent| parent.span().span_context().trace_id().to_string())
}

/// Makes `span` a child of the caller's span named in `metadata`, if any.
pub(crate) fn adopt_remote_parent(span: &tracing::Span, metadata: &tonic::metadata::MetadataMap) {
    if let Some(parent) = remote_parent(metadata) {
        let _ = span.set_parent(parent);
    }
}

/// The trace id of `span`, when it is traced (an OpenTelemetry exporter is configured).
pub(crate) fn trace_id(span: &tracing::Span) -> Option<String> {
    let context = span_context(span);
    context.is_valid().then(|| context.trace_id().to_string())
}

/// The OpenTelemetry context of `span`.
pub(crate) fn span_context(span: &tracing::Span) -> SpanContext {
    span.context().span().span_context().clone()
}
