//! The JSON API under `/api/v1/`: the overview, a page of farms, a farm, an aggregation.
//! Bounded: a page holds at most [`MAX_PAGE`] entries, and nothing reads more of the store
//! than its page needs. Bad parameters answer 400 with what is wrong.

use super::{Console, json};
use crate::gateway::inspect::{FarmOrder, MAX_PAGE};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// How long a count of running refreshes and splits is reused: a count reads the head of
/// every farm that runs one (1,000 reads on 1,000 farms).
const RUNNING_TTL: Duration = Duration::from_secs(30);
/// Entries in a page when none is asked for.
const DEFAULT_LIMIT: usize = 50;

/// An error as JSON: `{"error": code, "message": ...}`.
pub(super) fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, axum::Json(json!({ "error": code, "message": message }))).into_response()
}

pub(super) async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such API path; see /api/v1/overview, /api/v1/farms, /api/v1/farms/{farm_id}, /api/v1/aggregations/{id}",
    )
}

/// `limit` (1..=500), `offset`, and the named extra parameters, or what is wrong with them.
fn paging(query: &HashMap<String, String>, allowed: &[&str]) -> Result<(usize, usize), String> {
    if let Some(unknown) =
        query.keys().find(|k| !["limit", "offset"].contains(&k.as_str()) && !allowed.contains(&k.as_str()))
    {
        return Err(format!("unknown parameter {unknown:?}"));
    }
    let number = |name: &str, default: usize, range: std::ops::RangeInclusive<usize>| match query.get(name) {
        None => Ok(default),
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| range.contains(n))
            .ok_or_else(|| format!("{name} must be a whole number from {} to {}", range.start(), range.end())),
    };
    Ok((number("limit", DEFAULT_LIMIT, 1..=MAX_PAGE)?, number("offset", 0, 0..=1_000_000)?))
}

/// A parameter the API refuses.
fn invalid(message: &str) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid_parameter", message)
}

fn store_unavailable(e: &crate::gateway::StoreError) -> Response {
    error(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", &e.to_string())
}

pub(super) async fn overview(State(c): State<Arc<Console>>) -> Response {
    let g = &c.gateway;
    let now = g.now();
    let began = tokio::time::Instant::now();
    let replicas = g.replicas().await;
    let latency_ms = replicas.is_ok().then(|| began.elapsed().as_secs_f64() * 1000.0);
    let stats = g.store_stats();
    let (capacity, max_active, max_farms) = g.bounds();
    let (recent, window) = c.window.recent();
    let (refreshes, splits) = c.running();
    let (dropped, failed) = g.activity_losses();
    let ratio = |hits: u64, misses: u64| (hits + misses > 0).then(|| hits as f64 / (hits + misses) as f64);
    let calls =
        |(ok, throttled, errors): (u64, u64, u64)| json!({ "ok": ok, "throttled": throttled, "errors": errors });
    let pacing = |(per_second, burst): (f64, u32)| json!({ "per_second": per_second, "burst": burst });
    let (queued, running) = stats.farms.values().fold((0, 0), |(q, r), l| (q + l.queued, r + l.running));
    let memory = stats.memory;
    let body = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "build": env!("DSG_BUILD_COMMIT"),
        "now": json::time(now),
        "uptime_seconds": c.started.elapsed().as_secs(),
        "store": {
            "kind": if g.shared() { "redis" } else { "memory" },
            "up": stats.up,
            "latency_ms": latency_ms,
            "keys": memory.map(|m| m.keys),
            "used_bytes": memory.map(|m| m.used_bytes),
            "max_bytes": memory.map(|m| m.max_bytes),
        },
        "replicas": replicas.unwrap_or_default().iter().map(|r| json!({
            "id": r.id,
            "version": r.version,
            "started": json::time(crate::gateway::activity::time_of(r.started_ms)),
            "last_heartbeat": json::time(crate::gateway::activity::time_of(r.seen_ms)),
            "farms_held": r.farms_held,
            "farms": r.farms,
        })).collect::<Vec<_>>(),
        "bounds": {
            "active_aggregations": { "used": stats.active, "limit": max_active },
            "farms": { "used": stats.farms.len(), "limit": max_farms },
            "cache_bytes": { "used": stats.cached_bytes, "limit": g.cache_budget() },
            "farm_queue_capacity": capacity,
        },
        "cache": {
            "entries": stats.cached,
            "hit_ratio": ratio(recent.cache_hits, recent.cache_misses),
            "hits": recent.cache_hits,
            "misses": recent.cache_misses,
        },
        "work": { "farms": stats.farms.len(), "queued": queued, "running": running, "refreshes_running": refreshes, "splits_running": splits },
        "upstream": {
            "window_seconds": window.as_secs(),
            "start": { "pacing": pacing(c.settings.upstream_start), "calls": calls(recent.start) },
            "get": { "pacing": pacing(c.settings.upstream_get), "calls": calls(recent.get) },
        },
        "console": { "events_dropped": dropped, "events_not_written": failed },
    });
    axum::Json(body).into_response()
}

pub(super) async fn farms(State(c): State<Arc<Console>>, Query(query): Query<HashMap<String, String>>) -> Response {
    let (limit, offset) = match paging(&query, &["order"]) {
        Ok(p) => p,
        Err(why) => return invalid(&why),
    };
    let order = match query.get("order").map(String::as_str) {
        None | Some("farm") => FarmOrder::Farm,
        Some("queued") => FarmOrder::Queued,
        Some(_) => return invalid("order must be farm or queued"),
    };
    let page = c.gateway.farms_page(order, offset, limit).await;
    let now = c.gateway.now();
    axum::Json(json!({
        "total": page.total,
        "offset": offset,
        "limit": limit,
        "farms": page.farms.iter().map(|f| json::farm_summary(f, now)).collect::<Vec<_>>(),
    }))
    .into_response()
}

pub(super) async fn farm(
    State(c): State<Arc<Console>>,
    Path(farm): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if !crate::domain::ids::is_farm_id(&farm) {
        return error(StatusCode::BAD_REQUEST, "invalid_farm_id", "a farm id is farm- and 32 lowercase hex digits");
    }
    let (limit, offset) = match paging(&query, &["recent"]) {
        Ok(p) => p,
        Err(why) => return invalid(&why),
    };
    let recent = match query.get("recent").map(|r| r.parse::<usize>()) {
        None => crate::gateway::activity::RECENT_PER_FARM,
        Some(Ok(n)) if n <= crate::gateway::activity::RECENT_PER_FARM => n,
        Some(_) => {
            return error(StatusCode::BAD_REQUEST, "invalid_parameter", "recent must be a whole number from 0 to 50");
        }
    };
    let view = match c.gateway.farm_view(&farm, offset, limit, recent).await {
        Ok(view) => view,
        Err(e) => return store_unavailable(&e),
    };
    let mut body = json::farm(&view, c.gateway.now());
    body["offset"] = json!(offset);
    body["limit"] = json!(limit);
    axum::Json(body).into_response()
}

/// Whether `id` may name an aggregation: `agg-` and up to 60 lowercase letters and digits.
fn is_aggregation_id(id: &str) -> bool {
    id.strip_prefix("agg-").is_some_and(|rest| {
        (1..=60).contains(&rest.len()) && rest.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    })
}

pub(super) async fn aggregation(State(c): State<Arc<Console>>, Path(id): Path<String>) -> Response {
    if !is_aggregation_id(&id) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_aggregation_id",
            "an aggregation id is agg- and lowercase letters and digits",
        );
    }
    let template = c.settings.trace_url_template.clone();
    let trace_url = move |trace: &str| template.as_ref().map(|t| t.replace("{trace_id}", trace));
    match c.gateway.aggregation_view(&id).await {
        Ok(Some(view)) => axum::Json(json::aggregation(&view, trace_url)).into_response(),
        Ok(None) => match c.gateway.timeline(&id).await {
            Ok(timeline) if !timeline.is_empty() => {
                let mut body = json::aggregation_history(&id, &timeline);
                body["trace_url"] = json!(json::trace_id(&timeline).and_then(trace_url));
                axum::Json(body).into_response()
            }
            _ => error(StatusCode::NOT_FOUND, "not_found", "no such aggregation (or its record and history are gone)"),
        },
        Err(e) => store_unavailable(&e),
    }
}

impl Console {
    /// Refreshes and split aggregations running, as last counted from the heads of the farms
    /// that run one; a count older than [`RUNNING_TTL`] starts a new one in the background (on a
    /// shared store 1,000 farms take 1,000 reads), so no answer waits for it.
    fn running(self: &Arc<Self>) -> (usize, usize) {
        let mut running = self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let stale = running.at.is_none_or(|at| at.elapsed() >= RUNNING_TTL);
        if stale && !running.counting {
            running.counting = true;
            let console = self.clone();
            tokio::spawn(async move {
                let counts = console.count_running().await;
                let mut running = console.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                *running = super::Running { counts, at: Some(tokio::time::Instant::now()), counting: false };
            });
        }
        running.counts
    }

    async fn count_running(&self) -> (usize, usize) {
        let heads = self.gateway.running_heads().await;
        let refreshes = heads.iter().filter(|h| h.refresh).count();
        (refreshes, heads.iter().filter(|h| !h.split.is_empty()).count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregation_ids_in_paths_are_checked_before_anything_is_read() {
        assert!(is_aggregation_id("agg-0a0000000112345678901234567890ab"));
        for bad in ["", "agg-", "agg-<script>", "agg-../x", "AGG-1", "agg-ABC", &format!("agg-{}", "a".repeat(61))] {
            assert!(!is_aggregation_id(bad), "{bad}");
        }
    }

    #[test]
    fn paging_parameters_are_bounded_and_unknown_ones_refused() {
        let q = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        assert_eq!(paging(&q(&[]), &[]).ok(), Some((DEFAULT_LIMIT, 0)));
        assert_eq!(paging(&q(&[("limit", "500"), ("offset", "10")]), &[]).ok(), Some((500, 10)));
        assert!(paging(&q(&[("limit", "501")]), &[]).is_err());
        assert!(paging(&q(&[("limit", "0")]), &[]).is_err());
        assert!(paging(&q(&[("limit", "x")]), &[]).is_err());
        assert!(paging(&q(&[("sort", "x")]), &[]).is_err());
        assert!(paging(&q(&[("order", "queued")]), &["order"]).is_ok());
    }
}
