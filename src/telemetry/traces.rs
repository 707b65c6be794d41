//! Trace plumbing: the tracer provider (OTLP/gRPC exporter only when an endpoint is configured
//! by the standard `OTEL_*` variables), W3C trace-context extraction from gRPC metadata, and
//! helpers that put a span's ids into its fields so log lines carry them.

use opentelemetry::propagation::Extractor;
use opentelemetry::trace::{SpanContext, TraceContextExt as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The variables that turn the exporter on.
const ENDPOINT_VARS: [&str; 2] = ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"];

/// The tracer provider: sampler from `OTEL_TRACES_SAMPLER`, resource from `OTEL_SERVICE_NAME`
/// and `OTEL_RESOURCE_ATTRIBUTES`, and a batch OTLP/gRPC exporter when an endpoint is set.
pub fn provider() -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    let mut builder = SdkTracerProvider::builder().with_resource(resource());
    if ENDPOINT_VARS.iter().any(|v| std::env::var(v).is_ok_and(|s| !s.trim().is_empty())) {
        let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().build()?;
        let processor = opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
        builder = builder.with_span_processor(processor);
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

/// Makes `span` a child of the caller's span named in `metadata`, if any.
pub fn adopt_remote_parent(span: &tracing::Span, metadata: &tonic::metadata::MetadataMap) {
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&MetadataExtractor(metadata)));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// The OpenTelemetry context of `span`.
pub fn span_context(span: &tracing::Span) -> SpanContext {
    span.context().span().span_context().clone()
}

/// Records `trace_id` and `span_id` into the span's fields (declared `Empty`), for the logs.
pub fn record_ids(span: &tracing::Span) {
    let cx = span_context(span);
    if cx.is_valid() {
        span.record("trace_id", tracing::field::display(cx.trace_id()));
        span.record("span_id", tracing::field::display(cx.span_id()));
    }
}
