//! WatchAggregation end to end: a real tonic client on a gateway served on loopback, in front of
//! the emulator through the SDK. The stream sends the current state at once, then each change
//! in order, and ends after the terminal state; many watchers share one source; a client that
//! goes away frees its stream; shutdown ends streams with the latest state; estimates appear
//! once a run was observed on the farm. On the memory store and with two replicas on Redis.

mod common;

use common::*;
use deadline_stats_gateway::grpc::pb::{Aggregation, AggregationState, GroupBy, WatchAggregationRequest};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tonic::Streaming;

const HOUR: Duration = Duration::from_secs(3600);

async fn start(client: &mut Client, farm_n: u64, days: i64) -> String {
    let request = start_request(farm_n, 1, days, &[GroupBy::QueueId]);
    client.start_aggregation(request).await.expect("start").into_inner().aggregation.expect("a").aggregation_id
}

async fn watch(client: &mut Client, id: &str) -> Streaming<Aggregation> {
    let request = WatchAggregationRequest { aggregation_id: id.to_owned() };
    client.watch_aggregation(request).await.expect("watch").into_inner()
}

/// Every message until the stream ends (bounded in time).
async fn all(mut stream: Streaming<Aggregation>) -> Vec<Aggregation> {
    let mut seen = Vec::new();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(30), stream.message()).await.expect("ends in time");
        match next.expect("no error") {
            Some(a) => seen.push(a),
            None => return seen,
        }
    }
}

fn at(t: Option<prost_types::Timestamp>) -> Option<SystemTime> {
    t.map(|t| SystemTime::try_from(t).expect("a valid time"))
}

#[tokio::test]
async fn a_watch_sends_each_change_in_order_and_ends_after_the_terminal_state() {
    let g = gateway(Duration::from_millis(400), fast_config(HOUR)).await;
    let mut client = g.client().await;
    let ahead = start(&mut client, 150, 1).await;
    let id = start(&mut client, 150, 2).await;
    let seen = all(watch(&mut client, &id).await).await;
    let states: Vec<AggregationState> = seen.iter().map(Aggregation::state).collect();
    assert_eq!(states.first(), Some(&AggregationState::Queued), "{states:?}");
    assert_eq!(seen[0].queue_position, 1, "behind the first");
    assert_eq!(states.last(), Some(&AggregationState::Completed), "{states:?}");
    assert!(states.windows(2).all(|w| w[0] as i32 <= w[1] as i32), "never backwards: {states:?}");
    assert!(states.contains(&AggregationState::Running), "{states:?}");
    assert!(seen.windows(2).all(|w| w[0] != w[1]), "one message per change, no repeats");
    assert!(seen.iter().all(|a| a.aggregation_id == id));
    let first = all(watch(&mut client, &ahead).await).await;
    assert_eq!(first.len(), 1, "a terminal aggregation: its state, then the end");
    assert_eq!(g.gateway.watch_sources(), 0, "no source outlives its aggregation");
}

#[tokio::test]
async fn many_watchers_of_one_aggregation_share_one_source_and_vanishing_clients_free_theirs() {
    let g = gateway(Duration::from_millis(1500), fast_config(HOUR)).await;
    let mut client = g.client().await;
    let id = start(&mut client, 151, 1).await;
    let mut watchers = Vec::new();
    for _ in 0..50 {
        watchers.push(watch(&mut client, &id).await);
    }
    let mut gone = Vec::new();
    for _ in 0..20 {
        let mut other = g.client().await;
        gone.push((watch(&mut other, &id).await, other));
    }
    assert_eq!(g.gateway.watch_sources(), 1, "70 watchers, one source");
    assert_eq!(g.metrics.watch_streams.get(), 70);
    drop(gone);
    eventually(Duration::from_secs(10), || async { (g.metrics.watch_streams.get() == 50).then_some(()) }).await;
    let ends = futures_all(watchers).await;
    assert!(ends.iter().all(|last| last.state() == AggregationState::Completed), "every watcher saw the end");
    eventually(Duration::from_secs(10), || async {
        (g.metrics.watch_streams.get() == 0 && g.gateway.watch_sources() == 0).then_some(())
    })
    .await;
}

/// The last message of each stream.
async fn futures_all(streams: Vec<Streaming<Aggregation>>) -> Vec<Aggregation> {
    let tasks: Vec<_> = streams.into_iter().map(|s| tokio::spawn(all(s))).collect();
    let mut last = Vec::new();
    for t in tasks {
        last.push(t.await.expect("joins").pop().expect("at least one message"));
    }
    last
}

#[tokio::test]
async fn shutdown_ends_a_watch_with_the_latest_state() {
    let g = gateway(Duration::from_secs(30), fast_config(HOUR)).await;
    let mut client = g.client().await;
    let id = start(&mut client, 152, 1).await;
    let mut stream = watch(&mut client, &id).await;
    let first = stream.message().await.expect("ok").expect("the current state");
    assert!(matches!(first.state(), AggregationState::Queued | AggregationState::Running));
    g.gateway.shutdown();
    let rest = all(stream).await;
    assert!(rest.iter().all(|a| !matches!(a.state(), AggregationState::Completed)), "{rest:?}");
}

#[tokio::test]
async fn a_watch_of_an_unknown_id_is_not_found_and_an_empty_one_invalid() {
    let g = gateway(Duration::from_millis(100), fast_config(HOUR)).await;
    let mut client = g.client().await;
    let unknown = client
        .watch_aggregation(WatchAggregationRequest { aggregation_id: "agg-0123456789abcdef0123456789abcdef".into() })
        .await
        .expect_err("unknown");
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    let empty =
        client.watch_aggregation(WatchAggregationRequest { aggregation_id: String::new() }).await.expect_err("empty");
    assert_eq!(empty.code(), tonic::Code::InvalidArgument, "{empty:?}");
}

/// Runs one aggregation of `days` on `farm_n` to its end, returning what a watcher saw.
async fn run(client: &mut Client, farm_n: u64, days: i64) -> Vec<Aggregation> {
    let id = start(client, farm_n, days).await;
    all(watch(client, &id).await).await
}

/// How many estimate errors were measured, as the exported metrics say.
fn estimate_errors(g: &TestGateway) -> u64 {
    let text = g.metrics.encode();
    let line = text.lines().find(|l| l.starts_with("dsg_estimate_error_seconds_count")).expect("exported");
    line.rsplit(' ').next().and_then(|n| n.parse().ok()).expect("a count")
}

async fn estimates_appear_after_the_first_observed_run(g: &TestGateway, farm_n: u64) {
    let mut client = g.client().await;
    let first = run(&mut client, farm_n, 1).await;
    assert!(
        first.iter().all(|a| a.estimated_completion_time.is_none() && a.estimated_start_time.is_none()),
        "nothing observed on the farm yet: no estimate: {first:?}"
    );
    let errors_before = estimate_errors(g);
    let mut client_b = g.client().await;
    // Two more of the same size: one runs while the other waits behind it.
    let running = start(&mut client, farm_n, 2).await;
    let answer = client_b
        .start_aggregation(start_request(farm_n, 1, 3, &[GroupBy::QueueId]))
        .await
        .expect("start")
        .into_inner()
        .aggregation
        .expect("a");
    assert!(
        answer.estimated_start_time.is_some() && answer.estimated_completion_time.is_some(),
        "the Start's answer predicts too: {answer:?}"
    );
    let queued = answer.aggregation_id;
    let (running, queued) = tokio::join!(async { all(watch(&mut client, &running).await).await }, async {
        all(watch(&mut client_b, &queued).await).await
    });
    let predicted = running
        .iter()
        .find(|a| a.state() == AggregationState::Running && a.estimated_completion_time.is_some())
        .expect("a running aggregation gets an estimate once a run was observed");
    let done_by = SystemTime::now();
    let predicted_at = at(predicted.estimated_completion_time).expect("estimate");
    let error = done_by.duration_since(predicted_at).unwrap_or_else(|e| e.duration());
    assert!(error < Duration::from_secs(3), "the prediction is close to what happened: off by {error:?}");
    let waiting = queued.iter().find(|a| a.state() == AggregationState::Queued).expect("it waited");
    let (starts, completes) = (at(waiting.estimated_start_time), at(waiting.estimated_completion_time));
    assert!(starts.is_some() && completes > starts, "a queued one has both: {waiting:?}");
    assert!(estimate_errors(g) > errors_before, "the error is measured after the fact");
}

#[tokio::test]
async fn on_the_memory_store_estimates_appear_after_the_first_observed_run() {
    let g = gateway(Duration::from_millis(800), fast_config(HOUR)).await;
    estimates_appear_after_the_first_observed_run(&g, 153).await;
}

/// A replica on the Redis at `url`, in front of `emu`.
async fn redis_replica(emu: Arc<deadline_stats_gateway::emulator::EmulatorHandle>, url: &str) -> TestGateway {
    let config = fast_config(HOUR);
    let coordination = on_redis(url, &config).await;
    replica(emu, config, coordination).await
}

#[tokio::test]
async fn on_redis_a_watcher_on_one_replica_follows_what_another_drives_with_the_same_estimates() {
    let server = tokio::task::spawn_blocking(redis_server).await.expect("joins");
    let emu = Arc::new(emulator(Duration::from_millis(800), HOUR).await);
    let (a, b) = (redis_replica(emu.clone(), &server.url()).await, redis_replica(emu, &server.url()).await);
    estimates_appear_after_the_first_observed_run(&a, 154).await;
    // Started on a, watched on b and a: both see the same states and the same prediction.
    let (mut on_a, mut on_b) = (a.client().await, b.client().await);
    let id = start(&mut on_a, 154, 4).await;
    let (from_a, from_b) = tokio::join!(async { all(watch(&mut on_a, &id).await).await }, async {
        all(watch(&mut on_b, &id).await).await
    });
    assert_eq!(from_b.last().map(Aggregation::state), Some(AggregationState::Completed), "{from_b:?}");
    let estimate = |seen: &[Aggregation]| {
        seen.iter().filter(|x| x.state() == AggregationState::Running).find_map(|x| x.estimated_completion_time)
    };
    assert!(estimate(&from_a).is_some(), "{from_a:#?}");
    assert_eq!(estimate(&from_a), estimate(&from_b), "one estimate per aggregation, whichever replica");
}
