//! The operator console on the admin listener: a page (`/`, `/farms/{id}`,
//! `/aggregations/{id}`) that shows every farm's queue, what runs and why a caller waits, live,
//! and the JSON API under `/api/v1/` it reads, which programs and `status` read too.
//!
//! - `api`: the JSON handlers; `json`: the gateway's views as JSON; `window`: the last five
//!   minutes of a few counters; `token`: the bearer token file.
//!
//! Access: open on a loopback admin address; with `--admin-token-file`, every console route
//! needs `Authorization: Bearer TOKEN` (the page asks for it once per tab); on any other
//! address without a token file the console is off. `/healthz`, `/readyz` and `/metrics` are
//! never behind the token. Everything is served by the gateway itself: no script, font or
//! style from elsewhere, so it works through `kubectl port-forward` without internet.

mod api;
pub mod json;
pub mod token;
mod window;

use crate::gateway::Gateway;
use crate::telemetry::Metrics;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::sync::Arc;
use token::TokenFile;
use tokio_util::sync::CancellationToken;

/// The page's markup, script and style: three files, so the script runs from `'self'` only
/// (nothing inline runs, whatever a value shown in the page contains).
const PAGE: &str = include_str!("assets/console.html");
const SCRIPT: &str = include_str!("assets/console.js");
const STYLE: &str = include_str!("assets/console.css");

/// The last count of running refreshes and splits.
#[derive(Debug, Default)]
struct Running {
    counts: (usize, usize),
    at: Option<tokio::time::Instant>,
    counting: bool,
}

/// Who may use the console.
#[derive(Clone)]
pub enum ConsoleAccess {
    /// Anyone who reaches the admin listener (it listens on loopback only).
    Open,
    /// Whoever presents the token.
    Token(Arc<TokenFile>),
    /// Nobody: the admin listener is reachable from elsewhere and no token is set.
    Off,
}

impl ConsoleAccess {
    /// The rule: the token when there is one; else open on a loopback listener, off elsewhere.
    pub fn for_listener(token: Option<Arc<TokenFile>>, loopback: bool) -> Self {
        match (token, loopback) {
            (Some(token), _) => Self::Token(token),
            (None, true) => Self::Open,
            (None, false) => Self::Off,
        }
    }
}

/// What the console is built with.
pub struct ConsoleSettings {
    pub access: ConsoleAccess,
    /// A URL with `{trace_id}` where the operator's tracing UI shows a trace.
    pub trace_url_template: Option<String>,
    /// The upstream pacing, as configured (per second, burst).
    pub upstream_start: (f64, u32),
    pub upstream_get: (f64, u32),
}

/// The console's state, shared by its handlers.
pub(crate) struct Console {
    gateway: Arc<Gateway>,
    settings: ConsoleSettings,
    window: Arc<window::Window>,
    started: tokio::time::Instant,
    /// The running refreshes and splits as last counted, when, and whether a count is under way
    /// (counted in the background, never while an answer waits).
    running: std::sync::Mutex<Running>,
}

/// The console's routes, stopping their background sampling when `stop` fires.
pub fn router(
    gateway: Arc<Gateway>,
    metrics: Arc<Metrics>,
    settings: ConsoleSettings,
    stop: CancellationToken,
) -> Router {
    let console = Arc::new(Console {
        gateway,
        settings,
        window: window::Window::start(metrics, stop),
        started: tokio::time::Instant::now(),
        running: std::sync::Mutex::default(),
    });
    let api = Router::new()
        .route("/api/v1/overview", get(api::overview))
        .route("/api/v1/farms", get(api::farms))
        .route("/api/v1/farms/{farm}", get(api::farm))
        .route("/api/v1/aggregations/{id}", get(api::aggregation))
        .fallback(api::not_found)
        .route_layer(middleware::from_fn_with_state(console.clone(), authorize));
    let page = Router::new()
        .route("/console.js", get(|| async { ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], SCRIPT) }))
        .route("/console.css", get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE) }))
        .route("/", get(page))
        .route("/farms/{farm}", get(page))
        .route("/aggregations/{id}", get(page));
    page.merge(api).layer(middleware::from_fn(headers)).with_state(console)
}

/// The page: the same shell for every console path (it reads its path and the API). It holds
/// no data, so it is served without the token; the API it calls is not.
async fn page(State(console): State<Arc<Console>>) -> Response {
    if matches!(console.settings.access, ConsoleAccess::Off) {
        return (StatusCode::NOT_FOUND, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], OFF_MESSAGE)
            .into_response();
    }
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE).into_response()
}

/// What the console says when it is off.
const OFF_MESSAGE: &str = "The console is off: the admin listener is reachable from other hosts and no token is set. \
Start the gateway with --admin-token-file FILE (a token of at least 16 characters) to turn it on, \
or bind --admin-listen to 127.0.0.1 and use kubectl port-forward.\n";

/// The token rule for the API.
async fn authorize(State(console): State<Arc<Console>>, request: Request, next: Next) -> Response {
    match &console.settings.access {
        ConsoleAccess::Open => next.run(request).await,
        ConsoleAccess::Off => api::error(StatusCode::NOT_FOUND, "console_off", OFF_MESSAGE.trim_end()),
        ConsoleAccess::Token(token) => {
            let presented = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            if presented.is_some_and(|p| token.admits(p.trim())) {
                return next.run(request).await;
            }
            let mut refused = api::error(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "present the admin token as Authorization: Bearer TOKEN",
            );
            refused
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"console\""));
            refused
        }
    }
}

/// What every console answer carries: nothing from elsewhere may run or load in the page, it
/// is never framed, and nothing it shows is cached.
async fn headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_token_the_console_is_open_on_loopback_only() {
        assert!(matches!(ConsoleAccess::for_listener(None, true), ConsoleAccess::Open));
        assert!(matches!(ConsoleAccess::for_listener(None, false), ConsoleAccess::Off));
        let dir = std::env::temp_dir().join(format!("dsg-access-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a directory");
        std::fs::write(dir.join("t"), "a-token-of-sixteen-or-more").expect("writes");
        let token = Arc::new(TokenFile::load(&dir.join("t")).expect("loads"));
        for loopback in [true, false] {
            assert!(matches!(ConsoleAccess::for_listener(Some(token.clone()), loopback), ConsoleAccess::Token(_)));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
