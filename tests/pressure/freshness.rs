//! What CACHED promises (validity left, staleness), long-polls before the caller's deadline,
//! and defaults that coalesce with their explicit values.

use super::*;

#[tokio::test]
async fn cached_is_only_answered_with_enough_validity_left_to_read_it() {
    let mut config = fast_config(Duration::from_secs(4));
    config.min_remaining_validity = Duration::from_secs(2);
    let gw = gateway(Duration::from_millis(20), config).await;
    let mut client = gw.client().await;
    let req = start_request(56, 1, 1, &[GroupBy::QueueId]);
    let first = id_of(&start(&mut client, req.clone()).await);
    wait_terminal(&mut client, &first).await;
    let cached = start(&mut client, req.clone()).await;
    assert_eq!((cached.disposition(), id_of(&cached)), (Disposition::Cached, first.clone()));
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let fresh = start(&mut client, req).await;
    assert_eq!(fresh.disposition(), Disposition::Started, "too little validity left to read it");
    assert_ne!(id_of(&fresh), first);
    get(&mut client, &first).await.expect("the old id keeps working until its expiry");
}

#[tokio::test]
async fn max_staleness_refuses_an_older_cached_result() {
    let gw = gateway(Duration::from_millis(20), fast_config(HOUR)).await;
    let mut client = gw.client().await;
    let req = start_request(57, 1, 1, &[GroupBy::QueueId]);
    let first = id_of(&start(&mut client, req.clone()).await);
    wait_terminal(&mut client, &first).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut lax = req.clone();
    lax.max_staleness = Some(prost_types::Duration { seconds: 60, nanos: 0 });
    assert_eq!(start(&mut client, lax).await.disposition(), Disposition::Cached);
    let mut strict = req.clone();
    strict.max_staleness = Some(prost_types::Duration { seconds: 0, nanos: 100_000_000 });
    let fresh = start(&mut client, strict).await;
    assert_eq!(fresh.disposition(), Disposition::Started, "older than 100 ms");
    assert_eq!(start(&mut client, req).await.disposition(), Disposition::Joined, "the key now names the fresh one");
    let mut negative = start_request(57, 1, 1, &[GroupBy::QueueId]);
    negative.max_staleness = Some(prost_types::Duration { seconds: -5, nanos: 0 });
    let status = client.start_aggregation(negative).await.expect_err("negative");
    assert_eq!(
        status.get_details_bad_request().map(|b| b.field_violations[0].field.clone()),
        Some("max_staleness".into())
    );
}

#[tokio::test]
async fn a_long_poll_returns_the_current_state_before_the_callers_deadline() {
    let gw = gateway(Duration::from_secs(20), fast_config(HOUR)).await;
    let mut client = gw.client().await;
    let id = id_of(&start(&mut client, start_request(58, 1, 1, &[GroupBy::QueueId])).await);
    let mut req = tonic::Request::new(get_request(&id, 0, "", Duration::from_secs(30)));
    req.set_timeout(Duration::from_secs(2));
    let begin = std::time::Instant::now();
    let page = client.get_aggregation(req).await.expect("answered, not DEADLINE_EXCEEDED").into_inner();
    assert!(begin.elapsed() < Duration::from_secs(2));
    let state = page.aggregation.expect("aggregation").state();
    assert!(matches!(state, AggregationState::Queued | AggregationState::Running), "{state:?}");
}

#[tokio::test]
async fn an_omitted_timezone_and_period_coalesce_with_their_defaults_given_explicitly() {
    let gw = gateway(Duration::from_millis(300), fast_config(HOUR)).await;
    let mut client = gw.client().await;
    let mut omitted = start_request(59, 1, 1, &[GroupBy::QueueId]);
    omitted.period = pb::Period::Unspecified as i32;
    let mut explicit = omitted.clone();
    explicit.period = pb::Period::Daily as i32;
    explicit.timezone = "UTC+00:00".into();
    let a = start(&mut client, omitted).await;
    let b = start(&mut client, explicit).await;
    assert_eq!((id_of(&a), b.disposition()), (id_of(&b), Disposition::Joined));
    wait_terminal(&mut client, &id_of(&a)).await;
    assert_eq!(gw.upstream(&farm(59)).await["start_calls"], 1);
}
