//! Refresh-ahead end to end: a gateway in front of the emulator through the real SDK, with
//! results valid for seconds instead of an hour. A key started three times is re-run upstream
//! in the background before its result expires; a Start after the old expiry is CACHED with the
//! new id at once; the old id reads until its own expiry; a key asked for less often is not
//! refreshed. On the memory store, on Redis, and with two replicas sharing Redis (one refresh
//! between them).

mod common;

use common::*;
use deadline_stats_gateway::gateway::refresh::RefreshConfig;
use deadline_stats_gateway::grpc::pb::{AggregationState, Disposition, GroupBy};
use deadline_stats_gateway::telemetry::metrics::OutcomeLabels;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Results live 10 s; popular ones are refreshed with 5 s left.
const VALIDITY: Duration = Duration::from_secs(10);
const AHEAD: Duration = Duration::from_secs(5);

fn config(ahead: Duration) -> Config {
    let mut c = fast_config(VALIDITY);
    c.refresh = RefreshConfig { ahead, min_hits: 3 };
    c
}

async fn memory_gateway(ahead: Duration) -> TestGateway {
    gateway(Duration::from_millis(300), config(ahead)).await
}

/// A replica on the Redis at `url`, in front of `emu`.
async fn redis_replica(emu: Arc<deadline_stats_gateway::emulator::EmulatorHandle>, url: &str) -> TestGateway {
    let config = config(AHEAD);
    let coordination = on_redis(url, &config).await;
    replica(emu, config, coordination).await
}

fn expiry(a: &deadline_stats_gateway::grpc::pb::Aggregation) -> SystemTime {
    let t = a.expire_time.expect("a completed aggregation expires");
    SystemTime::UNIX_EPOCH + Duration::new(u64::try_from(t.seconds).expect("after 1970"), t.nanos as u32)
}

async fn start(client: &mut Client, farm_n: u64, days: i64) -> (String, Disposition) {
    start_by(client, farm_n, days, "caller-0").await
}

/// [`start`] by the caller named `caller` (`x-caller-id`: a result is popular when several
/// callers start it, not one caller several times).
async fn start_by(client: &mut Client, farm_n: u64, days: i64, caller: &str) -> (String, Disposition) {
    let mut request = tonic::Request::new(start_request(farm_n, 1, days, &[GroupBy::QueueId]));
    request.metadata_mut().insert("x-caller-id", caller.parse().expect("an ASCII caller id"));
    let answer = client.start_aggregation(request).await.expect("start").into_inner();
    let disposition = answer.disposition();
    (answer.aggregation.expect("aggregation").aggregation_id, disposition)
}

/// Every row of a completed aggregation, rendered whole, in order.
async fn rows_of(client: &mut Client, id: &str) -> Vec<String> {
    let page = client.get_aggregation(get_request(id, 1000, "", Duration::ZERO)).await.expect("page").into_inner();
    page.statistics.iter().map(|s| format!("{s:?}")).collect()
}

/// The key of `farm_n` started by three callers through `clients` in turn (the first Start
/// waits for its result): popular. Its id and first aggregation.
async fn make_popular(clients: &mut [Client], farm_n: u64) -> (String, deadline_stats_gateway::grpc::pb::Aggregation) {
    let (id, disposition) = start(&mut clients[0], farm_n, 1).await;
    assert_eq!(disposition, Disposition::Started);
    let done = wait_terminal(&mut clients[0], &id).await.aggregation.expect("aggregation");
    assert_eq!(done.state(), AggregationState::Completed, "{done:?}");
    for n in 1..3 {
        let i = n % clients.len();
        let by = format!("caller-{n}");
        assert_eq!(start_by(&mut clients[i], farm_n, 1, &by).await, (id.clone(), Disposition::Cached));
    }
    (id, done)
}

/// Waits for the refresh's upstream Start and checks everything around it: before the old
/// expiry, the old id still reads; after it, a Start is CACHED with the new id and the same
/// rows, and the old id answers expired.
async fn refreshed_before_expiry(gateways: &[&TestGateway], farm_n: u64) {
    let mut clients = Vec::new();
    for g in gateways {
        clients.push(g.client().await);
    }
    let (old_id, old) = make_popular(&mut clients, farm_n).await;
    let old_rows = rows_of(&mut clients[0], &old_id).await;
    let old_expiry = expiry(&old);
    let cold_farm = farm_n + 1;
    let (cold_id, _) = start(&mut clients[0], cold_farm, 1).await;
    wait_terminal(&mut clients[0], &cold_id).await;
    start(&mut clients[0], cold_farm, 1).await;

    let g = gateways[0];
    eventually(VALIDITY, || async { (g.upstream(&farm(farm_n)).await["start_calls"] == 2).then_some(()) }).await;
    assert!(SystemTime::now() < old_expiry, "the refresh started upstream before the old result expired");
    let read = clients[0].get_aggregation(get_request(&old_id, 10, "", Duration::ZERO)).await;
    assert!(read.is_ok(), "the old id reads until its own expiry: {read:?}");

    // Past the old expiry: the new result answers at once.
    let left = old_expiry.duration_since(SystemTime::now()).unwrap_or_default();
    tokio::time::sleep(left + Duration::from_millis(200)).await;
    let (new_id, disposition) = start(&mut clients[0], farm_n, 1).await;
    assert_eq!(disposition, Disposition::Cached, "no wait after the old expiry");
    assert_ne!(new_id, old_id, "the refresh's id");
    assert_eq!(rows_of(&mut clients[0], &new_id).await, old_rows, "the same rows, renewed");
    let gone = clients[0].get_aggregation(get_request(&old_id, 10, "", Duration::ZERO)).await.expect_err("expired");
    assert_eq!(gone.code(), tonic::Code::NotFound, "{gone:?}");
    assert_eq!(g.upstream(&farm(farm_n)).await["start_calls"], 2, "one refresh");
    assert_eq!(g.upstream(&farm(cold_farm)).await["start_calls"], 1, "a key asked for twice is not refreshed");
    let count = |outcome| {
        gateways.iter().map(|g| g.metrics.refreshes.get_or_create(&OutcomeLabels { outcome }).get()).sum::<u64>()
    };
    assert_eq!((count("queued"), count("completed"), count("failed")), (1, 1, 0));
}

#[tokio::test]
async fn on_the_memory_store_a_popular_result_is_refreshed_before_it_expires() {
    let g = memory_gateway(AHEAD).await;
    refreshed_before_expiry(&[&g], 140).await;
}

#[tokio::test]
async fn on_redis_a_popular_result_is_refreshed_before_it_expires() {
    let server = tokio::task::spawn_blocking(redis_server).await.expect("joins");
    let emu = Arc::new(emulator(Duration::from_millis(300), VALIDITY).await);
    let g = redis_replica(emu, &server.url()).await;
    refreshed_before_expiry(&[&g], 142).await;
}

#[tokio::test]
async fn two_replicas_on_redis_count_hits_together_and_refresh_once() {
    let server = tokio::task::spawn_blocking(redis_server).await.expect("joins");
    let emu = Arc::new(emulator(Duration::from_millis(300), VALIDITY).await);
    let a = redis_replica(emu.clone(), &server.url()).await;
    let b = redis_replica(emu, &server.url()).await;
    refreshed_before_expiry(&[&a, &b], 144).await;
}

#[tokio::test]
async fn with_refresh_ahead_off_nothing_is_refreshed() {
    let g = memory_gateway(Duration::ZERO).await;
    let mut clients = vec![g.client().await];
    let (_, old) = make_popular(&mut clients, 146).await;
    let left = expiry(&old).duration_since(SystemTime::now()).unwrap_or_default();
    tokio::time::sleep(left + Duration::from_millis(200)).await;
    assert_eq!(g.upstream(&farm(146)).await["start_calls"], 1, "no refresh");
    assert_eq!(start(&mut clients[0], 146, 1).await.1, Disposition::Started, "the key went cold");
}
