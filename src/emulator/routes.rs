//! The HTTP routes: the two Deadline operations under `/2023-10-12/`, STS `AssumeRole` at `/`
//! (the query protocol), and the admin API under the reserved prefix `/_emulator/`.

use super::error::{ApiError, ValidationReason};
use super::faults::{FaultSpec, Operation};
use super::sigv4::Authorization;
use super::state::Emulator;
use super::sts::TokenError;
use super::wire::{self, GetOutput, StartOutput};
use crate::domain::ids;
use crate::domain::validate::{Field, FieldViolation, check_farm_id};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
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
        .route("/", post(sts))
        .route("/2023-10-12/farms", get(list_farms))
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
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<StartOutput>, ApiError> {
    let key = authenticate(&emu, &method, &uri, &headers, &body)?;
    emu.record_key(&farm_id, &key);
    let request = wire::start_request(farm_id, &body)?;
    let aggregation_id = emu.start(request)?;
    Ok(Json(StartOutput { aggregation_id }))
}

async fn get_aggregation(
    State(emu): State<Arc<Emulator>>,
    Path(farm_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Json<GetOutput>, ApiError> {
    let key = authenticate(&emu, &method, &uri, &headers, &[])?;
    emu.record_key(&farm_id, &key);
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

/// ListFarms (REST-JSON, paged by `maxResults` 1..100 and an opaque `nextToken`).
async fn list_farms(
    State(emu): State<Arc<Emulator>>,
    Query(query): Query<HashMap<String, String>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    authenticate(&emu, &method, &uri, &headers, &[])?;
    let mut v = Vec::new();
    let max_results = match query.get("maxResults").map(|m| m.parse::<usize>()) {
        None => MAX_RESULTS,
        Some(Ok(n)) if (1..=MAX_RESULTS).contains(&n) => n,
        Some(_) => {
            v.push(("maxResults".to_owned(), format!("must be a whole number from 1 to {MAX_RESULTS}")));
            MAX_RESULTS
        }
    };
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let after = match query.get("nextToken").filter(|t| !t.is_empty()) {
        None => None,
        Some(token) => match base64::Engine::decode(&engine, token).ok().and_then(|b| String::from_utf8(b).ok()) {
            Some(after) => Some(after),
            None => {
                v.push(("nextToken".to_owned(), "is not a token this API gave".to_owned()));
                None
            }
        },
    };
    if !v.is_empty() {
        return Err(ApiError::fields(v));
    }
    let (farms, next) = emu.list_farms(max_results, after.as_deref());
    let farms: Vec<serde_json::Value> = farms
        .iter()
        .map(|id| {
            serde_json::json!({
                "farmId": id,
                "displayName": format!("emulated {id}"),
                "createdAt": "2026-01-01T00:00:00Z",
                "createdBy": "arn:aws:iam::123456789012:role/emulator",
            })
        })
        .collect();
    let mut body = serde_json::json!({ "farms": farms });
    if let Some(next) = next {
        body["nextToken"] = base64::Engine::encode(&engine, next).into();
    }
    Ok(Json(body))
}

/// Requires a SigV4 `Authorization` header scoped to the emulator's region, as the real service
/// does; a request signed with credentials its STS handed out must carry their session token
/// and their signature ([`super::sigv4`]). The access key id it was signed with.
fn authenticate(
    emu: &Emulator,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<String, ApiError> {
    let Some(auth) = Authorization::parse(headers) else {
        return Err(ApiError::AccessDenied {
            message: "the request is not signed with AWS Signature Version 4".into(),
        });
    };
    let refused = |error_type, message: &str| ApiError::Unauthenticated { error_type, message: message.to_owned() };
    if auth.region != emu.region() {
        return Err(refused("InvalidSignatureException", "Credential should be scoped to a valid region."));
    }
    let token = headers.get("x-amz-security-token").and_then(|v| v.to_str().ok());
    if let Some(token) = token.filter(|t| t.starts_with("emu1.")) {
        let secret = match emu.sts().secret_of(&auth.access_key, token, std::time::SystemTime::now()) {
            Ok(secret) => secret,
            Err(TokenError::Expired) => {
                return Err(refused("ExpiredTokenException", "The security token included in the request is expired"));
            }
            Err(TokenError::Invalid) => {
                return Err(refused(
                    "UnrecognizedClientException",
                    "The security token included in the request is invalid.",
                ));
            }
        };
        if auth.expected(&secret, method, uri, headers, body) != auth.signature {
            return Err(refused(
                "InvalidSignatureException",
                "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method.",
            ));
        }
    }
    Ok(auth.access_key)
}

/// STS `AssumeRole` (a form body; an XML answer or error, as STS gives them).
async fn sts(State(emu): State<Arc<Emulator>>, body: Bytes) -> Response {
    let form: HashMap<String, String> = body
        .split(|b| *b == b'&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let text = String::from_utf8_lossy(pair).replace('+', " ");
            let (k, v) = text.split_once('=').unwrap_or((&text, ""));
            (super::sigv4::decode(k), super::sigv4::decode(v))
        })
        .collect();
    let xml =
        |status: StatusCode, body: String| (status, [(http::header::CONTENT_TYPE, "text/xml")], body).into_response();
    match super::sts::assume_role(emu.sts(), &form, std::time::SystemTime::now()) {
        Ok((body, assumed)) => {
            emu.record_assumed(assumed);
            xml(StatusCode::OK, body)
        }
        Err(e) => xml(StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST), e.xml()),
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
