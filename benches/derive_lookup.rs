//! What looking for a cached result that contains a request costs a Start
//! (`AggregationStore::containing`) on a farm holding 10,000 completed results: 1,000 in the
//! request's own family (one day each, one of them a week that contains the request) and 9,000
//! in nine other families. Measured on the memory store, and on Redis when `redis-server` is on
//! the PATH (a server of its own on a free loopback port): a hit (the week) and a miss; and,
//! for scale, one PING round trip to that Redis from the same harness.

use criterion::{Criterion, criterion_group, criterion_main};
use deadline_stats_gateway::domain::{AggregationRequest, GroupBy, Resources, Statistic, ids::format_id};
use deadline_stats_gateway::gateway::coordination::redis::RedisConfig;
use deadline_stats_gateway::gateway::coordination::{
    AggregationStore, Coordination, CoordinationSettings, Freshness, Limits, MemoryStore, Wakeups, Written,
};
use deadline_stats_gateway::gateway::ids::{Bucket, IdMinter};
use deadline_stats_gateway::gateway::key::CanonicalKey;
use deadline_stats_gateway::gateway::rate::{CallerLimits, Rate};
use deadline_stats_gateway::gateway::rows::RowBlockBuilder;
use deadline_stats_gateway::gateway::{AggregationRecord, Priority, State};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

const DAY: i64 = 86_400;
const ROOMY: Limits =
    Limits { queue_capacity: 100_000, max_live: 100_000, max_farms: 100, caller_capacity: 100_000, fair: true };
const ANY: Freshness = Freshness { min_remaining: Duration::ZERO, max_staleness: None };

/// Queue 0 of farm 1 from day `from` for `days` days, daily, grouped by queue and the `family`th
/// other group.
fn key(family: usize, from: i64, days: i64) -> CanonicalKey {
    let groups = [
        GroupBy::UsageType,
        GroupBy::UserId,
        GroupBy::JobId,
        GroupBy::InstanceType,
        GroupBy::LicenseProduct,
        GroupBy::FleetId,
    ];
    let mut group_by = vec![GroupBy::QueueId];
    group_by.extend(groups.iter().enumerate().filter(|(i, _)| (family >> i) & 1 == 1).map(|(_, g)| *g));
    let start = chrono::DateTime::from_timestamp(1_790_812_800 + from * DAY, 0).expect("start");
    CanonicalKey::new(&AggregationRequest {
        farm_id: format_id("farm-", 1, 1),
        resources: Resources::Queues(vec![format_id("queue-", 3, 0)]),
        start_time: start,
        end_time: start + chrono::Duration::days(days),
        timezone: None,
        period: None,
        group_by,
        statistics: vec![Statistic::Sum, Statistic::Avg],
    })
}

/// 10,000 completed results on one farm, as the gateway leaves them.
async fn fill(store: &dyn AggregationStore) {
    let farm = format_id("farm-", 1, 1);
    let epoch = store.epoch(Bucket::of_farm(&farm)).await.expect("store").unwrap_or_default();
    let ids = IdMinter::tagged(epoch);
    let lease = store.leases().acquire(&farm, "bench", Duration::from_secs(3600)).await.expect("store").expect("free");
    let mut keys: Vec<CanonicalKey> = (0..1000).flat_map(|d| (0..10).map(move |f| key(f, d, 1))).collect();
    keys[0] = key(0, 100, 7);
    for k in keys {
        let claimed = store.claim(&k, &ANY, &ROOMY, ids.mint(k.farm_id()), "bench", Priority::Interactive).await;
        let mut done = AggregationRecord::clone(&claimed.expect("room").record);
        done.state = State::Completed;
        done.expire_time = Some(SystemTime::now() + Duration::from_secs(3600));
        done.data_time = Some(SystemTime::now());
        let mut rows = RowBlockBuilder::new(|_, buf| buf.extend_from_slice(b"row"));
        rows.push(&Default::default());
        let written = store.finish(&lease, done, Some(Arc::new(rows.finish()))).await.expect("store");
        assert_eq!(written, Written::Done);
    }
}

fn lookups(c: &mut Criterion, name: &str, runtime: &tokio::runtime::Runtime, store: &dyn AggregationStore) {
    let (inside, outside) = (key(0, 102, 2), key(0, 2000, 1));
    assert!(runtime.block_on(store.containing(&inside, &ANY)).expect("store").is_some(), "the week contains it");
    c.bench_function(&format!("containing_10k_{name}_hit"), |b| {
        b.iter(|| runtime.block_on(store.containing(black_box(&inside), &ANY)))
    });
    c.bench_function(&format!("containing_10k_{name}_miss"), |b| {
        b.iter(|| runtime.block_on(store.containing(black_box(&outside), &ANY)))
    });
}

fn derive_lookup(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let memory = MemoryStore::new(1 << 30, Duration::ZERO, Arc::new(Wakeups::default()));
    runtime.block_on(fill(&memory));
    lookups(c, "memory", &runtime, &memory);

    let Some(server) = RedisServer::start() else {
        eprintln!("redis-server is not on the PATH: the Redis lookups are not measured");
        return;
    };
    let settings = CoordinationSettings {
        cache_max_bytes: 1 << 30,
        result_grace: Duration::ZERO,
        upstream_start: Rate { per_second: 0.0, burst: 1 },
        upstream_get: Rate { per_second: 0.0, burst: 1 },
        caller_start: Rate { per_second: 0.0, burst: 1 },
        caller_get: Rate { per_second: 0.0, burst: 1 },
        caller_limits: CallerLimits::Local,
        clock: deadline_stats_gateway::gateway::clock::Clock::system(),
    };
    let url = format!("redis://127.0.0.1:{}", server.port);
    let coordination = runtime.block_on(Coordination::redis(&settings, &RedisConfig::new(&url))).expect("connects");
    let store = coordination.store;
    runtime.block_on(fill(store.as_ref()));
    lookups(c, "redis", &runtime, store.as_ref());
    // For scale: one round trip to the same Redis from the same harness, doing nothing.
    let client = redis::Client::open(url.as_str()).expect("a URL");
    let mut conn = runtime.block_on(client.get_multiplexed_async_connection()).expect("connects");
    c.bench_function("redis_round_trip_ping", |b| {
        b.iter(|| runtime.block_on(redis::cmd("PING").query_async::<String>(&mut conn)))
    });
}

/// A `redis-server` of the benchmark's own, stopped when dropped.
struct RedisServer {
    child: std::process::Child,
    port: u16,
}

impl RedisServer {
    fn start() -> Option<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .ok()?;
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(Self { child, port });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

criterion_group!(benches, derive_lookup);
criterion_main!(benches);
