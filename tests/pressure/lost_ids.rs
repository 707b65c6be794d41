//! Ids after a restart, and failed ids after their TTL, still say what happened.

use super::*;

#[tokio::test]
async fn an_id_from_before_a_restart_is_lost_and_an_unknown_one_not_found() {
    let before = gateway(Duration::from_millis(20), fast_config(HOUR)).await;
    let mut client = before.client().await;
    let id = id_of(&start(&mut client, start_request(53, 1, 1, &[GroupBy::QueueId])).await);
    let after = gateway(Duration::from_millis(20), fast_config(HOUR)).await;
    let mut client = after.client().await;
    let lost = get(&mut client, &id).await.expect_err("the restarted gateway does not know it");
    assert_eq!(lost.code(), Code::NotFound);
    assert_eq!(lost.get_details_error_info().map(|e| e.reason), Some("AGGREGATION_LOST".into()));
    assert!(lost.message().contains("restarted") && lost.message().contains("start the aggregation again"));
    let ours = id_of(&start(&mut client, start_request(53, 1, 1, &[GroupBy::QueueId])).await);
    // Its bucket and epoch (`agg-`, 2 + 8 hex digits) with other random digits.
    let never = format!("{}{}", &ours[..14], "0".repeat(22));
    let unknown = get(&mut client, &never).await.expect_err("never existed");
    assert_eq!(unknown.get_details_error_info().map(|e| e.reason), Some("AGGREGATION_NOT_FOUND".into()));
    let garbage = get(&mut client, "not-an-id").await.expect_err("not an id");
    assert_eq!(garbage.get_details_error_info().map(|e| e.reason), Some("AGGREGATION_NOT_FOUND".into()));
}

#[tokio::test]
async fn a_failed_id_still_says_why_after_its_failed_ttl() {
    let gw = gateway(Duration::from_millis(20), fast_config(HOUR)).await;
    set_faults(&gw.emu, serde_json::json!({"force_status": "FAILED"})).await;
    let mut client = gw.client().await;
    let id = id_of(&start(&mut client, start_request(54, 1, 1, &[GroupBy::QueueId])).await);
    wait_terminal(&mut client, &id).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let later = get(&mut client, &id).await.expect("a failure is remembered past its TTL");
    assert_eq!(later.state(), AggregationState::Failed);
    assert_eq!(later.error.map(|e| e.code), Some(Code::FailedPrecondition as i32));
    let again = start(&mut client, start_request(54, 1, 1, &[GroupBy::QueueId])).await;
    assert_eq!(again.disposition(), Disposition::Started, "after the TTL a Start retries");
}
