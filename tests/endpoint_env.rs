//! The endpoint override through the standard `AWS_ENDPOINT_URL_DEADLINE` variable: the SDK
//! reaches the emulator, and the `management.` prefix stays off the configured host.
//!
//! Alone in its own test binary because it sets process environment variables.

mod common;

use common::*;
use deadline_stats_gateway::domain::GroupBy;
use deadline_stats_gateway::upstream::Upstream;
use deadline_stats_gateway::upstream::sdk::SdkUpstream;
use std::time::Duration;

#[tokio::test]
async fn the_service_specific_endpoint_variable_is_honoured_without_host_prefix() {
    let emu = emulator(Duration::from_millis(50), Duration::from_secs(60)).await;
    let endpoint = format!("http://localhost:{}", emu.addr().port());
    // SAFETY: this binary holds a single test, and no other thread reads the environment yet.
    unsafe {
        std::env::set_var("AWS_ENDPOINT_URL_DEADLINE", &endpoint);
        std::env::set_var("AWS_ENDPOINT_URL", "http://127.0.0.1:9");
        std::env::remove_var("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS");
    }
    let mut config = sdk_config("unused");
    config.endpoint_url = None;
    let client = SdkUpstream::connect(&config).await.expect("client");
    let req = request(1, 1, 1, vec![GroupBy::QueueId]);
    let id = client.start(&req).await.expect("start reaches the emulator through the variable");
    client.get_page(&req.farm_id, &id, 10, None).await.expect("get too");
    let hosts: Vec<String> = serde_json::from_value(stats(&emu).await["hosts"].clone()).expect("hosts");
    assert_eq!(hosts, vec![format!("localhost:{}", emu.addr().port())]);
}
