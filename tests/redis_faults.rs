//! Gateway processes on one real `redis-server`, in front of one emulator process, meeting the
//! faults an operated Redis has every month: connections that hang and then reset (writes lost
//! on the way), a server paused past the store's response timeout, a lease holder frozen past
//! its lease, records gone from a farm's queue. The replicas reach Redis through a
//! [`FaultProxy`].
//!
//! Each test counts, at the emulator, the upstream Starts each farm accepted (one per
//! aggregation) and the most aggregations ever running on a farm at once (one), and checks
//! that every accepted aggregation ends COMPLETED with its rows: a store fault never fails one.

mod common;

use common::*;
use deadline_stats_gateway::grpc::pb::{AggregationState, GroupBy};
use serde_json::json;
use std::time::Duration;
use tonic_types::StatusExt as _;

/// Replicas, their Redis and their emulator: a [`Fleet`] reaching Redis through a proxy (or
/// at a URL of the test's choice).
struct Rig {
    fleet: Fleet,
    redis: RedisServer,
    /// Between the replicas and Redis.
    proxy: FaultProxy,
}

impl std::ops::Deref for Rig {
    type Target = Fleet;

    fn deref(&self) -> &Fleet {
        &self.fleet
    }
}

impl std::ops::DerefMut for Rig {
    fn deref_mut(&mut self) -> &mut Fleet {
        &mut self.fleet
    }
}

impl Rig {
    /// `n` replicas with `replica_flags`, over an emulator run with `emulator_flags`.
    async fn launch(n: usize, replica_flags: &[&str], emulator_flags: &[&str]) -> Self {
        let redis = tokio::task::spawn_blocking(redis_server).await.expect("joins");
        Self::over(redis, n, replica_flags, emulator_flags).await
    }

    /// [`Rig::launch`] on `redis`.
    async fn over(redis: RedisServer, n: usize, replica_flags: &[&str], emulator_flags: &[&str]) -> Self {
        Self::reaching(redis, None, n, replica_flags, emulator_flags).await
    }

    /// [`Rig::over`], the replicas reaching Redis at `url` (else through the proxy).
    async fn reaching(
        redis: RedisServer,
        url: Option<String>,
        n: usize,
        replica_flags: &[&str],
        emulator_flags: &[&str],
    ) -> Self {
        let proxy = FaultProxy::start(redis.port).await;
        let url = url.unwrap_or_else(|| proxy.url());
        let fleet = Fleet::launch(&url, n, replica_flags, emulator_flags).await;
        Self { fleet, redis, proxy }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_paused_past_the_response_timeout_fail_no_aggregation() {
    // Each pause outlasts the store's response timeout (2 s) but not the lease: holders whose
    // write or renewal times out retry it, and one that stopped is resumed by the next holder.
    let mut rig = Rig::launch(2, &["--lease-ttl", "10s"], &["--aggregation-duration", "1s"]).await;
    let accepted = rig.start_many(300..306, 4).await;
    for pause_ms in ["2500", "3000", "2500", "3000"] {
        tokio::time::sleep(Duration::from_millis(600)).await;
        rig.redis.cli(&["CLIENT", "PAUSE", pause_ms, "WRITE"]).expect("CLIENT PAUSE");
        let ms: u64 = pause_ms.parse().expect("a number");
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    rig.assert_all_completed_once(&accepted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_lost_in_connections_that_hang_then_reset_fail_no_aggregation_and_start_none_twice() {
    // Each black hole outlasts the response timeout (2 s) but not the lease; the writes sent
    // into it are lost when the connections reset.
    let mut rig = Rig::launch(2, &["--lease-ttl", "10s"], &["--aggregation-duration", "1s"]).await;
    let accepted = rig.start_many(310..316, 4).await;
    for hold_ms in [2500, 3000, 2500, 3000] {
        tokio::time::sleep(Duration::from_millis(600)).await;
        rig.proxy.black_hole(Duration::from_millis(hold_ms)).await;
    }
    rig.assert_all_completed_once(&accepted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_write_of_the_upstream_id_is_retried_not_failed_or_started_twice() {
    let mut rig = Rig::launch(2, &["--lease-ttl", "10s"], &["--aggregation-duration", "1s"]).await;
    // The upstream answers Start after 500 ms; meanwhile Redis's memory is full, so the write
    // of the upstream id is refused (OOM) while reads go on, for 1.5 s.
    faults_of(&rig.endpoint, json!({ "latency_ms": 500, "operations": ["start"] })).await;
    let accepted = rig.start_many(320..321, 1).await;
    rig.until_starts(320, 1).await;
    rig.redis.cli(&["CONFIG", "SET", "maxmemory", "1"]).expect("CONFIG SET");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    rig.redis.cli(&["CONFIG", "SET", "maxmemory", "0"]).expect("CONFIG SET");
    faults_of(&rig.endpoint, json!({})).await;
    rig.assert_all_completed_once(&accepted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_frozen_past_its_lease_while_its_start_is_throttled_never_starts_again() {
    let flags = ["--lease-ttl", "2s", "--start-retry-initial", "300ms", "--start-retry-max", "300ms"];
    let mut rig = Rig::launch(2, &flags, &["--aggregation-duration", "300ms"]).await;
    let throttle =
        json!({ "error_rates": { "ThrottlingException": 1.0 }, "retry_after_secs": 0, "operations": ["start"] });
    faults_of(&rig.endpoint, throttle).await;
    let accepted = rig.start_many(330..331, 1).await;
    rig.until_starts(330, 2).await;
    let mut conn = redis_conn(&rig.redis.url()).await;
    let holder = lease_holder(&mut conn, &farm(330)).await.expect("a replica holds the farm");
    // Frozen (a paused VM, a throttled pod) with its Start's retry pending; meanwhile the farm
    // goes to the other replica, whose Start the upstream accepts and soon completes.
    rig.signal(holder, "-STOP");
    faults_of(&rig.endpoint, json!({})).await;
    let mut other = rig.clients[1 - holder].clone();
    let done = wait_terminal(&mut other, &accepted[0].id).await.aggregation.expect("aggregation");
    assert_eq!(done.state(), AggregationState::Completed, "{done:?}");
    // Thawed, the old holder's retry comes due at once: it must see its lease ran out.
    rig.signal(holder, "-CONT");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    rig.assert_all_completed_once(&accepted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_the_upstream_accepts_after_its_holder_lost_the_farm_is_adopted_not_started_again() {
    let flags = [
        "--lease-ttl",
        "2s",
        "--start-retry-initial",
        "300ms",
        "--start-retry-max",
        "300ms",
        "--upstream-attempt-timeout",
        "30s",
    ];
    let mut rig = Rig::launch(2, &flags, &["--aggregation-duration", "6s"]).await;
    // The upstream takes 1 s to answer the first Start (less than the lease, so the upstream
    // aggregation exists before the farm can change hands); its holder freezes meanwhile.
    faults_of(&rig.endpoint, json!({ "latency_ms": 1000, "operations": ["start"] })).await;
    let accepted = rig.start_many(335..336, 1).await;
    rig.until_starts(335, 1).await;
    let mut conn = redis_conn(&rig.redis.url()).await;
    let holder = lease_holder(&mut conn, &farm(335)).await.expect("a replica holds the farm");
    rig.signal(holder, "-STOP");
    faults_of(&rig.endpoint, json!({})).await;
    // The other replica takes the farm; the upstream aggregation the frozen holder's Start
    // created keeps the farm busy, so its own Start is refused as throttled (told to retry
    // when that aggregation ends).
    rig.until_starts(335, 2).await;
    // Thawed, the old holder has the upstream id but no lease to record it under: it leaves it
    // for the new holder, which follows it instead of starting again once the farm is free.
    rig.signal(holder, "-CONT");
    rig.assert_all_completed_once(&accepted).await;
    let mut offers = std::collections::BTreeMap::new();
    for (_, _, admin) in &rig.replicas {
        let (_, _, text) = http("GET", &format!("{admin}/metrics"), None, &[]).await;
        for (series, n) in parse_metrics(&text) {
            if let Some(outcome) = series.strip_prefix("dsg_upstream_start_offers_total") {
                *offers.entry(outcome.to_owned()).or_insert(0.0) += n;
            }
        }
    }
    let expected = [("{outcome=\"adopted\"}".to_owned(), 1.0), ("{outcome=\"left\"}".to_owned(), 1.0)];
    assert_eq!(offers, expected.into(), "left by the old holder, adopted by the new");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_gone_or_unreadable_in_a_farms_queue_are_skipped_counted_and_the_farm_moves_on() {
    let mut rig = Rig::launch(2, &[], &["--aggregation-duration", "1s"]).await;
    let mut all = rig.start_many(340..341, 4).await;
    let mut conn = redis_conn(&rig.redis.url()).await;
    // Behind the running head: one record deleted by hand (or evicted), one that a version of
    // the gateway this one cannot read wrote.
    let (last, first) = (all.pop().expect("four"), all.remove(0));
    let (gone, unreadable) = (all[0].id.clone(), all[1].id.clone());
    let _: () = ::redis::cmd("DEL")
        .arg(deadline_stats_gateway::gateway::coordination::redis::RedisKeys::new("dsg:", false).record(&gone))
        .query_async(&mut conn)
        .await
        .expect("DEL");
    let _: () = ::redis::cmd("HSET")
        .arg(deadline_stats_gateway::gateway::coordination::redis::RedisKeys::new("dsg:", false).record(&unreadable))
        .arg("json")
        .arg("{\"written_by\": \"a future version\"}")
        .query_async(&mut conn)
        .await
        .expect("HSET");
    let ran = [first, last];
    let finished = tokio::time::timeout(Duration::from_secs(30), rig.assert_all_completed_once(&ran)).await;
    assert!(finished.is_ok(), "the farm wedged behind the broken records");
    let mut client = rig.clients[0].clone();
    let err = client.get_aggregation(get_request(&unreadable, 0, "", Duration::ZERO)).await.expect_err("unreadable");
    assert_eq!(err.code(), tonic::Code::Internal, "{err:?}");
    assert_eq!(err.get_details_error_info().map(|e| e.reason), Some("AGGREGATION_UNREADABLE".into()), "{err:?}");
    assert!(err.message().contains("cannot read"), "{err:?}");
    let live: i64 = ::redis::cmd("HGET")
        .arg(deadline_stats_gateway::gateway::coordination::redis::RedisKeys::new("dsg:", false).admission())
        .arg("live")
        .query_async(&mut conn)
        .await
        .expect("HGET live");
    assert_eq!(live, 0, "no aggregation is counted live for ever");
    let mut discarded = 0.0;
    for (_, _, admin) in &rig.replicas {
        let (_, _, text) = http("GET", &format!("{admin}/metrics"), None, &[]).await;
        discarded += parse_metrics(&text)
            .iter()
            .filter(|(k, _)| k.starts_with("dsg_store_corrupt_total"))
            .map(|(_, v)| v)
            .sum::<f64>();
    }
    assert_eq!(discarded, 2.0, "both broken entries were counted once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_restarts_from_an_older_snapshot_ids_of_the_lost_window_answer_lost() {
    let mut rig = Rig::launch(2, &[], &["--aggregation-duration", "300ms"]).await;
    let kept = rig.start_many(350..351, 1).await;
    rig.assert_all_completed_once(&kept).await;
    rig.redis.cli(&["SAVE"]).expect("SAVE");
    let lost = rig.start_many(351..352, 1).await;
    rig.assert_all_completed_once(&lost).await;
    // Redis comes back from the snapshot (an older RDB, or a failover to a replica that lagged):
    // what was written after it is gone.
    tokio::task::block_in_place(|| rig.redis.restart());
    let mut client = rig.clients[1].clone();
    let err = eventually(Duration::from_secs(10), || {
        let (mut client, id) = (client.clone(), lost[0].id.clone());
        async move {
            let answer = client.get_aggregation(get_request(&id, 0, "", Duration::ZERO)).await;
            answer.err().filter(|e| e.code() != tonic::Code::Unavailable)
        }
    })
    .await;
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    let info = err.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "AGGREGATION_LOST", "{err:?}");
    assert_eq!(info.metadata.get("cause").map(String::as_str), Some("shared_state_lost"), "{err:?}");
    let page = client.get_aggregation(get_request(&kept[0].id, 0, "", Duration::ZERO)).await.expect("still kept");
    assert_eq!(page.into_inner().aggregation.map(|a| a.state()), Some(AggregationState::Completed));
    // Started again, it runs again: in the new epoch, one more upstream aggregation.
    let again = rig.start_many(351..352, 1).await;
    assert_ne!(again[0].id, lost[0].id);
    let done = wait_terminal(&mut client, &again[0].id).await.aggregation.expect("aggregation");
    assert_eq!((done.state(), done.row_count), (AggregationState::Completed, 24));
}

/// `INFO replication` of `server` says its link to the primary is up.
/// The `field` of `server`'s `INFO replication`, as a number.
async fn replication_offset(server: &RedisServer, field: &str) -> Option<u64> {
    let mut conn = redis_conn(&server.url()).await;
    let info: String = ::redis::cmd("INFO").arg("replication").query_async(&mut conn).await.ok()?;
    info.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':')?.trim().parse().ok())
}

/// Waits until every replica has received what `primary` had written when asked: what a
/// failover right after may lose is then only what is written meanwhile.
async fn caught_up(primary: &RedisServer, replicas: &[RedisServer]) {
    let written = replication_offset(primary, "master_repl_offset").await.expect("the primary's offset");
    for replica in replicas {
        eventually(Duration::from_secs(10), || async {
            (replication_offset(replica, "slave_repl_offset").await? >= written).then_some(())
        })
        .await;
    }
}

async fn replicating(server: &RedisServer) {
    eventually(Duration::from_secs(10), || async {
        let mut conn = redis_conn(&server.url()).await;
        let info: String = ::redis::cmd("INFO").arg("replication").query_async(&mut conn).await.ok()?;
        info.contains("master_link_status:up").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_to_a_replica_that_lagged_loses_no_accepted_aggregation_with_wait_replicas() {
    let primary = tokio::task::spawn_blocking(redis_server).await.expect("joins");
    // Two replicas, each reaching the primary through a proxy of its own, so the test can
    // stall them: with `--redis-wait-replicas 1` a failover must leave one replica behind.
    let links = [FaultProxy::start(primary.port).await, FaultProxy::start(primary.port).await];
    let mut replicas = Vec::new();
    for link in &links {
        let port = link.port.to_string();
        let replica = tokio::task::spawn_blocking(move || redis_server_with(&["--replicaof", "127.0.0.1", &port]))
            .await
            .expect("joins");
        replicating(&replica).await;
        replicas.push(replica);
    }
    let flags = ["--redis-wait-replicas", "1", "--redis-wait-timeout", "200ms"];
    let mut rig = Rig::over(primary, 2, &flags, &["--aggregation-duration", "1s"]).await;
    let mut accepted = rig.start_many(360..362, 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The replicas fall behind: what the primary takes now is not replicated.
    links.iter().for_each(FaultProxy::hold);
    accepted.extend(rig.try_start_many(362..364, 2).await);
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The primary dies; a replica is promoted, the other follows it, and the name the
    // gateways use moves to the new primary.
    tokio::task::block_in_place(|| rig.redis.stop());
    replicas[0].cli(&["REPLICAOF", "NO", "ONE"]).expect("REPLICAOF NO ONE");
    replicas[1].cli(&["REPLICAOF", "127.0.0.1", &replicas[0].port.to_string()]).expect("REPLICAOF");
    rig.proxy.retarget(replicas[0].port);
    rig.assert_all_completed_once(&accepted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_refuses_new_aggregations_as_store_full_keeps_running_ones_and_recovers_by_itself() {
    let mut rig = Rig::launch(2, &[], &["--aggregation-duration", "2s"]).await;
    let accepted = rig.start_many(370..371, 2).await;
    rig.until_starts(370, 1).await;
    let conn = redis_conn(&rig.redis.url()).await;
    let lease_key =
        deadline_stats_gateway::gateway::coordination::redis::RedisKeys::new("dsg:", false).lease(&farm(370));
    let lease = || {
        let (mut conn, key) = (conn.clone(), lease_key.clone());
        async move { ::redis::cmd("GET").arg(key).query_async::<Option<String>>(&mut conn).await.expect("GET") }
    };
    let held = lease().await.expect("the farm is held");
    rig.redis.cli(&["CONFIG", "SET", "maxmemory", "1"]).expect("CONFIG SET");
    let refused = rig.clients[0]
        .start_aggregation(start_request(371, 1, 1, &[GroupBy::QueueId]))
        .await
        .expect_err("no room for a new aggregation");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    assert_eq!(refused.get_details_error_info().map(|e| e.reason), Some("STORE_FULL".into()), "{refused:?}");
    assert!(refused.get_details_retry_info().is_some(), "it says when to retry: {refused:?}");
    // Two lease TTLs of full memory: the holder keeps its farm (renewals write nothing new),
    // and its running aggregation goes on being polled upstream.
    let polls = upstream_of(&rig.endpoint, &farm(370)).await["get_calls"].as_u64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(lease().await, Some(held), "the running aggregation's holder kept its lease");
    let polled = upstream_of(&rig.endpoint, &farm(370)).await["get_calls"].as_u64();
    assert!(polled > polls, "still polled while Redis is full: {polls:?} then {polled:?}");
    let page = rig.clients[1].get_aggregation(get_request(&accepted[0].id, 0, "", Duration::ZERO)).await;
    assert!(page.is_ok(), "reads go on: {page:?}");
    rig.redis.cli(&["CONFIG", "SET", "maxmemory", "0"]).expect("CONFIG SET");
    rig.assert_all_completed_once(&accepted).await;
    let again = rig.start_many(371..372, 1).await;
    rig.assert_all_completed_once(&again).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_stopped_with_an_aggregation_still_running_gives_its_farm_up_when_its_grace_ends() {
    let flags = ["--lease-ttl", "30s", "--shutdown-grace", "1s"];
    let mut rig = Rig::launch(2, &flags, &["--aggregation-duration", "4s"]).await;
    let accepted = rig.start_many(380..381, 1).await;
    rig.until_starts(380, 1).await;
    let mut conn = redis_conn(&rig.redis.url()).await;
    let holder = lease_holder(&mut conn, &farm(380)).await.expect("a replica holds the farm");
    rig.replicas[holder].0.terminate();
    rig.replicas[holder].0.wait_exit(Duration::from_secs(15));
    // Not 30 s of a lease nobody renews: the other replica takes the farm at its next scan.
    assert_ne!(lease_holder(&mut conn, &farm(380)).await, Some(holder), "the stopped replica released its lease");
    let mut other = rig.clients[1 - holder].clone();
    let done = tokio::time::timeout(Duration::from_secs(20), wait_terminal(&mut other, &accepted[0].id))
        .await
        .expect("taken over well before the lease would have expired")
        .aggregation
        .expect("aggregation");
    assert_eq!((done.state(), done.row_count), (AggregationState::Completed, 24));
    let upstream = upstream_of(&rig.endpoint, &farm(380)).await;
    assert_eq!(upstream["aggregations_started"], 1, "the next holder polled the recorded upstream id: {upstream}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_whose_far_end_vanished_without_a_word_are_noticed_and_made_anew() {
    let mut rig = Rig::launch(2, &[], &["--aggregation-duration", "300ms"]).await;
    let conn = redis_conn(&rig.redis.url()).await;
    let subscribers = |mut conn: ::redis::aio::MultiplexedConnection| async move {
        let counts: Vec<(String, u64)> =
            ::redis::cmd("PUBSUB").arg("NUMSUB").arg("dsg:changes").query_async(&mut conn).await.expect("NUMSUB");
        counts.first().map_or(0, |(_, n)| *n)
    };
    eventually(Duration::from_secs(10), || async { (subscribers(conn.clone()).await == 2).then_some(()) }).await;
    // Every open connection's far end goes silent: no bytes, no reset, ever.
    rig.proxy.freeze_open();
    // Each replica's health check finds its subscription dead and subscribes anew.
    eventually(Duration::from_secs(15), || async { (subscribers(conn.clone()).await >= 4).then_some(()) }).await;
    let accepted = rig.start_many(390..392, 2).await;
    rig.assert_all_completed_once(&accepted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_sentinel_a_primary_killed_mid_work_is_followed_to_the_replica_it_promotes() {
    let primary = tokio::task::spawn_blocking(redis_server).await.expect("joins");
    // Two replicas, as Sentinel deployments run them.
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let primary_port = primary.port.to_string();
        let replica =
            tokio::task::spawn_blocking(move || redis_server_with(&["--replicaof", "127.0.0.1", &primary_port]))
                .await
                .expect("joins");
        replicating(&replica).await;
        replicas.push(replica);
    }
    let primary_port = primary.port;
    let sentinel = tokio::task::spawn_blocking(move || redis_sentinel(primary_port)).await.expect("joins");
    // The Sentinel has found the replicas (from the primary's INFO) before the primary dies.
    eventually(Duration::from_secs(20), || async {
        let mut conn = redis_conn(&format!("redis://127.0.0.1:{}", sentinel.port)).await;
        let known: Vec<::redis::Value> =
            ::redis::cmd("SENTINEL").arg("REPLICAS").arg("mymaster").query_async(&mut conn).await.ok()?;
        (known.len() == 2).then_some(())
    })
    .await;
    // Following Sentinel is what is tested here (waiting for replicas is tested above): how
    // soon Sentinel re-points the other replica varies with the machine's load.
    let flags: [&str; 0] = [];
    let mut rig = Rig::reaching(primary, Some(sentinel.url()), 2, &flags, &["--aggregation-duration", "1s"]).await;
    let mut accepted = rig.start_many(395..397, 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Asynchronous replication may lose the last writes in a failover (answered as
    // AGGREGATION_LOST; tested with and without waiting for replicas above). On a loaded
    // machine a replica can lag by more than the half second: the kill comes once they have
    // what the aggregations' claims wrote.
    caught_up(&rig.redis, &replicas).await;
    tokio::task::block_in_place(|| rig.redis.stop());
    rig.assert_all_completed_once(&accepted).await;
    // New work goes to the promoted primary.
    accepted = rig.start_many(397..398, 1).await;
    rig.assert_all_completed_once(&accepted).await;
    assert!(replicas.iter().all(|r| r.cli(&["ROLE"]).is_ok()), "both replicas answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_sentinel_connections_to_a_primary_left_behind_move_to_the_one_sentinel_names() {
    let primary = tokio::task::spawn_blocking(redis_server).await.expect("joins");
    let primary_port = primary.port.to_string();
    let replica = tokio::task::spawn_blocking(move || redis_server_with(&["--replicaof", "127.0.0.1", &primary_port]))
        .await
        .expect("joins");
    replicating(&replica).await;
    let primary_port = primary.port;
    let sentinel = tokio::task::spawn_blocking(move || redis_sentinel(primary_port)).await.expect("joins");
    let old = primary.url();
    let mut rig = Rig::reaching(primary, Some(sentinel.url()), 1, &[], &["--aggregation-duration", "300ms"]).await;
    let accepted = rig.start_many(418..419, 1).await;
    rig.assert_all_completed_once(&accepted).await;
    // The replica becomes a primary and Sentinel names it; the old primary is left as it was,
    // answering reads and writes without an error, as a primary a failover left behind does
    // until it is demoted (or for good, when Sentinel cannot reach it to demote it).
    assert_eq!(replica.cli(&["REPLICAOF", "NO", "ONE"]).as_deref(), Ok("+OK"));
    let mut to_sentinel = redis_conn(&format!("redis://127.0.0.1:{}", sentinel.port)).await;
    let port = replica.port.to_string();
    for command in [vec!["REMOVE", "mymaster"], vec!["MONITOR", "mymaster", "127.0.0.1", &port, "1"]] {
        let _: () = ::redis::cmd("SENTINEL").arg(&command).query_async(&mut to_sentinel).await.expect("SENTINEL");
    }
    // Every connection of the gateway leaves the old primary by itself.
    let mut on_old = redis_conn(&old).await;
    eventually(Duration::from_secs(20), || {
        let mut conn = on_old.clone();
        async move {
            let clients: String = ::redis::cmd("CLIENT").arg("LIST").query_async(&mut conn).await.ok()?;
            (clients.lines().count() == 1).then_some(())
        }
    })
    .await;
    let accepted = rig.start_many(419..420, 1).await;
    rig.assert_all_completed_once(&accepted).await;
    let mut on_new = redis_conn(&replica.url()).await;
    assert!(record_json(&mut on_new, &accepted[0].id).await.is_some(), "queued and run on the primary Sentinel names");
    assert!(record_json(&mut on_old, &accepted[0].id).await.is_none(), "nothing written to the one left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_larger_than_the_near_cache_is_served_page_by_page_and_the_cache_stays_within_budget() {
    // 2 queues × 7 days × 24 hours × 3 usage types = 1,008 rows: far more than 20 KB encoded.
    let budget = 20_000;
    let mut rig = Rig::launch(1, &["--cache-max-bytes", "20000"], &["--aggregation-duration", "300ms"]).await;
    let request = start_request(420, 2, 7, &[GroupBy::QueueId, GroupBy::UsageType]);
    let id = rig.clients[0].start_aggregation(request).await.expect("start").into_inner().aggregation.expect("agg");
    let id = id.aggregation_id;
    let done = until_terminal(&mut rig.clients[0], &id).await;
    assert_eq!((done.state(), done.row_count), (AggregationState::Completed, 1008));
    // Every page, 100 rows at a time, from the replica whose cache cannot hold the result...
    let mut conn = redis_conn(&rig.redis.url()).await;
    let stored: u64 = ::redis::cmd("STRLEN")
        .arg(deadline_stats_gateway::gateway::coordination::redis::RedisKeys::new("dsg:", false).rows(&id))
        .query_async(&mut conn)
        .await
        .expect("STRLEN");
    let sent_before = redis_output_bytes(&mut conn).await;
    let mut paged = Vec::new();
    let mut token = String::new();
    loop {
        let page = rig.clients[0].get_aggregation(get_request(&id, 100, &token, Duration::ZERO)).await;
        let page = page.expect("a page").into_inner();
        paged.extend(page.statistics.iter().map(|s| format!("{s:?}")));
        token = page.next_page_token;
        let (_, _, admin) = &rig.replicas[0];
        let (_, _, text) = http("GET", &format!("{admin}/metrics"), None, &[]).await;
        let held = parse_metrics(&text).get("dsg_cache_bytes").copied().unwrap_or(0.0);
        assert!(held <= f64::from(budget), "the results cache holds {held} bytes, over its {budget}");
        if token.is_empty() {
            break;
        }
    }
    // ...read from Redis a page at a time: the stored rows moved out of Redis about once, not
    // once per page (eleven times).
    let sent = redis_output_bytes(&mut conn).await - sent_before;
    assert!(sent < 2 * stored, "Redis sent {sent} bytes for rows stored in {stored}");
    // And it is the result as a replica with room for it serves it whole.
    let (_roomy, url, _) = redis_replica(&rig.endpoint, &rig.proxy.url(), 8, &[]);
    let mut roomy = client_of(&url).await;
    let whole = roomy.get_aggregation(get_request(&id, 1000, "", Duration::ZERO)).await.expect("rows").into_inner();
    let rest = roomy.get_aggregation(get_request(&id, 1000, &whole.next_page_token, Duration::ZERO)).await;
    let rest = rest.expect("rows").into_inner();
    let all: Vec<String> = whole.statistics.iter().chain(&rest.statistics).map(|s| format!("{s:?}")).collect();
    assert_eq!(paged.len(), 1008);
    assert_eq!(paged, all, "the same rows in the same order");
    let (_, _, admin) = &rig.replicas[0];
    let (_, _, text) = http("GET", &format!("{admin}/metrics"), None, &[]).await;
    let metrics = parse_metrics(&text);
    assert!(metrics.get("dsg_cache_bytes").copied().unwrap_or(0.0) <= f64::from(budget), "{metrics:?}");
    assert_eq!(metrics.get("dsg_cache_entries").copied(), Some(0.0), "the result was never held whole");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_taken_over_midway_resumes_its_parts_and_its_lost_rows_come_back_part_by_part() {
    // 2 queues × 7 days × 24 hours × 3 usage types = 1,008 rows, against an upstream that
    // refuses more than 600: the whole, then two parts of 3 and 4 days (432 and 576 rows).
    let mut rig = Rig::launch(2, &[], &["--aggregation-duration", "1s", "--max-rows", "600"]).await;
    let request = start_request(400, 2, 7, &[GroupBy::QueueId, GroupBy::UsageType]);
    let id = rig.clients[0].start_aggregation(request).await.expect("start").into_inner().aggregation.expect("agg");
    let id = id.aggregation_id;
    let mut conn = redis_conn(&rig.redis.url()).await;
    eventually(Duration::from_secs(30), || {
        let (mut conn, id) = (conn.clone(), id.clone());
        async move {
            let record = record_json(&mut conn, &id).await?;
            (record["split"][0]["done"] == true && record["split"][1]["upstream_id"].is_string()).then_some(())
        }
    })
    .await;
    // The first part is done, the second's upstream aggregation is recorded and running: its
    // holder dies. (Dying between the upstream's acceptance of a Start and the record of its
    // id is the one window no holder can recover from: the API has no idempotency token, and
    // the next holder waits out the orphan and starts the part again. README, "Running
    // several replicas".)
    let holder = lease_holder(&mut conn, &farm(400)).await.expect("a replica holds the farm");
    let _ = rig.replicas[holder].0.0.kill();
    let _ = rig.replicas[holder].0.0.wait();
    let mut survivor = rig.clients[1 - holder].clone();
    let done = until_terminal(&mut survivor, &id).await;
    assert_eq!((done.state(), done.row_count), (AggregationState::Completed, 1008), "{done:?}");
    let upstream = upstream_of(&rig.endpoint, &farm(400)).await;
    assert_eq!(upstream["aggregations_started"], 3, "the whole and two parts, none run twice: {upstream}");
    assert_eq!(upstream["max_in_progress"], 1, "{upstream}");
    // The rows go from Redis; a replica that never held them fetches them again, part by part.
    let _: () = ::redis::cmd("DEL")
        .arg(deadline_stats_gateway::gateway::coordination::redis::RedisKeys::new("dsg:", false).rows(&id))
        .query_async(&mut conn)
        .await
        .expect("DEL");
    let (_fresh, url, _) = redis_replica(&rig.endpoint, &rig.proxy.url(), 7, &[]);
    let mut fresh = client_of(&url).await;
    let page = fresh.get_aggregation(get_request(&id, 1000, "", Duration::ZERO)).await.expect("rows back");
    let page = page.into_inner();
    assert_eq!(page.aggregation.map(|a| a.row_count), Some(1008));
    assert_eq!(page.statistics.len(), 1000, "the first page of the merged rows");
}

/// The bytes Redis has sent its clients so far (`INFO stats`).
async fn redis_output_bytes(conn: &mut ::redis::aio::MultiplexedConnection) -> u64 {
    let info: String = ::redis::cmd("INFO").arg("stats").query_async(conn).await.expect("INFO stats");
    info.lines()
        .find_map(|l| l.strip_prefix("total_net_output_bytes:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("total_net_output_bytes")
}
