//! The [`AggregationStore`] shared by replicas through Redis.
//!
//! - `admission`: the bounds shared by every bucket (exact on one Redis, within R − 1 on a
//!   cluster).
//! - `client`: the connection, leases, shared rates and the relay of change notifications.
//! - `conn`: a connection (to one Redis, behind Sentinel, or to a cluster) that survives
//!   drops, half-open sockets and a stalled cluster connection.
//! - `keys`: the name of every key (see there for the layout).
//! - `wire`: how a record is stored.
//! - `scripts`: the Lua scripts, one file each under `scripts/`.
//! - `time`: Redis's clock, which every replica reads the time of day from.
//!
//! A claim, an update, a finish and queueing a refresh are each one script: the claim reads the
//! key's record and either answers it or queues a new one; updates and finishes check the
//! farm's fence first, so a replaced lease holder writes nothing. Every write is published on
//! the changes channel. Terminal results read here are kept in this replica's results cache
//! (the near-cache), so cache-hit Gets do not touch Redis.
//!
//! Every key a script touches is declared in its KEYS and carries its farm's bucket as hash
//! tag (`keys`), so the same scripts run on one Redis and on a Redis Cluster. Where a script
//! would read a key it only learns from another (the record of the id a key answers), the
//! replica reads that first and the script checks it is unchanged (`moved` else, and the
//! replica reads again). The bounds shared by every bucket are checked through `admission`.
//!
//! Each bucket's state has an epoch ([`RedisClient::epoch`]): a claim is only made with an id
//! of the bucket's current one, so every id names the state it lives in.

pub(crate) mod activity;
mod admission;
pub(crate) mod client;
mod conn;
mod keys;
mod scripts;
pub(crate) mod time;
mod wire;

pub use client::{RedisClient, RedisConfig, RedisRate};
pub use keys::Keys as RedisKeys;

use super::lease::{FarmLeases, Lease};
use super::policy::{self, Freshness, Limits, RefreshVerdict};
use super::results::{CachedResult, ResultsCache};
use super::run_model::{RunModel, SMOOTHING};
use super::wakeups::{Wakeups, farm_topic};
use super::{
    AggregationStore, Bound, ClaimError, Claimed, Disposition, FarmLoad, Found, Head, QueueFault, StoreError,
    StoreStats, Topology, Written,
};
use crate::gateway::clock::Clock;
use crate::gateway::ids::{Bucket, tag_of};
use crate::gateway::key::CanonicalKey;
use crate::gateway::record::{AggregationId, AggregationRecord, Offer, Priority, Rows, State};
use crate::gateway::rows::RowBlock;
use admission::{Admission, Counts};
use client::store_error;
use scripts::{
    CLAIM, CONTAINING, DERIVED, DISCARD, FINISH, OBSERVE_RUN, OFFER, QUEUE_REFRESH, RESTORE_ROWS, ROWS_IF_SMALL,
    ROWS_PAGE, UPDATE,
};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;
use wire::{from_json, millis, offer_from_json, offer_to_json, state_name, to_json};

/// How long a record outlives its result, so Get can say it expired or why it failed.
const KEEP_AFTER_EXPIRY: Duration = Duration::from_secs(3600);

/// Due results looked at per bucket and refresh scan.
const DUE_SCAN_LIMIT: usize = 1000;

/// How often a script is run again after it answered `moved` (what it was given to declare
/// changed meanwhile) before the store gives up: each time another replica's write won.
const MOVED_RETRIES: usize = 20;

/// The error after [`MOVED_RETRIES`].
fn kept_moving(script: &'static str) -> StoreError {
    StoreError::UnexpectedAnswer { script, answer: format!("moved {MOVED_RETRIES} times in a row") }
}

/// The epoch an id was minted in, as scripts compare it.
fn epoch_arg(id: &str) -> String {
    tag_of(id).map(|t| t.to_string()).unwrap_or_default()
}

/// How a COMPLETED result not derived from another is listed in its family's index
/// (containing.lua): its window, expiry and id; empty for any other.
fn family_member(r: &AggregationRecord) -> String {
    let Some(expire) = r.expire_time.filter(|_| r.state == State::Completed && r.derived_from.is_none()) else {
        return String::new();
    };
    let q = r.key.request();
    format!("{}:{}:{}:{}", q.start_time.timestamp_millis(), q.end_time.timestamp_millis(), millis(expire), r.id)
}

/// What the claim script answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClaimVerdict {
    Started,
    Joined,
    Cached,
    QueueFull,
    CallerQueueFull,
    Busy(Bound),
    Epoch,
    /// What the replica declared changed meanwhile: read again.
    Moved,
    /// It would queue a new aggregation: the replica checks the bounds first.
    Admit,
}

impl std::str::FromStr for ClaimVerdict {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "started" => Self::Started,
            "joined" => Self::Joined,
            "cached" => Self::Cached,
            "queue_full" => Self::QueueFull,
            "caller_queue_full" => Self::CallerQueueFull,
            "busy_live" => Self::Busy(Bound::ActiveAggregations),
            "busy_farms" => Self::Busy(Bound::Farms),
            "epoch" => Self::Epoch,
            "moved" => Self::Moved,
            "admit" => Self::Admit,
            other => return Err(StoreError::UnexpectedAnswer { script: "claim", answer: other.to_owned() }),
        })
    }
}

impl std::str::FromStr for RefreshVerdict {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "queued" => Self::Queued,
            "gone" => Self::Gone,
            "cold" => Self::Cold,
            "backlog" => Self::Backlog,
            "farms" => Self::Farms,
            "live" => Self::Live,
            "epoch" => Self::Epoch,
            other => return Err(StoreError::UnexpectedAnswer { script: "queue_refresh", answer: other.to_owned() }),
        })
    }
}

/// A duration in whole milliseconds, for script arguments.
fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The store in Redis, with this replica's results cache in front of it.
pub struct RedisStore {
    redis: RedisClient,
    near: Arc<ResultsCache>,
    wakeups: Arc<Wakeups>,
    /// What housekeeping last counted.
    counted: Mutex<StoreStats>,
    /// On a cluster: held while this replica admits a new aggregation (`admission`).
    admitting: tokio::sync::Mutex<()>,
    /// Redis's clock (`time`): every replica's expiry and freshness decisions agree.
    time: time::RedisTime,
    clock: Clock,
}

impl RedisStore {
    /// A store on `redis`, keeping terminal results it reads in `near`, and waking `wakeups`
    /// on its own writes (other replicas' arrive through [`RedisClient::relay_changes`], which
    /// [`AggregationStore::spawn_background`] starts).
    pub(crate) fn new(
        redis: RedisClient,
        near: Arc<ResultsCache>,
        wakeups: Arc<Wakeups>,
        time: time::RedisTime,
    ) -> Self {
        Self {
            redis,
            near,
            wakeups,
            counted: Mutex::default(),
            admitting: tokio::sync::Mutex::new(()),
            clock: time.clock(),
            time,
        }
    }

    fn conn(&self) -> conn::Conn {
        self.redis.conn()
    }

    fn keys(&self) -> &keys::Keys {
        &self.redis.keys
    }

    /// The terminal result `record`, with its rows when it has any; kept in the near cache.
    async fn terminal(&self, record: AggregationRecord, has_rows: bool) -> Result<Found, StoreError> {
        if let Some(at) = record.expired_at(self.clock.now()) {
            return Ok(Found::Expired(at));
        }
        let rows = if has_rows {
            // Rows the near-cache cannot hold are not moved out of Redis whole: read page by
            // page instead (`rows_page`).
            let answer: redis::Value = ROWS_IF_SMALL
                .key(self.keys().rows(&record.id))
                .arg(self.near.max_bytes())
                .invoke_async(&mut self.conn())
                .await
                .map_err(store_error)?;
            match answer {
                redis::Value::Nil => return Ok(Found::RowsLost(Arc::new(record))),
                redis::Value::Int(_) => return Ok(Found::Large(Arc::new(record))),
                redis::Value::BulkString(bytes) => match RowBlock::from_bytes(bytes.into()) {
                    Some(rows) => Some(Arc::new(rows)),
                    None => {
                        return Err(StoreError::Corrupt { what: format!("the rows of {}", record.id), source: None });
                    }
                },
                other => {
                    return Err(StoreError::UnexpectedAnswer { script: "rows_if_small", answer: format!("{other:?}") });
                }
            }
        } else {
            None
        };
        let result = Arc::new(CachedResult::new(Arc::new(record), rows));
        self.near.insert(result.clone());
        Ok(Found::Terminal(result))
    }

    /// Wakes this replica's waiters of a write it made (others learn it from the channel).
    /// The first `count` ids of `farm`'s queue.
    async fn queued_ids(&self, farm: &str, count: usize) -> Result<Vec<String>, StoreError> {
        if count == 0 {
            return Ok(Vec::new());
        }
        redis::cmd("LRANGE")
            .arg(self.keys().queue(farm))
            .arg(0)
            .arg(count - 1)
            .query_async(&mut self.conn())
            .await
            .map_err(store_error)
    }

    fn wake(&self, id: &str, farm: &str) {
        self.wakeups.wake(id);
        self.wakeups.wake(&farm_topic(farm));
    }

    /// What a fenced script's answer (1: written, 0: refused) means.
    fn written(done: i64) -> Written {
        if done == 1 { Written::Done } else { Written::Fenced }
    }

    fn counted(&self) -> MutexGuard<'_, StoreStats> {
        self.counted.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues a refresh of the due result `old_id` if [`RefreshVerdict`] allows; the bucket's
    /// counts when it queued one.
    async fn queue_refresh(
        &self,
        old_id: &str,
        old: &AggregationRecord,
        refresh: &AggregationRecord,
        min_hits: u32,
        limits: &Limits,
        admission: Admission,
    ) -> Result<(RefreshVerdict, Option<Counts>), StoreError> {
        let (k, farm) = (self.keys(), old.farm_id());
        let bucket = Bucket::of_farm(farm);
        let mut script = QUEUE_REFRESH.key(k.due(bucket));
        script
            .key(k.record(old_id))
            .key(k.index(&old.key))
            .key(k.marker(&old.key))
            .key(k.queue(farm))
            .key(k.refreshes(farm))
            .key(k.farms(bucket))
            .key(k.live(bucket))
            .key(k.record(&refresh.id))
            .key(k.epoch(bucket))
            .key(k.version(bucket))
            .key(k.fair(farm));
        if admission == Admission::Inline {
            script.key(k.admission());
        }
        script
            .arg(old_id)
            .arg(&*refresh.id)
            .arg(to_json(refresh)?)
            .arg(farm)
            .arg(min_hits)
            .arg(limits.max_live)
            .arg(limits.max_farms)
            .arg(epoch_arg(&refresh.id))
            .arg(ms(KEEP_AFTER_EXPIRY))
            .arg(millis(self.clock.now()));
        admission.args(&mut script);
        script.arg(bucket.hex());
        let answer: Vec<redis::Value> = script.invoke_async(&mut self.conn()).await.map_err(store_error)?;
        let verdict: String = answer
            .first()
            .and_then(|v| redis::from_redis_value(v.clone()).ok())
            .ok_or_else(|| StoreError::UnexpectedAnswer { script: "queue_refresh", answer: format!("{answer:?}") })?;
        Ok((verdict.parse()?, Counts::from_answer(&answer, 1)))
    }

    /// Runs the claim script once, with what the replica read of the key and its marker.
    #[allow(clippy::too_many_arguments)]
    async fn claim_once(
        &self,
        key: &CanonicalKey,
        freshness: &Freshness,
        limits: &Limits,
        id: &str,
        json: &str,
        (caller, priority): (&str, Priority),
        admission: Admission,
    ) -> Result<ClaimAnswer, StoreError> {
        let (k, farm) = (self.keys(), key.farm_id());
        let bucket = Bucket::of_farm(farm);
        let (existing, refresh): (Option<String>, Option<String>) = redis::cmd("MGET")
            .arg(k.index(key))
            .arg(k.marker(key))
            .query_async(&mut self.conn())
            .await
            .map_err(store_error)?;
        let (existing, refresh) = (existing.unwrap_or_default(), refresh.unwrap_or_default());
        // A record key for each id read, the new record's where there is none.
        let record_of = |read: &str| if read.is_empty() { k.record(id) } else { k.record(read) };
        let rows_of = |read: &str| if read.is_empty() { k.rows(id) } else { k.rows(read) };
        let mut script = CLAIM.key(k.index(key));
        script
            .key(k.queue(farm))
            .key(k.farms(bucket))
            .key(k.live(bucket))
            .key(k.record(id))
            .key(k.epoch(bucket))
            .key(k.marker(key))
            .key(k.refreshes(farm))
            .key(k.version(bucket))
            .key(record_of(&existing))
            .key(rows_of(&existing))
            .key(record_of(&refresh))
            .key(k.fair(farm));
        if admission == Admission::Inline {
            script.key(k.admission());
        }
        script
            .arg(id)
            .arg(json)
            .arg(farm)
            .arg(ms(freshness.min_remaining))
            .arg(freshness.max_staleness.map_or(-1, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)))
            .arg(limits.queue_capacity)
            .arg(limits.max_live)
            .arg(limits.max_farms)
            .arg(epoch_arg(id))
            .arg(millis(self.clock.now()))
            .arg(caller)
            .arg(ms(policy::HIT_WINDOW))
            .arg(&existing)
            .arg(&refresh);
        admission.args(&mut script);
        script
            .arg(bucket.hex())
            .arg(limits.caller_capacity)
            .arg(if limits.fair { "1" } else { "0" })
            .arg(policy::class(priority))
            .arg(k.changes(bucket))
            .arg(farm_topic(farm))
            .arg(k.publish());
        let answer: Vec<redis::Value> = self.redis.guarded(&k.index(key), &script).await?;
        ClaimAnswer::read(&answer)
    }

    /// The id `key` answers now ('' none).
    async fn answering(&self, key: &CanonicalKey) -> Result<String, StoreError> {
        let id: Option<String> =
            redis::cmd("GET").arg(self.keys().index(key)).query_async(&mut self.conn()).await.map_err(store_error)?;
        Ok(id.unwrap_or_default())
    }

    /// The ids of one bucket's farms with work.
    async fn bucket_farms(&self, bucket: Bucket) -> Result<Vec<String>, StoreError> {
        redis::cmd("SMEMBERS").arg(self.keys().farms(bucket)).query_async(&mut self.conn()).await.map_err(store_error)
    }

    /// What each farm of `bucket` with work holds: its queue's length and whether its head
    /// runs.
    async fn bucket_loads(&self, bucket: Bucket) -> Result<Vec<(String, FarmLoad)>, StoreError> {
        let farms = self.bucket_farms(bucket).await?;
        let k = self.keys();
        let mut loads = Vec::with_capacity(farms.len());
        for farm in farms {
            let (len, head): (usize, Option<String>) = redis::pipe()
                .cmd("LLEN")
                .arg(k.queue(&farm))
                .cmd("LINDEX")
                .arg(k.queue(&farm))
                .arg(0)
                .query_async(&mut self.conn())
                .await
                .map_err(store_error)?;
            let running = match head {
                Some(head) => {
                    let state: Option<String> = redis::cmd("HGET")
                        .arg(k.record(&head))
                        .arg("state")
                        .query_async(&mut self.conn())
                        .await
                        .map_err(store_error)?;
                    state.as_deref() == Some(state_name(State::Running))
                }
                None => false,
            };
            loads.push((farm, FarmLoad::of(len, running)));
        }
        Ok(loads)
    }

    /// The refresh-ahead candidates of `bucket`: COMPLETED results expiring by `due_by` that
    /// still answer their key and are popular enough, with their hits and records. Those that
    /// no longer answer their key (expired ones among them) leave the due set when looked at;
    /// housekeeping drops every expired one. Records of results not popular enough are not
    /// read (`policy::refresh_verdict`'s Cold: they may still become popular, so they stay).
    async fn due(
        &self,
        bucket: Bucket,
        due_by: SystemTime,
        min_hits: u32,
    ) -> Result<Vec<(String, u32, AggregationRecord)>, StoreError> {
        let k = self.keys();
        let ids: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(k.due(bucket))
            .arg("-inf")
            .arg(millis(due_by))
            .arg("LIMIT")
            .arg(0)
            .arg(DUE_SCAN_LIMIT)
            .query_async(&mut self.conn())
            .await
            .map_err(store_error)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        ids.iter().for_each(|id| {
            pipe.cmd("HMGET").arg(k.record(id)).arg("state").arg("expire_ms").arg("hits").arg("index");
        });
        type Fields = (Option<String>, Option<i64>, Option<u32>, Option<String>);
        let fields: Vec<Fields> = pipe.query_async(&mut self.conn()).await.map_err(store_error)?;
        let now = millis(self.clock.now());
        let completed = state_name(State::Completed);
        let mut pipe = redis::pipe();
        let mut checked = Vec::new();
        for (id, (state, expire, hits, index)) in ids.iter().zip(fields) {
            match index {
                Some(index) if state.as_deref() == Some(completed) && expire.unwrap_or_default() > now => {
                    pipe.cmd("GET").arg(index);
                    checked.push((id, hits.unwrap_or_default()));
                }
                _ => checked.push((id, u32::MAX)),
            }
        }
        let answering: Vec<Option<String>> = if pipe.cmd_iter().next().is_none() {
            Vec::new()
        } else {
            pipe.query_async(&mut self.conn()).await.map_err(store_error)?
        };
        let mut answering = answering.into_iter();
        let (mut dead, mut popular) = (Vec::new(), Vec::new());
        for (id, hits) in checked {
            // u32::MAX marks those not alive without an index to read.
            let alive = hits != u32::MAX && answering.next().flatten().as_deref() == Some(id.as_str());
            if !alive {
                dead.push(id.clone());
            } else if hits >= min_hits {
                popular.push((id.clone(), hits));
            }
        }
        if !dead.is_empty() {
            let _: i64 = redis::cmd("ZREM")
                .arg(k.due(bucket))
                .arg(&dead)
                .query_async(&mut self.conn())
                .await
                .map_err(store_error)?;
        }
        let mut out = Vec::with_capacity(popular.len());
        for (id, hits) in popular {
            let json: Option<String> = redis::cmd("HGET")
                .arg(k.record(&id))
                .arg("json")
                .query_async(&mut self.conn())
                .await
                .map_err(store_error)?;
            if let Some(json) = json {
                out.push((id, hits, from_json(&json)?));
            }
        }
        Ok(out)
    }
}

/// What the claim script answered.
struct ClaimAnswer {
    verdict: ClaimVerdict,
    json: String,
    position: i64,
    /// Others' positions on the farm moved.
    reordered: bool,
    /// After `started`: the bucket's new counts.
    counts: Option<Counts>,
}

impl ClaimAnswer {
    fn read(answer: &[redis::Value]) -> Result<Self, StoreError> {
        let unexpected = || StoreError::UnexpectedAnswer { script: "claim", answer: format!("{answer:?}") };
        let verdict: String =
            answer.first().and_then(|v| redis::from_redis_value(v.clone()).ok()).ok_or_else(unexpected)?;
        let json: String =
            answer.get(1).and_then(|v| redis::from_redis_value(v.clone()).ok()).ok_or_else(unexpected)?;
        let position: i64 =
            answer.get(2).and_then(|v| redis::from_redis_value(v.clone()).ok()).ok_or_else(unexpected)?;
        let reordered = answer.get(3).and_then(|v| redis::from_redis_value::<i64>(v.clone()).ok()) == Some(1);
        Ok(Self { verdict: verdict.parse()?, json, position, reordered, counts: Counts::from_answer(answer, 4) })
    }
}

#[async_trait::async_trait]
impl AggregationStore for RedisStore {
    fn leases(&self) -> &dyn FarmLeases {
        &self.redis
    }

    async fn claim(
        &self,
        key: &CanonicalKey,
        freshness: &Freshness,
        limits: &Limits,
        id: AggregationId,
        caller: &str,
        priority: Priority,
    ) -> Result<Claimed, ClaimError> {
        let fresh =
            AggregationRecord { priority, ..AggregationRecord::queued(id.clone(), key.clone(), self.clock.now()) };
        let caller = (caller, priority);
        let json = to_json(&fresh)?;
        let farm = key.farm_id();
        let mut settled = None;
        for _ in 0..MOVED_RETRIES {
            let mut answer = self.claim_once(key, freshness, limits, &id, &json, caller, self.admission()).await?;
            if answer.verdict == ClaimVerdict::Admit {
                // One admission at a time on this replica (`admission`).
                let _admitting = self.admitting.lock().await;
                let given = Admission::Given(self.totals().await?);
                answer = self.claim_once(key, freshness, limits, &id, &json, caller, given).await?;
                if let (ClaimVerdict::Started, Some(counts)) = (answer.verdict, answer.counts) {
                    self.tally(Bucket::of_farm(farm), counts).await;
                }
            }
            if answer.verdict != ClaimVerdict::Moved {
                settled = Some(answer);
                break;
            }
        }
        let answer = settled.ok_or_else(|| kept_moving("claim"))?;
        let disposition = match answer.verdict {
            ClaimVerdict::Started => Disposition::Started,
            ClaimVerdict::Joined => Disposition::Joined,
            ClaimVerdict::Cached => Disposition::Cached,
            ClaimVerdict::QueueFull => {
                return Err(ClaimError::QueueFull { farm_id: farm.to_owned(), capacity: limits.queue_capacity });
            }
            ClaimVerdict::CallerQueueFull => {
                return Err(ClaimError::CallerQueueFull { farm_id: farm.to_owned(), capacity: limits.caller_capacity });
            }
            ClaimVerdict::Busy(bound) => {
                let limit = match bound {
                    Bound::ActiveAggregations => limits.max_live,
                    Bound::Farms => limits.max_farms,
                };
                return Err(ClaimError::Busy { bound, limit });
            }
            ClaimVerdict::Epoch => return Err(ClaimError::NewEpoch),
            ClaimVerdict::Moved | ClaimVerdict::Admit => {
                return Err(
                    StoreError::UnexpectedAnswer { script: "claim", answer: format!("{:?}", answer.verdict) }.into()
                );
            }
        };
        let queue_position = u32::try_from(answer.position).unwrap_or(u32::MAX);
        if answer.reordered {
            // Other replicas hear of it through the script's publish; this one at once.
            self.wakeups.wake(&farm_topic(farm));
        }
        Ok(Claimed { record: Arc::new(from_json(&answer.json)?), queue_position, disposition })
    }

    async fn read(&self, id: &str) -> Result<Found, StoreError> {
        if let Some(result) = self.near.get(id) {
            return Ok(Found::terminal(result, self.clock.now()));
        }
        if Bucket::of_id(id).is_none() {
            // Names no bucket (minted before buckets): nothing is stored for it.
            return Ok(Found::Unknown);
        }
        let (json, farm, rows): (Option<String>, Option<String>, Option<i64>) = redis::cmd("HMGET")
            .arg(self.keys().record(id))
            .arg("json")
            .arg("farm")
            .arg("rows")
            .query_async(&mut self.conn())
            .await
            .map_err(store_error)?;
        let Some(json) = json else { return Ok(Found::Unknown) };
        let record = from_json(&json)?;
        if record.state.is_terminal() {
            return self.terminal(record, rows == Some(1)).await;
        }
        let farm = farm.unwrap_or_else(|| record.farm_id().to_owned());
        let position: Option<i64> = redis::cmd("LPOS")
            .arg(self.keys().queue(&farm))
            .arg(id)
            .query_async(&mut self.conn())
            .await
            .map_err(store_error)?;
        let queue_position = position.and_then(|p| u32::try_from(p).ok()).unwrap_or_default();
        Ok(Found::Active { record: Arc::new(record), queue_position })
    }

    async fn containing(
        &self,
        key: &CanonicalKey,
        freshness: &Freshness,
    ) -> Result<Option<Arc<AggregationRecord>>, StoreError> {
        let (q, now) = (key.request(), self.clock.now());
        let ids: Vec<String> = CONTAINING
            .key(self.keys().family(key))
            .key(self.keys().family_expiry(key))
            .arg(millis(now + freshness.min_remaining))
            .arg(q.start_time.timestamp_millis())
            .arg(q.end_time.timestamp_millis())
            .arg(policy::CONTAINING_LOOKED_AT)
            .invoke_async(&mut self.conn())
            .await
            .map_err(store_error)?;
        if ids.is_empty() {
            return Ok(None);
        }
        let mut pipe = redis::pipe();
        ids.iter().for_each(|id| {
            pipe.cmd("HMGET").arg(self.keys().record(id)).arg("json").arg("rows");
        });
        let records: Vec<(Option<String>, Option<i64>)> =
            pipe.query_async(&mut self.conn()).await.map_err(store_error)?;
        Ok(records
            .into_iter()
            .filter_map(|(json, rows)| Some((from_json(&json?).ok()?, rows == Some(1))))
            .find(|(r, has_rows)| {
                r.state == State::Completed
                    && freshness.accepts(r, *has_rows, now)
                    && crate::domain::derive::contains(r.key.request(), q)
            })
            .map(|(r, _)| Arc::new(r)))
    }

    async fn answers(&self, key: &CanonicalKey, freshness: &Freshness) -> Result<bool, StoreError> {
        let id = self.answering(key).await?;
        if id.is_empty() {
            return Ok(false);
        }
        let (json, rows): (Option<String>, Option<i64>) = redis::cmd("HMGET")
            .arg(self.keys().record(&id))
            .arg("json")
            .arg("rows")
            .query_async(&mut self.conn())
            .await
            .map_err(store_error)?;
        let Some(record) = json.and_then(|json| from_json(&json).ok()) else { return Ok(false) };
        Ok(!record.state.is_terminal() || freshness.accepts(&record, rows == Some(1), self.clock.now()))
    }

    async fn put_derived(&self, record: AggregationRecord, rows: Rows) -> Result<Arc<CachedResult>, StoreError> {
        let k = self.keys();
        let expire = record.expire_time.unwrap_or_else(|| self.clock.now());
        let (json, bytes) = (to_json(&record)?, rows.to_bytes());
        for _ in 0..MOVED_RETRIES {
            // What the key answers is declared: its record is read by the script.
            let answering = self.answering(&record.key).await?;
            let kept: i64 = DERIVED
                .key(k.record(&record.id))
                .key(k.rows(&record.id))
                .key(k.index(&record.key))
                .key(if answering.is_empty() { k.record(&record.id) } else { k.record(&answering) })
                .arg(&json)
                .arg(millis(expire))
                .arg(record.data_time.map_or(0, millis))
                .arg(&bytes)
                .arg(&*record.id)
                .arg(ms(KEEP_AFTER_EXPIRY))
                .arg(&answering)
                .arg(record.farm_id())
                .invoke_async(&mut self.conn())
                .await
                .map_err(store_error)?;
            if kept == 1 {
                let result = Arc::new(CachedResult::new(Arc::new(record), Some(rows)));
                self.near.insert(result.clone());
                return Ok(result);
            }
        }
        Err(kept_moving("derived"))
    }

    async fn head(&self, farm: &str) -> Result<Head, StoreError> {
        let Some(id) = self.queued_ids(farm, 1).await?.into_iter().next() else { return Ok(Head::Empty) };
        let json: Option<String> = redis::cmd("HGET")
            .arg(self.keys().record(&id))
            .arg("json")
            .query_async(&mut self.conn())
            .await
            .map_err(store_error)?;
        Ok(match json.map(|json| from_json(&json)) {
            Some(Ok(record)) => Head::Ready(Arc::new(record)),
            Some(Err(e)) => Head::Broken { id, fault: QueueFault::Unreadable(e) },
            None => Head::Broken { id, fault: QueueFault::Missing },
        })
    }

    async fn discard(&self, lease: &Lease, id: &str) -> Result<Written, StoreError> {
        let k = self.keys();
        let bucket = Bucket::of_farm(&lease.farm);
        for _ in 0..MOVED_RETRIES {
            let index: Option<String> = redis::cmd("HGET")
                .arg(k.record(id))
                .arg("index")
                .query_async(&mut self.conn())
                .await
                .map_err(store_error)?;
            let index = index.unwrap_or_default();
            let mut script = DISCARD.key(k.fence(&lease.farm));
            script
                .key(k.record(id))
                .key(k.queue(&lease.farm))
                .key(k.farms(bucket))
                .key(k.live(bucket))
                .key(k.version(bucket))
                .key(if index.is_empty() { k.record(id) } else { index.clone() })
                .key(k.fair(&lease.farm));
            let admission = self.lowering();
            if admission == Admission::Inline {
                script.key(k.admission());
            }
            script
                .arg(lease.token)
                .arg(id)
                .arg(&lease.farm)
                .arg(ms(KEEP_AFTER_EXPIRY))
                .arg(k.changes(bucket))
                .arg(farm_topic(&lease.farm))
                .arg(&index)
                .arg(admission.mode())
                .arg(bucket.hex())
                .arg(k.publish());
            let Some(written) = self.off_queue(&k.fence(&lease.farm), &script, bucket).await? else { continue };
            if written == Written::Done {
                self.wake(id, &lease.farm);
            }
            return Ok(written);
        }
        Err(kept_moving("discard"))
    }

    async fn rows_page(&self, record: &AggregationRecord, range: Range<usize>) -> Result<Option<RowBlock>, StoreError> {
        let answer: Option<(u64, Vec<u8>, u64, Vec<u8>)> = ROWS_PAGE
            .key(self.keys().rows(&record.id))
            .arg(range.start)
            .arg(range.end)
            .invoke_async(&mut self.conn())
            .await
            .map_err(store_error)?;
        let Some((_count, ends, start, bytes)) = answer else { return Ok(None) };
        let start = usize::try_from(start).unwrap_or(usize::MAX);
        match RowBlock::window(&ends, start, bytes.into()) {
            Some(rows) => Ok(Some(rows)),
            None => Err(StoreError::Corrupt { what: format!("the rows of {}", record.id), source: None }),
        }
    }

    async fn offer(&self, id: &str, offer: &Offer) -> Result<(), StoreError> {
        // Replicated like the writes that guard the one-running rule: it is one of them.
        let record = self.keys().record(id);
        let _left: i64 = self.redis.guarded(&record, OFFER.key(&record).arg(offer_to_json(offer)?)).await?;
        Ok(())
    }

    async fn offered(&self, id: &str) -> Result<Option<Offer>, StoreError> {
        let (state, offer): (Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(self.keys().record(id))
            .arg("state")
            .arg("offer")
            .query_async(&mut self.conn())
            .await
            .map_err(store_error)?;
        match (state.as_deref(), offer) {
            (Some(state), Some(json)) if [State::Queued, State::Running].map(state_name).contains(&state) => {
                offer_from_json(&json).map(Some)
            }
            _ => Ok(None),
        }
    }

    async fn queue(&self, farm: &str, count: usize) -> Result<Vec<Arc<AggregationRecord>>, StoreError> {
        let ids = self.queued_ids(farm, count).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        ids.iter().for_each(|id| {
            pipe.cmd("HGET").arg(self.keys().record(id)).arg("json");
        });
        let records: Vec<Option<String>> = pipe.query_async(&mut self.conn()).await.map_err(store_error)?;
        Ok(records.iter().flatten().filter_map(|json| from_json(json).ok().map(Arc::new)).collect())
    }

    async fn farms_with_work(&self) -> Result<Vec<String>, StoreError> {
        let buckets = self.busy_buckets().await?;
        let farms = futures::future::try_join_all(buckets.into_iter().map(|b| self.bucket_farms(b))).await?;
        Ok(farms.into_iter().flatten().collect())
    }

    async fn update(&self, lease: &Lease, record: AggregationRecord) -> Result<Written, StoreError> {
        let k = self.keys();
        let fence = k.fence(&lease.farm);
        let done: i64 = self
            .redis
            .guarded(
                &fence,
                UPDATE
                    .key(&fence)
                    .key(k.record(&record.id))
                    .arg(lease.token)
                    .arg(to_json(&record)?)
                    .arg(state_name(record.state))
                    .arg(k.changes(Bucket::of_farm(&lease.farm)))
                    .arg(&*record.id)
                    .arg(farm_topic(&lease.farm))
                    .arg(k.publish()),
            )
            .await?;
        if done == 1 {
            self.wake(&record.id, &lease.farm);
        }
        Ok(Self::written(done))
    }

    async fn finish(
        &self,
        lease: &Lease,
        record: AggregationRecord,
        rows: Option<Rows>,
    ) -> Result<Written, StoreError> {
        let (k, farm) = (self.keys(), record.farm_id());
        let bucket = Bucket::of_farm(farm);
        let expire = record.expire_time.unwrap_or_else(|| self.clock.now());
        let (json, bytes) = (to_json(&record)?, rows.as_ref().map(|r| r.to_bytes()).unwrap_or_default());
        let admission = self.lowering();
        for _ in 0..MOVED_RETRIES {
            // A refresh checks what its key answers: the record of that id is declared.
            let answering = if record.refresh { self.answering(&record.key).await? } else { String::new() };
            let fence = k.fence(&lease.farm);
            let mut script = FINISH.key(&fence);
            script
                .key(k.record(&record.id))
                .key(k.queue(farm))
                .key(k.farms(bucket))
                .key(k.live(bucket))
                .key(k.rows(&record.id))
                .key(k.index(&record.key))
                .key(k.due(bucket))
                .key(k.marker(&record.key))
                .key(k.refreshes(farm))
                .key(k.version(bucket))
                .key(if answering.is_empty() { k.record(&record.id) } else { k.record(&answering) })
                .key(k.fair(farm))
                .key(k.family(&record.key))
                .key(k.family_expiry(&record.key));
            if admission == Admission::Inline {
                script.key(k.admission());
            }
            script
                .arg(lease.token)
                .arg(&json)
                .arg(state_name(record.state))
                .arg(millis(expire))
                .arg(record.data_time.map_or(0, millis))
                .arg(&bytes)
                .arg(farm)
                .arg(k.changes(bucket))
                .arg(&*record.id)
                .arg(ms(KEEP_AFTER_EXPIRY))
                .arg(if record.refresh { "1" } else { "0" })
                .arg(farm_topic(&lease.farm))
                .arg(&answering)
                .arg(admission.mode())
                .arg(bucket.hex())
                .arg(k.publish())
                .arg(family_member(&record))
                .arg(record.key.request().start_time.timestamp_millis());
            let Some(written) = self.off_queue(&fence, &script, bucket).await? else { continue };
            if written == Written::Done {
                self.wake(&record.id, &lease.farm);
                self.near.insert(Arc::new(CachedResult::new(Arc::new(record), rows)));
            }
            return Ok(written);
        }
        Err(kept_moving("finish"))
    }

    async fn restore_rows(&self, record: Arc<AggregationRecord>, rows: Rows) -> Result<Arc<CachedResult>, StoreError> {
        let expire = record.expire_time.unwrap_or_else(|| self.clock.now());
        let _written: i64 = RESTORE_ROWS
            .key(self.keys().record(&record.id))
            .key(self.keys().rows(&record.id))
            .arg(rows.to_bytes())
            .arg(millis(expire))
            .invoke_async(&mut self.conn())
            .await
            .map_err(store_error)?;
        let result = Arc::new(CachedResult::new(record, Some(rows)));
        self.near.insert(result.clone());
        Ok(result)
    }

    async fn start_refreshes(
        &self,
        due_by: SystemTime,
        min_hits: u32,
        limits: &Limits,
        mint: &(dyn for<'f> Fn(&'f str) -> AggregationId + Send + Sync),
    ) -> Result<Vec<Arc<AggregationRecord>>, StoreError> {
        let mut queued = Vec::new();
        'buckets: for bucket in Bucket::all() {
            let due = self.due(bucket, due_by, min_hits).await?;
            if due.is_empty() {
                continue;
            }
            // On a cluster, one admission at a time on this replica (`admission`).
            let _admitting = match self.admission() {
                Admission::Ask => Some(self.admitting.lock().await),
                _ => None,
            };
            for (old_id, hits, old) in due {
                if hits < min_hits {
                    continue;
                }
                let admission = match self.admission() {
                    Admission::Ask => Admission::Given(self.totals().await?),
                    inline => inline,
                };
                let refresh = AggregationRecord::refresh_of(mint(old.farm_id()), &old, self.clock.now());
                let (verdict, counts) =
                    self.queue_refresh(&old_id, &old, &refresh, min_hits, limits, admission).await?;
                if let Some(counts) = counts {
                    self.tally(bucket, counts).await;
                }
                match verdict {
                    RefreshVerdict::Queued => queued.push(Arc::new(refresh)),
                    RefreshVerdict::Live => break 'buckets,
                    // That bucket's epoch changed: its next ids are minted in the new one.
                    RefreshVerdict::Epoch => break,
                    RefreshVerdict::Gone | RefreshVerdict::Cold | RefreshVerdict::Backlog | RefreshVerdict::Farms => {}
                }
            }
        }
        Ok(queued)
    }

    async fn run_model(&self, farm: &str) -> Result<Option<RunModel>, StoreError> {
        let (rate, runs): (Option<f64>, Option<u64>) = redis::cmd("HMGET")
            .arg(self.keys().model(farm))
            .arg("seconds_per_unit")
            .arg("runs")
            .query_async(&mut self.conn())
            .await
            .map_err(store_error)?;
        Ok(rate.zip(runs).map(|(seconds_per_unit, runs)| RunModel { seconds_per_unit, runs }))
    }

    async fn observe_run(&self, farm: &str, size: u64, took: Duration) -> Result<(), StoreError> {
        let _runs: i64 = OBSERVE_RUN
            .key(self.keys().model(farm))
            .arg(format!("{:e}", RunModel::rate(size, took)))
            .arg(SMOOTHING)
            .invoke_async(&mut self.conn())
            .await
            .map_err(store_error)?;
        Ok(())
    }

    async fn housekeeping(&self) {
        self.near.housekeeping();
        let k = self.keys();
        let loads = match self.busy_buckets().await {
            Ok(buckets) => futures::future::try_join_all(buckets.into_iter().map(|b| self.bucket_loads(b))).await,
            Err(e) => Err(e),
        };
        let Ok(loads) = loads else {
            self.counted().up = false;
            return;
        };
        // Expired results leave the refresh candidates (when refresh-ahead is off, nothing
        // else takes them out).
        let now = millis(self.clock.now());
        let trims = Bucket::all().map(|b| async move {
            let trimmed: Result<i64, _> =
                redis::cmd("ZREMRANGEBYSCORE").arg(k.due(b)).arg("-inf").arg(now).query_async(&mut self.conn()).await;
            trimmed
        });
        let _ = futures::future::join_all(trims).await;
        self.resync().await;
        let live = self.totals().await.ok().map(|t| usize::try_from(t.live).unwrap_or(usize::MAX));
        let memory = self.redis.memory().await.ok();
        let _ = self.redis.count_replicas().await;
        let mut counted = self.counted();
        counted.memory = memory;
        counted.active = live.unwrap_or_default();
        counted.farms = loads.into_iter().flatten().collect();
        counted.up = true;
    }

    fn stats(&self) -> StoreStats {
        let (cached, cached_bytes, expirations, evictions) = self.near.stats();
        StoreStats { cached, cached_bytes, expirations, evictions, ..self.counted().clone() }
    }

    fn topology(&self) -> Topology {
        Topology::Shared
    }

    async fn epoch(&self, bucket: Bucket) -> Result<Option<u32>, StoreError> {
        self.redis.epoch(bucket).await.map(Some)
    }

    fn spawn_background(&self, stop: CancellationToken) {
        let (redis, wakeups) = (self.redis.clone(), self.wakeups.clone());
        tokio::spawn(self.time.clone().keep_measuring(redis.clone(), stop.clone()));
        let follower = redis.clone();
        let following = stop.clone();
        tokio::spawn(async move { follower.follow_primary(following).await });
        tokio::spawn(async move { redis.relay_changes(wakeups, stop).await });
    }
}
