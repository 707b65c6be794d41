//! Shared pieces of the integration tests: an emulator on a loopback port, the real SDK client
//! pointed at it, a tiny HTTP client for the admin API, and sample requests.
#![allow(dead_code)]

use bytes::Bytes;
use chrono::{TimeZone, Utc};
use deadline_stats_gateway::domain::ids::format_id;
use deadline_stats_gateway::domain::{AggregationRequest, GroupBy, Period, Resources, Statistic};
use deadline_stats_gateway::emulator::{EmulatorConfig, EmulatorHandle};
use deadline_stats_gateway::upstream::sdk::{CredentialSource, SdkUpstream, SdkUpstreamConfig};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

/// An emulator on `127.0.0.1:0` with the given timing.
pub async fn emulator(aggregation_duration: Duration, result_validity: Duration) -> EmulatorHandle {
    let config = EmulatorConfig {
        aggregation_duration,
        result_validity,
        ..EmulatorConfig::default()
    };
    EmulatorHandle::spawn(config, "127.0.0.1:0".parse().expect("loopback address"))
        .await
        .expect("emulator binds a loopback port")
}

/// The SDK client settings for an emulator at `endpoint`.
pub fn sdk_config(endpoint: &str) -> SdkUpstreamConfig {
    SdkUpstreamConfig {
        endpoint_url: Some(endpoint.to_owned()),
        region: Some("us-west-2".into()),
        credentials: CredentialSource::Static {
            access_key_id: "AKIDTEST".into(),
            secret_access_key: "secret".into(),
        },
        ..SdkUpstreamConfig::default()
    }
}

/// The real SDK client pointed at `endpoint`.
pub async fn sdk(endpoint: &str) -> SdkUpstream {
    SdkUpstream::connect(&sdk_config(endpoint))
        .await
        .expect("SDK client builds")
}

pub fn farm(n: u64) -> String {
    format_id("farm-", 0xfa, n)
}

pub fn queue(n: u64) -> String {
    format_id("queue-", 0x9e, n)
}

/// A request over `queues` queues for `days` days, hourly, grouped by `group_by`.
pub fn request(farm_n: u64, queues: u64, days: i64, group_by: Vec<GroupBy>) -> AggregationRequest {
    let start = Utc
        .with_ymd_and_hms(2026, 10, 1, 0, 0, 0)
        .single()
        .expect("start time");
    AggregationRequest {
        farm_id: farm(farm_n),
        resources: Resources::Queues((0..queues).map(queue).collect()),
        start_time: start,
        end_time: start + chrono::Duration::days(days),
        timezone: None,
        period: Some(Period::Hourly),
        group_by,
        statistics: vec![Statistic::Sum, Statistic::Avg],
    }
}

/// A plain HTTP/1 call: `(status, headers, body)`.
pub async fn http(
    method: &str,
    url: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, http::HeaderMap, String) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default().to_owned())))
        .expect("request builds");
    let resp = client.request(req).await.expect("HTTP call succeeds");
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.expect("body reads").to_bytes();
    (
        parts.status.as_u16(),
        parts.headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

/// `GET /_emulator/stats` as JSON.
pub async fn stats(emu: &EmulatorHandle) -> serde_json::Value {
    let (status, _, body) = http(
        "GET",
        &format!("{}/_emulator/stats", emu.endpoint_url()),
        None,
        &[],
    )
    .await;
    assert_eq!(status, 200, "stats answers: {body}");
    serde_json::from_str(&body).expect("stats are JSON")
}

/// `POST /_emulator/faults` with `spec`.
pub async fn set_faults(emu: &EmulatorHandle, spec: serde_json::Value) {
    let (status, _, body) = http(
        "POST",
        &format!("{}/_emulator/faults", emu.endpoint_url()),
        Some(&spec.to_string()),
        &[],
    )
    .await;
    assert_eq!(status, 200, "faults accepted: {body}");
}

/// Polls `check` every 20 ms until it returns `Some`, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
