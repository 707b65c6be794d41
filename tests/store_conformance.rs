//! The coordination store's conformance suite: every property is one function over a
//! [`Subject`] (a store and the wake-ups its writes wake), run as one test per backend: the
//! in-memory store, the Redis store on a `redis-server` started for that test, and the Redis
//! store on a Redis Cluster (three primaries, three replicas) started for that test. Each rule of
//! `gateway::coordination::policy` (freshness, the bounds, queue order, refresh eligibility,
//! the run-time moving average) has a property here, so the Lua scripts cannot drift from the
//! Rust. Redis alone: two replicas see one store, lost rows are put back, and a claim after
//! Redis lost its state needs an id of the new epoch.

use deadline_stats_gateway::gateway::clock::Clock;
use deadline_stats_gateway::gateway::coordination::redis::{RedisConfig, RedisKeys};
use deadline_stats_gateway::gateway::coordination::{
    AggregationStore, Bound, ClaimError, Claimed, Coordination, CoordinationSettings, Disposition, FarmLoad, Found,
    Freshness, Head, Lease, Limits, MemoryStore, RunModel, Wakeups, Written,
};
use deadline_stats_gateway::gateway::ids::{Bucket, IdMinter};
use deadline_stats_gateway::gateway::key::CanonicalKey;
use deadline_stats_gateway::gateway::rate::Rate;
use deadline_stats_gateway::gateway::{
    AggregationRecord, Failure, FailureCode, Offer, Priority, Rows, SplitPart, State,
};
use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::{Duration, SystemTime};

mod common;

const ANY: Freshness = Freshness { min_remaining: Duration::ZERO, max_staleness: None };
const ROOMY: Limits = Limits { queue_capacity: 100, max_live: 100, max_farms: 100, caller_capacity: 100, fair: true };
const TTL: Duration = Duration::from_secs(60);

thread_local! {
    /// The clock of the store under test (each test runs on its own thread): tokio's for the
    /// memory store on paused time, the system's for Redis.
    static CLOCK: std::cell::RefCell<Clock> = std::cell::RefCell::new(Clock::system());
}

/// The time of day by the store's clock.
fn now() -> SystemTime {
    CLOCK.with(|c| c.borrow().now())
}

/// What a property runs against.
struct Subject {
    store: Arc<dyn AggregationStore>,
    /// This replica's wake-ups, woken by the store's writes.
    wakeups: Arc<Wakeups>,
}

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

/// A new id for `k`, as the gateway mints it: in the store's epoch of the farm's bucket (any
/// tag, in memory).
async fn mint(store: &dyn AggregationStore, k: &CanonicalKey) -> deadline_stats_gateway::gateway::AggregationId {
    IdMinter::tagged(epoch(store, k.farm_id()).await.unwrap_or_default()).mint(k.farm_id())
}

/// The store's epoch of `farm`'s bucket.
async fn epoch(store: &dyn AggregationStore, farm: &str) -> Option<u32> {
    store.epoch(Bucket::of_farm(farm)).await.expect("store")
}

async fn claim(store: &dyn AggregationStore, k: &CanonicalKey, limits: &Limits) -> Result<Claimed, ClaimError> {
    claim_by(store, k, limits, "caller-a").await
}

/// [`claim`] by `caller`.
async fn claim_by(
    store: &dyn AggregationStore,
    k: &CanonicalKey,
    limits: &Limits,
    caller: &str,
) -> Result<Claimed, ClaimError> {
    claim_as(store, k, limits, caller, Priority::Interactive).await
}

/// [`claim`] by `caller` with `priority`.
async fn claim_as(
    store: &dyn AggregationStore,
    k: &CanonicalKey,
    limits: &Limits,
    caller: &str,
    priority: Priority,
) -> Result<Claimed, ClaimError> {
    store.claim(k, &ANY, limits, mint(store, k).await, caller, priority).await
}

async fn holder(store: &dyn AggregationStore, farm: &str, name: &str) -> Lease {
    store.leases().acquire(farm, name, TTL).await.expect("store").expect("the lease is free")
}

fn completed(record: &AggregationRecord, valid_for: Duration) -> AggregationRecord {
    let mut r = record.clone();
    r.state = State::Completed;
    r.expire_time = Some(now() + valid_for);
    r.data_time = Some(now());
    r
}

/// Rows of `n` rows, each encoded by `encode`.
fn rows(n: usize, encode: deadline_stats_gateway::gateway::rows::RowEncoder) -> Rows {
    let mut block = deadline_stats_gateway::gateway::rows::RowBlockBuilder::new(encode);
    (0..n).for_each(|_| block.push(&Default::default()));
    Arc::new(block.finish())
}

/// Ends `record` COMPLETED with one row, valid for `valid_for`.
async fn complete(store: &dyn AggregationStore, lease: &Lease, record: &AggregationRecord, valid_for: Duration) {
    let done = completed(record, valid_for);
    assert_eq!(
        store.finish(lease, done, Some(rows(1, |_, buf| buf.extend_from_slice(b"row")))).await.expect("store"),
        Written::Done
    );
}

fn running(record: &AggregationRecord) -> AggregationRecord {
    AggregationRecord { state: State::Running, running_since: Some(now()), ..record.clone() }
}

fn position(found: Found) -> u32 {
    match found {
        Found::Active { queue_position, .. } => queue_position,
        other => panic!("not active: {other:?}"),
    }
}

async fn head(store: &dyn AggregationStore, farm: &str) -> Option<Arc<str>> {
    match store.head(farm).await.expect("store") {
        Head::Ready(r) => Some(r.id.clone()),
        Head::Empty => None,
        Head::Broken { id, fault } => panic!("{id} is broken: {fault}"),
    }
}

async fn identical_claims_coalesce_and_farms_are_independent(s: &Subject) {
    let store = s.store.as_ref();
    let (a, other) = (key(1, 1), key(2, 1));
    let first = claim(store, &a, &ROOMY).await.expect("room");
    assert_eq!((first.disposition, first.queue_position, first.record.state), (Disposition::Started, 0, State::Queued));
    let joined = claim(store, &a, &ROOMY).await.expect("room");
    assert_eq!((joined.disposition, &joined.record.id), (Disposition::Joined, &first.record.id));
    assert_eq!(claim(store, &other, &ROOMY).await.expect("room").queue_position, 0, "farms are independent");
    let mut farms = store.farms_with_work().await.expect("store");
    farms.sort();
    assert_eq!(farms, vec![a.farm_id().to_owned(), other.farm_id().to_owned()]);
    assert!(matches!(store.read("agg-never").await.expect("store"), Found::Unknown));
}

async fn a_farm_queue_is_first_in_first_out(s: &Subject) {
    let store = s.store.as_ref();
    let (a, b, c) = (key(3, 1), key(3, 2), key(3, 3));
    let first = claim(store, &a, &ROOMY).await.expect("room");
    let second = claim(store, &b, &ROOMY).await.expect("room");
    let third = claim(store, &c, &ROOMY).await.expect("room");
    assert_eq!((second.queue_position, third.queue_position), (1, 2), "behind the first on its farm");
    let farm = first.record.farm_id();
    assert_eq!(head(store, farm).await, Some(first.record.id.clone()));
    let queue: Vec<_> = store.queue(farm, 2).await.expect("store").iter().map(|r| r.id.clone()).collect();
    assert_eq!(queue, vec![first.record.id.clone(), second.record.id.clone()], "the queue, head first, up to 2");
    assert_eq!(position(store.read(&third.record.id).await.expect("store")), 2);
    let lease = holder(store, farm, "replica-a").await;
    complete(store, &lease, &first.record, Duration::from_secs(600)).await;
    assert_eq!(head(store, farm).await, Some(second.record.id.clone()), "FIFO");
    assert!(matches!(store.read(&first.record.id).await.expect("store"), Found::Terminal(_)));
    assert_eq!(position(store.read(&third.record.id).await.expect("store")), 1, "moved up");
}

/// The farm's queue, head first, as ids.
async fn queue_ids(store: &dyn AggregationStore, farm: &str) -> Vec<Arc<str>> {
    store.queue(farm, 100).await.expect("store").iter().map(|r| r.id.clone()).collect()
}

/// Completes the head of `farm` until it is empty: the order the aggregations ran in, each
/// checked against its position (`read`) and the queue just before.
async fn run_out(store: &dyn AggregationStore, farm: &str) -> Vec<Arc<str>> {
    let lease = holder(store, farm, "replica-a").await;
    let mut ran = Vec::new();
    while let Some(id) = head(store, farm).await {
        let queue = queue_ids(store, farm).await;
        for (i, queued) in queue.iter().enumerate() {
            assert_eq!(position(store.read(queued).await.expect("store")) as usize, i, "{queued} reads its place");
        }
        let Found::Active { record, .. } = store.read(&id).await.expect("store") else { panic!("{id} active") };
        complete(store, &lease, &record, TTL).await;
        ran.push(id);
    }
    ran
}

/// `policy::place` and `policy::slot`: interactive before batch, callers taking turns within a
/// class, the head never displaced; with `fair: false`, arrival order.
async fn a_farms_queue_is_shared_fairly_between_classes_and_callers(s: &Subject) {
    let store = s.store.as_ref();
    for (farm, fair) in [(81, true), (82, false)] {
        let limits = Limits { fair, ..ROOMY };
        let mut ids = std::collections::HashMap::new();
        let mut days = 0;
        for (name, caller, priority) in [
            ("a-b1", "a", Priority::Batch),
            ("a-b2", "a", Priority::Batch),
            ("a-b3", "a", Priority::Batch),
            ("a-i1", "a", Priority::Interactive),
            ("a-i2", "a", Priority::Interactive),
            ("a-i3", "a", Priority::Interactive),
            ("b-i1", "b", Priority::Interactive),
            ("b-i2", "b", Priority::Interactive),
        ] {
            days += 1;
            let claimed = claim_as(store, &key(farm, days), &limits, caller, priority).await.expect("room");
            assert_eq!(claimed.record.priority, priority);
            ids.insert(claimed.record.id.clone(), name);
        }
        let farm_id = key(farm, 1).farm_id().to_owned();
        let ran: Vec<&str> = run_out(store, &farm_id).await.iter().map(|id| ids[id]).collect();
        let want = if fair {
            ["a-b1", "a-i1", "b-i1", "a-i2", "b-i2", "a-i3", "a-b2", "a-b3"]
        } else {
            ["a-b1", "a-b2", "a-b3", "a-i1", "a-i2", "a-i3", "b-i1", "b-i2"]
        };
        assert_eq!(ran, want, "fair: {fair}");
    }
}

/// A caller new to a farm goes next after the head, not behind another caller's backlog; a
/// caller that joins a waiting aggregation for the first time moves it up to its own place
/// (an interactive caller raises a batch one) and spends its turn; joining again changes
/// nothing. Positions that move wake the farm's waiters.
async fn a_newcomer_goes_next_and_a_join_moves_an_aggregation_up(s: &Subject) {
    let store = s.store.as_ref();
    let farm = 83;
    let backlog: Vec<Claimed> = futures_in_order(store, farm, 1..=5, "a", Priority::Batch).await;
    let newcomer = claim_as(store, &key(farm, 6), &ROOMY, "b", Priority::Batch).await.expect("room");
    assert_eq!(newcomer.queue_position, 1, "next after the head, before the backlog");
    let mut waiter = s.wakeups.waiter(&format!("farm:{}", key(farm, 1).farm_id()));
    let last = &backlog[4].record;
    assert_eq!(position(store.read(&last.id).await.expect("store")), 5);
    let joined = claim_as(store, &last.key, &ROOMY, "c", Priority::Interactive).await.expect("joins");
    assert_eq!((joined.disposition, &joined.record.id), (Disposition::Joined, &last.id));
    assert_eq!(joined.queue_position, 1, "raised to interactive: before every batch one waiting");
    assert_eq!(joined.record.priority, Priority::Interactive);
    assert_eq!(position(store.read(&newcomer.record.id).await.expect("store")), 2, "pushed back by it");
    tokio::time::timeout(Duration::from_secs(10), waiter.woken()).await.expect("the farm's waiters were woken");
    let again = claim_as(store, &last.key, &ROOMY, "c", Priority::Interactive).await.expect("joins");
    assert_eq!(again.queue_position, 1, "a second join changes nothing");
    // c spent its first interactive turn on the join: its own next one waits behind it.
    let own = claim_as(store, &key(farm, 7), &ROOMY, "c", Priority::Interactive).await.expect("room");
    assert_eq!(own.queue_position, 2, "after the aggregation it joined");
    let Found::Active { record, .. } = store.read(&last.id).await.expect("store") else { panic!("active") };
    assert_eq!(record.priority, Priority::Interactive, "the raised class is what a read finds");
}

/// Claims `days` on `farm` by `caller`, one after the other.
async fn futures_in_order(
    store: &dyn AggregationStore,
    farm: u64,
    days: std::ops::RangeInclusive<i64>,
    caller: &str,
    priority: Priority,
) -> Vec<Claimed> {
    let mut out = Vec::new();
    for d in days {
        out.push(claim_as(store, &key(farm, d), &ROOMY, caller, priority).await.expect("room"));
    }
    out
}

/// `policy::admit`: one caller holds at most its share of a farm's queue; other callers are
/// still taken, and joining takes no share.
async fn a_caller_holds_at_most_its_share_of_a_farms_queue(s: &Subject) {
    let store = s.store.as_ref();
    let limits = Limits { queue_capacity: 10, caller_capacity: 2, ..ROOMY };
    let farm = 84;
    let mut mine = Vec::new();
    for d in 1..=3 {
        mine.push(
            claim_as(store, &key(farm, d), &limits, "a", Priority::Batch).await.expect("the head and two waiting"),
        );
    }
    let refused = claim_as(store, &key(farm, 4), &limits, "a", Priority::Batch).await.expect_err("a's share is taken");
    assert!(matches!(refused, ClaimError::CallerQueueFull { capacity: 2, .. }), "{refused:?}");
    claim_as(store, &key(farm, 5), &limits, "b", Priority::Batch).await.expect("b is still taken");
    let joined = claim_as(store, &key(farm, 5), &limits, "a", Priority::Batch).await.expect("a may join");
    assert_eq!(joined.disposition, Disposition::Joined);
    let lease = holder(store, key(farm, 1).farm_id(), "replica-a").await;
    complete(store, &lease, &mine[0].record, TTL).await;
    let refused = claim_as(store, &key(farm, 4), &limits, "a", Priority::Batch).await.expect_err("b's turn is next");
    assert!(matches!(refused, ClaimError::CallerQueueFull { .. }), "{refused:?}");
    let Some(next) = head(store, key(farm, 1).farm_id()).await else { panic!("b's is the head") };
    let Found::Active { record, .. } = store.read(&next).await.expect("store") else { panic!("active") };
    complete(store, &lease, &record, TTL).await;
    claim_as(store, &key(farm, 4), &limits, "a", Priority::Batch).await.expect("once one of a's started, room again");
}

/// A queue longer than one slice of the scripts' reads (1,000) keeps its order.
async fn a_long_queue_keeps_its_order(s: &Subject) {
    let store = s.store.as_ref();
    let limits = Limits { queue_capacity: 1_500, max_live: 2_000, caller_capacity: 1_500, ..ROOMY };
    let farm = 85;
    for d in 1..=1_100 {
        claim_as(store, &key(farm, d), &limits, "a", Priority::Batch).await.expect("room");
    }
    let b = claim_as(store, &key(farm, 1_101), &limits, "b", Priority::Batch).await.expect("room");
    assert_eq!(b.queue_position, 1, "b's turn comes next, whatever a's backlog");
    let i = claim_as(store, &key(farm, 1_102), &limits, "c", Priority::Interactive).await.expect("room");
    assert_eq!(i.queue_position, 1, "interactive first");
    let last = claim_as(store, &key(farm, 1_103), &limits, "a", Priority::Batch).await.expect("room");
    assert_eq!(last.queue_position, 1_102, "a's next at the back");
}

/// `policy::admit`: live aggregations, then farms, then the farm's queue.
async fn claims_respect_every_bound(s: &Subject) {
    let store = s.store.as_ref();
    let queue = Limits { queue_capacity: 1, ..ROOMY };
    claim(store, &key(11, 1), &queue).await.expect("head");
    claim(store, &key(11, 2), &queue).await.expect("one waits");
    let full = claim(store, &key(11, 3), &queue).await.expect_err("the farm's queue is full");
    assert!(matches!(full, ClaimError::QueueFull { capacity: 1, .. }), "{full:?}");
    let one_farm = Limits { max_farms: 1, ..ROOMY };
    let farms = claim(store, &key(12, 1), &one_farm).await.expect_err("a second farm");
    assert!(matches!(farms, ClaimError::Busy { bound: Bound::Farms, limit: 1 }), "{farms:?}");
    assert!(claim(store, &key(11, 3), &one_farm).await.is_ok(), "a farm with work is counted already");
    let three_live = Limits { max_live: 3, ..ROOMY };
    let live = claim(store, &key(11, 4), &three_live).await.expect_err("three live");
    assert!(matches!(live, ClaimError::Busy { bound: Bound::ActiveAggregations, limit: 3 }), "{live:?}");
    let all = Limits { queue_capacity: 0, max_live: 0, max_farms: 0, caller_capacity: 0, fair: true };
    let first = claim(store, &key(13, 1), &all).await.expect_err("every bound");
    assert!(matches!(first, ClaimError::Busy { bound: Bound::ActiveAggregations, .. }), "live first: {first:?}");
    let joined = claim(store, &key(11, 1), &all).await.expect("joins");
    assert_eq!(joined.disposition, Disposition::Joined, "joining takes no room");
}

async fn only_the_current_lease_holders_writes_land(s: &Subject) {
    let store = s.store.as_ref();
    let claimed = claim(store, &key(21, 1), &ROOMY).await.expect("room");
    let farm = claimed.record.farm_id().to_owned();
    let old = holder(store, &farm, "replica-a").await;
    let mut record = running(&claimed.record);
    assert_eq!(store.update(&old, record.clone()).await.expect("store"), Written::Done);
    store.leases().release(&old).await.expect("store");
    let new = holder(store, &farm, "replica-b").await;
    assert!(new.token > old.token);
    record.status_message = "from the paused holder".into();
    assert_eq!(store.update(&old, record.clone()).await.expect("store"), Written::Fenced);
    assert_eq!(store.finish(&old, completed(&record, TTL), None).await.expect("store"), Written::Fenced);
    match store.read(&claimed.record.id).await.expect("store") {
        Found::Active { record, .. } => {
            assert_eq!((record.state, record.status_message.as_str()), (State::Running, ""))
        }
        other => panic!("the stale write changed it: {other:?}"),
    }
    assert_eq!(store.finish(&new, completed(&record, TTL), None).await.expect("store"), Written::Done);
    assert_eq!(store.update(&new, record).await.expect("store"), Written::Fenced, "a terminal one is not rewritten");
}

/// A broken id is taken off its farm's queue by the current holder only, and then counts
/// nowhere: not in the queue, not as live, not as a farm with work.
async fn a_discarded_id_leaves_its_farms_queue_under_the_current_lease_only(s: &Subject) {
    let store = s.store.as_ref();
    let (first, second) = (
        claim(store, &key(25, 1), &ROOMY).await.expect("room"),
        claim(store, &key(25, 2), &ROOMY).await.expect("room"),
    );
    let farm = first.record.farm_id().to_owned();
    let old = holder(store, &farm, "replica-a").await;
    store.leases().release(&old).await.expect("store");
    let new = holder(store, &farm, "replica-b").await;
    let (a, b) = (first.record.id.to_string(), second.record.id.to_string());
    assert_eq!(store.discard(&old, &a).await.expect("store"), Written::Fenced);
    assert_eq!(head(store, &farm).await.as_deref(), Some(a.as_str()), "a stale holder discards nothing");
    assert_eq!(store.discard(&new, &a).await.expect("store"), Written::Done);
    assert_eq!(store.discard(&new, &a).await.expect("store"), Written::Done, "idempotent");
    assert_eq!(head(store, &farm).await.as_deref(), Some(b.as_str()), "the farm moves on");
    assert_eq!(store.discard(&new, &b).await.expect("store"), Written::Done);
    assert_eq!(head(store, &farm).await, None);
    assert!(store.farms_with_work().await.expect("store").is_empty(), "no farm has work");
    let one_live = Limits { max_live: 1, ..ROOMY };
    claim(store, &key(26, 1), &one_live).await.expect("the discarded ones count as live no more");
}

/// An upstream aggregation left by a holder that lost its lease (unfenced) is read back while
/// its aggregation is active, the last one left wins, and it goes with the aggregation's end;
/// nothing is left with an aggregation that is not active.
async fn an_offer_is_kept_with_its_active_aggregation_only(s: &Subject) {
    let store = s.store.as_ref();
    let claimed = claim(store, &key(27, 1), &ROOMY).await.expect("room");
    let (id, farm) = (claimed.record.id.to_string(), claimed.record.farm_id().to_owned());
    assert_eq!(store.offered(&id).await.expect("store"), None);
    let started = SystemTime::UNIX_EPOCH + Duration::from_millis(1_800_000_000_123);
    let whole = Offer { part: None, upstream_id: "upstream-1".into(), started };
    store.offer(&id, &whole).await.expect("store");
    assert_eq!(store.offered(&id).await.expect("store"), Some(whole), "unfenced: no lease is needed");
    let r = &claimed.record;
    let part = SplitPart::of(r.key.request(), r.key.request());
    let second = Offer { part: Some((1, part)), upstream_id: "upstream-2".into(), started };
    store.offer(&id, &second).await.expect("store");
    assert_eq!(store.offered(&id).await.expect("store"), Some(second), "the last one left wins");
    let lease = holder(store, &farm, "replica-a").await;
    complete(store, &lease, r, TTL).await;
    assert_eq!(store.offered(&id).await.expect("store"), None, "gone with the aggregation's end");
    let late = Offer { part: None, upstream_id: "upstream-3".into(), started };
    store.offer(&id, &late).await.expect("store");
    assert_eq!(store.offered(&id).await.expect("store"), None, "nothing is left with a terminal aggregation");
    store.offer("agg-never-claimed", &late).await.expect("store");
    assert_eq!(store.offered("agg-never-claimed").await.expect("store"), None);
}

/// `Freshness::accepts`: enough validity left, not too stale.
async fn a_terminal_result_answers_while_fresh_enough(s: &Subject) {
    let store = s.store.as_ref();
    let k = key(31, 1);
    let claimed = claim(store, &k, &ROOMY).await.expect("room");
    let lease = holder(store, claimed.record.farm_id(), "replica-a").await;
    complete(store, &lease, &claimed.record, Duration::from_secs(60)).await;
    let cached = claim(store, &k, &ROOMY).await.expect("claims");
    assert_eq!((cached.disposition, &cached.record.id), (Disposition::Cached, &claimed.record.id));
    let needs_more = Freshness { min_remaining: Duration::from_secs(120), max_staleness: None };
    let fresh = store
        .claim(&k, &needs_more, &ROOMY, mint(store, &k).await, "caller-a", Priority::Interactive)
        .await
        .expect("claims");
    assert_eq!(fresh.disposition, Disposition::Started, "60 s left is too little to read it");
    assert!(
        matches!(store.read(&claimed.record.id).await.expect("store"), Found::Terminal(_)),
        "the old id still reads"
    );
    tokio::time::sleep(Duration::from_millis(30)).await;
    let strict = Freshness { min_remaining: Duration::ZERO, max_staleness: Some(Duration::from_millis(10)) };
    let joined = store
        .claim(&k, &strict, &ROOMY, mint(store, &k).await, "caller-a", Priority::Interactive)
        .await
        .expect("claims");
    assert_eq!((joined.disposition, &joined.record.id), (Disposition::Joined, &fresh.record.id), "the key names it");

    let failed_key = key(31, 2);
    let claimed = claim(store, &failed_key, &ROOMY).await.expect("room");
    let mut failed = claimed.record.as_ref().clone();
    failed.state = State::Failed;
    failed.error = Some(Failure { code: FailureCode::Unavailable, message: "the upstream refused".into() });
    failed.expire_time = Some(now() + TTL);
    failed.data_time = Some(now());
    assert_eq!(store.finish(&lease, failed, None).await.expect("store"), Written::Done);
    let cached = store
        .claim(&failed_key, &needs_more, &ROOMY, mint(store, &failed_key).await, "caller-a", Priority::Interactive)
        .await
        .expect("claims");
    assert_eq!(cached.disposition, Disposition::Cached, "a failure needs no time to be read");
}

/// `key` of farm `farm` over `days` days (one queue, hourly), grouped by `group`.
fn key_grouped(farm: u64, days: i64, group: deadline_stats_gateway::grpc::pb::GroupBy) -> CanonicalKey {
    let request = common::start_request(farm, 1, days, &[group]);
    CanonicalKey::new(&deadline_stats_gateway::grpc::convert::start_request(request).expect("valid").request)
}

/// A result of `k` derived from `from`, valid for `valid_for`, with two rows.
async fn derived(store: &dyn AggregationStore, k: &CanonicalKey, from: &str, valid_for: Duration) -> AggregationRecord {
    let mut r = completed(&AggregationRecord::queued(mint(store, k).await, k.clone(), now()), valid_for);
    r.derived_from = Some(from.into());
    r.row_count = 2;
    r
}

async fn the_result_containing_a_request_is_found_through_its_family_most_validity_first(s: &Subject) {
    let store = s.store.as_ref();
    let (three_days, four_days) = (key(41, 3), key(41, 4));
    let mut ids = Vec::new();
    for (k, valid_for) in [(&three_days, 60), (&four_days, 120)] {
        let claimed = claim(store, k, &ROOMY).await.expect("room");
        let lease = holder(store, k.farm_id(), "replica-a").await;
        complete(store, &lease, &claimed.record, Duration::from_secs(valid_for)).await;
        store.leases().release(&lease).await.expect("store");
        ids.push(claimed.record.id.clone());
    }
    let found = |k: CanonicalKey, freshness: Freshness| async move {
        store.containing(&k, &freshness).await.expect("store").map(|r| r.id.clone())
    };
    let one_day = key(41, 1);
    assert_eq!(found(one_day.clone(), ANY).await.as_ref(), Some(&ids[1]), "both contain it: the one valid longer");
    let needs = |secs| Freshness { min_remaining: Duration::from_secs(secs), max_staleness: None };
    assert_eq!(found(one_day.clone(), needs(90)).await.as_ref(), Some(&ids[1]));
    assert_eq!(found(one_day.clone(), needs(150)).await, None, "neither is valid long enough");
    assert_eq!(found(key(41, 5), ANY).await, None, "a window past both");
    let other_groups = key_grouped(41, 1, deadline_stats_gateway::grpc::pb::GroupBy::UsageType);
    assert_eq!(found(other_groups, ANY).await, None, "another family");
    assert_eq!(found(key(42, 1), ANY).await, None, "another farm");
    // A derived result is not looked at, even valid longer: the one it came from contains it.
    let d = derived(store, &one_day, &ids[1], Duration::from_secs(300)).await;
    store.put_derived(d, rows(2, |_, buf| buf.extend_from_slice(b"row"))).await.expect("store");
    assert_eq!(found(one_day, ANY).await.as_ref(), Some(&ids[1]));
}

/// One queue of farm `farm`, hourly, from day `from` of the bench window for `days` days.
fn window_key(farm: u64, from: i64, days: i64) -> CanonicalKey {
    let mut request = common::start_request(farm, 1, days, &[deadline_stats_gateway::grpc::pb::GroupBy::QueueId]);
    let start = request.start_time.as_mut().expect("a start");
    start.seconds += from * 86_400;
    let end = request.end_time.as_mut().expect("an end");
    end.seconds += from * 86_400;
    CanonicalKey::new(&deadline_stats_gateway::grpc::convert::start_request(request).expect("valid").request)
}

async fn only_the_results_starting_nearest_before_a_request_are_looked_at(s: &Subject) {
    let store = s.store.as_ref();
    // A long result from day 0, then one-day results from day 1 on: a request on day 70 lies in
    // the long one, which is looked at while fewer than 64 others start between.
    let mut keys = vec![window_key(44, 0, 100)];
    keys.extend((1..=64).map(|day| window_key(44, day, 1)));
    let lease = holder(store, keys[0].farm_id(), "replica-a").await;
    for (n, k) in keys.iter().enumerate() {
        let claimed = claim(store, k, &ROOMY).await.expect("room");
        complete(store, &lease, &claimed.record, Duration::from_secs(60)).await;
        let found = store.containing(&window_key(44, 70, 1), &ANY).await.expect("store");
        let looked_at = n < 64;
        assert_eq!(found.is_some(), looked_at, "{n} one-day results start after the long one");
    }
}

async fn a_derived_result_answers_its_key_unless_an_active_aggregation_does(s: &Subject) {
    let store = s.store.as_ref();
    let k = key(43, 1);
    let d = derived(store, &k, "agg-00000000000000000000000000000000", Duration::from_secs(60)).await;
    let id = d.id.clone();
    let kept = store.put_derived(d, rows(2, |_, buf| buf.extend_from_slice(b"row"))).await.expect("store");
    assert_eq!(kept.record.derived_from.as_deref(), Some("agg-00000000000000000000000000000000"));
    let again = claim(store, &k, &ROOMY).await.expect("claims");
    assert_eq!((again.disposition, &again.record.id), (Disposition::Cached, &id), "its key answers it");
    match store.read(&id).await.expect("store") {
        Found::Terminal(r) => assert_eq!(r.rows.as_ref().map(|r| r.len()), Some(2)),
        other => panic!("not readable: {other:?}"),
    }
    let busy = key(43, 2);
    let running = claim(store, &busy, &ROOMY).await.expect("room");
    let d = derived(store, &busy, "agg-00000000000000000000000000000000", Duration::from_secs(60)).await;
    let other = d.id.clone();
    store.put_derived(d, rows(2, |_, buf| buf.extend_from_slice(b"row"))).await.expect("store");
    let joined = claim(store, &busy, &ROOMY).await.expect("claims");
    assert_eq!((joined.disposition, &joined.record.id), (Disposition::Joined, &running.record.id));
    assert!(matches!(store.read(&other).await.expect("store"), Found::Terminal(_)), "the derived one still reads");
}

async fn an_expired_result_reads_expired_and_answers_no_start(s: &Subject) {
    let store = s.store.as_ref();
    let k = key(32, 1);
    let claimed = claim(store, &k, &ROOMY).await.expect("room");
    let lease = holder(store, claimed.record.farm_id(), "replica-a").await;
    complete(store, &lease, &claimed.record, Duration::from_millis(300)).await;
    assert!(matches!(store.read(&claimed.record.id).await.expect("store"), Found::Terminal(_)));
    tokio::time::sleep(Duration::from_millis(400)).await;
    store.housekeeping().await;
    match store.read(&claimed.record.id).await.expect("store") {
        Found::Expired(at) => assert!(at <= now(), "it says when"),
        other => panic!("an expired result still reads: {other:?}"),
    }
    assert_eq!(claim(store, &k, &ROOMY).await.expect("room").disposition, Disposition::Started);
}

async fn every_write_wakes_its_waiters(s: &Subject) {
    let store = s.store.as_ref();
    let claimed = claim(store, &key(41, 1), &ROOMY).await.expect("room");
    let mut waiter = s.wakeups.waiter(&claimed.record.id);
    let lease = holder(store, claimed.record.farm_id(), "replica-a").await;
    let record = running(&claimed.record);
    store.update(&lease, record.clone()).await.expect("store");
    tokio::time::timeout(Duration::from_secs(10), waiter.woken()).await.expect("an update wakes");
    store.finish(&lease, completed(&record, TTL), None).await.expect("store");
    tokio::time::timeout(Duration::from_secs(10), waiter.woken()).await.expect("the end wakes");
}

/// Both stores count alike: active aggregations, each farm's queued and running ones, results.
async fn stats_count_what_the_store_holds(s: &Subject) {
    let store = s.store.as_ref();
    let (a, b, other) = (key(42, 1), key(42, 2), key(43, 1));
    let first = claim(store, &a, &ROOMY).await.expect("room");
    claim(store, &b, &ROOMY).await.expect("room");
    claim(store, &other, &ROOMY).await.expect("room");
    let (farm, other_farm) = (a.farm_id().to_owned(), other.farm_id().to_owned());
    let load = |queued, running| FarmLoad { queued, running };
    store.housekeeping().await;
    let stats = store.stats();
    assert_eq!((stats.active, stats.up), (3, true));
    assert_eq!((stats.farms.get(&farm), stats.farms.get(&other_farm)), (Some(&load(2, 0)), Some(&load(1, 0))));
    let lease = holder(store, &farm, "replica-a").await;
    let record = running(&first.record);
    store.update(&lease, record.clone()).await.expect("store");
    store.housekeeping().await;
    assert_eq!(store.stats().farms.get(&farm), Some(&load(1, 1)), "the head runs");
    complete(store, &lease, &record, TTL).await;
    store.housekeeping().await;
    let stats = store.stats();
    assert_eq!((stats.active, stats.farms.get(&farm)), (2, Some(&load(1, 0))));
    assert!(stats.cached >= 1 && stats.cached_bytes > 0, "the result is held: {stats:?}");
}

/// `RunModel::observe`: the same moving average in every store.
async fn the_run_model_is_a_moving_average(s: &Subject) {
    let store = s.store.as_ref();
    let farm = key(44, 1).farm_id().to_owned();
    assert_eq!(store.run_model(&farm).await.expect("store"), None, "nothing observed, nothing said");
    store.observe_run(&farm, 4, Duration::from_secs(8)).await.expect("store");
    store.observe_run(&farm, 2, Duration::from_secs(8)).await.expect("store");
    let expected =
        RunModel::observe(Some(RunModel::observe(None, 4, Duration::from_secs(8))), 2, Duration::from_secs(8));
    let model = store.run_model(&farm).await.expect("store").expect("observed");
    assert_eq!(model.runs, 2);
    assert!((model.seconds_per_unit - expected.seconds_per_unit).abs() < 1e-9, "{model:?} against {expected:?}");
}

/// A completed result of `k`, valid for a minute, that answered `hits` Starts in all.
async fn popular(store: &dyn AggregationStore, lease: &Lease, k: &CanonicalKey, hits: u32) -> Claimed {
    let first = claim(store, k, &ROOMY).await.expect("room");
    complete(store, lease, &first.record, Duration::from_secs(60)).await;
    for n in 1..hits {
        let by = format!("caller-{n}");
        assert_eq!(claim_by(store, k, &ROOMY, &by).await.expect("claims").disposition, Disposition::Cached);
    }
    first
}

async fn refreshes(store: &dyn AggregationStore, due_in: Duration, limits: &Limits) -> Vec<Arc<AggregationRecord>> {
    let ids = IdMinter::per_bucket(|_| 0);
    for bucket in Bucket::all() {
        ids.retag(bucket, store.epoch(bucket).await.expect("store").unwrap_or_default());
    }
    store.start_refreshes(now() + due_in, 3, limits, &|farm| ids.mint(farm)).await.expect("store")
}

/// `policy::refresh_verdict`: due, popular, within bounds, once.
async fn popular_results_are_refreshed_once_when_due(s: &Subject) {
    let store = s.store.as_ref();
    let (a, c, cold) = (key(71, 1), key(71, 2), key(71, 3));
    let lease = holder(store, a.farm_id(), "replica-a").await;
    popular(store, &lease, &a, 3).await;
    popular(store, &lease, &c, 3).await;
    popular(store, &lease, &cold, 2).await;
    assert!(refreshes(store, Duration::from_secs(30), &ROOMY).await.is_empty(), "not due yet (60 s left)");
    let full = Limits { max_live: 0, ..ROOMY };
    assert!(refreshes(store, Duration::from_secs(120), &full).await.is_empty(), "refreshes count as live");
    let queued = refreshes(store, Duration::from_secs(120), &ROOMY).await;
    let mut keys: Vec<_> = queued.iter().map(|r| (r.key.clone(), r.refresh)).collect();
    keys.sort_by_key(|(k, _)| k == &c);
    assert_eq!(keys, vec![(a.clone(), true), (c, true)], "the two popular keys, not the cold one");
    assert!(refreshes(store, Duration::from_secs(120), &ROOMY).await.is_empty(), "each result is refreshed once");
    assert_eq!(head(store, a.farm_id()).await, Some(queued[0].id.clone()), "queued on the farm");
}

/// `policy::counts_as_hit`: one caller's Starts of a result, however many, are one hit (within
/// the window; the window itself is a unit test of the policy), so a caller retrying or
/// polling by Start cannot make a result look popular; other callers' count.
async fn a_caller_counts_once_toward_a_results_popularity(s: &Subject) {
    let store = s.store.as_ref();
    let (busy, shared) = (key(72, 1), key(72, 2));
    let lease = holder(store, busy.farm_id(), "replica-a").await;
    let first = claim(store, &busy, &ROOMY).await.expect("room");
    complete(store, &lease, &first.record, Duration::from_secs(60)).await;
    for _ in 0..10 {
        assert_eq!(claim(store, &busy, &ROOMY).await.expect("claims").disposition, Disposition::Cached);
    }
    popular(store, &lease, &shared, 3).await;
    let queued = refreshes(store, Duration::from_secs(120), &ROOMY).await;
    let keys: Vec<_> = queued.iter().map(|r| r.key.clone()).collect();
    assert_eq!(keys, vec![shared], "three callers once each make a result popular; one caller eleven times does not");
}

/// `policy::caller_slot`: a caller's Start goes before the refreshes waiting, never before the
/// head.
async fn a_caller_goes_before_waiting_refreshes(s: &Subject) {
    let store = s.store.as_ref();
    let (a, c) = (key(74, 1), key(74, 2));
    let lease = holder(store, a.farm_id(), "replica-a").await;
    let old_a = popular(store, &lease, &a, 3).await;
    popular(store, &lease, &c, 3).await;
    let queued = refreshes(store, Duration::from_secs(120), &ROOMY).await;
    assert_eq!(queued.len(), 2);
    let cached = claim(store, &a, &ROOMY).await.expect("claims");
    assert_eq!((cached.disposition, &cached.record.id), (Disposition::Cached, &old_a.record.id), "the old answers");
    let caller = claim(store, &key(74, 3), &ROOMY).await.expect("room");
    assert_eq!(caller.queue_position, 1, "before the refresh waiting, after the head");
    assert_eq!(position(store.read(&queued[1].id).await.expect("store")), 2, "the waiting refresh is behind it");
    assert_eq!(head(store, a.farm_id()).await, Some(queued[0].id.clone()), "the head stays");
}

async fn a_refresh_becomes_what_its_key_answers_or_is_joined(s: &Subject) {
    let store = s.store.as_ref();
    let (a, c) = (key(75, 1), key(75, 2));
    let lease = holder(store, a.farm_id(), "replica-a").await;
    let old_a = popular(store, &lease, &a, 3).await;
    let old_c = popular(store, &lease, &c, 3).await;
    let queued = refreshes(store, Duration::from_secs(120), &ROOMY).await;
    let refresh_of = |k: &CanonicalKey| queued.iter().find(|r| &r.key == k).cloned().expect("a refresh");
    let (refresh_a, refresh_c) = (refresh_of(&a), refresh_of(&c));

    complete(store, &lease, &refresh_a, Duration::from_secs(120)).await;
    let renewed = claim(store, &a, &ROOMY).await.expect("claims");
    assert_eq!((renewed.disposition, &renewed.record.id), (Disposition::Cached, &refresh_a.id), "the key moved on");
    assert!(matches!(store.read(&old_a.record.id).await.expect("store"), Found::Terminal(_)), "the old id reads");

    let needs_more = Freshness { min_remaining: Duration::from_secs(90), max_staleness: None };
    let joined = store
        .claim(&c, &needs_more, &ROOMY, mint(store, &c).await, "caller-a", Priority::Interactive)
        .await
        .expect("claims");
    assert_eq!(
        (joined.disposition, &joined.record.id),
        (Disposition::Joined, &refresh_c.id),
        "a Start the old result no longer answers joins the refresh"
    );
    complete(store, &lease, &refresh_c, Duration::from_secs(120)).await;
    let renewed = claim(store, &c, &ROOMY).await.expect("claims");
    assert_eq!((renewed.disposition, &renewed.record.id), (Disposition::Cached, &refresh_c.id));
    assert_ne!(renewed.record.id, old_c.record.id);
}

async fn a_farm_with_callers_work_gets_no_refresh_until_it_is_done(s: &Subject) {
    let store = s.store.as_ref();
    let (d, e) = (key(72, 1), key(72, 2));
    let lease = holder(store, d.farm_id(), "replica-a").await;
    popular(store, &lease, &d, 3).await;
    let busy = claim(store, &e, &ROOMY).await.expect("room");
    assert!(refreshes(store, Duration::from_secs(120), &ROOMY).await.is_empty(), "callers first");
    complete(store, &lease, &busy.record, Duration::from_secs(600)).await;
    let queued = refreshes(store, Duration::from_secs(120), &ROOMY).await;
    assert_eq!(queued.iter().map(|r| r.key.clone()).collect::<Vec<_>>(), vec![d], "then it is refreshed");
}

async fn a_failed_refresh_changes_nothing_and_is_not_retried(s: &Subject) {
    let store = s.store.as_ref();
    let f = key(73, 1);
    let lease = holder(store, f.farm_id(), "replica-a").await;
    let old_f = popular(store, &lease, &f, 3).await;
    let queued = refreshes(store, Duration::from_secs(120), &ROOMY).await;
    assert_eq!(queued.len(), 1);
    let mut failed = (*queued[0]).clone();
    failed.state = State::Failed;
    failed.error = Some(Failure { code: FailureCode::Unavailable, message: "the upstream refused".into() });
    failed.expire_time = Some(now() + TTL);
    assert_eq!(store.finish(&lease, failed, None).await.expect("store"), Written::Done);
    let still = claim(store, &f, &ROOMY).await.expect("claims");
    assert_eq!((still.disposition, &still.record.id), (Disposition::Cached, &old_f.record.id));
    assert!(refreshes(store, Duration::from_secs(120), &ROOMY).await.is_empty(), "not retried in a loop");
}

/// A fresh memory store whose clock is tokio's: its tests run on paused time, so waiting out a
/// validity costs no real time.
fn memory() -> Subject {
    let wakeups = Arc::new(Wakeups::default());
    let clock = Clock::tokio();
    CLOCK.with(|c| *c.borrow_mut() = clock.clone());
    let store = MemoryStore::with_clock(64 * 1024 * 1024, Duration::from_secs(30), wakeups.clone(), clock);
    Subject { store: Arc::new(store), wakeups }
}

/// A replica's coordination on `server` under `prefix`, as `serve --store redis` builds it (on
/// the system's clock: Redis expires keys in real time).
async fn on_redis(server: &common::RedisServer, prefix: &str) -> Coordination {
    on_redis_by(server, prefix, Clock::system()).await
}

/// A replica's settings on Redis, on `clock`: no pacing, no caller limits.
fn redis_settings(clock: Clock) -> CoordinationSettings {
    CoordinationSettings {
        cache_max_bytes: 64 * 1024 * 1024,
        result_grace: Duration::from_secs(30),
        upstream_start: Rate { per_second: 0.0, burst: 1 },
        upstream_get: Rate { per_second: 0.0, burst: 1 },
        caller_start: Rate { per_second: 0.0, burst: 1 },
        caller_get: Rate { per_second: 0.0, burst: 1 },
        caller_limits: Default::default(),
        clock,
    }
}

/// [`on_redis`], the replica's own clock being `clock`.
async fn on_redis_by(server: &common::RedisServer, prefix: &str, clock: Clock) -> Coordination {
    Coordination::redis(&redis_settings(clock), &RedisConfig::new(server.url()).with_prefix(prefix))
        .await
        .expect("connects to redis-server")
}

/// A replica's coordination on the Redis Cluster `cluster`, as `serve --store redis` builds it
/// for a `redis-cluster://` URL.
async fn on_cluster(cluster: &common::RedisCluster) -> Coordination {
    Coordination::redis(&redis_settings(Clock::system()), &RedisConfig::new(cluster.cluster_url()))
        .await
        .expect("connects to the cluster")
}

async fn in_cluster(cluster: &common::RedisCluster) -> Subject {
    let c = on_cluster(cluster).await;
    Subject { store: c.store, wakeups: c.wakeups }
}

async fn in_redis(server: &common::RedisServer) -> Subject {
    let c = on_redis(server, "dsg:").await;
    Subject { store: c.store, wakeups: c.wakeups }
}

/// One test per property on each backend; each Redis test has a redis-server of its own.
macro_rules! conformance {
    ($($property:ident),* $(,)?) => {
        mod memory_store {
            $(
                #[tokio::test(start_paused = true)]
                async fn $property() {
                    super::$property(&super::memory()).await;
                }
            )*
        }
        mod redis_store {
            $(
                #[tokio::test]
                async fn $property() {
                    let server = tokio::task::spawn_blocking(super::common::redis_server).await.expect("joins");
                    super::$property(&super::in_redis(&server).await).await;
                }
            )*
        }
        mod cluster_store {
            $(
                #[tokio::test]
                async fn $property() {
                    let cluster = tokio::task::spawn_blocking(super::common::redis_cluster).await.expect("joins");
                    super::$property(&super::in_cluster(&cluster).await).await;
                }
            )*
        }
    };
}

conformance! {
    identical_claims_coalesce_and_farms_are_independent,
    a_farm_queue_is_first_in_first_out,
    claims_respect_every_bound,
    only_the_current_lease_holders_writes_land,
    a_discarded_id_leaves_its_farms_queue_under_the_current_lease_only,
    an_offer_is_kept_with_its_active_aggregation_only,
    a_terminal_result_answers_while_fresh_enough,
    an_expired_result_reads_expired_and_answers_no_start,
    every_write_wakes_its_waiters,
    stats_count_what_the_store_holds,
    the_run_model_is_a_moving_average,
    popular_results_are_refreshed_once_when_due,
    a_caller_counts_once_toward_a_results_popularity,
    a_caller_goes_before_waiting_refreshes,
    a_refresh_becomes_what_its_key_answers_or_is_joined,
    a_farm_with_callers_work_gets_no_refresh_until_it_is_done,
    a_failed_refresh_changes_nothing_and_is_not_retried,
    a_farms_queue_is_shared_fairly_between_classes_and_callers,
    a_newcomer_goes_next_and_a_join_moves_an_aggregation_up,
    a_caller_holds_at_most_its_share_of_a_farms_queue,
    a_long_queue_keeps_its_order,
    the_result_containing_a_request_is_found_through_its_family_most_validity_first,
    a_derived_result_answers_its_key_unless_an_active_aggregation_does,
    only_the_results_starting_nearest_before_a_request_are_looked_at,
}

#[tokio::test]
async fn two_replicas_on_one_redis_see_one_store() {
    let server = tokio::task::spawn_blocking(common::redis_server).await.expect("joins");
    let (a, b) = (on_redis(&server, "dsg:").await.store, on_redis(&server, "dsg:").await.store);
    let (a, b) = (a.as_ref(), b.as_ref());
    let k = key(51, 1);
    let first = claim(a, &k, &ROOMY).await.expect("room");
    let joined = claim(b, &k, &ROOMY).await.expect("room");
    assert_eq!((joined.disposition, &joined.record.id), (Disposition::Joined, &first.record.id));
    let lease = holder(b, first.record.farm_id(), "replica-b").await;
    let done = completed(&first.record, Duration::from_secs(600));
    assert_eq!(
        b.finish(&lease, done, Some(rows(1, |_, buf| buf.extend_from_slice(b"row")))).await.expect("store"),
        Written::Done
    );
    match a.read(&first.record.id).await.expect("store") {
        Found::Terminal(result) => {
            assert_eq!(result.record.state, State::Completed);
            assert_eq!(result.rows.as_ref().map(|r| r.slice(0..1).to_vec()), Some(b"row".to_vec()), "the same rows");
        }
        other => panic!("replica a does not see replica b's result: {other:?}"),
    }
    assert!(
        matches!(a.head(first.record.farm_id()).await.expect("store"), Head::Empty),
        "the farm's queue is empty everywhere"
    );

    // Refresh-ahead: hits counted on both replicas, the refresh claimed by one.
    let k = key(52, 1);
    let lease = holder(a, k.farm_id(), "replica-a").await;
    popular(a, &lease, &k, 2).await;
    assert_eq!(claim_by(b, &k, &ROOMY, "caller-2").await.expect("claims").disposition, Disposition::Cached);
    let (on_a, on_b) =
        tokio::join!(refreshes(a, Duration::from_secs(120), &ROOMY), refreshes(b, Duration::from_secs(120), &ROOMY));
    assert_eq!(on_a.len() + on_b.len(), 1, "one refresh between them: {on_a:?} {on_b:?}");
}

/// Every replica reads the time of day from Redis's clock: a result a replica whose own clock
/// is two hours behind completes for ten minutes is fresh, with its rows, to a replica whose
/// clock is two hours ahead, and to Redis's key TTLs.
#[tokio::test]
async fn replicas_whose_clocks_are_hours_apart_agree_on_redis_time() {
    let server = tokio::task::spawn_blocking(common::redis_server).await.expect("joins");
    let off_by = |secs: i64| Clock::corrected(Clock::system(), Arc::new(AtomicI64::new(secs * 1_000_000)));
    let behind = on_redis_by(&server, "dsg:", off_by(-7200)).await;
    let ahead = on_redis_by(&server, "dsg:", off_by(7200)).await;
    for c in [&behind, &ahead] {
        let skew = c.clock.now().duration_since(SystemTime::now()).unwrap_or_else(|e| e.duration());
        assert!(skew < Duration::from_secs(1), "reads Redis's time, not its own: {skew:?} off");
    }
    let (writer, reader) = (behind.store.as_ref(), ahead.store.as_ref());
    let claimed = claim(writer, &key(56, 1), &ROOMY).await.expect("room");
    let lease = holder(writer, claimed.record.farm_id(), "replica-behind").await;
    let mut done = claimed.record.as_ref().clone();
    done.state = State::Completed;
    done.expire_time = Some(behind.clock.now() + Duration::from_secs(600));
    done.data_time = Some(behind.clock.now());
    let rows = rows(1, |_, buf| buf.extend_from_slice(b"row"));
    assert_eq!(writer.finish(&lease, done, Some(rows)).await.expect("store"), Written::Done);
    match reader.read(&claimed.record.id).await.expect("store") {
        Found::Terminal(result) => assert!(result.rows.is_some(), "the rows are in Redis"),
        other => panic!("not fresh with its rows to the other replica: {other:?}"),
    }
    let disposition = claim(reader, &key(56, 1), &ROOMY).await.expect("claims").disposition;
    assert_eq!(disposition, Disposition::Cached, "answered from the cache by the other replica");
}

/// The refresh-ahead due set does not grow with results nobody refreshes: results past their
/// expiry leave it at the next scan, popular or not.
#[tokio::test]
async fn expired_results_leave_the_refresh_due_set() {
    let server = tokio::task::spawn_blocking(common::redis_server).await.expect("joins");
    let store = on_redis(&server, "dsg:").await.store;
    let store = store.as_ref();
    for days in 1..=3 {
        let claimed = claim(store, &key(57, days), &ROOMY).await.expect("room");
        let lease = holder(store, claimed.record.farm_id(), "replica-a").await;
        complete(store, &lease, &claimed.record, Duration::from_millis(300)).await;
        store.leases().release(&lease).await.expect("store");
    }
    let mut conn = common::redis_conn(&server.url()).await;
    let due_key = RedisKeys::new("dsg:", false).due(Bucket::of_farm(key(57, 1).farm_id()));
    let due: u64 = ::redis::cmd("ZCARD").arg(&due_key).query_async(&mut conn).await.expect("ZCARD");
    assert_eq!(due, 3);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(refreshes(store, Duration::from_secs(120), &ROOMY).await.is_empty());
    let due: u64 = ::redis::cmd("ZCARD").arg(&due_key).query_async(&mut conn).await.expect("ZCARD");
    assert_eq!(due, 0, "expired results left the due set");
}

#[tokio::test]
async fn rows_redis_lost_are_put_back_and_never_over_rows_present() {
    let server = tokio::task::spawn_blocking(common::redis_server).await.expect("joins");
    let (writer, reader) = (on_redis(&server, "dsg:").await.store, on_redis(&server, "dsg:").await.store);
    let claimed = claim(writer.as_ref(), &key(53, 1), &ROOMY).await.expect("room");
    let lease = holder(writer.as_ref(), claimed.record.farm_id(), "replica-a").await;
    let done = completed(&claimed.record, Duration::from_secs(600));
    assert_eq!(
        writer.finish(&lease, done, Some(rows(2, |_, buf| buf.extend_from_slice(b"row")))).await.expect("store"),
        Written::Done
    );
    let id = claimed.record.id.clone();
    server.cli(&["DEL", &RedisKeys::new("dsg:", false).rows(&id)]).expect("DEL");
    let Found::RowsLost(record) = reader.read(&id).await.expect("store") else { panic!("the rows are gone") };
    reader.restore_rows(record.clone(), rows(2, |_, buf| buf.extend_from_slice(b"new"))).await.expect("store");
    let fresh = on_redis(&server, "dsg:").await.store;
    match fresh.read(&id).await.expect("store") {
        Found::Terminal(result) => {
            assert_eq!(result.rows.as_ref().map(|r| r.slice(0..1).to_vec()), Some(b"new".to_vec()))
        }
        other => panic!("not put back: {other:?}"),
    }
    reader.restore_rows(record, rows(2, |_, buf| buf.extend_from_slice(b"bad"))).await.expect("store");
    match on_redis(&server, "dsg:").await.store.read(&id).await.expect("store") {
        Found::Terminal(result) => {
            assert_eq!(
                result.rows.as_ref().map(|r| r.slice(0..1).to_vec()),
                Some(b"new".to_vec()),
                "rows are immutable"
            )
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn after_redis_lost_its_state_a_claim_needs_an_id_of_the_new_epoch() {
    let server = tokio::task::spawn_blocking(common::redis_server).await.expect("joins");
    let store = on_redis(&server, "dsg:").await.store;
    let k = key(60, 1);
    let before = epoch(store.as_ref(), k.farm_id()).await.expect("a shared store has an epoch");
    assert_eq!(epoch(store.as_ref(), k.farm_id()).await, Some(before), "stable while the state lives");
    let old = mint(store.as_ref(), &k).await;
    server.cli(&["FLUSHALL"]).expect("FLUSHALL");
    let refused = store
        .claim(&k, &ANY, &ROOMY, old, "caller-a", Priority::Interactive)
        .await
        .expect_err("an id of the lost state");
    assert!(matches!(refused, ClaimError::NewEpoch), "{refused:?}");
    let after = epoch(store.as_ref(), k.farm_id()).await.expect("a new epoch");
    assert_ne!(after, before, "a new generation");
    claim(store.as_ref(), &key(60, 1), &ROOMY).await.expect("an id of the new epoch is claimed");
}

#[tokio::test]
async fn after_redis_restarts_from_an_older_snapshot_no_two_holders_share_a_token_and_the_epoch_is_new() {
    let mut server = tokio::task::spawn_blocking(common::redis_server).await.expect("joins");
    let store = on_redis(&server, "dsg:").await.store;
    let farm = key(61, 1).farm_id().to_owned();
    let before = epoch(store.as_ref(), &farm).await.expect("a shared store has an epoch");
    let a = holder(store.as_ref(), &farm, "replica-a").await;
    server.cli(&["SAVE"]).expect("SAVE");
    store.leases().release(&a).await.expect("store");
    let b = holder(store.as_ref(), &farm, "replica-b").await;
    // Redis comes back from the snapshot: B's lease and its fence are lost, A's lease is back.
    server.restart();
    let store = on_redis(&server, "dsg:").await.store;
    store.leases().release(&a).await.expect("store");
    let c = holder(store.as_ref(), &farm, "replica-c").await;
    assert!(c.token > b.token, "a token after the loss is larger than every token before: {c:?} {b:?}");
    assert!(!store.leases().is_current(&b).await.expect("store"), "the holder whose lease was lost is fenced");
    let after = epoch(store.as_ref(), &farm).await.expect("an epoch");
    assert_ne!(after, before, "the state may have lost writes: ids minted since the snapshot must answer lost");
}
