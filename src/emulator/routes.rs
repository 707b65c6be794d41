//! The HTTP routes: the two Deadline operations under `/2023-10-12/`, and the admin API under
//! the reserved prefix `/_emulator/`.

use super::error::{ApiError, ValidationReason};
use super::faults::{FaultSpec, Operation};
use super::state::Emulator;
use super::wire::{self, GetOutput, StartOutput};
use crate::domain::ids;
use crate::domain::validate::{Field, FieldViolation, check_farm_id};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::collections::HashMap;
use std::sync::Arc;

/// The path of both operations, below the API version.
const API_PATH: &str = "/2023-10-12/farms/{farm_id}/sessions-statistics-aggregation";
/// The model's page size bounds.
const MAX_RESULTS: usize = 100;
/// The model's `NextToken` length limit.
const MAX_TOKEN_LEN: usize = 4096;

pub(super) fn router(emulator: Arc<Emulator>) -> Router {
    Router::new()
        .route(API_PATH, post(start).get(get_aggregation))
        .route("/_emulator/stats", get(stats))
        .route("/_emulator/faults", get(faults).post(set_faults).delete(clear_faults))
        .route("/_emulator/reset", post(reset))
        .route("/_emulator/health", get(|| async { "ok" }))
        .fallback(unknown_operation)
        .with_state(emulator)
}

/// Which API operation a request is, and for which farm; `None` for everything else.
pub(super) fn operation_of<'p>(method: &Method, path: &'p str) -> Option<(Operation, &'p str)> {
    let farm = path.strip_prefix("/2023-10-12/farms/")?.strip_suffix("/sessions-statistics-aggregation")?;
    match *method {
        Method::POST => Some((Operation::Start, farm)),
        Method::GET => Some((Operation::Get, farm)),
        _ => None,
    }
}

async fn start(
    State(emu): State<Arc<Emulator>>,
    Path(farm_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<StartOutput>, ApiError> {
    authenticate(&headers)?;
    let request = wire::start_request(farm_id, &body)?;
    let aggregation_id = emu.start(request)?;
    Ok(Json(StartOutput { aggregation_id }))
}

async fn get_aggregation(
    State(emu): State<Arc<Emulator>>,
    Path(farm_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Json<GetOutput>, ApiError> {
    authenticate(&headers)?;
    let mut v = Vec::new();
    check_farm_id(&farm_id, &mut v);
    let aggregation_id = query.get("aggregationId").map(String::as_str).unwrap_or_default();
    if !ids::is_aggregation_id(aggregation_id) {
        v.push(FieldViolation::new(Field::AggregationId, format!("'{aggregation_id}' must match [0-9a-f]{{32}}")));
    }
    let max_results = match query.get("maxResults").map(|m| m.parse::<usize>()) {
        None => MAX_RESULTS,
        Some(Ok(n)) if (1..=MAX_RESULTS).contains(&n) => n,
        Some(_) => {
            v.push(FieldViolation::new(Field::MaxResults, format!("must be a whole number from 1 to {MAX_RESULTS}")));
            MAX_RESULTS
        }
    };
    let next_token = query.get("nextToken").filter(|t| !t.is_empty());
    if next_token.is_some_and(|t| t.len() > MAX_TOKEN_LEN) {
        v.push(FieldViolation::new(Field::NextToken, format!("is longer than {MAX_TOKEN_LEN} characters")));
    }
    if !v.is_empty() {
        return Err(wire::violations(v));
    }
    let page = emu.get(&farm_id, aggregation_id, max_results, next_token.map(String::as_str))?;
    Ok(Json(page.into()))
}

/// Requires a SigV4 `Authorization` header, as the real service does (the signature itself is
/// not checked: the emulator has no secrets).
fn authenticate(headers: &HeaderMap) -> Result<(), ApiError> {
    let signed =
        headers.get("authorization").and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("AWS4-HMAC-SHA256 "));
    if signed {
        Ok(())
    } else {
        Err(ApiError::AccessDenied { message: "the request is not signed with AWS Signature Version 4".into() })
    }
}

async fn unknown_operation(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::Validation {
        reason: ValidationReason::UnknownOperation,
        message: format!("no operation matches {method} {}", uri.path()),
        fields: vec![],
    }
}

async fn stats(State(emu): State<Arc<Emulator>>) -> impl IntoResponse {
    Json(emu.stats())
}

async fn faults(State(emu): State<Arc<Emulator>>) -> impl IntoResponse {
    Json(emu.faults.get())
}

async fn set_faults(State(emu): State<Arc<Emulator>>, body: Bytes) -> Response {
    let spec = match serde_json::from_slice::<FaultSpec>(&body)
        .map_err(|e| e.to_string())
        .and_then(|s| s.validate().map(|()| s))
    {
        Ok(spec) => spec,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, Json(serde_json::json!({ "message": e }))).into_response();
        }
    };
    emu.faults.set(spec.clone());
    Json(spec).into_response()
}

async fn clear_faults(State(emu): State<Arc<Emulator>>) -> impl IntoResponse {
    emu.faults.set(FaultSpec::default());
    StatusCode::NO_CONTENT
}

async fn reset(State(emu): State<Arc<Emulator>>) -> impl IntoResponse {
    emu.reset();
    StatusCode::NO_CONTENT
}
