//! Gateway processes on a real Redis Cluster (three primaries with a replica each, on
//! loopback) while the cluster does what an operated one does: slots move between shards (a
//! resharding: `MIGRATING`/`IMPORTING`, keys moved one by one, clients sent `ASK` and
//! `TRYAGAIN`), and a primary dies and its replica takes over. Each test counts, at the
//! emulator, one upstream Start per aggregation and never two running on a farm, and checks
//! that every accepted aggregation ends COMPLETED with its rows.

mod common;

use common::*;
use deadline_stats_gateway::gateway::ids::Bucket;
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
