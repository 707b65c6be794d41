//! Observability: logs (text or JSON lines carrying trace and span ids), OpenTelemetry traces
//! exported over OTLP/gRPC when the standard variables ask for it, Prometheus metrics, and the
//! admin HTTP listener that serves them with liveness and readiness.
//!
//! Nothing here decides anything about aggregations; the gateway and the gRPC layer report
//! to it.

pub mod admin;
pub(crate) mod logs;
pub mod metrics;
pub(crate) mod traces;

pub use metrics::Metrics;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::io::IsTerminal as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// JSON lines unless stderr is a terminal.
    Auto,
    Json,
    Text,
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot build the OTLP trace exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("a global tracing subscriber is already installed: {0}")]
    Subscriber(#[from] tracing_subscriber::util::TryInitError),
}

/// Keeps the tracer provider alive; [`TelemetryGuard::shutdown`] flushes pending spans.
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl TelemetryGuard {
    /// Exports what is pending and stops the exporter.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("telemetry: flushing spans failed: {e}");
        }
    }
}

/// What is logged unless `RUST_LOG` says otherwise.
const DEFAULT_FILTER: &str = "info,redis::cluster_handling=error";

/// Installs the global subscriber: `RUST_LOG`-style filtering (default `info`), logs in
/// `format`, and the OpenTelemetry layer. Needs a Tokio runtime (the span exporter runs on it).
pub fn init(format: LogFormat) -> Result<TelemetryGuard, TelemetryError> {
    let provider = traces::provider()?;
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    // Busy/idle times, thread attributes and making each entered span the current
    // OpenTelemetry context would cost clock reads, allocations and thread-local updates on
    // every span of every request; nothing here reads them (span contexts are taken from the
    // tracing span itself).
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("deadline-stats-gateway"))
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_context_activation(false);
    // The redis crate's cluster client logs every failed reconnect to a dead node at warn
    // (thousands a minute during a failover); the gateway says what it means for its work.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let fmt = if json {
        tracing_subscriber::fmt::layer()
            .event_format(logs::JsonLines)
            .fmt_fields(logs::NoFields)
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal()).boxed()
    };
    tracing_subscriber::registry().with(filter).with(otel).with(fmt).try_init()?;
    logs::remember_global_dispatch();
    Ok(TelemetryGuard { provider })
}
