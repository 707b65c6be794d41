//! The [`AggregationStore`] shared by replicas through Redis.
//!
//! - `client`: the connection, leases, shared rates and the relay of change notifications.
//! - `conn`: a connection that survives drops and half-open sockets.
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
//! The state has an epoch ([`RedisClient::epoch`]): a claim is only made with an id of the
//! current one, so every id names the state it lives in. Every script addresses some keys by
//! name inside the script, so this store needs a Redis that is not in cluster mode (or a
//! cluster of one shard).

pub(crate) mod client;
mod conn;
mod keys;
mod scripts;
pub(crate) mod time;
mod wire;

pub use client::{RedisClient, RedisConfig, RedisRate};

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
use crate::gateway::key::CanonicalKey;
use crate::gateway::record::{AggregationId, AggregationRecord, Offer, Rows, State};
use crate::gateway::rows::RowBlock;
use client::store_error;
use scripts::{
    CLAIM, DISCARD, DUE, FINISH, LOADS, OBSERVE_RUN, OFFER, QUEUE_REFRESH, RESTORE_ROWS, ROWS_IF_SMALL, ROWS_PAGE,
    UPDATE,
};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;
use wire::{from_json, millis, offer_from_json, offer_to_json, state_name, to_json};

/// How long a record outlives its result, so Get can say it expired or why it failed.
const KEEP_AFTER_EXPIRY: Duration = Duration::from_secs(3600);

/// Due results looked at per refresh scan.
const DUE_SCAN_LIMIT: usize = 1000;

/// What the claim script answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClaimVerdict {
    Started,
    Joined,
    Cached,
    QueueFull,
    Busy(Bound),
    Epoch,
}

impl std::str::FromStr for ClaimVerdict {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "started" => Self::Started,
            "joined" => Self::Joined,
            "cached" => Self::Cached,
            "queue_full" => Self::QueueFull,
            "busy_live" => Self::Busy(Bound::ActiveAggregations),
            "busy_farms" => Self::Busy(Bound::Farms),
            "epoch" => Self::Epoch,
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
        Self { redis, near, wakeups, counted: Mutex::default(), clock: time.clock(), time }
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

    /// Queues a refresh of the due result `old_id` if [`RefreshVerdict`] allows.
    async fn queue_refresh(
        &self,
        old_id: &str,
        old: &AggregationRecord,
        refresh: &AggregationRecord,
        min_hits: u32,
        limits: &Limits,
    ) -> Result<RefreshVerdict, StoreError> {
        let (k, farm) = (self.keys(), old.farm_id());
        let verdict: String = QUEUE_REFRESH
            .key(k.due())
            .key(k.record(old_id))
            .key(k.index(&old.key))
            .key(k.marker(&old.key))
            .key(k.queue(farm))
            .key(k.refreshes(farm))
            .key(k.farms())
            .key(k.live())
            .key(k.record(&refresh.id))
            .key(k.epoch())
            .arg(old_id)
            .arg(&*refresh.id)
            .arg(to_json(refresh)?)
            .arg(farm)
            .arg(min_hits)
            .arg(limits.max_live)
            .arg(limits.max_farms)
            .arg(crate::gateway::ids::tag_of(&refresh.id).map(|t| t.to_string()).unwrap_or_default())
            .arg(ms(KEEP_AFTER_EXPIRY))
            .arg(millis(self.clock.now()))
            .invoke_async(&mut self.conn())
            .await
            .map_err(store_error)?;
        verdict.parse()
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
    ) -> Result<Claimed, ClaimError> {
        let fresh = AggregationRecord::queued(id.clone(), key.clone(), self.clock.now());
        let (k, farm) = (self.keys(), key.farm_id());
        let (verdict, json, position): (String, String, i64) = self
            .redis
            .guarded(
                CLAIM
                    .key(k.index(key))
                    .key(k.queue(farm))
                    .key(k.farms())
                    .key(k.live())
                    .key(k.record(&id))
                    .key(k.epoch())
                    .key(k.marker(key))
                    .key(k.refreshes(farm))
                    .arg(&*id)
                    .arg(to_json(&fresh)?)
                    .arg(farm)
                    .arg(ms(freshness.min_remaining))
                    .arg(freshness.max_staleness.map_or(-1, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)))
                    .arg(limits.queue_capacity)
                    .arg(limits.max_live)
                    .arg(limits.max_farms)
                    .arg(k.record_prefix())
                    .arg(k.rows_prefix())
                    .arg(crate::gateway::ids::tag_of(&id).map(|t| t.to_string()).unwrap_or_default())
                    .arg(millis(self.clock.now()))
                    .arg(caller)
                    .arg(ms(policy::HIT_WINDOW)),
            )
            .await?;
        let disposition = match verdict.parse()? {
            ClaimVerdict::Started => Disposition::Started,
            ClaimVerdict::Joined => Disposition::Joined,
            ClaimVerdict::Cached => Disposition::Cached,
            ClaimVerdict::QueueFull => {
                return Err(ClaimError::QueueFull { farm_id: farm.to_owned(), capacity: limits.queue_capacity });
            }
            ClaimVerdict::Busy(bound) => {
                let limit = match bound {
                    Bound::ActiveAggregations => limits.max_live,
                    Bound::Farms => limits.max_farms,
                };
                return Err(ClaimError::Busy { bound, limit });
            }
            ClaimVerdict::Epoch => return Err(ClaimError::NewEpoch),
        };
        let queue_position = u32::try_from(position).unwrap_or(u32::MAX);
        Ok(Claimed { record: Arc::new(from_json(&json)?), queue_position, disposition })
    }

    async fn read(&self, id: &str) -> Result<Found, StoreError> {
        if let Some(result) = self.near.get(id) {
            return Ok(Found::terminal(result, self.clock.now()));
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
        let done: i64 = self
            .redis
            .guarded(
                DISCARD
                    .key(k.fence(&lease.farm))
                    .key(k.record(id))
                    .key(k.queue(&lease.farm))
                    .key(k.farms())
                    .key(k.live())
                    .arg(lease.token)
                    .arg(id)
                    .arg(&lease.farm)
                    .arg(ms(KEEP_AFTER_EXPIRY))
                    .arg(k.changes())
                    .arg(farm_topic(&lease.farm)),
            )
            .await?;
        if done == 1 {
            self.wake(id, &lease.farm);
        }
        Ok(Self::written(done))
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
        let _left: i64 = self.redis.guarded(OFFER.key(self.keys().record(id)).arg(offer_to_json(offer)?)).await?;
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
        redis::cmd("SMEMBERS").arg(self.keys().farms()).query_async(&mut self.conn()).await.map_err(store_error)
    }

    async fn update(&self, lease: &Lease, record: AggregationRecord) -> Result<Written, StoreError> {
        let k = self.keys();
        let done: i64 = self
            .redis
            .guarded(
                UPDATE
                    .key(k.fence(&lease.farm))
                    .key(k.record(&record.id))
                    .arg(lease.token)
                    .arg(to_json(&record)?)
                    .arg(state_name(record.state))
                    .arg(k.changes())
                    .arg(&*record.id)
                    .arg(farm_topic(&lease.farm)),
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
        let expire = record.expire_time.unwrap_or_else(|| self.clock.now());
        let done: i64 = self
            .redis
            .guarded(
                FINISH
                    .key(k.fence(&lease.farm))
                    .key(k.record(&record.id))
                    .key(k.queue(farm))
                    .key(k.farms())
                    .key(k.live())
                    .key(k.rows(&record.id))
                    .key(k.index(&record.key))
                    .key(k.due())
                    .key(k.marker(&record.key))
                    .key(k.refreshes(farm))
                    .arg(lease.token)
                    .arg(to_json(&record)?)
                    .arg(state_name(record.state))
                    .arg(millis(expire))
                    .arg(record.data_time.map_or(0, millis))
                    .arg(rows.as_ref().map(|r| r.to_bytes()).unwrap_or_default())
                    .arg(farm)
                    .arg(k.changes())
                    .arg(&*record.id)
                    .arg(ms(KEEP_AFTER_EXPIRY))
                    .arg(if record.refresh { "1" } else { "0" })
                    .arg(k.record_prefix())
                    .arg(farm_topic(&lease.farm)),
            )
            .await?;
        if done == 1 {
            self.wake(&record.id, &lease.farm);
            self.near.insert(Arc::new(CachedResult::new(Arc::new(record), rows)));
        }
        Ok(Self::written(done))
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
        mint: &(dyn Fn() -> AggregationId + Send + Sync),
    ) -> Result<Vec<Arc<AggregationRecord>>, StoreError> {
        let due: Vec<(String, u32, String)> = DUE
            .key(self.keys().due())
            .arg(millis(self.clock.now()))
            .arg(millis(due_by))
            .arg(self.keys().record_prefix())
            .arg(DUE_SCAN_LIMIT)
            .arg(min_hits)
            .invoke_async(&mut self.conn())
            .await
            .map_err(store_error)?;
        let mut queued = Vec::new();
        for (old_id, hits, json) in due {
            if hits < min_hits {
                continue;
            }
            let old = from_json(&json)?;
            let refresh = AggregationRecord::refresh_of(mint(), &old, self.clock.now());
            match self.queue_refresh(&old_id, &old, &refresh, min_hits, limits).await? {
                RefreshVerdict::Queued => queued.push(Arc::new(refresh)),
                RefreshVerdict::Live | RefreshVerdict::Epoch => break,
                RefreshVerdict::Gone | RefreshVerdict::Cold | RefreshVerdict::Backlog | RefreshVerdict::Farms => {}
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
        let loads: Result<Vec<(String, usize, u8)>, _> =
            LOADS.key(k.farms()).arg(k.prefix()).arg(k.record_prefix()).invoke_async(&mut self.conn()).await;
        let Ok(loads) = loads else {
            self.counted().up = false;
            return;
        };
        // Expired results leave the refresh candidates (when refresh-ahead is off, nothing
        // else takes them out).
        let _: Result<i64, _> = redis::cmd("ZREMRANGEBYSCORE")
            .arg(k.due())
            .arg("-inf")
            .arg(millis(self.clock.now()))
            .query_async(&mut self.conn())
            .await;
        let live: Option<usize> = redis::cmd("GET").arg(k.live()).query_async(&mut self.conn()).await.ok().flatten();
        let memory = self.redis.memory().await.ok();
        let _ = self.redis.count_replicas().await;
        let mut counted = self.counted();
        counted.memory = memory;
        counted.active = live.unwrap_or_default();
        counted.farms = loads.into_iter().map(|(farm, len, running)| (farm, FarmLoad::of(len, running == 1))).collect();
        counted.up = true;
    }

    fn stats(&self) -> StoreStats {
        let (cached, cached_bytes, expirations, evictions) = self.near.stats();
        StoreStats { cached, cached_bytes, expirations, evictions, ..self.counted().clone() }
    }

    fn topology(&self) -> Topology {
        Topology::Shared
    }

    async fn epoch(&self) -> Result<Option<u32>, StoreError> {
        self.redis.epoch().await.map(Some)
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
