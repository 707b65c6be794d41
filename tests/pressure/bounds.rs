//! Gateway-wide bounds answer GATEWAY_BUSY with RetryInfo; an aggregation waiting for the
//! upstream pacer is still queued.

use super::*;
use deadline_stats_gateway::gateway::rate::Rate;

#[tokio::test]
async fn gateway_wide_bounds_answer_gateway_busy_with_retry_info() {
    let mut config = fast_config(HOUR);
    config.max_active_aggregations = 3;
    config.max_farms = 2;
    let gw = gateway(Duration::from_secs(20), config).await;
    let mut client = gw.client().await;
    start(&mut client, start_request(47, 1, 1, &[GroupBy::QueueId])).await;
    start(&mut client, start_request(48, 1, 1, &[GroupBy::QueueId])).await;
    let third_farm = client.start_aggregation(start_request(49, 1, 1, &[GroupBy::QueueId])).await.expect_err("busy");
    start(&mut client, start_request(47, 1, 2, &[GroupBy::QueueId])).await;
    let fourth = client.start_aggregation(start_request(48, 1, 2, &[GroupBy::QueueId])).await.expect_err("busy");
    for (status, bound) in [(third_farm, "max_farms"), (fourth, "max_active_aggregations")] {
        assert_eq!(status.code(), Code::ResourceExhausted);
        let details = status.get_error_details();
        assert!(details.retry_info().and_then(|r| r.retry_delay).is_some());
        let info = details.error_info().expect("ErrorInfo");
        assert_eq!((info.reason.as_str(), info.metadata["bound"].as_str()), ("GATEWAY_BUSY", bound));
    }
    let joined = start(&mut client, start_request(47, 1, 1, &[GroupBy::QueueId])).await;
    assert_eq!(joined.disposition(), Disposition::Joined, "joining takes no room");
}

#[tokio::test]
async fn an_aggregation_waiting_for_the_upstream_pacer_is_still_queued() {
    let mut config = fast_config(HOUR);
    config.upstream_start = Rate { per_second: 0.5, burst: 1 };
    let gw = gateway(Duration::from_millis(50), config).await;
    let mut client = gw.client().await;
    let first = id_of(&start(&mut client, start_request(50, 1, 1, &[GroupBy::QueueId])).await);
    eventually(Duration::from_secs(5), || {
        let (mut client, id) = (client.clone(), first.clone());
        async move { (get(&mut client, &id).await.ok()?.state() != AggregationState::Queued).then_some(()) }
    })
    .await;
    let second = id_of(&start(&mut client, start_request(51, 1, 1, &[GroupBy::QueueId])).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let waiting = get(&mut client, &second).await.expect("get");
    assert_eq!(
        (waiting.state(), waiting.queue_position),
        (AggregationState::Queued, 0),
        "its Start has not been sent: it waits for the pacer"
    );
    assert_eq!(gw.upstream(&farm(51)).await, serde_json::Value::Null, "nothing reached the upstream yet");
    let done = wait_terminal(&mut client, &second).await.aggregation.expect("aggregation");
    assert_eq!(done.state(), AggregationState::Completed);
}
