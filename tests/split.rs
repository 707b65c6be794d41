//! Aggregations too large for the upstream: the gateway splits them, runs the parts through
//! the farm's queue one after another, and serves the merged rows as the one aggregation the
//! caller started: against an emulator whose `max_rows` refuses the whole, compared with what
//! an emulator without the limit returns for it in one piece.

mod common;

use common::*;
use deadline_stats_gateway::emulator::{EmulatorConfig, EmulatorHandle};
use deadline_stats_gateway::grpc::pb::{AggregationState, GroupBy};
use std::sync::Arc;
use std::time::Duration;

const HOUR: Duration = Duration::from_secs(3600);

async fn emulator_with_max_rows(max_rows: u64) -> EmulatorHandle {
    let config = EmulatorConfig {
        aggregation_duration: Duration::from_millis(100),
        result_validity: HOUR,
        max_rows,
        ..EmulatorConfig::default()
    };
    EmulatorHandle::spawn(config, "127.0.0.1:0".parse().expect("loopback")).await.expect("binds")
}

async fn gateway_with(max_rows: u64, split_max_parts: u32) -> TestGateway {
    let emu = emulator_with_max_rows(max_rows).await;
    let upstream = sdk(&emu.endpoint_url()).await;
    let mut config = fast_config(HOUR);
    config.lifecycle.split_max_parts = split_max_parts;
    gateway_over(emu, Arc::new(upstream), config).await
}

/// Every row of a completed aggregation, each rendered whole (every field), sorted: the rows
/// as a multiset.
async fn rows_of(client: &mut Client, id: &str) -> Vec<String> {
    let (mut rows, mut token) = (Vec::new(), String::new());
    loop {
        let page =
            client.get_aggregation(get_request(id, 1000, &token, Duration::ZERO)).await.expect("page").into_inner();
        rows.extend(page.statistics.iter().map(|s| format!("{s:?}")));
        if page.next_page_token.is_empty() {
            rows.sort();
            return rows;
        }
        token = page.next_page_token;
    }
}

/// About 2,000 rows (2 queues × 7 days × 24 hours × 6 groups) through `limited`, whose
/// emulator refuses more than 500: the merged rows are exactly what an emulator without the
/// limit returns in one piece.
async fn split_and_merged_exactly(limited: TestGateway, farm_n: u64) {
    let request = start_request(farm_n, 2, 7, &[GroupBy::QueueId, GroupBy::UsageType]);
    let whole = gateway_with(u64::MAX, 16).await;
    let mut client = whole.client().await;
    let id = client
        .start_aggregation(request.clone())
        .await
        .expect("start")
        .into_inner()
        .aggregation
        .expect("a")
        .aggregation_id;
    let one = wait_terminal(&mut client, &id).await.aggregation.expect("aggregation");
    assert_eq!((one.state(), one.parts), (AggregationState::Completed, 1), "{one:?}");
    let expected = rows_of(&mut client, &id).await;
    assert!(expected.len() > 1000, "{} rows", expected.len());

    let mut client = limited.client().await;
    let id =
        client.start_aggregation(request).await.expect("start").into_inner().aggregation.expect("a").aggregation_id;
    let split = wait_terminal(&mut client, &id).await.aggregation.expect("aggregation");
    assert_eq!(split.state(), AggregationState::Completed, "{split:?}");
    assert!(split.parts >= 4, "at least four parts of at most 500 rows: {split:?}");
    assert_eq!(split.row_count, expected.len() as u64);
    assert!(split.status_message.contains("too large"), "{}", split.status_message);
    assert_eq!(rows_of(&mut client, &id).await, expected, "the same rows, field by field");
    let upstream = limited.upstream(&farm(farm_n)).await;
    assert_eq!(upstream["max_in_progress"], 1, "the parts ran one after another: {upstream}");
}

#[tokio::test]
async fn on_the_memory_store_a_result_too_large_upstream_is_split_and_merged_exactly() {
    split_and_merged_exactly(gateway_with(500, 16).await, 130).await;
}

#[tokio::test]
async fn on_redis_a_result_too_large_upstream_is_split_and_merged_exactly() {
    let server = tokio::task::spawn_blocking(redis_server).await.expect("joins");
    let mut config = fast_config(HOUR);
    config.lifecycle.split_max_parts = 16;
    let coordination = on_redis(&server.url(), &config).await;
    let emu = Arc::new(emulator_with_max_rows(500).await);
    split_and_merged_exactly(replica(emu, config, coordination).await, 133).await;
}

#[tokio::test]
async fn a_part_that_cannot_be_split_further_fails_naming_it() {
    // One monthly bucket of one queue: nothing to cut, and the upstream refuses it.
    let mut request = start_request(131, 1, 28, &[GroupBy::QueueId, GroupBy::JobId]);
    request.period = deadline_stats_gateway::grpc::pb::Period::Monthly as i32;
    let g = gateway_with(2, 16).await;
    let mut client = g.client().await;
    let id =
        client.start_aggregation(request).await.expect("start").into_inner().aggregation.expect("a").aggregation_id;
    let failed = wait_terminal(&mut client, &id).await.aggregation.expect("aggregation");
    assert_eq!(failed.state(), AggregationState::Failed, "{failed:?}");
    assert_eq!(failed.error.as_ref().map(|e| e.code), Some(tonic::Code::FailedPrecondition as i32), "{failed:?}");
    assert!(failed.status_message.contains("cannot be split further"), "{}", failed.status_message);
}

#[tokio::test]
async fn a_caller_that_refuses_a_split_gets_the_upstreams_failure_and_its_own_aggregation() {
    let g = gateway_with(500, 16).await;
    let mut client = g.client().await;
    let mut request = start_request(134, 2, 7, &[GroupBy::QueueId, GroupBy::UsageType]);
    let splits = client.start_aggregation(request.clone()).await.expect("start").into_inner().aggregation.expect("a");
    request.no_split = true;
    let whole = client.start_aggregation(request).await.expect("start").into_inner().aggregation.expect("a");
    assert_ne!(whole.aggregation_id, splits.aggregation_id, "not the same aggregation");
    let failed = wait_terminal(&mut client, &whole.aggregation_id).await.aggregation.expect("aggregation");
    assert_eq!(failed.state(), AggregationState::Failed, "{failed:?}");
    assert!(failed.status_message.contains("too large"), "{}", failed.status_message);
    let done = wait_terminal(&mut client, &splits.aggregation_id).await.aggregation.expect("aggregation");
    assert_eq!(done.state(), AggregationState::Completed, "the other is split as usual: {done:?}");
}

#[tokio::test]
async fn with_splitting_off_a_result_too_large_fails_as_the_upstream_said() {
    let g = gateway_with(500, 0).await;
    let mut client = g.client().await;
    let request = start_request(132, 2, 7, &[GroupBy::QueueId, GroupBy::UsageType]);
    let id =
        client.start_aggregation(request).await.expect("start").into_inner().aggregation.expect("a").aggregation_id;
    let failed = wait_terminal(&mut client, &id).await.aggregation.expect("aggregation");
    assert_eq!(failed.state(), AggregationState::Failed);
    assert!(failed.status_message.contains("too large"), "{}", failed.status_message);
    assert_eq!(g.upstream(&farm(132)).await["start_calls"], 1, "no parts");
}
