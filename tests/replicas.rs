//! Several replicas acting as one gateway through one coordination store: the in-memory store
//! shared in-process, and two Redis stores on one real `redis-server`:
//! identical Starts on different replicas coalesce, any replica reads any aggregation, and when
//! the replica driving a farm dies mid-poll another takes the farm over after its lease expires
//! and finishes the aggregation under the same id, without a second upstream Start.

mod common;

use common::*;
use deadline_stats_gateway::gateway::redis::RedisCoordination;
use deadline_stats_gateway::gateway::redis_store::RedisStore;
use deadline_stats_gateway::gateway::results::ResultsCache;
use deadline_stats_gateway::gateway::store::{AggregationStore, MemoryStore};
use deadline_stats_gateway::gateway::wakeups::Wakeups;
use deadline_stats_gateway::grpc::pb::{AggregationState, Disposition, GroupBy};
use std::sync::Arc;
use std::time::Duration;

const HOUR: Duration = Duration::from_secs(3600);

/// What one replica runs on: its handle of the shared store, its results cache, its wake-ups.
type Parts = (Arc<dyn AggregationStore>, Arc<ResultsCache>, Arc<Wakeups>);

/// Two replicas (sharing state through their stores) run one aggregation; the one that drives
/// it dies mid-poll and the other finishes it under the same id.
async fn takeover(replicas: [Parts; 2], farm_n: u64) {
    let emu = Arc::new(emulator(Duration::from_secs(2), HOUR).await);
    let mut config = fast_config(HOUR);
    config.lease_ttl = Duration::from_millis(600);
    let [(store_a, results_a, wakeups_a), (store_b, results_b, wakeups_b)] = replicas;
    let mut a = replica(
        emu.clone(),
        Config { instance_id: "replica-a".into(), ..config.clone() },
        store_a,
        results_a,
        wakeups_a,
    )
    .await;
    let b =
        replica(emu.clone(), Config { instance_id: "replica-b".into(), ..config }, store_b, results_b, wakeups_b).await;
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
    eventually(Duration::from_secs(10), || {
        let (mut client, id) = (on_b.clone(), id.clone());
        async move {
            let page = client.get_aggregation(get_request(&id, 0, "", Duration::ZERO)).await.ok()?.into_inner();
            (page.aggregation?.state() == AggregationState::Running).then_some(())
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
    let results = store.results();
    let shared: Arc<dyn AggregationStore> = store;
    takeover([(shared.clone(), results.clone(), wakeups.clone()), (shared, results, wakeups)], 70).await;
}

#[tokio::test]
async fn on_redis_a_farm_whose_driver_dies_is_taken_over_under_the_same_id() {
    let server = tokio::task::spawn_blocking(redis_server).await.expect("joins");
    let stop = tokio_util::sync::CancellationToken::new();
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let redis = RedisCoordination::connect(&server.url(), "dsg:").await.expect("connects");
        let wakeups = Arc::new(Wakeups::default());
        let results = Arc::new(ResultsCache::new(64 * 1024 * 1024, Duration::from_secs(30), Box::new(|_, _| {})));
        tokio::spawn({
            let (redis, wakeups, stop) = (redis.clone(), wakeups.clone(), stop.clone());
            async move { redis.relay_changes(wakeups, stop).await }
        });
        let store: Arc<dyn AggregationStore> = Arc::new(RedisStore::new(redis, results.clone(), wakeups.clone()));
        replicas.push((store, results, wakeups));
    }
    let [first, second]: [_; 2] = replicas.try_into().unwrap_or_else(|_| panic!("two replicas"));
    takeover([first, second], 71).await;
    stop.cancel();
}
