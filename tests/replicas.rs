//! Several replicas acting as one gateway through one coordination store: the in-memory store
//! shared in-process, and Redis stores on one real `redis-server` or a real Redis Cluster:
//! identical Starts on different replicas coalesce, any replica reads any aggregation, and when
//! the replica driving a farm dies mid-poll another takes the farm over after its lease expires
//! and finishes the aggregation under the same id, without a second upstream Start.

mod common;

use common::*;
use deadline_stats_gateway::gateway::coordination::{Coordination, Found, MemoryStore, Wakeups};
use deadline_stats_gateway::grpc::pb::{AggregationState, Disposition, GroupBy};
use std::sync::Arc;
use std::time::Duration;

const HOUR: Duration = Duration::from_secs(3600);

/// Two replicas (sharing state through their stores) run one aggregation; the one that drives
/// it dies mid-poll and the other finishes it under the same id.
async fn takeover(replicas: [Coordination; 2], farm_n: u64) {
    let emu = Arc::new(emulator(Duration::from_secs(2), HOUR).await);
    let mut config = fast_config(HOUR);
    config.lease_ttl = Duration::from_millis(600);
    let [on_a, on_b] = replicas;
    let observer = on_b.store.clone();
    let mut a = replica(emu.clone(), Config { instance_id: "replica-a".into(), ..config.clone() }, on_a).await;
    let b = replica(emu.clone(), Config { instance_id: "replica-b".into(), ..config }, on_b).await;
    let (mut on_a, mut on_b) = (a.client().await, b.client().await);
    let request = start_request(farm_n, 1, 1, &[GroupBy::QueueId]);
    let started = on_a.start_aggregation(request.clone()).await.expect("start").into_inner();
    let id = started.aggregation.expect("aggregation").aggregation_id;
    let joined = on_b.start_aggregation(request).await.expect("start").into_inner();
    assert_eq!(
        (joined.disposition(), joined.aggregation.expect("aggregation").aggregation_id.as_str()),
        (Disposition::Joined, id.as_str()),
        "identical Starts on two replicas are one aggregation"
    );
    // Polling: the upstream accepted the Start and its id is recorded (a death between the two
    // is a Start of unknown outcome, a different case).
    eventually(Duration::from_secs(10), || {
        let (observer, id) = (observer.clone(), id.clone());
        async move {
            match observer.read(&id).await.ok()? {
                Found::Active { record, .. } => record.upstream_id.as_ref().map(|_| ()),
                _ => None,
            }
        }
    })
    .await;
    // Replica a dies while it polls: its worker stops, its lease is never released.
    a.gateway.shutdown();
    a.stop_serving();
    let done = wait_terminal(&mut on_b, &id).await.aggregation.expect("aggregation");
    assert_eq!(done.state(), AggregationState::Completed, "{done:?}");
    assert_eq!(done.row_count, 24);
    assert_eq!(b.upstream(&farm(farm_n)).await["start_calls"], 1, "the survivor resumed polling; no second Start");
}

#[tokio::test]
async fn on_one_memory_store_a_farm_whose_driver_dies_is_taken_over_under_the_same_id() {
    let wakeups = Arc::new(Wakeups::default());
    let store = Arc::new(MemoryStore::new(64 * 1024 * 1024, Duration::from_secs(30), wakeups.clone()));
    takeover([on_memory(&store, &wakeups), on_memory(&store, &wakeups)], 70).await;
}

#[tokio::test]
async fn on_redis_a_farm_whose_driver_dies_is_taken_over_under_the_same_id() {
    let server = tokio::task::spawn_blocking(redis_server).await.expect("joins");
    let config = fast_config(HOUR);
    takeover([on_redis(&server.url(), &config).await, on_redis(&server.url(), &config).await], 71).await;
}

#[tokio::test]
async fn three_gateway_processes_on_one_redis_act_as_one_and_survive_a_sigkill() {
    three_processes_act_as_one_and_survive_a_sigkill(SharedRedis::one().await).await;
}

#[tokio::test]
async fn three_gateway_processes_on_a_redis_cluster_act_as_one_and_survive_a_sigkill() {
    three_processes_act_as_one_and_survive_a_sigkill(SharedRedis::cluster().await).await;
}

async fn three_processes_act_as_one_and_survive_a_sigkill(shared: SharedRedis) {
    let (_emulator, endpoint) = spawn_emulator(&["--aggregation-duration", "3s"]);
    let redis = shared.url();
    let mut replicas: Vec<_> = (0..3).map(|n| redis_replica(&endpoint, &redis, n, &[])).collect();
    let mut clients = Vec::new();
    for (_, url, _) in &replicas {
        clients.push(client_of(url).await);
    }

    // 1,000 identical Starts spread over the three replicas: one id, one upstream Start.
    let request = start_request(80, 2, 1, &[GroupBy::QueueId]);
    let calls: Vec<_> = (0..1000)
        .map(|i| {
            let (mut client, request) = (clients[i % 3].clone(), request.clone());
            tokio::spawn(async move { client.start_aggregation(request).await.map(|r| r.into_inner()) })
        })
        .collect();
    let mut ids = std::collections::HashSet::new();
    for call in calls {
        let resp = call.await.expect("joins").expect("every Start succeeds");
        ids.insert(resp.aggregation.expect("aggregation").aggregation_id);
    }
    assert_eq!(ids.len(), 1, "one aggregation across three replicas");
    let id = ids.into_iter().next().expect("one id");

    // The replica that started it drives it; kill it while it polls.
    eventually(Duration::from_secs(10), || {
        let (mut client, id) = (clients[1].clone(), id.clone());
        async move {
            let page = client.get_aggregation(get_request(&id, 0, "", Duration::ZERO)).await.ok()?.into_inner();
            (page.aggregation?.state() == AggregationState::Running).then_some(())
        }
    })
    .await;
    let farm_id = farm(80);
    let mut conn = shared.conn().await;
    // Polling: the upstream accepted the Start and its id is recorded (a kill between the two
    // is a Start of unknown outcome, a different case).
    eventually(Duration::from_secs(10), || {
        let (mut conn, key) = (
            conn.clone(),
            deadline_stats_gateway::gateway::coordination::redis::RedisKeys::new("dsg:", false).record(&id),
        );
        async move {
            let json: Option<String> = ::redis::cmd("HGET").arg(key).arg("json").query_async(&mut conn).await.ok()?;
            json.filter(|j| !j.contains("\"upstream_id\":null")).map(|_| ())
        }
    })
    .await;
    // The lease names its holder: `token:replica-N-pid`. SIGKILL exactly that replica.
    let holder = lease_holder(&mut conn, &farm_id).await.expect("the holder is one of ours");
    let process = &mut replicas[holder].0;
    let _ = process.0.kill();
    let _ = process.0.wait();
    let mut survivor = clients[(holder + 1) % 3].clone();
    let done = wait_terminal(&mut survivor, &id).await.aggregation.expect("aggregation");
    assert_eq!(done.state(), AggregationState::Completed, "{done:?}");
    assert_eq!(done.row_count, 48);
    let upstream = upstream_of(&endpoint, &farm_id).await;
    assert_eq!(upstream["start_calls"], 1, "one upstream Start, even across a SIGKILL: {upstream}");
    assert_eq!(upstream["max_in_progress"], 1);
    drop(replicas);
}

#[tokio::test]
async fn while_redis_is_down_starts_are_unavailable_cached_results_are_served_and_both_recover() {
    let mut server = tokio::task::spawn_blocking(redis_server).await.expect("joins");
    let (_emulator, endpoint) = spawn_emulator(&["--aggregation-duration", "200ms"]);
    let redis = server.url();
    let flags =
        ["--store", "redis", "--redis-url", &redis, "--caller-start-rate", "0", "--poll-initial-interval", "50ms"];
    let (_gateway, url, admin) = spawn_replica(&endpoint, &flags);
    let mut client = client_of(&url).await;
    let started = client.start_aggregation(start_request(81, 1, 1, &[GroupBy::QueueId])).await.expect("start");
    let id = started.into_inner().aggregation.expect("aggregation").aggregation_id;
    assert_eq!(
        wait_terminal(&mut client, &id).await.aggregation.expect("aggregation").state(),
        AggregationState::Completed
    );

    server.stop();
    let refused = client.start_aggregation(start_request(81, 1, 2, &[GroupBy::QueueId])).await.expect_err("no store");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    use tonic_types::StatusExt as _;
    assert!(refused.get_details_retry_info().and_then(|r| r.retry_delay).is_some(), "with RetryInfo");
    let page = client.get_aggregation(get_request(&id, 0, "", Duration::ZERO)).await.expect("served from this replica");
    assert_eq!(page.into_inner().statistics.len(), 24);
    let up = eventually(Duration::from_secs(10), || {
        let admin = admin.clone();
        async move {
            let (_, _, body) = http("GET", &format!("{admin}/metrics"), None, &[]).await;
            parse_metrics(&body).get("dsg_store_up").copied().filter(|v| *v == 0.0)
        }
    })
    .await;
    assert_eq!(up, 0.0, "the metric says the store is down");
    let (status, _, body) = http("GET", &format!("{admin}/readyz"), None, &[]).await;
    assert_eq!(status, 200, "still serving what it holds");
    assert!(body.contains("coordination store is unreachable"), "{body}");

    server.restart();
    let again = eventually(Duration::from_secs(30), || {
        let mut client = client.clone();
        async move { client.start_aggregation(start_request(81, 1, 3, &[GroupBy::QueueId])).await.ok() }
    })
    .await;
    let new_id = again.into_inner().aggregation.expect("aggregation").aggregation_id;
    let done = wait_terminal(&mut client, &new_id).await.aggregation.expect("aggregation");
    assert_eq!(done.state(), AggregationState::Completed, "recovered without restarting the gateway");

    // Redis came back empty: a replica that never held the first result says its state was
    // lost, which an id that never existed does not.
    let (_other, other_url, _) = spawn_replica(&endpoint, &flags);
    let mut other = client_of(&other_url).await;
    let lost = other.get_aggregation(get_request(&id, 0, "", Duration::ZERO)).await.expect_err("lost");
    assert_eq!(lost.code(), tonic::Code::NotFound, "{lost:?}");
    assert!(lost.message().contains("shared store, which has since lost its state"), "{}", lost.message());
    let info = lost.get_details_error_info().expect("ErrorInfo");
    assert_eq!(
        (info.reason.as_str(), info.metadata.get("cause").map(String::as_str)),
        ("AGGREGATION_LOST", Some("shared_state_lost"))
    );
    let mut never = new_id.clone();
    never.replace_range(never.len() - 4.., if never.ends_with("0000") { "ffff" } else { "0000" });
    let missing = other.get_aggregation(get_request(&never, 0, "", Duration::ZERO)).await.expect_err("missing");
    assert_eq!(
        missing.get_details_error_info().map(|i| i.reason),
        Some("AGGREGATION_NOT_FOUND".to_owned()),
        "{missing:?}"
    );
}

#[tokio::test]
async fn five_farms_of_six_distinct_requests_over_three_replicas_run_one_at_a_time_per_farm() {
    one_at_a_time_per_farm(SharedRedis::one().await).await;
}

#[tokio::test]
async fn on_a_redis_cluster_five_farms_of_six_requests_over_three_replicas_run_one_at_a_time_per_farm() {
    one_at_a_time_per_farm(SharedRedis::cluster().await).await;
}

async fn one_at_a_time_per_farm(shared: SharedRedis) {
    let (_emulator, endpoint) = spawn_emulator(&["--aggregation-duration", "300ms"]);
    let replicas: Vec<_> = (0..3).map(|n| redis_replica(&endpoint, &shared.url(), n, &[])).collect();
    let mut clients = Vec::new();
    for (_, url, _) in &replicas {
        clients.push(client_of(url).await);
    }
    let mut ids = Vec::new();
    for (i, (farm_n, days)) in (0..5u64).flat_map(|f| (1..=6i64).map(move |d| (90 + f, d))).enumerate() {
        let resp = clients[i % 3]
            .start_aggregation(start_request(farm_n, 1, days, &[GroupBy::QueueId]))
            .await
            .expect("start")
            .into_inner();
        assert_eq!(resp.disposition(), Disposition::Started);
        ids.push(resp.aggregation.expect("aggregation").aggregation_id);
    }
    for (i, id) in ids.iter().enumerate() {
        let done = wait_terminal(&mut clients[(i + 1) % 3], id).await.aggregation.expect("aggregation");
        assert_eq!(done.state(), AggregationState::Completed, "{id}");
    }
    for f in 0..5 {
        let upstream = upstream_of(&endpoint, &farm(90 + f)).await;
        assert_eq!(
            (
                upstream["start_calls"].as_u64(),
                upstream["max_in_progress"].as_u64(),
                upstream["throttled_starts"].as_u64()
            ),
            (Some(6), Some(1), Some(0)),
            "farm {f}: {upstream}"
        );
    }
}

#[tokio::test]
async fn a_rolling_restart_of_three_replicas_loses_none_of_fifty_aggregations() {
    rolling_restart_loses_nothing(SharedRedis::one().await).await;
}

#[tokio::test]
async fn on_a_redis_cluster_a_rolling_restart_of_three_replicas_loses_none_of_fifty_aggregations() {
    rolling_restart_loses_nothing(SharedRedis::cluster().await).await;
}

async fn rolling_restart_loses_nothing(shared: SharedRedis) {
    let (_emulator, endpoint) = spawn_emulator(&["--aggregation-duration", "400ms"]);
    let extra = ["--shutdown-grace", "10s"];
    let redis = shared.url();
    let mut replicas: Vec<_> = (0..3).map(|n| redis_replica(&endpoint, &redis, n, &extra)).collect();
    let mut ids = Vec::new();
    for i in 0..50u64 {
        let mut client = client_of(&replicas[(i % 3) as usize].1).await;
        let resp = client
            .start_aggregation(start_request(100 + i % 10, 1, 1 + (i / 10) as i64, &[GroupBy::QueueId]))
            .await
            .expect("start")
            .into_inner();
        ids.push(resp.aggregation.expect("aggregation").aggregation_id);
    }
    for (n, slot) in replicas.iter_mut().enumerate() {
        slot.0.terminate();
        // The next one starts while the old one drains (maxSurge 1).
        let mut old = std::mem::replace(slot, redis_replica(&endpoint, &redis, n + 3, &extra)).0;
        let exit = tokio::task::spawn_blocking(move || old.wait_exit(Duration::from_secs(30))).await.expect("joins");
        assert!(exit.success(), "replica {n} drained and exited cleanly: {exit:?}");
    }
    let mut client = client_of(&replicas[0].1).await;
    for id in &ids {
        let done = wait_terminal(&mut client, id).await.aggregation.expect("aggregation");
        assert_eq!(done.state(), AggregationState::Completed, "{id} was lost in the rollout: {done:?}");
    }
    for f in 0..10 {
        let upstream = upstream_of(&endpoint, &farm(100 + f)).await;
        assert_eq!(upstream["max_in_progress"], 1, "farm {f}: {upstream}");
    }
}
