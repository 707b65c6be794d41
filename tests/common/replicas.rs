//! Gateway processes sharing one `redis-server`, and what the tests read of their shared
//! state: the Redis keys themselves and the emulator's counters.

use super::{Running, http, spawn_replica};
use deadline_stats_gateway::grpc::pb::aggregation_service_client::AggregationServiceClient;

/// A tonic client of one gateway process.
pub type Client = AggregationServiceClient<tonic::transport::Channel>;

/// A tonic client of the gateway at `url`.
pub async fn client_of(url: &str) -> Client {
    let channel =
        tonic::transport::Channel::from_shared(url.to_owned()).expect("URL").connect().await.expect("connects");
    Client::new(channel)
}

/// `serve --store redis` on `redis` in front of `endpoint`, as replica `n` (its instance id is
/// `replica-n`), with a 1 s lease, quick polls, no caller or upstream-Start limits, and `extra`
/// flags.
pub fn redis_replica(endpoint: &str, redis: &str, n: usize, extra: &[&str]) -> (Running, String, String) {
    let id = format!("replica-{n}");
    let mut flags = vec![
        "--store",
        "redis",
        "--redis-url",
        redis,
        "--instance-id",
        &id,
        "--poll-initial-interval",
        "100ms",
        "--upstream-start-rate",
        "0",
    ];
    for unlimited in ["--caller-start-rate", "--caller-get-rate"] {
        if !extra.contains(&unlimited) {
            flags.extend_from_slice(&[unlimited, "0"]);
        }
    }
    if !extra.contains(&"--lease-ttl") {
        flags.extend_from_slice(&["--lease-ttl", "1500ms"]);
    }
    if !extra.contains(&"--redis-response-timeout") {
        flags.extend_from_slice(&["--redis-response-timeout", "500ms"]);
    }
    flags.extend_from_slice(extra);
    spawn_replica(endpoint, &flags)
}

/// The emulator process's counters (`GET /_emulator/stats`): every farm's, and its STS's.
pub async fn emulator_stats(endpoint: &str) -> serde_json::Value {
    let (status, _, body) = http("GET", &format!("{endpoint}/_emulator/stats"), None, &[]).await;
    assert_eq!(status, 200, "stats answers: {body}");
    serde_json::from_str(&body).expect("stats are JSON")
}

/// The emulator process's counters for `farm`.
pub async fn upstream_of(endpoint: &str, farm: &str) -> serde_json::Value {
    emulator_stats(endpoint).await["farms"][farm].clone()
}

/// Sets the emulator process's faults (the JSON of `POST /_emulator/faults`).
pub async fn faults_of(endpoint: &str, spec: serde_json::Value) {
    let (status, _, body) = http("POST", &format!("{endpoint}/_emulator/faults"), Some(&spec.to_string()), &[]).await;
    assert_eq!(status, 200, "{body}");
}

/// A connection to the Redis at `url`, for reading (and damaging) the gateway's keys.
pub async fn redis_conn(url: &str) -> ::redis::aio::MultiplexedConnection {
    ::redis::Client::open(url).expect("URL").get_multiplexed_async_connection().await.expect("connects")
}

/// The stored record of `id` (its JSON), under the default prefix.
pub async fn record_json(conn: &mut impl ::redis::aio::ConnectionLike, id: &str) -> Option<serde_json::Value> {
    let json: Option<String> = ::redis::cmd("HGET")
        .arg(deadline_stats_gateway::gateway::coordination::redis::RedisKeys::new("dsg:", false).record(id))
        .arg("json")
        .query_async(conn)
        .await
        .ok()?;
    serde_json::from_str(&json?).ok()
}

/// Which `replica-n` holds the lease of `farm_id`: the lease's value is `token:replica-n-pid`.
pub async fn lease_holder(conn: &mut impl ::redis::aio::ConnectionLike, farm_id: &str) -> Option<usize> {
    let lease: Option<String> = ::redis::cmd("GET")
        .arg(deadline_stats_gateway::gateway::coordination::redis::RedisKeys::new("dsg:", false).lease(farm_id))
        .query_async(conn)
        .await
        .ok()?;
    lease?.split(':').nth(1)?.strip_prefix("replica-")?.split('-').next()?.parse().ok()
}
