//! The real `aws-sdk-deadline` client against the emulator over loopback HTTP: every operation,
//! every error kind, the one-running rule, expiry, paging, faults and the host-prefix guard.

mod common;

use common::*;
use deadline_stats_gateway::domain::{
    AggregationStatus, GroupBy, Period, Resources, StatisticsRow, Timezone, UsageType,
};
use deadline_stats_gateway::upstream::sdk::SdkUpstream;
use deadline_stats_gateway::upstream::{Upstream, UpstreamError};
use serde_json::json;
use std::time::Duration;

const QUICK: Duration = Duration::from_millis(150);
const HOUR: Duration = Duration::from_secs(3600);
const WAIT: Duration = Duration::from_secs(10);

/// Polls until the aggregation leaves IN_PROGRESS and returns its first page.
async fn finished(
    client: &SdkUpstream,
    farm: &str,
    id: &str,
    page_size: u32,
) -> deadline_stats_gateway::upstream::UpstreamPage {
    eventually(WAIT, || async {
        let page = client.get_page(farm, id, page_size, None).await.expect("get succeeds");
        page.status.is_terminal().then_some(page)
    })
    .await
}

/// Every row, following next tokens with pages of `page_size`.
async fn all_rows(client: &SdkUpstream, farm: &str, id: &str, page_size: u32) -> Vec<StatisticsRow> {
    let (mut rows, mut token) = (Vec::new(), None::<String>);
    loop {
        let page = client.get_page(farm, id, page_size, token.as_deref()).await.expect("page");
        assert_eq!(page.status, AggregationStatus::Completed);
        assert!(page.rows.len() <= page_size as usize);
        rows.extend(page.rows);
        token = page.next_token;
        if token.is_none() {
            return rows;
        }
    }
}

#[tokio::test]
async fn pages_through_more_than_a_thousand_rows_with_several_page_sizes() {
    let emu = emulator(QUICK, HOUR).await;
    let client = sdk(&emu.endpoint_url()).await;
    let req = request(1, 2, 4, vec![GroupBy::QueueId, GroupBy::JobId]);
    let id = client.start(&req).await.expect("start");
    let in_progress = client.get_page(&req.farm_id, &id, 100, None).await.expect("get");
    assert_eq!(in_progress.status, AggregationStatus::InProgress);
    assert!(in_progress.rows.is_empty() && in_progress.next_token.is_none());
    finished(&client, &req.farm_id, &id, 100).await;

    let reference = all_rows(&client, &req.farm_id, &id, 100).await;
    assert_eq!(reference.len(), 2 * 6 * 96, "2 queues x 6 jobs x 96 hours");
    for size in [1, 37, 99] {
        if size == 1 {
            let first = client.get_page(&req.farm_id, &id, 1, None).await.expect("page of one");
            assert_eq!(first.rows.len(), 1);
            assert!(first.next_token.is_some());
            continue;
        }
        assert_eq!(all_rows(&client, &req.farm_id, &id, size).await, reference, "page size {size}");
    }
    let row = &reference[0];
    assert!(row.queue_id.is_some() && row.job_id.is_some() && row.job_name.is_some());
    assert!(row.cost_in_usd.sum.is_some() && row.cost_in_usd.avg.is_some() && row.cost_in_usd.min.is_none());
    assert_eq!(row.aggregation_start_time, Some(req.start_time));
    assert_eq!(row.aggregation_end_time, Some(req.start_time + chrono::Duration::hours(1)));
}

#[tokio::test]
async fn rows_decode_every_member_including_persistent_volume() {
    let emu = emulator(QUICK, HOUR).await;
    let client = sdk(&emu.endpoint_url()).await;
    let mut req = request(2, 1, 1, vec![GroupBy::UsageType, GroupBy::InstanceType]);
    req.resources = Resources::Fleets(vec![deadline_stats_gateway::domain::ids::format_id("fleet-", 1, 1)]);
    req.period = Some(Period::Daily);
    req.timezone = Timezone::parse("UTC+08:00");
    let id = client.start(&req).await.expect("start");
    finished(&client, &req.farm_id, &id, 100).await;
    let rows = all_rows(&client, &req.farm_id, &id, 100).await;
    let kinds: std::collections::BTreeSet<_> = rows.iter().filter_map(|r| r.usage_type).collect();
    assert!(
        kinds.contains(&UsageType::PersistentVolume)
            && kinds.contains(&UsageType::License)
            && kinds.contains(&UsageType::Compute)
    );
    assert!(rows.iter().any(|r| r.instance_type.is_some()));
    // A day in UTC+08:00 starting at 00:00 UTC spans two local days.
    let starts: std::collections::BTreeSet<_> = rows.iter().filter_map(|r| r.aggregation_start_time).collect();
    assert_eq!(starts.len(), 2);
}

#[tokio::test]
async fn one_running_aggregation_per_farm() {
    let emu = emulator(Duration::from_millis(600), HOUR).await;
    let client = sdk(&emu.endpoint_url()).await;
    let first = request(3, 1, 1, vec![GroupBy::QueueId]);
    let id = client.start(&first).await.expect("first start");
    let second = request(3, 1, 2, vec![GroupBy::QueueId]);
    match client.start(&second).await {
        Err(UpstreamError::Throttled { retry_after, .. }) => {
            assert_eq!(retry_after, Some(Duration::from_secs(1)))
        }
        other => panic!("expected ThrottlingException, got {other:?}"),
    }
    client.start(&request(4, 1, 1, vec![GroupBy::QueueId])).await.expect("another farm is independent");
    finished(&client, &first.farm_id, &id, 10).await;
    client.start(&second).await.expect("the farm is free once the first completed");

    let s = stats(&emu).await;
    let f = &s["farms"][&first.farm_id];
    assert_eq!(
        (f["start_calls"].as_u64(), f["throttled_starts"].as_u64(), f["max_in_progress"].as_u64()),
        (Some(3), Some(1), Some(1))
    );
    assert!(f["get_calls"].as_u64().is_some_and(|n| n >= 1));
}

#[tokio::test]
async fn results_expire_after_their_validity() {
    let emu = emulator(Duration::from_millis(50), Duration::from_millis(800)).await;
    let client = sdk(&emu.endpoint_url()).await;
    let req = request(5, 1, 1, vec![GroupBy::QueueId]);
    let id = client.start(&req).await.expect("start");
    finished(&client, &req.farm_id, &id, 10).await;
    let gone = eventually(WAIT, || async {
        match client.get_page(&req.farm_id, &id, 10, None).await {
            Err(e @ UpstreamError::NotFound { .. }) => Some(e),
            Ok(_) => None,
            Err(e) => panic!("unexpected error {e:?}"),
        }
    })
    .await;
    assert!(gone.to_string().contains(&id));
}

#[tokio::test]
async fn unknown_ids_other_farms_and_bad_tokens_are_rejected() {
    let emu = emulator(QUICK, HOUR).await;
    let client = sdk(&emu.endpoint_url()).await;
    let req = request(6, 2, 4, vec![GroupBy::JobId]);
    let id = client.start(&req).await.expect("start");
    let page = finished(&client, &req.farm_id, &id, 10).await;
    let unknown = "0123456789abcdef0123456789abcdef";
    assert!(matches!(client.get_page(&req.farm_id, unknown, 10, None).await, Err(UpstreamError::NotFound { .. })));
    assert!(matches!(client.get_page(&farm(99), &id, 10, None).await, Err(UpstreamError::NotFound { .. })));
    match client.get_page(&req.farm_id, &id, 10, Some("not-a-token")).await {
        Err(UpstreamError::Invalid { fields, .. }) => assert_eq!(fields[0].name, "nextToken"),
        other => panic!("expected ValidationException, got {other:?}"),
    }
    let other = client.start(&request(7, 1, 1, vec![GroupBy::JobId])).await.expect("start on another farm");
    let other_token = finished(&client, &farm(7), &other, 1).await.next_token.expect("more pages");
    assert!(matches!(
        client.get_page(&req.farm_id, &id, 10, Some(&other_token)).await,
        Err(UpstreamError::Invalid { .. })
    ));
    assert!(page.next_token.is_some());
}

#[tokio::test]
async fn invalid_requests_come_back_with_every_field_named() {
    let emu = emulator(QUICK, HOUR).await;
    let client = sdk(&emu.endpoint_url()).await;
    let mut req = request(8, 1, 1, vec![GroupBy::QueueId]);
    req.resources = Resources::Queues(vec![queue(1), "queue-XYZ".into()]);
    req.group_by = vec![GroupBy::QueueId, GroupBy::JobId, GroupBy::UserId];
    req.end_time = req.start_time;
    match client.start(&req).await {
        Err(UpstreamError::Invalid { fields, .. }) => {
            let names: Vec<&str> = fields.iter().map(|f| f.name.as_str()).collect();
            assert_eq!(names, vec!["resourceIds.queueIds[1]", "endTime", "groupBy"]);
        }
        other => panic!("expected ValidationException, got {other:?}"),
    }
    assert!(matches!(client.get_page(&farm(8), "tooshort", 10, None).await, Err(UpstreamError::Invalid { .. })));
    assert!(matches!(
        client.get_page(&farm(8), "0123456789abcdef0123456789abcdef", 101, None).await,
        Err(UpstreamError::Invalid { .. })
    ));
}

#[tokio::test]
async fn every_exception_kind_maps_to_its_domain_error_and_start_is_never_retried() {
    let emu = emulator(QUICK, HOUR).await;
    let client = sdk(&emu.endpoint_url()).await;
    let kinds = [
        "AccessDeniedException",
        "InternalServerErrorException",
        "ResourceNotFoundException",
        "ThrottlingException",
        "ValidationException",
    ];
    for (n, kind) in kinds.into_iter().enumerate() {
        set_faults(&emu, json!({"error_rates": {kind: 1.0}, "operations": ["start"]})).await;
        let req = request(10 + n as u64, 1, 1, vec![GroupBy::QueueId]);
        let err = client.start(&req).await.expect_err("fault fires");
        let ok = match (kind, &err) {
            ("AccessDeniedException", UpstreamError::AccessDenied { .. }) => true,
            ("InternalServerErrorException", UpstreamError::OutcomeUnknown { .. }) => true,
            ("ResourceNotFoundException", UpstreamError::NotFound { .. }) => true,
            ("ThrottlingException", UpstreamError::Throttled { retry_after, .. }) => {
                *retry_after == Some(Duration::from_secs(1))
            }
            ("ValidationException", UpstreamError::Invalid { .. }) => true,
            _ => false,
        };
        assert!(ok, "{kind} became {err:?}");
        let s = stats(&emu).await;
        assert_eq!(s["farms"][&req.farm_id]["start_calls"].as_u64(), Some(1), "{kind}: Start made exactly one attempt");
    }
}

#[tokio::test]
async fn get_retries_transient_failures_and_dropped_connections() {
    let emu = emulator(Duration::from_millis(10), HOUR).await;
    let client = sdk(&emu.endpoint_url()).await;
    let req = request(20, 1, 1, vec![GroupBy::QueueId]);
    let id = client.start(&req).await.expect("start");
    finished(&client, &req.farm_id, &id, 10).await;
    let before = stats(&emu).await["farms"][&req.farm_id]["get_calls"].as_u64().unwrap_or(0);

    set_faults(
        &emu,
        json!({"error_rates": {"InternalServerErrorException": 1.0}, "operations": ["get"], "remaining": 1}),
    )
    .await;
    client.get_page(&req.farm_id, &id, 10, None).await.expect("a 500 is retried");
    set_faults(&emu, json!({"drop_rate": 1.0, "operations": ["get"], "remaining": 1})).await;
    client.get_page(&req.farm_id, &id, 10, None).await.expect("a dropped connection is retried");
    let after = stats(&emu).await["farms"][&req.farm_id]["get_calls"].as_u64().unwrap_or(0);
    assert_eq!(after - before, 4, "two calls, each failed once and retried once");

    set_faults(&emu, json!({"drop_rate": 1.0, "operations": ["start"], "remaining": 1})).await;
    let next = request(21, 1, 1, vec![GroupBy::QueueId]);
    assert!(
        matches!(client.start(&next).await, Err(UpstreamError::OutcomeUnknown { .. })),
        "a dropped Start is surfaced as of unknown outcome, not retried"
    );
    assert_eq!(stats(&emu).await["farms"][&next.farm_id]["start_calls"].as_u64(), Some(1));
}

#[tokio::test]
async fn a_start_whose_response_is_lost_may_have_started_and_a_refused_connection_did_not() {
    let emu = emulator(Duration::from_secs(30), HOUR).await;
    let client = sdk(&emu.endpoint_url()).await;
    set_faults(&emu, json!({"lose_response_rate": 1.0, "operations": ["start"], "remaining": 1})).await;
    let req = request(22, 1, 1, vec![GroupBy::QueueId]);
    let err = client.start(&req).await.expect_err("the response is lost");
    assert!(matches!(err, UpstreamError::OutcomeUnknown { .. }), "{err:?}");
    let again = client.start(&request(22, 1, 2, vec![GroupBy::QueueId])).await.expect_err("the farm is busy");
    assert!(matches!(again, UpstreamError::Throttled { .. }), "the lost Start did start: {again:?}");

    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binds");
    let dead_end = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    let refused = sdk(&dead_end).await.start(&req).await.expect_err("nothing listens");
    assert!(matches!(refused, UpstreamError::Transient { .. }), "never sent: {refused:?}");
}

#[tokio::test]
async fn latency_beyond_the_attempt_timeout_is_a_transient_timeout() {
    let emu = emulator(QUICK, HOUR).await;
    let mut config = sdk_config(&emu.endpoint_url());
    config.attempt_timeout = Duration::from_millis(200);
    config.operation_timeout = Duration::from_millis(500);
    let client = SdkUpstream::connect(&config).await.expect("client");
    set_faults(&emu, json!({"latency_ms": 2000, "operations": ["start"]})).await;
    match client.start(&request(30, 1, 1, vec![GroupBy::QueueId])).await {
        Err(UpstreamError::OutcomeUnknown { message, .. }) => {
            assert!(message.contains("timed out"), "{message}")
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    let (status, _, _) = http("DELETE", &format!("{}/_emulator/faults", emu.endpoint_url()), None, &[]).await;
    assert_eq!(status, 204);
    client.start(&request(31, 1, 1, vec![GroupBy::QueueId])).await.expect("faults cleared");
}

#[tokio::test]
async fn forced_outcomes_end_failed_or_timeout_with_a_message() {
    let emu = emulator(Duration::from_millis(20), HOUR).await;
    let client = sdk(&emu.endpoint_url()).await;
    for (n, (forced, status)) in
        [("FAILED", AggregationStatus::Failed), ("TIMEOUT", AggregationStatus::Timeout)].into_iter().enumerate()
    {
        set_faults(&emu, json!({"force_status": forced})).await;
        let req = request(40 + n as u64, 1, 1, vec![GroupBy::QueueId]);
        let id = client.start(&req).await.expect("start");
        let page = finished(&client, &req.farm_id, &id, 10).await;
        assert_eq!(page.status, status);
        assert!(page.status_message.is_some_and(|m| m.contains(forced)));
        assert!(page.rows.is_empty());
    }
}

#[tokio::test]
async fn too_large_results_end_failed() {
    let config = deadline_stats_gateway::emulator::EmulatorConfig {
        aggregation_duration: Duration::from_millis(20),
        max_rows: 500,
        ..Default::default()
    };
    let emu = deadline_stats_gateway::emulator::EmulatorHandle::spawn(config, "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("emulator");
    let client = sdk(&emu.endpoint_url()).await;
    let req = request(50, 2, 4, vec![GroupBy::JobId]);
    let id = client.start(&req).await.expect("start");
    let page = finished(&client, &req.farm_id, &id, 10).await;
    assert_eq!(page.status, AggregationStatus::Failed);
    assert!(page.status_message.is_some_and(|m| m.contains("too large")));
}

#[tokio::test]
async fn requests_go_only_to_the_configured_host() {
    let emu = emulator(QUICK, HOUR).await;
    let port = emu.addr().port();
    // `management.localhost` resolves on many systems, so only the Host header tells the truth.
    for endpoint in [format!("http://localhost:{port}"), format!("http://127.0.0.1:{port}")] {
        let client = sdk(&endpoint).await;
        let req = request(60, 1, 1, vec![GroupBy::QueueId]);
        let id = client.start(&req).await.expect("start reaches the emulator");
        client.get_page(&req.farm_id, &id, 10, None).await.expect("get reaches the emulator");
        emu.emulator().reset();
    }
    let hosts: Vec<String> = serde_json::from_value(stats(&emu).await["hosts"].clone()).expect("hosts list");
    assert!(hosts.is_empty(), "reset clears hosts");
    let client = sdk(&format!("http://localhost:{port}")).await;
    client.start(&request(61, 1, 1, vec![GroupBy::QueueId])).await.expect("start");
    let hosts: Vec<String> = serde_json::from_value(stats(&emu).await["hosts"].clone()).expect("hosts list");
    assert_eq!(hosts, vec![format!("localhost:{port}")]);
}
