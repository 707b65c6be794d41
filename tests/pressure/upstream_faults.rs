//! An upstream that loses a Start's answer, throttles nine Gets in ten, or throttles for the
//! whole polling window.

use super::*;
use deadline_stats_gateway::upstream::sdk::{SdkUpstream, SdkUpstreamConfig};

#[tokio::test]
async fn a_start_whose_outcome_is_unknown_waits_out_its_orphan_and_says_so() {
    let mut config = fast_config(HOUR);
    config.lifecycle.start_deadline = Duration::from_millis(300);
    let gw = gateway(Duration::from_millis(2000), config).await;
    set_faults(&gw.emu, serde_json::json!({"lose_response_rate": 1.0, "operations": ["start"], "remaining": 1})).await;
    let mut client = gw.client().await;
    let id = id_of(&start(&mut client, start_request(46, 1, 1, &[GroupBy::QueueId])).await);
    let waiting = eventually(Duration::from_secs(5), || {
        let (mut client, id) = (client.clone(), id.clone());
        async move { get(&mut client, &id).await.ok().filter(|a| a.status_message.contains("outcome unknown")) }
    })
    .await;
    assert_eq!(waiting.state(), AggregationState::Running);
    assert_eq!(waiting.status_message, "previous Start's outcome unknown; waiting for the farm to be free");
    let done = wait_terminal(&mut client, &id).await.aggregation.expect("aggregation");
    assert_eq!(done.state(), AggregationState::Completed, "not UNAVAILABLE after --start-deadline: {done:?}");
    assert_eq!(metric(&gw, "dsg_upstream_start_outcome_unknown_total"), 1.0);
    let upstream = gw.upstream(&farm(46)).await;
    assert_eq!(upstream["max_in_progress"], 1);
}

#[tokio::test]
async fn a_completed_result_is_fetched_whole_while_the_upstream_throttles_ninety_percent_of_gets() {
    let emu = emulator(Duration::from_millis(50), HOUR).await;
    let mut sdk_settings = sdk_config(&emu.endpoint_url());
    sdk_settings.get_max_attempts = 1;
    let upstream = deadline_stats_gateway::upstream::sdk::SdkUpstream::connect(&sdk_settings).await.expect("SDK");
    let mut config = fast_config(HOUR);
    config.lifecycle.start_retry = deadline_stats_gateway::gateway::backoff::BackoffPolicy {
        initial: Duration::from_millis(5),
        max: Duration::from_millis(20),
        multiplier: 2.0,
    };
    let gw = gateway_over(emu, Arc::new(upstream), config).await;
    set_faults(
        &gw.emu,
        serde_json::json!({"error_rates": {"ThrottlingException": 0.9}, "operations": ["get"], "retry_after_secs": 0}),
    )
    .await;
    let mut client = gw.client().await;
    let id = id_of(&start(&mut client, start_request(52, 2, 4, &[GroupBy::QueueId, GroupBy::JobId])).await);
    let done = wait_terminal(&mut client, &id).await.aggregation.expect("aggregation");
    assert_eq!(done.state(), AggregationState::Completed, "{done:?}");
    assert_eq!(done.row_count, 1152, "every row of twelve upstream pages");
    let throttled = metric(
        &gw,
        r#"dsg_upstream_calls_total{operation="GetSessionsStatisticsAggregation",outcome="throttled",route="default"}"#,
    );
    assert!(throttled >= 20.0, "the upstream did throttle: {throttled}");
}

#[tokio::test]
async fn an_upstream_throttling_for_the_whole_polling_window_ends_unavailable() {
    // One SDK attempt per call, so the gateway's own retries (not the SDK's jittered backoff)
    // fill the window and each throttled answer reaches it.
    let config = fast_config(Duration::from_millis(1500));
    let emu = emulator(Duration::from_millis(20), config.lifecycle.result_validity).await;
    let sdk_config = SdkUpstreamConfig { get_max_attempts: 1, ..sdk_config(&emu.endpoint_url()) };
    let upstream = SdkUpstream::connect(&sdk_config).await.expect("SDK client builds");
    let gw = gateway_over(emu, Arc::new(upstream), config).await;
    set_faults(
        &gw.emu,
        serde_json::json!({"error_rates": {"ThrottlingException": 1.0}, "operations": ["get"], "retry_after_secs": 0}),
    )
    .await;
    let mut client = gw.client().await;
    let id = id_of(&start(&mut client, start_request(55, 1, 1, &[GroupBy::QueueId])).await);
    let agg = wait_terminal(&mut client, &id).await.aggregation.expect("aggregation");
    let state = agg.state();
    let error = agg.error.expect("error");
    assert_eq!((state, error.code), (AggregationState::Failed, Code::Unavailable as i32), "{error:?}");
    assert!(error.message.contains("throttled"), "names the last upstream error: {}", error.message);
}
