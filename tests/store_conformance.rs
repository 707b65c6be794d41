//! The coordination store's conformance suite: every property is one function over
//! `&dyn AggregationStore`, run against each implementation: the in-memory store and the Redis
//! store. Claims coalesce and queue in order within bounds,
//! reads find what was claimed, only the current lease holder's writes land, a terminal result
//! answers identical claims while fresh enough, and every write wakes its waiters. The Redis
//! store runs against a real `redis-server` started for the test.

use deadline_stats_gateway::gateway::error::GatewayError;
use deadline_stats_gateway::gateway::ids::IdMinter;
use deadline_stats_gateway::gateway::key::CanonicalKey;
use deadline_stats_gateway::gateway::lease::Lease;
use deadline_stats_gateway::gateway::redis::RedisCoordination;
use deadline_stats_gateway::gateway::redis_store::RedisStore;
use deadline_stats_gateway::gateway::results::ResultsCache;
use deadline_stats_gateway::gateway::store::{
    AggregationStore, Claimed, Disposition, Found, Freshness, Limits, MemoryStore, Written,
};
use deadline_stats_gateway::gateway::wakeups::Wakeups;
use deadline_stats_gateway::gateway::{AggregationRecord, State};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

mod common;

const ANY: Freshness = Freshness { min_remaining: Duration::ZERO, max_staleness: None };
const ROOMY: Limits = Limits { queue_capacity: 100, max_live: 100, max_farms: 100 };
const TTL: Duration = Duration::from_secs(60);

fn key(farm: u64, days: i64) -> CanonicalKey {
    let request = deadline_stats_gateway::grpc::convert::start_request(common::start_request(
        farm,
        1,
        days,
        &[deadline_stats_gateway::grpc::pb::GroupBy::QueueId],
    ))
    .expect("a valid request");
    CanonicalKey::new(&request.request)
}

/// A new id, as the gateway mints it: in the store's epoch (any tag, in memory).
async fn mint(store: &dyn AggregationStore) -> deadline_stats_gateway::gateway::AggregationId {
    IdMinter::tagged(store.epoch().await.expect("store").unwrap_or_default()).mint()
}

async fn claim(store: &dyn AggregationStore, k: &CanonicalKey, limits: &Limits) -> Result<Claimed, GatewayError> {
    store.claim(k, &ANY, limits, mint(store).await).await
}

async fn holder(store: &dyn AggregationStore, farm: &str, name: &str) -> Lease {
    store.leases().acquire(farm, name, TTL).await.expect("store").expect("the lease is free")
}

fn completed(record: &AggregationRecord, valid_for: Duration) -> AggregationRecord {
    let mut r = record.clone();
    r.state = State::Completed;
    r.expire_time = Some(SystemTime::now() + valid_for);
    r.data_time = Some(SystemTime::now());
    r
}

async fn claims_coalesce_and_queue_in_order(store: &dyn AggregationStore) {
    let (a, b, other) = (key(1, 1), key(1, 2), key(2, 1));
    let first = claim(store, &a, &ROOMY).await.expect("room");
    assert_eq!((first.disposition, first.queue_position, first.record.state), (Disposition::Started, 0, State::Queued));
    let joined = claim(store, &a, &ROOMY).await.expect("room");
    assert_eq!((joined.disposition, &joined.record.id), (Disposition::Joined, &first.record.id));
    let second = claim(store, &b, &ROOMY).await.expect("room");
    assert_eq!(second.queue_position, 1, "behind the first on its farm");
    assert_eq!(claim(store, &other, &ROOMY).await.expect("room").queue_position, 0, "farms are independent");
    let farm = first.record.farm_id();
    assert_eq!(store.head(farm).await.expect("store").map(|r| r.id.clone()), Some(first.record.id.clone()));
    let mut farms = store.farms_with_work().await.expect("store");
    farms.sort();
    assert_eq!(farms.len(), 2);
    match store.read(&second.record.id).await.expect("store") {
        Found::Active { record, queue_position } => {
            assert_eq!((record.id.clone(), queue_position), (second.record.id.clone(), 1))
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(store.read("agg-never").await.expect("store"), Found::Unknown));

    let lease = holder(store, farm, "replica-a").await;
    let done = completed(&first.record, Duration::from_secs(600));
    assert_eq!(store.finish(&lease, done, None).await.expect("store"), Written::Done);
    assert_eq!(store.head(farm).await.expect("store").map(|r| r.id.clone()), Some(second.record.id.clone()), "FIFO");
    assert!(matches!(store.read(&first.record.id).await.expect("store"), Found::Terminal(_)));
    match store.read(&second.record.id).await.expect("store") {
        Found::Active { queue_position, .. } => assert_eq!(queue_position, 0, "now at the head"),
        other => panic!("{other:?}"),
    }
}

async fn claims_respect_every_bound(store: &dyn AggregationStore) {
    let queue = Limits { queue_capacity: 1, ..ROOMY };
    claim(store, &key(11, 1), &queue).await.expect("head");
    claim(store, &key(11, 2), &queue).await.expect("one waits");
    let full = claim(store, &key(11, 3), &queue).await.expect_err("the farm's queue is full");
    assert!(matches!(full, GatewayError::QueueFull { capacity: 1, .. }), "{full:?}");
    let one_farm = Limits { max_farms: 1, ..ROOMY };
    let farms = claim(store, &key(12, 1), &one_farm).await.expect_err("a second farm");
    assert!(matches!(farms, GatewayError::Busy { bound: "max_farms", limit: 1 }), "{farms:?}");
    let two_live = Limits { max_live: 2, ..ROOMY };
    let live = claim(store, &key(11, 3), &two_live).await.expect_err("two live");
    assert!(matches!(live, GatewayError::Busy { bound: "max_active_aggregations", limit: 2 }), "{live:?}");
    let tightest = Limits { queue_capacity: 0, max_live: 0, max_farms: 0 };
    let joined = claim(store, &key(11, 1), &tightest).await.expect("joins");
    assert_eq!(joined.disposition, Disposition::Joined, "joining takes no room");
}

async fn only_the_current_lease_holders_writes_land(store: &dyn AggregationStore) {
    let claimed = claim(store, &key(21, 1), &ROOMY).await.expect("room");
    let farm = claimed.record.farm_id().to_owned();
    let old = holder(store, &farm, "replica-a").await;
    let mut running = (*claimed.record).clone();
    running.state = State::Running;
    assert_eq!(store.update(&old, running.clone()).await.expect("store"), Written::Done);
    store.leases().release(&old).await.expect("store");
    let new = holder(store, &farm, "replica-b").await;
    assert!(new.token > old.token);
    running.status_message = "from the paused holder".into();
    assert_eq!(store.update(&old, running.clone()).await.expect("store"), Written::Fenced);
    assert_eq!(store.finish(&old, completed(&running, TTL), None).await.expect("store"), Written::Fenced);
    match store.read(&claimed.record.id).await.expect("store") {
        Found::Active { record, .. } => {
            assert_eq!((record.state, record.status_message.as_str()), (State::Running, ""))
        }
        other => panic!("the stale write changed it: {other:?}"),
    }
    assert_eq!(store.finish(&new, completed(&running, TTL), None).await.expect("store"), Written::Done);
}

async fn a_terminal_result_answers_while_fresh_enough(store: &dyn AggregationStore) {
    let k = key(31, 1);
    let claimed = claim(store, &k, &ROOMY).await.expect("room");
    let lease = holder(store, claimed.record.farm_id(), "replica-a").await;
    let rows = Arc::new(deadline_stats_gateway::gateway::rows::RowBlockBuilder::new(|_, _| {}).finish());
    store.finish(&lease, completed(&claimed.record, Duration::from_secs(60)), Some(rows)).await.expect("store");
    let cached = claim(store, &k, &ROOMY).await.expect("claims");
    assert_eq!((cached.disposition, &cached.record.id), (Disposition::Cached, &claimed.record.id));
    let needs_more = Freshness { min_remaining: Duration::from_secs(120), max_staleness: None };
    let fresh = store.claim(&k, &needs_more, &ROOMY, mint(store).await).await.expect("claims");
    assert_eq!(fresh.disposition, Disposition::Started, "60 s left is too little to read it");
    assert!(
        matches!(store.read(&claimed.record.id).await.expect("store"), Found::Terminal(_)),
        "the old id still reads"
    );
    tokio::time::sleep(Duration::from_millis(30)).await;
    let strict = Freshness { min_remaining: Duration::ZERO, max_staleness: Some(Duration::from_millis(10)) };
    let joined = store.claim(&k, &strict, &ROOMY, mint(store).await).await.expect("claims");
    assert_eq!(
        (joined.disposition, &joined.record.id),
        (Disposition::Joined, &fresh.record.id),
        "the key names the fresh one"
    );
}

async fn every_write_wakes_its_waiters(store: &dyn AggregationStore, wakeups: &Arc<Wakeups>) {
    let claimed = claim(store, &key(41, 1), &ROOMY).await.expect("room");
    let mut waiter = wakeups.waiter(&claimed.record.id);
    let lease = holder(store, claimed.record.farm_id(), "replica-a").await;
    let mut running = (*claimed.record).clone();
    running.state = State::Running;
    store.update(&lease, running.clone()).await.expect("store");
    tokio::time::timeout(Duration::from_secs(10), waiter.woken()).await.expect("an update wakes");
    store.finish(&lease, completed(&running, TTL), None).await.expect("store");
    tokio::time::timeout(Duration::from_secs(10), waiter.woken()).await.expect("the end wakes");
}

/// Ends `record` COMPLETED with no rows (rows of none), valid for `valid_for`.
async fn complete(store: &dyn AggregationStore, lease: &Lease, record: &AggregationRecord, valid_for: Duration) {
    let rows = Arc::new(deadline_stats_gateway::gateway::rows::RowBlockBuilder::new(|_, _| {}).finish());
    let done = completed(record, valid_for);
    assert_eq!(store.finish(lease, done, Some(rows)).await.expect("store"), Written::Done);
}

/// A completed result of `k`, valid for a minute, that answered `hits` Starts in all.
async fn popular(store: &dyn AggregationStore, lease: &Lease, k: &CanonicalKey, hits: u32) -> Claimed {
    let first = claim(store, k, &ROOMY).await.expect("room");
    complete(store, lease, &first.record, Duration::from_secs(60)).await;
    for _ in 1..hits {
        assert_eq!(claim(store, k, &ROOMY).await.expect("claims").disposition, Disposition::Cached);
    }
    first
}

async fn refreshes(store: &dyn AggregationStore, due_in: Duration, limits: &Limits) -> Vec<Arc<AggregationRecord>> {
    let tag = store.epoch().await.expect("store").unwrap_or_default();
    let ids = IdMinter::tagged(tag);
    store.start_refreshes(SystemTime::now() + due_in, 3, limits, &|| ids.mint()).await.expect("store")
}

fn position(found: Found) -> u32 {
    match found {
        Found::Active { queue_position, .. } => queue_position,
        other => panic!("not active: {other:?}"),
    }
}

async fn popular_results_are_refreshed_once_behind_callers(store: &dyn AggregationStore) {
    let (a, c, cold) = (key(71, 1), key(71, 2), key(71, 3));
    let farm = a.farm_id().to_owned();
    let lease = holder(store, &farm, "replica-a").await;
    let old_a = popular(store, &lease, &a, 3).await;
    let old_c = popular(store, &lease, &c, 3).await;
    popular(store, &lease, &cold, 2).await;

    assert!(refreshes(store, Duration::from_secs(30), &ROOMY).await.is_empty(), "not due yet (60 s left)");
    let full = Limits { max_live: 0, ..ROOMY };
    assert!(refreshes(store, Duration::from_secs(120), &full).await.is_empty(), "refreshes count as live");
    let queued = refreshes(store, Duration::from_secs(120), &ROOMY).await;
    assert_eq!(queued.len(), 2, "the two popular keys, not the cold one: {queued:?}");
    assert!(refreshes(store, Duration::from_secs(120), &ROOMY).await.is_empty(), "each result is refreshed once");
    let (refresh_a, refresh_c) = if queued[0].key == a { (&queued[0], &queued[1]) } else { (&queued[1], &queued[0]) };
    assert!(refresh_a.refresh && refresh_a.key == a && refresh_c.key == c);
    assert_eq!(store.head(&farm).await.expect("store").map(|r| r.id.clone()), Some(queued[0].id.clone()));

    let cached = claim(store, &a, &ROOMY).await.expect("claims");
    assert_eq!((cached.disposition, &cached.record.id), (Disposition::Cached, &old_a.record.id), "old answers");
    let caller = claim(store, &key(71, 4), &ROOMY).await.expect("room");
    assert_eq!(caller.queue_position, 1, "a caller's Start goes before the refresh waiting");
    assert_eq!(position(store.read(&queued[1].id).await.expect("store")), 2, "the waiting refresh is behind it");

    complete(store, &lease, refresh_a, Duration::from_secs(120)).await;
    let renewed = claim(store, &a, &ROOMY).await.expect("claims");
    assert_eq!((renewed.disposition, &renewed.record.id), (Disposition::Cached, &refresh_a.id), "the key moved on");
    assert!(matches!(store.read(&old_a.record.id).await.expect("store"), Found::Terminal(_)), "the old id reads");

    let needs_more = Freshness { min_remaining: Duration::from_secs(90), max_staleness: None };
    let joined = store.claim(&c, &needs_more, &ROOMY, mint(store).await).await.expect("claims");
    assert_eq!(
        (joined.disposition, &joined.record.id),
        (Disposition::Joined, &refresh_c.id),
        "a Start the old result no longer answers joins the refresh"
    );
    complete(store, &lease, refresh_c, Duration::from_secs(120)).await;
    let renewed = claim(store, &c, &ROOMY).await.expect("claims");
    assert_eq!((renewed.disposition, &renewed.record.id), (Disposition::Cached, &refresh_c.id));
    assert_ne!(renewed.record.id, old_c.record.id);

    // A farm with callers' work waiting gets no refresh until that work is done.
    let (d, e) = (key(72, 1), key(72, 2));
    let lease = holder(store, d.farm_id(), "replica-a").await;
    popular(store, &lease, &d, 3).await;
    let busy = claim(store, &e, &ROOMY).await.expect("room");
    assert!(refreshes(store, Duration::from_secs(120), &ROOMY).await.is_empty(), "callers first");
    complete(store, &lease, &busy.record, Duration::from_secs(600)).await;
    let queued = refreshes(store, Duration::from_secs(120), &ROOMY).await;
    assert_eq!(queued.iter().map(|r| r.key.clone()).collect::<Vec<_>>(), vec![d], "then it is refreshed");

    // A refresh that fails changes nothing: the old result answers until its expiry.
    let f = key(73, 1);
    let lease = holder(store, f.farm_id(), "replica-a").await;
    let old_f = popular(store, &lease, &f, 3).await;
    let queued = refreshes(store, Duration::from_secs(120), &ROOMY).await;
    assert_eq!(queued.len(), 1);
    let mut failed = (*queued[0]).clone();
    failed.state = State::Failed;
    failed.error = Some(deadline_stats_gateway::gateway::Failure {
        code: deadline_stats_gateway::gateway::FailureCode::Unavailable,
        message: "the upstream refused".into(),
    });
    failed.expire_time = Some(SystemTime::now() + TTL);
    assert_eq!(store.finish(&lease, failed, None).await.expect("store"), Written::Done);
    let still = claim(store, &f, &ROOMY).await.expect("claims");
    assert_eq!((still.disposition, &still.record.id), (Disposition::Cached, &old_f.record.id));
    assert!(refreshes(store, Duration::from_secs(120), &ROOMY).await.is_empty(), "not retried in a loop");
}

/// A fresh memory store and the wake-ups its writes wake.
fn memory() -> (MemoryStore, Arc<Wakeups>) {
    let wakeups = Arc::new(Wakeups::default());
    (MemoryStore::new(64 * 1024 * 1024, Duration::from_secs(30), wakeups.clone()), wakeups)
}

#[tokio::test]
async fn memory_store_conforms() {
    let (store, wakeups) = memory();
    claims_coalesce_and_queue_in_order(&store).await;
    claims_respect_every_bound(&memory().0).await;
    only_the_current_lease_holders_writes_land(&store).await;
    a_terminal_result_answers_while_fresh_enough(&store).await;
    every_write_wakes_its_waiters(&store, &wakeups).await;
    popular_results_are_refreshed_once_behind_callers(&store).await;
}

/// A Redis store under `prefix` on `server`, and the wake-ups its writes wake.
async fn in_redis(server: &common::RedisServer, prefix: &str) -> (RedisStore, Arc<Wakeups>) {
    let wakeups = Arc::new(Wakeups::default());
    let near = Arc::new(ResultsCache::new(64 * 1024 * 1024, Duration::from_secs(30), Box::new(|_, _| {})));
    let redis = RedisCoordination::connect(&server.url(), prefix).await.expect("connects to redis-server");
    (RedisStore::new(redis, near, wakeups.clone()), wakeups)
}

#[tokio::test]
async fn redis_store_conforms() {
    let server = tokio::task::spawn_blocking(common::redis_server).await.expect("joins");
    let (store, wakeups) = in_redis(&server, "dsg:").await;
    claims_coalesce_and_queue_in_order(&store).await;
    claims_respect_every_bound(&in_redis(&server, "bounds:").await.0).await;
    only_the_current_lease_holders_writes_land(&store).await;
    a_terminal_result_answers_while_fresh_enough(&store).await;
    every_write_wakes_its_waiters(&store, &wakeups).await;
    popular_results_are_refreshed_once_behind_callers(&store).await;
}

#[tokio::test]
async fn two_replicas_on_one_redis_see_one_store() {
    let server = tokio::task::spawn_blocking(common::redis_server).await.expect("joins");
    let ((a, _), (b, _)) = (in_redis(&server, "dsg:").await, in_redis(&server, "dsg:").await);
    let k = key(51, 1);
    let first = claim(&a, &k, &ROOMY).await.expect("room");
    let joined = claim(&b, &k, &ROOMY).await.expect("room");
    assert_eq!((joined.disposition, &joined.record.id), (Disposition::Joined, &first.record.id));
    let lease = holder(&b, first.record.farm_id(), "replica-b").await;
    let rows = deadline_stats_gateway::gateway::rows::RowBlockBuilder::new(|_, buf| buf.extend_from_slice(b"row"));
    let mut rows = rows;
    rows.push(&Default::default());
    let done = completed(&first.record, Duration::from_secs(600));
    assert_eq!(b.finish(&lease, done, Some(Arc::new(rows.finish()))).await.expect("store"), Written::Done);
    match a.read(&first.record.id).await.expect("store") {
        Found::Terminal(result) => {
            assert_eq!(result.record.state, State::Completed);
            assert_eq!(result.rows.as_ref().map(|r| r.slice(0..1).to_vec()), Some(b"row".to_vec()), "the same rows");
        }
        other => panic!("replica a does not see replica b's result: {other:?}"),
    }
    assert!(a.head(first.record.farm_id()).await.expect("store").is_none(), "the farm's queue is empty everywhere");

    // Refresh-ahead: hits counted on both replicas, the refresh claimed by one.
    let k = key(52, 1);
    let farm = k.farm_id().to_owned();
    let lease = holder(&a, &farm, "replica-a").await;
    popular(&a, &lease, &k, 2).await;
    assert_eq!(claim(&b, &k, &ROOMY).await.expect("claims").disposition, Disposition::Cached);
    let (on_a, on_b) =
        tokio::join!(refreshes(&a, Duration::from_secs(120), &ROOMY), refreshes(&b, Duration::from_secs(120), &ROOMY));
    assert_eq!(on_a.len() + on_b.len(), 1, "one refresh between them: {on_a:?} {on_b:?}");
}

#[tokio::test]
async fn after_redis_lost_its_state_a_claim_needs_an_id_of_the_new_epoch() {
    let server = tokio::task::spawn_blocking(common::redis_server).await.expect("joins");
    let (store, _) = in_redis(&server, "dsg:").await;
    let before = store.epoch().await.expect("store").expect("a shared store has an epoch");
    assert_eq!(store.epoch().await.expect("store"), Some(before), "stable while the state lives");
    let old = mint(&store).await;
    let mut conn = common::redis_conn(&server.url()).await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.expect("FLUSHALL");
    let refused = store.claim(&key(60, 1), &ANY, &ROOMY, old).await.expect_err("an id of the lost state");
    assert!(
        matches!(refused, GatewayError::StoreUnavailable(deadline_stats_gateway::gateway::StoreError::NewEpoch)),
        "{refused:?}"
    );
    let after = store.epoch().await.expect("store").expect("a new epoch");
    assert_ne!(after, before, "a new generation");
    claim(&store, &key(60, 1), &ROOMY).await.expect("an id of the new epoch is claimed");
}
