//! Gateway processes on a real Redis Cluster (three primaries with a replica each, on
//! loopback) while the cluster does what an operated one does: slots move between shards (a
//! resharding: `MIGRATING`/`IMPORTING`, keys moved one by one, clients sent `ASK` and
//! `TRYAGAIN`), and a primary dies and its replica takes over. Each test counts, at the
//! emulator, one upstream Start per aggregation and never two running on a farm, and checks
//! that every accepted aggregation ends COMPLETED with its rows.

mod common;

use common::*;
use deadline_stats_gateway::gateway::ids::Bucket;
use deadline_stats_gateway::grpc::pb::GroupBy;
use std::time::Duration;

/// The slot holding the keys of `farm_n`'s bucket.
fn slot_of_farm(cluster: &RedisCluster, farm_n: u64) -> u16 {
    cluster.slot_of(&format!("{{{}}}", Bucket::of_farm(&farm(farm_n)).hex()))
}

/// The cluster's primaries, as node indexes.
fn primaries(cluster: &RedisCluster) -> Vec<usize> {
    let mut primaries: Vec<usize> = [0, 5461, 10923].iter().filter_map(|s| cluster.primary_of(*s)).collect();
    primaries.dedup();
    primaries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resharding_while_aggregations_queue_and_run_loses_none_and_starts_each_once() {
    let cluster = std::sync::Arc::new(tokio::task::spawn_blocking(redis_cluster).await.expect("joins"));
    let url = cluster.cluster_url();
    let mut fleet = Fleet::launch(&url, 3, &[], &["--aggregation-duration", "1s"]).await;
    let farms = 400..408;
    let accepted = fleet.start_many(farms.clone(), 4).await;
    // Every slot the farms' keys live in moves to the next primary, key by key, while their
    // aggregations queue and run.
    let moves = {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || {
            let primaries = primaries(&cluster);
            assert_eq!(primaries.len(), 3, "three primaries");
            let mut slots: Vec<u16> = farms.map(|f| slot_of_farm(&cluster, f)).collect();
            slots.sort_unstable();
            slots.dedup();
            for slot in &slots {
                let from = cluster.primary_of(*slot).expect("a primary serves the slot");
                let next = primaries[(primaries.iter().position(|p| *p == from).expect("a primary") + 1) % 3];
                cluster.migrate_slot(*slot, from, next, Duration::from_millis(300));
            }
            slots.len()
        })
    };
    let moved = moves.await.expect("the resharding ran");
    assert!(moved >= 2, "slots moved: {moved}");
    fleet.assert_all_completed_once(&accepted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_inside_the_cluster_fails_over_and_nothing_is_lost_or_started_twice() {
    let mut cluster = tokio::task::spawn_blocking(redis_cluster).await.expect("joins");
    let url = cluster.cluster_url();
    // Guarded writes wait for the shard's replica: a failover loses none of them.
    let flags = ["--redis-wait-replicas", "1", "--redis-wait-timeout", "200ms"];
    let mut fleet = Fleet::launch(&url, 3, &flags, &["--aggregation-duration", "1500ms"]).await;
    let farms = 420..426;
    let accepted = fleet.start_many(farms.clone(), 3).await;
    let slot = slot_of_farm(&cluster, farms.start);
    let victim = cluster.primary_of(slot).expect("a primary serves the slot");
    fleet.until_starts(farms.start, 1).await;
    // SIGKILL the primary while its farms run; its replica is promoted (cluster-node-timeout
    // 2 s), and the old primary comes back as the new one's replica (writes that wait for a
    // replica go through again).
    tokio::task::block_in_place(|| cluster.nodes[victim].stop());
    eventually(Duration::from_secs(30), || {
        let promoted = cluster.primary_of(slot).filter(|p| *p != victim);
        std::future::ready(promoted)
    })
    .await;
    tokio::task::block_in_place(|| cluster.nodes[victim].restart());
    fleet.assert_all_completed_once(&accepted).await;
}

/// The bound on active aggregations holds across replicas: on one Redis exactly (each claim
/// checks and counts it in one script), on a cluster within the README's precision (a replica
/// admits one new aggregation at a time, so R replicas racing exceed it by at most R − 1).
async fn bound_holds_across_replicas(shared: SharedRedis, most: usize) {
    let flags = ["--max-active-aggregations", "4"];
    let fleet = Fleet::launch(&shared.url(), 3, &flags, &["--aggregation-duration", "30s"]).await;
    // 60 distinct Starts at once over 3 replicas, on 60 farms (no farm's queue bounds them).
    let calls: Vec<_> = (0..60u64)
        .map(|i| {
            let mut client = fleet.clients[usize::try_from(i % 3).expect("small")].clone();
            tokio::spawn(
                async move { client.start_aggregation(start_request(440 + i, 1, 1, &[GroupBy::QueueId])).await },
            )
        })
        .collect();
    let (mut accepted, mut busy) = (0, 0);
    for call in calls {
        match call.await.expect("joins") {
            Ok(_) => accepted += 1,
            Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                use tonic_types::StatusExt as _;
                assert_eq!(e.get_details_error_info().map(|i| i.reason), Some("GATEWAY_BUSY".into()), "{e:?}");
                busy += 1;
            }
            Err(e) => panic!("neither accepted nor busy: {e:?}"),
        }
    }
    eprintln!("accepted {accepted} of 60 with --max-active-aggregations 4; {busy} busy");
    assert_eq!(accepted + busy, 60);
    assert!((4..=most).contains(&accepted), "accepted {accepted} with --max-active-aggregations 4 (at most {most})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_one_redis_the_active_bound_holds_exactly_across_three_replicas() {
    bound_holds_across_replicas(SharedRedis::one().await, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_the_active_bound_holds_within_one_per_other_replica() {
    bound_holds_across_replicas(SharedRedis::cluster().await, 4 + 2).await;
}

/// A cluster whose default user has a password and whose gateway user is an ACL user (as
/// MemoryDB has it): the gateway connects with that user's name and password from the
/// `redis-cluster://` URL, its keys and channels all under the gateway's prefix (the ACL
/// allows no others), and is refused with a clear error under a wrong password.
#[tokio::test]
async fn a_cluster_with_acl_users_is_reached_as_the_gateway_user() {
    let extra = [
        "--requirepass",
        "admin-secret",
        "--masterauth",
        "admin-secret",
        "--user",
        "gateway",
        "on",
        ">gateway-secret",
        "~dsg:*",
        "&dsg:*",
        "+@all",
    ];
    let cluster = tokio::task::spawn_blocking(move || redis_cluster_with(&extra)).await.expect("joins");
    let seeds = cluster.cluster_url().replace("redis-cluster://", "");
    let url = format!("redis-cluster://gateway:gateway-secret@{seeds}");
    let mut fleet = Fleet::launch(&url, 1, &[], &["--aggregation-duration", "200ms"]).await;
    let accepted = fleet.start_many(460..462, 2).await;
    fleet.assert_all_completed_once(&accepted).await;

    let wrong = format!("redis-cluster://gateway:not-the-secret@{seeds}");
    let refused = deadline_stats_gateway::gateway::coordination::redis::RedisClient::connect(
        &deadline_stats_gateway::gateway::coordination::redis::RedisConfig::new(wrong),
    )
    .await;
    let message = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.to_lowercase().contains("auth") || message.contains("WRONGPASS"), "{message}");
}

/// A cluster that speaks TLS only (clients, the cluster bus and replication), with a
/// certificate of a private CA the gateway is told to trust (`SSL_CERT_FILE`, as a pod mounts
/// one): a `rediss-cluster://` URL reaches it, and an aggregation runs through it.
#[tokio::test]
async fn a_cluster_served_over_tls_only_is_reached_with_a_rediss_cluster_url() {
    let dir = test_dir("redis-tls");
    let ca = TestCa::new("redis test CA");
    let ca_path = ca.write(&dir, "ca.crt");
    let (server, node) = (ca.server(&dir, "redis"), ca.client(&dir, "redis-node", "redis-node"));
    let ca_file = ca_path.clone();
    let cluster = tokio::task::spawn_blocking(move || redis_tls_cluster(&server, &node, &ca_file));
    let cluster = cluster.await.expect("joins");
    let url = cluster.cluster_url().replace("redis-cluster://", "rediss-cluster://");
    let flags =
        ["--store", "redis", "--redis-url", &url, "--caller-start-rate", "0", "--poll-initial-interval", "50ms"];
    let ca_env = ca_path.display().to_string();
    let (_gateway, grpc, _) = spawn_serve(&flags, &[("SSL_CERT_FILE", &ca_env)]);
    let mut client = client_of(&grpc).await;
    let started = client.start_aggregation(start_request(470, 1, 1, &[GroupBy::QueueId])).await.expect("start");
    let id = started.into_inner().aggregation.expect("aggregation").aggregation_id;
    let done = wait_terminal(&mut client, &id).await.aggregation.expect("aggregation");
    assert_eq!(done.state(), deadline_stats_gateway::grpc::pb::AggregationState::Completed, "{done:?}");
}

/// Ids minted before ids carried their farm's bucket (8 hex digits of epoch, then 24 random)
/// answer that their state is gone (`AGGREGATION_LOST`), on one Redis and on a cluster; an
/// id of today's shape that never existed answers not found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_minted_before_buckets_answer_lost_and_unknown_ones_not_found() {
    use tonic_types::StatusExt as _;
    for shared in [SharedRedis::one().await, SharedRedis::cluster().await] {
        let mut fleet = Fleet::launch(&shared.url(), 1, &[], &["--aggregation-duration", "100ms"]).await;
        let accepted = fleet.start_many(480..481, 1).await;
        let client = &mut fleet.clients[0];
        for old in ["agg-9f3c2a7b5d1e4f6a8b0c2d4e6f8a0b1c", "agg-000000019f3c2a7b5d1e4f6a8b0c2d4e"] {
            let lost = client.get_aggregation(get_request(old, 0, "", Duration::ZERO)).await.expect_err("lost");
            assert_eq!(lost.code(), tonic::Code::NotFound, "{lost:?}");
            assert_eq!(lost.get_details_error_info().map(|i| i.reason), Some("AGGREGATION_LOST".into()), "{old}");
        }
        let mut never = accepted[0].id.clone();
        never.replace_range(never.len() - 4.., if never.ends_with("0000") { "ffff" } else { "0000" });
        let missing = client.get_aggregation(get_request(&never, 0, "", Duration::ZERO)).await.expect_err("missing");
        let reason = missing.get_details_error_info().map(|i| i.reason);
        assert_eq!(reason, Some("AGGREGATION_NOT_FOUND".into()), "{missing:?}");
        fleet.assert_all_completed_once(&accepted).await;
    }
}
