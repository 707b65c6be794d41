//! Several replicas acting as one gateway through one coordination store (here the in-memory
//! store shared in-process; the shared Redis store runs the same scenarios across processes):
//! identical Starts on different replicas coalesce, any replica reads any aggregation, and when
//! the replica driving a farm dies mid-poll another takes the farm over after its lease expires
//! and finishes the aggregation under the same id, without a second upstream Start.

mod common;

use common::*;
use deadline_stats_gateway::gateway::store::MemoryStore;
use deadline_stats_gateway::gateway::wakeups::Wakeups;
use deadline_stats_gateway::grpc::pb::{AggregationState, Disposition, GroupBy};
use std::sync::Arc;
use std::time::Duration;

const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test]
async fn a_farm_whose_driver_dies_mid_poll_is_taken_over_and_finished_under_the_same_id() {
    let emu = Arc::new(emulator(Duration::from_secs(2), HOUR).await);
    let wakeups = Arc::new(Wakeups::default());
    let store = Arc::new(MemoryStore::new(64 * 1024 * 1024, Duration::from_secs(30), wakeups.clone()));
    let mut config = fast_config(HOUR);
    config.lease_ttl = Duration::from_millis(600);
    let (mut a, b) = (
        replica(
            emu.clone(),
            Config { instance_id: "replica-a".into(), ..config.clone() },
            store.clone(),
            wakeups.clone(),
        )
        .await,
        replica(emu.clone(), Config { instance_id: "replica-b".into(), ..config }, store, wakeups).await,
    );
    let (mut on_a, mut on_b) = (a.client().await, b.client().await);
    let started =
        on_a.start_aggregation(start_request(70, 1, 1, &[GroupBy::QueueId])).await.expect("start").into_inner();
    let id = started.aggregation.expect("aggregation").aggregation_id;
    let joined =
        on_b.start_aggregation(start_request(70, 1, 1, &[GroupBy::QueueId])).await.expect("start").into_inner();
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
    assert_eq!(b.upstream(&farm(70)).await["start_calls"], 1, "the survivor resumed polling; no second Start");
}
