//! The upstream side: an emulator on a loopback port, the real SDK client pointed at it, its
//! admin API (faults, counters), and domain requests for talking to it directly.

use super::http;
use chrono::{TimeZone, Utc};
use deadline_stats_gateway::domain::{AggregationRequest, GroupBy, Period, Resources, Statistic};
use deadline_stats_gateway::emulator::{EmulatorConfig, EmulatorHandle};
use deadline_stats_gateway::upstream::sdk::{CredentialSource, SdkUpstream, SdkUpstreamConfig};
use std::time::Duration;

pub use deadline_stats_gateway::bench::requests::{farm, queue};

/// An emulator on `127.0.0.1:0` with the given timing.
pub async fn emulator(aggregation_duration: Duration, result_validity: Duration) -> EmulatorHandle {
    let config = EmulatorConfig { aggregation_duration, result_validity, ..EmulatorConfig::default() };
    EmulatorHandle::spawn(config, "127.0.0.1:0".parse().expect("loopback address"))
        .await
        .expect("emulator binds a loopback port")
}

/// The SDK client settings for an emulator at `endpoint`.
pub fn sdk_config(endpoint: &str) -> SdkUpstreamConfig {
    SdkUpstreamConfig {
        endpoint_url: Some(endpoint.to_owned()),
        region: Some("us-west-2".into()),
        credentials: CredentialSource::Static { access_key_id: "AKIDTEST".into(), secret_access_key: "secret".into() },
        ..SdkUpstreamConfig::default()
    }
}

/// The real SDK client pointed at `endpoint`.
pub async fn sdk(endpoint: &str) -> SdkUpstream {
    SdkUpstream::connect(&sdk_config(endpoint)).await.expect("SDK client builds")
}

/// A request over `queues` queues for `days` days, hourly, grouped by `group_by`.
pub fn request(farm_n: u64, queues: u64, days: i64, group_by: Vec<GroupBy>) -> AggregationRequest {
    let start = Utc.with_ymd_and_hms(2026, 10, 1, 0, 0, 0).single().expect("start time");
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

/// `GET /_emulator/stats` as JSON.
pub async fn stats(emu: &EmulatorHandle) -> serde_json::Value {
    super::emulator_stats(&emu.endpoint_url()).await
}

/// `POST /_emulator/faults` with `spec`.
pub async fn set_faults(emu: &EmulatorHandle, spec: serde_json::Value) {
    let (status, _, body) =
        http("POST", &format!("{}/_emulator/faults", emu.endpoint_url()), Some(&spec.to_string()), &[]).await;
    assert_eq!(status, 200, "faults accepted: {body}");
}
