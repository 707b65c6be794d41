//! The coordination conformance suite: every property is one function over the trait, run
//! against the in-memory implementation and against a real `redis-server` (started per test on
//! a free loopback port). Leases exclude and fence; an expired lease is taken over and its old
//! holder fenced off; a rate shared through the store paces every replica together. Redis
//! alone: a policy that may evict keys is refused, and a change published by one replica wakes
//! another's waiters, also after Redis restarts.

mod common;

use common::*;
use deadline_stats_gateway::gateway::coordination::StoreError;
use deadline_stats_gateway::gateway::coordination::lease::{FarmLeases, MemoryLeases};
use deadline_stats_gateway::gateway::coordination::pacing::{LocalRate, Pacer, RateSource};
use deadline_stats_gateway::gateway::coordination::redis::{RedisClient, RedisConfig, RedisKeys};
use deadline_stats_gateway::gateway::coordination::wakeups::{Waiter, Wakeups};
use deadline_stats_gateway::gateway::ids::Bucket;
use deadline_stats_gateway::gateway::rate::Rate;
use std::sync::Arc;
use std::time::{Duration, Instant};

const TTL: Duration = Duration::from_secs(30);

async fn redis(server: &RedisServer, prefix: &str) -> RedisClient {
    RedisClient::connect(&RedisConfig::new(server.url()).with_prefix(prefix)).await.expect("connects to redis-server")
}

/// One holder at a time; release lets the next in with a larger token, and fences the first.
async fn leases_exclude_and_fence(a: &dyn FarmLeases, b: &dyn FarmLeases) {
    assert_eq!(b.holder("farm-1").await.expect("store"), None, "nobody holds it yet");
    let first = a.acquire("farm-1", "replica-a", TTL).await.expect("store").expect("free");
    assert_eq!(b.acquire("farm-1", "replica-b", TTL).await.expect("store"), None, "held by a");
    assert_eq!(b.holder("farm-1").await.expect("store").as_deref(), Some("replica-a"), "every replica sees who");
    assert!(a.renew(&first, TTL).await.expect("store"));
    assert!(a.is_current(&first).await.expect("store"));
    let other = b.acquire("farm-2", "replica-b", TTL).await.expect("store").expect("another farm is free");
    assert_eq!(other.holder, "replica-b");

    a.release(&first).await.expect("store");
    assert_eq!(a.holder("farm-1").await.expect("store"), None, "released");
    let second = b.acquire("farm-1", "replica-b", TTL).await.expect("store").expect("released");
    assert!(second.token > first.token, "tokens only grow: {} then {}", first.token, second.token);
    assert!(!a.renew(&first, TTL).await.expect("store"), "the old holder cannot renew");
    assert!(!a.is_current(&first).await.expect("store"), "the old holder is fenced off");
    assert!(b.is_current(&second).await.expect("store"));
    a.release(&first).await.expect("store");
    assert!(b.renew(&second, TTL).await.expect("store"), "a stale release does not drop the new holder's lease");
}

/// A lease not renewed expires; the next holder takes over and the paused one is fenced.
async fn an_expired_lease_is_taken_over(a: &dyn FarmLeases, b: &dyn FarmLeases) {
    let short = Duration::from_millis(200);
    let paused = a.acquire("farm-3", "replica-a", short).await.expect("store").expect("free");
    tokio::time::sleep(Duration::from_millis(350)).await;
    let next = b.acquire("farm-3", "replica-b", TTL).await.expect("store").expect("expired");
    assert!(next.token > paused.token);
    assert!(!a.renew(&paused, TTL).await.expect("store"), "the paused holder learns it lost the farm");
    assert!(!a.is_current(&paused).await.expect("store"), "and none of its writes may land");
}

/// Two replicas taking `n` tokens each from one shared rate are paced together.
async fn a_shared_rate_paces_every_replica_together(a: Arc<Pacer>, b: Arc<Pacer>, rate: Rate) {
    let n = 10;
    let begin = Instant::now();
    let take = |pacer: Arc<Pacer>| {
        tokio::spawn(async move {
            for _ in 0..n {
                pacer.ready().await;
            }
        })
    };
    let (x, y) = (take(a), take(b));
    x.await.expect("joins");
    y.await.expect("joins");
    let least = Duration::from_secs_f64((2 * n - rate.burst) as f64 / rate.per_second);
    assert!(begin.elapsed() >= least.mul_f64(0.95), "{} tokens in {:?}, at least {least:?}", 2 * n, begin.elapsed());
}

/// On paused time: a lease of this process expires by tokio's clock.
#[tokio::test(start_paused = true)]
async fn memory_leases_conform() {
    let leases = MemoryLeases::default();
    leases_exclude_and_fence(&leases, &leases).await;
    an_expired_lease_is_taken_over(&leases, &leases).await;
}

#[tokio::test]
async fn redis_leases_conform_across_two_replicas() {
    let server = tokio::task::spawn_blocking(redis_server).await.expect("joins");
    let (a, b) = (redis(&server, "dsg:").await, redis(&server, "dsg:").await);
    leases_exclude_and_fence(&a, &b).await;
    an_expired_lease_is_taken_over(&a, &b).await;
}

#[tokio::test]
async fn gateways_with_different_prefixes_share_a_redis_without_meeting() {
    let server = tokio::task::spawn_blocking(redis_server).await.expect("joins");
    let (blue, green) = (redis(&server, "blue:").await, redis(&server, "green:").await);
    assert!(blue.acquire("farm-1", "a", TTL).await.expect("store").is_some());
    assert!(green.acquire("farm-1", "a", TTL).await.expect("store").is_some(), "a different prefix, a different lease");
}

#[tokio::test]
async fn a_rate_in_memory_paces_the_handles_that_share_it() {
    let rate = Rate { per_second: 40.0, burst: 1 };
    let source: Arc<dyn RateSource> = Arc::new(LocalRate::new(rate).expect("paces"));
    let (a, b) = (Pacer::with_source(Some(source.clone()), rate), Pacer::with_source(Some(source), rate));
    a_shared_rate_paces_every_replica_together(Arc::new(a), Arc::new(b), rate).await;
}

#[tokio::test]
async fn a_rate_in_redis_paces_two_replicas_together() {
    let server = tokio::task::spawn_blocking(redis_server).await.expect("joins");
    let rate = Rate { per_second: 40.0, burst: 2 };
    let pacer = |r: RedisClient| {
        let source = r.rate("upstream-start", rate).map(|s| Arc::new(s) as Arc<dyn RateSource>);
        Arc::new(Pacer::with_source(source, rate))
    };
    let (a, b) = (pacer(redis(&server, "dsg:").await), pacer(redis(&server, "dsg:").await));
    a_shared_rate_paces_every_replica_together(a, b, rate).await;
}

#[tokio::test]
async fn an_unreachable_redis_is_an_error_never_a_lease() {
    let server = tokio::task::spawn_blocking(redis_server).await.expect("joins");
    let leases = redis(&server, "dsg:").await;
    let held = leases.acquire("farm-1", "a", TTL).await.expect("store").expect("free");
    let rate = leases.rate("upstream-get", Rate { per_second: 10.0, burst: 1 }).expect("paces");
    drop(server);
    // Each call waits out the client's reconnect attempts (seconds): asked at once, not in turn.
    let (refused, renewed, token) =
        tokio::join!(leases.acquire("farm-2", "a", TTL), leases.renew(&held, TTL), rate.try_take());
    assert!(matches!(refused, Err(StoreError::Unavailable(_))), "{refused:?}");
    assert!(matches!(renewed, Err(StoreError::Unavailable(_))), "renewal fails: stop working: {renewed:?}");
    assert!(matches!(token, Err(StoreError::Unavailable(_))), "no token is granted blindly: {token:?}");
}

#[tokio::test]
async fn a_redis_that_may_evict_keys_is_refused() {
    let safe = tokio::task::spawn_blocking(redis_server).await.expect("joins");
    redis(&safe, "dsg:").await.check_eviction_policy().await.expect("noeviction is safe");
    for policy in ["allkeys-lru", "volatile-lru"] {
        let server = tokio::task::spawn_blocking(move || redis_server_with(&["--maxmemory-policy", policy]))
            .await
            .expect("joins");
        let refused = redis(&server, "dsg:").await.check_eviction_policy().await;
        match refused {
            Err(e @ StoreError::EvictionPolicy { .. }) => {
                let message = e.to_string();
                assert!(message.contains(policy) && message.contains("noeviction"), "{message}")
            }
            other => panic!("{policy} accepted: {other:?}"),
        }
    }
}

/// A node of a Redis Cluster given as one server is refused at start-up with a message that
/// says what to use instead (one connection reaches one shard: the others' keys would answer
/// `MOVED` at run time); the same cluster as a `redis-cluster://` URL, or with `--redis-cluster`
/// (`RedisConfig::cluster`), passes, and a plain Redis is no cluster.
#[tokio::test]
async fn a_cluster_node_given_as_one_server_is_refused_with_what_to_use_instead() {
    let cluster = tokio::task::spawn_blocking(redis_cluster).await.expect("joins");
    let single = tokio::task::spawn_blocking(redis_server).await.expect("joins");
    redis(&single, "dsg:").await.check_not_a_cluster().await.expect("a plain Redis is no cluster");
    let client = RedisClient::connect(&RedisConfig::new(cluster.url())).await.expect("connects to a node");
    match client.check_not_a_cluster().await {
        Err(e @ StoreError::ClusterMode) => {
            let message = e.to_string();
            assert!(message.contains("cluster mode") && message.contains("redis-cluster://"), "{message}");
        }
        other => panic!("a cluster node accepted as one server: {other:?}"),
    }
    let url = RedisClient::connect(&RedisConfig::new(cluster.cluster_url())).await.expect("connects to the cluster");
    url.check_not_a_cluster().await.expect("a cluster URL passes");
    let seeds = cluster.nodes.iter().map(|n| n.url()).collect::<Vec<_>>().join(",").replace(",redis://", ",");
    let flagged = RedisClient::connect(&RedisConfig { cluster: true, ..RedisConfig::new(seeds) }).await;
    flagged.expect("connects to the cluster").check_not_a_cluster().await.expect("--redis-cluster passes");
}

/// Another replica's change: `id` published on the gateway's changes channel, with a client
/// of redis-server's own.
fn publish_change(server: &RedisServer, id: &str) -> Result<String, String> {
    server.cli(&["PUBLISH", "dsg:changes", id])
}

async fn woken(waiter: &mut Waiter, limit: Duration) -> bool {
    tokio::time::timeout(limit, waiter.woken()).await.is_ok()
}

#[tokio::test]
async fn a_change_on_one_replica_wakes_the_waiters_of_another_even_across_a_redis_restart() {
    let mut server = tokio::task::spawn_blocking(redis_server).await.expect("joins");
    let a = redis(&server, "dsg:").await;
    let wakeups = Arc::new(Wakeups::default());
    let (mut one, mut two) = (wakeups.waiter("agg-1"), wakeups.waiter("agg-2"));
    let stop = tokio_util::sync::CancellationToken::new();
    let relay = tokio::spawn({
        let (a, wakeups, stop) = (a.clone(), wakeups.clone(), stop.clone());
        async move { a.relay_changes(wakeups, stop).await }
    });
    // The relay wakes everyone once it has subscribed; from then on, changes arrive.
    assert!(woken(&mut one, Duration::from_secs(10)).await, "subscribed");
    assert!(woken(&mut two, Duration::from_secs(1)).await);
    publish_change(&server, "agg-1").expect("publishes");
    assert!(woken(&mut one, Duration::from_secs(10)).await, "replica b's change reached replica a");
    assert!(!woken(&mut two, Duration::from_millis(200)).await, "only that aggregation's waiters");

    server.restart();
    assert!(woken(&mut two, Duration::from_secs(30)).await, "re-subscribed: every waiter re-reads");
    eventually(Duration::from_secs(30), || std::future::ready(publish_change(&server, "agg-1").ok())).await;
    assert!(woken(&mut one, Duration::from_secs(10)).await, "changes flow again without restarting anything");
    stop.cancel();
    relay.await.expect("the relay stops when told");
}

/// On a Redis Cluster changes are published per bucket on the shard that holds it (`SPUBLISH`):
/// one replica's subscription hears every bucket, on every shard, and only the changed id's
/// waiters wake.
#[tokio::test]
async fn on_a_cluster_a_change_in_any_bucket_wakes_the_waiters_of_another_replica() {
    let cluster = SharedRedis::cluster().await;
    let a = RedisClient::connect(&RedisConfig::new(cluster.url())).await.expect("connects to the cluster");
    let wakeups = Arc::new(Wakeups::default());
    let ids: Vec<String> = Bucket::all().map(|b| format!("agg-changed-in-{}", b.hex())).collect();
    let mut waiters: Vec<Waiter> = ids.iter().map(|id| wakeups.waiter(id)).collect();
    let mut bystander = wakeups.waiter("agg-unchanged");
    let stop = tokio_util::sync::CancellationToken::new();
    let relay = tokio::spawn({
        let (a, wakeups, stop) = (a.clone(), wakeups.clone(), stop.clone());
        async move { a.relay_changes(wakeups, stop).await }
    });
    // Subscribed (on every shard) once the first wake-all arrives; let the rest settle.
    assert!(woken(&mut bystander, Duration::from_secs(10)).await, "subscribed");
    tokio::time::sleep(Duration::from_millis(500)).await;
    for waiter in waiters.iter_mut().chain(std::iter::once(&mut bystander)) {
        let _ = woken(waiter, Duration::from_millis(10)).await;
    }
    let keys = RedisKeys::new("dsg:", true);
    let mut conn = cluster.conn().await;
    for (bucket, id) in Bucket::all().zip(&ids) {
        let _: i64 =
            ::redis::cmd("SPUBLISH").arg(keys.changes(bucket)).arg(id).query_async(&mut conn).await.expect("SPUBLISH");
    }
    for (waiter, id) in waiters.iter_mut().zip(&ids) {
        assert!(woken(waiter, Duration::from_secs(10)).await, "{id}'s change reached the other replica");
    }
    assert!(!woken(&mut bystander, Duration::from_millis(200)).await, "only the changed ids' waiters");
    stop.cancel();
    relay.await.expect("the relay stops when told");
}
