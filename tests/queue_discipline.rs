//! The fair queue discipline of a farm, as a property test against a simple model: random
//! arrivals of several callers in two classes, joins (by the same and by other callers, of
//! either class) and completions, run on the memory store (the Redis scripts are held to the
//! same rules by the conformance suite and tests/fairness.rs).
//!
//! The model keeps what the rules say without their order: each active aggregation's owner
//! (the caller whose Start queued it), class (raised to interactive by an interactive join)
//! and whether it is the head. After every step the store must agree with it, and:
//! - every refusal is the model's (the farm's capacity, then the caller's share);
//! - positions are consistent: `read` answers each one's index in `queue`, the head first;
//! - the head is never displaced; a new head is the lowest class waiting;
//! - callers take turns: while two callers both have interactive work of their own waiting
//!   (and nobody joins), the numbers of their aggregations started differ by at most two (the
//!   bound of start-time fair queueing with unit costs);
//! - nothing starves: once arrivals stop, everything runs, batch included.

use deadline_stats_gateway::gateway::coordination::{
    AggregationStore, ClaimError, Disposition, Found, Freshness, Head, Limits, MemoryStore,
};
use deadline_stats_gateway::gateway::ids::IdMinter;
use deadline_stats_gateway::gateway::key::CanonicalKey;
use deadline_stats_gateway::gateway::{AggregationRecord, Priority, State};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

mod common;

const CASES: u32 = 500;

/// How many times the turn-taking bound was checked, over every case.
static TURNS_CHECKED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
const CALLERS: [&str; 3] = ["a", "b", "c"];
const LIMITS: Limits = Limits { queue_capacity: 12, max_live: 1000, max_farms: 10, caller_capacity: 5, fair: true };
const ANY: Freshness = Freshness { min_remaining: Duration::ZERO, max_staleness: None };

#[derive(Debug, Clone)]
enum Step {
    /// A caller starts distinct work (`days` picks which, so some Starts repeat a key: joins).
    Start { caller: usize, days: i64, interactive: bool },
    /// The head completes.
    Complete,
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        // Few days (Starts that repeat a key: joins) or many (distinct work, no joins).
        3 => (0..CALLERS.len(), prop_oneof![1i64..30, 100i64..10_000], any::<bool>())
            .prop_map(|(caller, days, interactive)| Step::Start { caller, days, interactive }),
        1 => Just(Step::Complete),
    ];
    prop::collection::vec(step, 1..80)
}

fn key(days: i64) -> CanonicalKey {
    let request = deadline_stats_gateway::grpc::convert::start_request(common::start_request(
        600,
        1,
        days,
        &[deadline_stats_gateway::grpc::pb::GroupBy::QueueId],
    ))
    .expect("a valid request");
    CanonicalKey::new(&request.request)
}

/// What the model knows of an active aggregation.
#[derive(Debug, Clone)]
struct Modelled {
    owner: &'static str,
    interactive: bool,
    askers: HashSet<&'static str>,
}

struct Run {
    store: Arc<MemoryStore>,
    farm: String,
    active: HashMap<Arc<str>, Modelled>,
    by_days: HashMap<i64, Arc<str>>,
    head: Option<Arc<str>>,
    /// For each pair of callers both continuously backlogged with interactive work of their
    /// own (and no join since): how many of each one's started since.
    pairs: HashMap<(&'static str, &'static str), (i64, i64)>,
    /// A caller joined a waiting aggregation: turns were spent on others' work, and the
    /// turn-taking bound (of one's own starts) no longer applies.
    joined: bool,
    /// What happened, for a failure's message.
    log: Vec<String>,
}

impl Run {
    async fn queue(&self) -> Vec<Arc<AggregationRecord>> {
        self.store.queue(&self.farm, 1000).await.expect("memory")
    }

    /// Everything the model says of the store's state now.
    async fn check(&self) {
        let queue = self.queue().await;
        let ids: HashSet<Arc<str>> = queue.iter().map(|r| r.id.clone()).collect();
        let modelled: HashSet<Arc<str>> = self.active.keys().cloned().collect();
        assert_eq!(ids, modelled, "the queue holds exactly the active aggregations");
        assert_eq!(queue.first().map(|r| r.id.clone()), self.head, "the head is never displaced");
        for (i, r) in queue.iter().enumerate() {
            let Found::Active { queue_position, record } = self.store.read(&r.id).await.expect("memory") else {
                panic!("{} is active", r.id)
            };
            assert_eq!(queue_position as usize, i, "{} reads its place", r.id);
            let interactive = self.active[&r.id].interactive;
            assert_eq!(record.priority == Priority::Interactive, interactive, "{}'s class", r.id);
        }
        // Waiting: interactive before batch.
        let classes: Vec<bool> = queue.iter().skip(1).map(|r| self.active[&r.id].interactive).collect();
        assert!(classes.windows(2).all(|w| w[0] >= w[1]), "interactive waits before batch: {classes:?}");
    }

    fn waiting_of(&self, caller: &str) -> usize {
        self.active.iter().filter(|(id, m)| Some(*id) != self.head.as_ref() && m.owner == caller).count()
    }

    async fn start(&mut self, caller: &'static str, days: i64, interactive: bool) {
        let priority = if interactive { Priority::Interactive } else { Priority::Batch };
        let k = key(days);
        let claimed = self.store.claim(&k, &ANY, &LIMITS, IdMinter::new().mint(k.farm_id()), caller, priority).await;
        let existing = self.by_days.get(&days).filter(|id| self.active.contains_key(*id)).cloned();
        match (existing, claimed) {
            (Some(id), Ok(c)) => {
                assert_eq!((c.disposition, &c.record.id), (Disposition::Joined, &id), "an identical Start joins");
                let m = self.active.get_mut(&id).expect("modelled");
                let first_ask = m.askers.insert(caller);
                if first_ask && Some(&id) != self.head.as_ref() {
                    m.interactive |= interactive;
                    self.joined = true;
                    self.log.push(format!("{caller} joins {id}"));
                }
            }
            (None, Ok(c)) => {
                assert_eq!(c.disposition, Disposition::Started);
                let queued = self.active.len();
                assert!(queued <= LIMITS.queue_capacity, "the model refuses at the farm's capacity");
                assert!(
                    queued == 0 || self.waiting_of(caller) < LIMITS.caller_capacity,
                    "the model refuses at the share"
                );
                let askers = HashSet::from([caller]);
                self.active.insert(c.record.id.clone(), Modelled { owner: caller, interactive, askers });
                self.by_days.insert(days, c.record.id.clone());
                if self.head.is_none() {
                    self.head = Some(c.record.id.clone());
                }
                self.log.push(format!("{caller} starts {} ({})", c.record.id, priority.name()));
            }
            (None, Err(ClaimError::QueueFull { .. })) => {
                assert!(self.active.len() > LIMITS.queue_capacity, "refused as full with room");
            }
            (None, Err(ClaimError::CallerQueueFull { .. })) => {
                assert!(self.active.len() <= LIMITS.queue_capacity, "the farm's capacity is checked first");
                assert_eq!(self.waiting_of(caller), LIMITS.caller_capacity, "refused within {caller}'s share");
            }
            (existing, other) => panic!("{caller} day {days} (active: {existing:?}): {other:?}"),
        }
    }

    /// Completes the head; the new head is checked against the rules.
    async fn complete(&mut self) {
        let Some(id) = self.head.take() else { return };
        let queue = self.queue().await;
        let lease = self.store.leases().acquire(&self.farm, "holder", Duration::from_secs(60)).await;
        let lease = lease.expect("memory").expect("free");
        let Found::Active { record, .. } = self.store.read(&id).await.expect("memory") else { panic!("active") };
        let mut done = (*record).clone();
        done.state = State::Completed;
        done.expire_time = Some(std::time::SystemTime::now() + Duration::from_secs(600));
        done.data_time = Some(std::time::SystemTime::now());
        // Without rows, a COMPLETED result answers no Start: a Start of its key queues anew.
        self.store.finish(&lease, done, None).await.expect("memory");
        self.store.leases().release(&lease).await.expect("memory");
        self.active.remove(&id);
        // The next head is the one that was next in the queue, of the lowest class waiting.
        self.head = match self.store.head(&self.farm).await.expect("memory") {
            Head::Ready(r) => Some(r.id.clone()),
            Head::Empty => None,
            Head::Broken { id, .. } => panic!("{id} broken"),
        };
        assert_eq!(self.head, queue.get(1).map(|r| r.id.clone()), "the next in line started");
        if let Some(head) = &self.head {
            let m = &self.active[head];
            let any_interactive = self.active.values().any(|w| w.interactive);
            assert!(m.interactive || !any_interactive, "no batch starts while interactive work waits");
            self.log.push(format!("{head} of {} starts", m.owner));
            if m.interactive && !self.joined {
                let owner = m.owner;
                for ((x, y), (sx, sy)) in &mut self.pairs {
                    *sx += i64::from(*x == owner);
                    *sy += i64::from(*y == owner);
                    TURNS_CHECKED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    assert!((*sx - *sy).abs() <= 2, "{x} and {y} take turns: {sx} and {sy} started: {:#?}", self.log);
                }
            }
        }
    }

    /// Callers with interactive work of their own waiting (behind the head).
    fn backlogged(&self) -> Vec<&'static str> {
        CALLERS
            .iter()
            .copied()
            .filter(|c| {
                self.active.iter().any(|(id, m)| m.owner == *c && m.interactive && Some(id) != self.head.as_ref())
            })
            .collect()
    }

    /// Pairs stay counted while both callers stay backlogged; new ones start at zero.
    fn track_pairs(&mut self) {
        let backlogged = self.backlogged();
        self.pairs.retain(|(x, y), _| backlogged.contains(x) && backlogged.contains(y));
        for (i, x) in backlogged.iter().enumerate() {
            for y in &backlogged[i + 1..] {
                self.pairs.entry((x, y)).or_default();
            }
        }
    }
}

async fn run(steps: Vec<Step>) {
    let store = Arc::new(MemoryStore::new(1 << 24, Duration::ZERO, Arc::default()));
    let mut run = Run {
        store,
        farm: key(1).farm_id().to_owned(),
        active: HashMap::new(),
        by_days: HashMap::new(),
        head: None,
        pairs: HashMap::new(),
        joined: false,
        log: Vec::new(),
    };
    for step in steps {
        match step {
            Step::Start { caller, days, interactive } => run.start(CALLERS[caller], days, interactive).await,
            Step::Complete => run.complete().await,
        }
        run.check().await;
        run.track_pairs();
    }
    // Arrivals stop: everything runs, batch included.
    let mut left = run.active.len();
    while run.head.is_some() {
        run.complete().await;
        run.check().await;
        run.track_pairs();
        assert!(run.active.len() < left, "the farm moves on");
        left = run.active.len();
    }
    assert!(run.active.is_empty(), "nothing starves");
}

#[test]
fn the_queue_discipline_holds_against_the_model() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    let config = Config { cases: CASES, failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new(config);
    if let Err(e) = runner.run(&steps(), |steps| {
        runtime.block_on(run(steps));
        Ok(())
    }) {
        panic!("{e}");
    }
    let checked = TURNS_CHECKED.load(std::sync::atomic::Ordering::Relaxed);
    assert!(checked > 1000, "the turn-taking bound was exercised: {checked} checks");
}
