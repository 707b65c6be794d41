//! The emulator's HTTP server: an accept loop that applies the faults in front of the router.
//!
//! Faults live here rather than in the router because dropping a connection needs the
//! connection: a service error makes hyper close it without an answer.

use super::error::ApiError;
use super::faults::Action;
use super::routes::{operation_of, router};
use super::state::Emulator;
use axum::response::IntoResponse;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tower::ServiceExt as _;

/// How long open connections may take to finish once shutdown begins.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The error that makes hyper drop a connection without answering.
#[derive(Debug, thiserror::Error)]
#[error("connection dropped by the emulator's faults")]
struct Dropped;

/// One request: its faults, then the router.
async fn handle(
    router: axum::Router,
    emulator: Arc<Emulator>,
    req: http::Request<axum::body::Body>,
) -> Result<http::Response<axum::body::Body>, Dropped> {
    let mut lose_response = false;
    if let Some((op, farm)) = operation_of(req.method(), req.uri().path()) {
        let host = req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok());
        emulator.record_call(farm, op, host);
        let latency = emulator.faults.latency(op);
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        match emulator.faults.decide(op) {
            Action::Drop => return Err(Dropped),
            Action::Fail(kind, retry_after) => {
                return Ok(ApiError::injected(kind, retry_after).into_response());
            }
            Action::LoseResponse => lose_response = true,
            Action::Proceed => {}
        }
    }
    let response = router.oneshot(req).await.unwrap_or_else(|never| match never {});
    if lose_response { Err(Dropped) } else { Ok(response) }
}

/// Serves `emulator` on `listener` until `shutdown` resolves, then drains connections.
pub(super) async fn serve(listener: TcpListener, emulator: Arc<Emulator>, shutdown: impl Future<Output = ()>) {
    let router = router(emulator.clone());
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "emulator accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let (router, emulator) = (router.clone(), emulator.clone());
        let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
            let (router, emulator) = (router.clone(), emulator.clone());
            async move {
                // Like a real service, a request once received is carried out even if its
                // caller goes away meanwhile (a killed client's Start still starts).
                let (parts, body) = req.into_parts();
                let body = body.collect().await.map_err(|_| Dropped)?.to_bytes();
                let req = http::Request::from_parts(parts, axum::body::Body::from(body));
                tokio::spawn(handle(router, emulator, req)).await.map_err(|_| Dropped)?
            }
        });
        let conn = auto::Builder::new(TokioExecutor::new())
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "emulator connection ended");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await.is_err() {
        tracing::warn!("emulator connections still open after the drain timeout");
    }
}
