//! Trace plumbing: the tracer provider (OTLP/gRPC exporter only when an endpoint is configured
//! by the standard `OTEL_*` variables) and W3C trace-context extraction from gRPC metadata.

use opentelemetry::propagation::Extractor;
use opentelemetry::trace::{SpanContext, SpanKind, TraceContextExt as _, TraceId};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{
    IdGenerator as _, RandomIdGenerator, SamplingDecision, SamplingResult, SdkTracerProvider, ShouldSample,
};
use std::sync::OnceLock;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The variables that turn the exporter on.
const ENDPOINT_VARS: [&str; 2] = ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"];

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
        // The sampler OTEL_TRACES_SAMPLER names decides each RPC before its span is made;
        // the SDK then records the RPC spans it is given and samples every other span so.
        let configured = opentelemetry_sdk::trace::Config::default().sampler;
        let _ = RPC_SAMPLER.set(configured.clone());
        builder = builder.with_span_processor(processor).with_sampler(RpcsPresampled(configured));
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

/// The configured sampler, once an exporter is built: [`rpc_sampled`] asks it.
static RPC_SAMPLER: OnceLock<Box<dyn ShouldSample>> = OnceLock::new();

/// Whether the RPC `name` (a full method name) is traced: decided before its span is made, by
/// the configured sampler, from the caller's trace context in `metadata` (a parent-based
/// sampler follows the caller's sampled flag) or, for a new trace, as the sampler decides a
/// root. False when nothing is exported. A span not sampled is not made at all: a cache hit
/// pays for a span only when it is recorded.
pub(crate) fn rpc_sampled(metadata: &tonic::metadata::MetadataMap, name: &str) -> bool {
    RPC_SAMPLER.get().is_some_and(|sampler| sampled(sampler.as_ref(), remote_parent(metadata).as_ref(), name))
}

fn sampled(sampler: &dyn ShouldSample, parent: Option<&opentelemetry::Context>, name: &str) -> bool {
    let trace_id = match parent {
        Some(parent) => parent.span().span_context().trace_id(),
        None => RandomIdGenerator::default().new_trace_id(),
    };
    let decision = sampler.should_sample(parent, trace_id, name, &SpanKind::Server, &[], &[]).decision;
    decision != SamplingDecision::Drop
}

/// The SDK's sampler: a new trace begun by an RPC span was sampled by [`rpc_sampled`] before
/// the span was made (with a trace id of its own drawing, so asking again would sample twice);
/// it is recorded. Everything else goes to the configured sampler.
#[derive(Debug, Clone)]
struct RpcsPresampled(Box<dyn ShouldSample>);

impl ShouldSample for RpcsPresampled {
    fn should_sample(
        &self,
        parent: Option<&opentelemetry::Context>,
        trace_id: TraceId,
        name: &str,
        kind: &SpanKind,
        attributes: &[opentelemetry::KeyValue],
        links: &[opentelemetry::trace::Link],
    ) -> SamplingResult {
        let root = parent.is_none_or(|p| !p.span().span_context().is_valid());
        if root && *kind == SpanKind::Server && is_rpc(name) {
            return SamplingResult {
                decision: SamplingDecision::RecordAndSample,
                attributes: Vec::new(),
                trace_state: Default::default(),
            };
        }
        self.0.should_sample(parent, trace_id, name, kind, attributes, links)
    }
}

/// Whether `name` is one of the aggregation service's methods.
fn is_rpc(name: &str) -> bool {
    name.strip_prefix(crate::grpc::service::SERVICE_NAME).is_some_and(|rest| rest.starts_with('/'))
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

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanId, TraceFlags, TraceState};
    use opentelemetry_sdk::trace::Sampler;

    fn remote(sampled: bool) -> opentelemetry::Context {
        let flags = if sampled { TraceFlags::SAMPLED } else { TraceFlags::default() };
        let context =
            SpanContext::new(TraceId::from(0x1234_u128), SpanId::from(0x56_u64), flags, true, TraceState::default());
        opentelemetry::Context::new().with_remote_span_context(context)
    }

    const GET: &str = "deadline.stats.v1.AggregationService/GetAggregation";

    #[test]
    fn an_rpc_is_sampled_before_its_span_is_made_as_the_configured_sampler_says() {
        let parent_based = Sampler::ParentBased(Box::new(Sampler::AlwaysOn));
        assert!(sampled(&parent_based, None, GET), "a new trace, root always on");
        assert!(sampled(&parent_based, Some(&remote(true)), GET));
        assert!(!sampled(&parent_based, Some(&remote(false)), GET), "the caller's flag says not sampled");
        assert!(!sampled(&Sampler::AlwaysOff, None, GET));
        assert!(!sampled(&Sampler::TraceIdRatioBased(0.0), None, GET));
        let half = Sampler::TraceIdRatioBased(0.5);
        let taken = (0..2000).filter(|_| sampled(&half, None, GET)).count();
        assert!((800..1200).contains(&taken), "{taken} of 2000 at a ratio of 0.5");
    }

    #[test]
    fn the_sdk_records_the_rpc_roots_given_it_and_samples_the_rest_as_configured() {
        let sdk = RpcsPresampled(Box::new(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(0.0)))));
        let decide = |parent: Option<&opentelemetry::Context>, name: &str, kind: SpanKind| {
            sdk.should_sample(parent, TraceId::from(7_u128), name, &kind, &[], &[]).decision
        };
        assert_eq!(decide(None, GET, SpanKind::Server), SamplingDecision::RecordAndSample);
        assert_eq!(decide(None, "aggregation.lifecycle", SpanKind::Internal), SamplingDecision::Drop);
        assert_eq!(decide(None, "deadline.stats.v1.AggregationServiceX/Get", SpanKind::Server), SamplingDecision::Drop);
        assert_eq!(decide(Some(&remote(false)), GET, SpanKind::Server), SamplingDecision::Drop);
        assert_eq!(decide(Some(&remote(true)), GET, SpanKind::Server), SamplingDecision::RecordAndSample);
    }
}
