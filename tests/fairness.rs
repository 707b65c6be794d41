//! Fair share on a farm, end to end: real gateway processes in front of the emulator process,
//! on the memory store, on Redis, and as two replicas sharing Redis. The order is read where it
//! happens: the emulator's record of the upstream Starts. Also the caller share's refusal (a
//! real tonic client reads its ErrorInfo and RetryInfo), a policy that limits an identity to
//! batch, and a Watch that sees its position go up when interactive work arrives.

mod common;

use common::*;
use deadline_stats_gateway::bench::requests::WINDOW_START;
use deadline_stats_gateway::grpc::pb;
use std::collections::HashMap;
use std::time::Duration;
use tonic_types::StatusExt;

const FARM: u64 = 500;
/// A's aggregations: batch days 1..=20, interactive days 21..=40; B's: days 41 and 42.
const A: &str = "team-a";
const B: &str = "team-b";

/// A Start of `days` days on `farm_n` as `caller` with `priority`.
async fn start_as(
    client: &mut Client,
    farm_n: u64,
    days: i64,
    caller: &str,
    priority: pb::Priority,
) -> pb::Aggregation {
    try_start(client, farm_n, days, caller, priority).await.unwrap_or_else(|e| panic!("{caller} day {days}: {e:?}"))
}

async fn try_start(
    client: &mut Client,
    farm_n: u64,
    days: i64,
    caller: &str,
    priority: pb::Priority,
) -> Result<pb::Aggregation, tonic::Status> {
    let mut message = start_request(farm_n, 1, days, &[pb::GroupBy::UsageType]);
    message.priority = priority as i32;
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("x-caller-id", caller.parse().expect("ASCII"));
    Ok(client.start_aggregation(request).await?.into_inner().aggregation.expect("aggregation"))
}

async fn read(client: &mut Client, id: &str) -> pb::Aggregation {
    let page = client.get_aggregation(get_request(id, 0, "", Duration::ZERO)).await.expect("get");
    page.into_inner().aggregation.expect("aggregation")
}

/// Waits until the emulator at `endpoint` has started the aggregation of `window` on the farm.
async fn until_started_upstream(endpoint: &str, window: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let stats = upstream_of(endpoint, &farm(FARM)).await;
        if stats["started_windows"].as_array().is_some_and(|w| w.iter().any(|w| w.as_str() == Some(window))) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{window} never started upstream: {stats}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The window the emulator records for a Start of `days` days (see `start_request`).
fn window(days: i64) -> String {
    let start = chrono::DateTime::from_timestamp(WINDOW_START, 0).expect("a time");
    format!("{}/{}", start.to_rfc3339(), (start + chrono::Duration::days(days)).to_rfc3339())
}

fn label(days: i64) -> String {
    match days {
        1..=20 => format!("a-b{days}"),
        21..=40 => format!("a-i{}", days - 20),
        _ => format!("b-i{}", days - 40),
    }
}

/// What the rules say happens: A's first batch aggregation runs first (it was alone); then,
/// fair, every interactive one before any other batch one, A and B taking turns; unfair,
/// arrival order.
fn expected(fair: bool) -> Vec<String> {
    let arrival: Vec<i64> = (1..=42).collect();
    let fair_order: Vec<i64> = [1, 21, 41, 22, 42].into_iter().chain(23..=40).chain(2..=20).collect();
    (if fair { fair_order } else { arrival }).into_iter().map(label).collect()
}

/// A submits 20 batch and 20 interactive aggregations while its first runs upstream (25 s),
/// then B submits 2 interactive ones; `clients` take turns sending them (two replicas: both).
/// Checks the upstream order, and that positions and estimates read before foretold it.
async fn a_backfill_and_a_dashboard(clients: &mut [Client], endpoint: &str, fair: bool) {
    let n = clients.len();
    // A run the farm's estimates learn from.
    let warm = start_as(&mut clients[0], FARM, 100, "warm-up", pb::Priority::Interactive).await;
    until_terminal(&mut clients[0], &warm.aggregation_id).await;
    faults_of(endpoint, serde_json::json!({ "aggregation_duration_ms": 25_000 })).await;
    let first = start_as(&mut clients[0], FARM, 1, A, pb::Priority::Batch).await;
    // Started at the emulator (RUNNING shows a moment before the upstream Start is sent): only
    // then are later aggregations made quick.
    until_started_upstream(endpoint, &window(1)).await;
    faults_of(endpoint, serde_json::json!({ "aggregation_duration_ms": 150 })).await;
    let mut ids = HashMap::from([(first.aggregation_id.clone(), label(1))]);
    for days in 2..=20 {
        let a = start_as(&mut clients[days as usize % n], FARM, days, A, pb::Priority::Batch).await;
        ids.insert(a.aggregation_id, label(days));
    }
    // A Watch of A's second batch aggregation: its position goes up as interactive work arrives.
    let second = ids.iter().find(|(_, l)| *l == "a-b2").map(|(id, _)| id.clone()).expect("a-b2");
    let mut watch = clients[0]
        .watch_aggregation(pb::WatchAggregationRequest { aggregation_id: second.clone() })
        .await
        .expect("watch")
        .into_inner();
    let before = watch.message().await.expect("a message").expect("its state").queue_position;
    for days in 21..=40 {
        let a = start_as(&mut clients[days as usize % n], FARM, days, A, pb::Priority::Interactive).await;
        ids.insert(a.aggregation_id, label(days));
    }
    for days in 41..=42 {
        let b = start_as(&mut clients[(days as usize + 1) % n], FARM, days, B, pb::Priority::Interactive).await;
        ids.insert(b.aggregation_id, label(days));
    }
    // Positions and estimates as the gateway foretells them now, the first still running.
    // Read all at once, so that they are read as close to one moment as can be.
    let reading = std::time::Instant::now();
    let reader = clients[1 % n].clone();
    let reads = ids.iter().map(|(id, l)| {
        let mut client = reader.clone();
        async move {
            let a = read(&mut client, id).await;
            (a.queue_position, l.clone(), a.estimated_start_time.map(|t| (t.seconds, t.nanos)))
        }
    });
    let mut foretold = futures::future::join_all(reads).await;
    foretold.sort();
    let still = read(&mut clients[0], &first.aggregation_id).await.state();
    assert_eq!(
        still,
        pb::AggregationState::Running,
        "the first ran throughout (25 s): positions were read as one order"
    );
    let read_for = i64::try_from(reading.elapsed().as_millis()).unwrap_or(i64::MAX);
    if fair {
        let seen = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let a = watch.message().await.expect("a message").expect("still watched");
                if a.queue_position > before {
                    return a.queue_position;
                }
            }
        })
        .await
        .expect("the watch sent the position's rise");
        assert!(seen > before, "the watch saw a-b2 move back from {before} to {seen}");
    }
    drop(watch);
    for id in ids.keys() {
        until_terminal(&mut clients[0], id).await;
    }

    let stats = upstream_of(endpoint, &farm(FARM)).await;
    let by_window: HashMap<String, String> = (1..=42).map(|d| (window(d), label(d))).collect();
    let ran: Vec<String> = stats["started_windows"]
        .as_array()
        .expect("the emulator's started windows")
        .iter()
        .filter_map(|w| by_window.get(w.as_str().expect("a string")).cloned())
        .collect();
    let want = expected(fair);
    if fair {
        // The rules, one by one, before the whole order.
        let b_first = ran.iter().position(|l| l == "b-i1").expect("B ran");
        assert!(b_first <= 2, "B's first came within the next two runs after the first: {ran:?}");
        let last_interactive = ran.iter().rposition(|l| l.contains("-i")).expect("interactive ran");
        let first_waiting_batch = ran.iter().skip(1).position(|l| l.contains("-b")).expect("batch ran") + 1;
        assert!(first_waiting_batch > last_interactive, "no batch started while interactive work waited: {ran:?}");
        assert_eq!(ran[1..5], ["a-i1", "b-i1", "a-i2", "b-i2"], "A and B took turns");
    }
    assert_eq!(ran, want, "the upstream order (fair: {fair})");
    let positions: Vec<&str> = foretold.iter().map(|(_, l, _)| l.as_str()).collect();
    assert_eq!(positions, want, "queue positions (the running first at 0) foretold the order");
    let starts: Vec<_> =
        foretold[1..].iter().map(|(_, _, s)| s.unwrap_or_else(|| panic!("every estimate: {foretold:?}"))).collect();
    // Read one after the other, each estimate counts from its own read: they may disagree by
    // as long as the reads took.
    let ms = |(s, n): (i64, i32)| s * 1000 + i64::from(n) / 1_000_000;
    let in_order = starts.windows(2).all(|w| ms(w[0]) <= ms(w[1]) + read_for + 50);
    assert!(in_order, "estimated starts follow the order (read over {read_for} ms): {foretold:?}");
    assert!(ms(starts[starts.len() - 1]) > ms(starts[0]) + 5_000, "and grow along it: {foretold:?}");
}

/// What every gateway of these tests runs with: each aggregation here is a window of whole days
/// from one start, so a completed one contains the shorter ones, which would be answered from it
/// (derived) instead of queueing on the farm, the order under test.
const NO_DERIVE: [&str; 2] = ["--derive", "false"];

/// The gateway process on the memory store in front of the emulator process at `endpoint`.
fn memory_gateway(endpoint: &str, extra: &[&str]) -> (Running, String, String) {
    let mut flags = vec!["--poll-initial-interval", "100ms", "--upstream-start-rate", "0"];
    flags.extend_from_slice(&NO_DERIVE);
    flags.extend_from_slice(&["--caller-start-rate", "0", "--caller-get-rate", "0"]);
    flags.extend_from_slice(extra);
    spawn_replica(endpoint, &flags)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_memory_store_interactive_work_goes_first_and_callers_take_turns() {
    let (_emulator, endpoint) = spawn_emulator(&["--aggregation-duration", "150ms"]);
    let (_gateway, url, _) = memory_gateway(&endpoint, &[]);
    a_backfill_and_a_dashboard(&mut [client_of(&url).await], &endpoint, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_fair_queueing_a_farm_runs_in_arrival_order() {
    let (_emulator, endpoint) = spawn_emulator(&["--aggregation-duration", "150ms"]);
    let (_gateway, url, _) = memory_gateway(&endpoint, &["--fair-queueing", "false"]);
    a_backfill_and_a_dashboard(&mut [client_of(&url).await], &endpoint, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_interactive_work_goes_first_and_callers_take_turns() {
    let redis = tokio::task::spawn_blocking(redis_server).await.expect("joins");
    let (_emulator, endpoint) = spawn_emulator(&["--aggregation-duration", "150ms"]);
    let (_gateway, url, _) = redis_replica(&endpoint, &redis.url(), 1, &NO_DERIVE);
    a_backfill_and_a_dashboard(&mut [client_of(&url).await], &endpoint, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_redis_keep_one_fair_order_per_farm() {
    let redis = tokio::task::spawn_blocking(redis_server).await.expect("joins");
    let (_emulator, endpoint) = spawn_emulator(&["--aggregation-duration", "150ms"]);
    let (_a, url_a, _) = redis_replica(&endpoint, &redis.url(), 1, &NO_DERIVE);
    let (_b, url_b, _) = redis_replica(&endpoint, &redis.url(), 2, &NO_DERIVE);
    a_backfill_and_a_dashboard(&mut [client_of(&url_a).await, client_of(&url_b).await], &endpoint, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_past_its_share_of_a_farms_queue_is_refused_while_another_is_taken() {
    let (_emulator, endpoint) = spawn_emulator(&["--aggregation-duration", "30s"]);
    // A capacity of 10 and a share of 0.3: three waiting aggregations per caller.
    let (_gateway, url, admin) =
        memory_gateway(&endpoint, &["--farm-queue-capacity", "10", "--farm-queue-caller-share", "0.3"]);
    let mut client = client_of(&url).await;
    for days in 1..=4 {
        start_as(&mut client, FARM, days, A, pb::Priority::Batch).await;
    }
    let refused = try_start(&mut client, FARM, 5, A, pb::Priority::Batch).await.expect_err("past A's share");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    let details = refused.get_error_details();
    let info = details.error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "CALLER_QUEUE_FULL", "{refused:?}");
    assert_eq!(info.metadata.get("capacity").map(String::as_str), Some("3"));
    assert!(details.retry_info().and_then(|r| r.retry_delay).is_some(), "RetryInfo says when to retry");
    start_as(&mut client, FARM, 6, B, pb::Priority::Batch).await;
    let joined = try_start(&mut client, FARM, 2, A, pb::Priority::Batch).await.expect("A may still join");
    assert_eq!(joined.state(), pb::AggregationState::Queued);
    let (_, _, scrape) = http("GET", &format!("{admin}/metrics"), None, &[]).await;
    let line = r#"dsg_queue_refused_total{reason="caller_queue_full"} 1"#;
    assert!(scrape.lines().any(|l| l == line), "the refusal is counted by its reason: {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_limited_to_batch_is_refused_interactive_and_runs_batch_by_default() {
    let dir = test_dir("fairness-policy");
    let policy = dir.join("policy.toml");
    std::fs::write(
        &policy,
        "[[rule]]\nidentities = [\"backfill\"]\nfarms = [\"*\"]\nmax_priority = \"batch\"\n\
         [[rule]]\nidentities = [\"dashboard\"]\nfarms = [\"*\"]\n",
    )
    .expect("writes the policy");
    let (_emulator, endpoint) = spawn_emulator(&["--aggregation-duration", "30s"]);
    let policy_flag = policy.to_str().expect("UTF-8");
    let (_gateway, url, _) = memory_gateway(&endpoint, &["--identity-source", "header", "--authz-policy", policy_flag]);
    let mut client = client_of(&url).await;
    let refused =
        try_start(&mut client, FARM, 1, "backfill", pb::Priority::Interactive).await.expect_err("beyond its class");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    let info = refused.get_error_details().error_info().cloned().expect("ErrorInfo");
    assert_eq!(info.reason, "PRIORITY_NOT_ALLOWED", "{refused:?}");
    assert_eq!(info.metadata.get("priority").map(String::as_str), Some("interactive"));
    let unspecified = start_as(&mut client, FARM, 1, "backfill", pb::Priority::Unspecified).await;
    assert_eq!(unspecified.priority(), pb::Priority::Batch, "unspecified: the most its policy allows");
    let dashboard = start_as(&mut client, FARM, 2, "dashboard", pb::Priority::Unspecified).await;
    assert_eq!(dashboard.priority(), pb::Priority::Interactive);
    let batch = start_as(&mut client, FARM, 3, "dashboard", pb::Priority::Batch).await;
    assert_eq!(batch.priority(), pb::Priority::Batch, "anyone may ask for less");
}
