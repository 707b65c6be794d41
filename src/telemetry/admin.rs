//! The admin HTTP listener (the operator console is merged in by the app): `/metrics` (OpenMetrics text format), `/healthz` (the process is
//! alive) and `/readyz` (the gRPC server is serving and not shutting down, with a word on the
//! coordination store).

use super::Metrics;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

#[derive(Clone)]
struct AdminState {
    metrics: Arc<Metrics>,
    ready: watch::Receiver<bool>,
}

/// The admin routes.
pub fn router(metrics: Arc<Metrics>, ready: watch::Receiver<bool>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(AdminState { metrics, ready })
}

/// Serves the admin routes, and `more` beside them (the operator console), on `listener` until
/// `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    ready: watch::Receiver<bool>,
    more: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(metrics, ready).merge(more)).with_graceful_shutdown(shutdown).await
}

async fn metrics_text(State(s): State<AdminState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, super::metrics::OPENMETRICS_CONTENT_TYPE)], s.metrics.encode())
}

/// Ready while the gRPC server serves. When the coordination store is unreachable the replica
/// stays ready (it still serves the results it holds) and says so: a shared store's outage
/// would otherwise take every replica out of service at once.
async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    match (*s.ready.borrow(), s.metrics.store_up()) {
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "not ready"),
        (true, true) => (StatusCode::OK, "ready"),
        (true, false) => (StatusCode::OK, "ready; the coordination store is unreachable: Starts are refused"),
    }
}
