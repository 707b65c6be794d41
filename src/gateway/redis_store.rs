//! The [`AggregationStore`] shared by replicas through Redis.
//!
//! Keys, under the gateway's prefix (`dsg:` by default); a farm's keys carry a hash tag:
//! - `agg:{id}`: a hash of the record (`json`, and `state`, `farm`, `expire_ms`, `data_ms`,
//!   `rows` for the scripts), kept until the result's expiry plus a day (to say why it went);
//! - `rows:{id}`: the encoded rows of a COMPLETED result, expiring with it (`PXAT`);
//! - `key:{canonical request}`: the id answering a key;
//! - `{farm}:queue`: the farm's queue of ids, its head first; `farms`: farms with work;
//!   `live`: queued plus running aggregations; `{farm}:fence`: see [`super::redis`];
//! - refresh-ahead: `due`, COMPLETED ids by expiry; `refresh:{canonical request}`, the refresh
//!   of a key no caller has joined yet; `{farm}:refreshes`, the farm's such refreshes; a
//!   record's `hits` field counts the Starts it answered.
//!
//! `epoch`: the generation of this state (see [`RedisCoordination::epoch`]); a claim is only
//! made with an id of the current one, so every id names the state it lives in.
//!
//! A claim, an update and a finish are each one Lua script: the claim reads the key's record
//! and either answers it or queues a new one; updates and finishes check the farm's fence
//! first, so a replaced lease holder writes nothing. Every write is published on the changes
//! channel. Terminal results read here are kept in this replica's results cache, so cache-hit
//! Gets do not touch Redis. Every script addresses keys by name inside the script, so this
//! store needs a Redis that is not in cluster mode (or a cluster of one shard).

use super::error::{GatewayError, StoreError};
use super::estimate::RunModel;
use super::key::CanonicalKey;
use super::lease::{FarmLeases, Lease};
use super::record::{AggregationId, AggregationRecord, Failure, FailureCode, Rows, State};
use super::redis::{RedisCoordination, unavailable};
use super::results::{CachedResult, ResultsCache};
use super::rows::RowBlock;
use super::store::{AggregationStore, Claimed, Disposition, FarmLoad, Found, Freshness, Limits, StoreStats, Written};
use super::wakeups::{Wakeups, farm_topic};
use crate::domain::{AggregationRequest, GroupBy, Period, Resources, Statistic, Timezone};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long a record outlives its result, so Get can say it expired or why it failed.
const KEEP_AFTER_EXPIRY: Duration = Duration::from_secs(24 * 3600);

static CLAIM: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
        -- KEYS: key index, farm queue, farms, live, new record, epoch, the key's refresh
        --       marker, the farm's pending refreshes
        -- ARGV: id, json, farm, now_ms, min_remaining_ms, max_staleness_ms (-1: any),
        --       queue capacity, max live, max farms, record prefix, rows prefix, the id's epoch
        if redis.call('GET', KEYS[6]) ~= ARGV[12] then return {'epoch', '', 0} end
        local existing = redis.call('GET', KEYS[1])
        if existing then
            local agg = ARGV[10] .. existing
            local f = redis.call('HMGET', agg, 'state', 'expire_ms', 'data_ms', 'json', 'farm')
            local state = f[1]
            if state == 'QUEUED' or state == 'RUNNING' then
                redis.call('HINCRBY', agg, 'hits', 1)
                local pos = redis.call('LPOS', KEYS[2], existing)
                return {'joined', f[4], pos or 0}
            end
            if state then
                local now = tonumber(ARGV[4])
                local remaining = tonumber(f[2] or '0') - now
                local need = 0
                if state == 'COMPLETED' then need = tonumber(ARGV[5]) end
                local fresh = true
                local max_staleness = tonumber(ARGV[6])
                if max_staleness >= 0 then fresh = f[3] ~= false and now - tonumber(f[3]) <= max_staleness end
                local rows = state ~= 'COMPLETED' or redis.call('EXISTS', ARGV[11] .. existing) == 1
                if remaining > 0 and remaining >= need and fresh and rows then
                    redis.call('HINCRBY', agg, 'hits', 1)
                    return {'cached', f[4], 0}
                end
            end
        end
        -- The old result no longer answers: a refresh of the key under way becomes the
        -- caller's aggregation.
        local refresh = redis.call('GET', KEYS[7])
        if refresh then
            redis.call('DEL', KEYS[7])
            redis.call('SREM', KEYS[8], refresh)
            local agg = ARGV[10] .. refresh
            local f = redis.call('HMGET', agg, 'state', 'json')
            if f[1] == 'QUEUED' or f[1] == 'RUNNING' then
                redis.call('SET', KEYS[1], refresh)
                redis.call('HINCRBY', agg, 'hits', 1)
                local pos = redis.call('LPOS', KEYS[2], refresh)
                return {'joined', f[2], pos or 0}
            end
        end
        if tonumber(redis.call('GET', KEYS[4]) or '0') >= tonumber(ARGV[8]) then
            return {'busy', 'max_active_aggregations', 0}
        end
        local waiting = redis.call('LLEN', KEYS[2])
        if waiting == 0 and redis.call('SCARD', KEYS[3]) >= tonumber(ARGV[9]) then return {'busy', 'max_farms', 0} end
        if waiting > 0 and waiting - 1 >= tonumber(ARGV[7]) then return {'full', '', 0} end
        -- Ahead of the refreshes waiting (never ahead of the head, which may be running).
        local position = waiting
        if redis.call('SCARD', KEYS[8]) > 0 then
            local queued = redis.call('LRANGE', KEYS[2], 1, -1)
            for i, queued_id in ipairs(queued) do
                if redis.call('SISMEMBER', KEYS[8], queued_id) == 1 then
                    redis.call('LINSERT', KEYS[2], 'BEFORE', queued_id, ARGV[1])
                    position = i
                    break
                end
            end
        end
        if position == waiting then redis.call('RPUSH', KEYS[2], ARGV[1]) end
        redis.call('SADD', KEYS[3], ARGV[3])
        redis.call('INCR', KEYS[4])
        redis.call('HSET', KEYS[5], 'json', ARGV[2], 'state', 'QUEUED', 'farm', ARGV[3], 'index', KEYS[1], 'hits', 1)
        redis.call('SET', KEYS[1], ARGV[1])
        return {'started', ARGV[2], position}
        ",
    )
});

static UPDATE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
        -- KEYS: fence, record. ARGV: token, json, state, channel, id, farm topic
        if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
        local state = redis.call('HGET', KEYS[2], 'state')
        if state ~= 'QUEUED' and state ~= 'RUNNING' then return 0 end
        redis.call('HSET', KEYS[2], 'json', ARGV[2], 'state', ARGV[3])
        redis.call('PUBLISH', ARGV[4], ARGV[5])
        redis.call('PUBLISH', ARGV[4], ARGV[6])
        return 1
        ",
    )
});

static FINISH: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
        -- KEYS: fence, record, queue, farms, live, rows, key index, due, the key's refresh
        --       marker, the farm's pending refreshes
        -- ARGV: token, json, state, expire_ms, data_ms, rows (empty: none), farm, channel, id,
        --       keep_ms, refresh (1: a refresh), record prefix, farm topic
        if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
        local state = redis.call('HGET', KEYS[2], 'state')
        if state ~= 'QUEUED' and state ~= 'RUNNING' then return 0 end
        local has_rows = 0
        if ARGV[6] ~= '' then has_rows = 1 end
        redis.call('HSET', KEYS[2], 'json', ARGV[2], 'state', ARGV[3], 'expire_ms', ARGV[4], 'data_ms', ARGV[5],
            'rows', has_rows)
        local keep_until = tonumber(ARGV[4]) + tonumber(ARGV[10])
        redis.call('PEXPIREAT', KEYS[2], keep_until)
        if redis.call('GET', KEYS[7]) == ARGV[9] then redis.call('PEXPIREAT', KEYS[7], keep_until) end
        local t = redis.call('TIME')
        local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
        if has_rows == 1 and tonumber(ARGV[4]) > now then redis.call('SET', KEYS[6], ARGV[6], 'PXAT', ARGV[4]) end
        if ARGV[3] == 'COMPLETED' then redis.call('ZADD', KEYS[8], ARGV[4], ARGV[9]) end
        if ARGV[11] == '1' then
            if redis.call('GET', KEYS[9]) == ARGV[9] then redis.call('DEL', KEYS[9]) end
            redis.call('SREM', KEYS[10], ARGV[9])
            -- A completed refresh is what its key answers from now on.
            local answering = redis.call('GET', KEYS[7])
            local superseded = true
            if answering and answering ~= ARGV[9] then
                local s = redis.call('HGET', ARGV[12] .. answering, 'state')
                superseded = s ~= 'QUEUED' and s ~= 'RUNNING'
            end
            if ARGV[3] == 'COMPLETED' and superseded then redis.call('SET', KEYS[7], ARGV[9], 'PXAT', keep_until) end
        end
        redis.call('LREM', KEYS[3], 0, ARGV[9])
        if redis.call('LLEN', KEYS[3]) == 0 then redis.call('SREM', KEYS[4], ARGV[7]) end
        redis.call('DECR', KEYS[5])
        redis.call('PUBLISH', ARGV[8], ARGV[9])
        redis.call('PUBLISH', ARGV[8], ARGV[13])
        return 1
        ",
    )
});

static DUE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
        -- KEYS: due. ARGV: now_ms, due_by_ms, record prefix, most to look at
        -- Completed results expiring by due_by that still answer their key, with their hits
        -- and records; the others leave the due set.
        local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[4]))
        local out = {}
        for _, id in ipairs(ids) do
            local f = redis.call('HMGET', ARGV[3] .. id, 'state', 'expire_ms', 'hits', 'index', 'json')
            local alive = f[1] == 'COMPLETED' and tonumber(f[2] or '0') > tonumber(ARGV[1]) and f[4]
                and redis.call('GET', f[4]) == id
            if alive then
                table.insert(out, id)
                table.insert(out, tonumber(f[3] or '0'))
                table.insert(out, f[5])
            else
                redis.call('ZREM', KEYS[1], id)
            end
        end
        return out
        ",
    )
});

static QUEUE_REFRESH: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
        -- KEYS: due, old record, key index, the key's refresh marker, farm queue, the farm's
        --       pending refreshes, farms, live, new record, epoch
        -- ARGV: old id, new id, json, farm, min hits, max live, max farms, the new id's epoch,
        --       marker ttl ms
        if redis.call('GET', KEYS[10]) ~= ARGV[8] then return 'epoch' end
        if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 'gone' end
        local t = redis.call('TIME')
        local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
        local f = redis.call('HMGET', KEYS[2], 'state', 'expire_ms', 'hits')
        if f[1] ~= 'COMPLETED' or tonumber(f[2] or '0') <= now or redis.call('GET', KEYS[3]) ~= ARGV[1]
            or redis.call('EXISTS', KEYS[4]) == 1 then
            redis.call('ZREM', KEYS[1], ARGV[1])
            return 'gone'
        end
        if tonumber(f[3] or '0') < tonumber(ARGV[5]) then return 'cold' end
        local queued = redis.call('LLEN', KEYS[5])
        if queued > redis.call('SCARD', KEYS[6]) then return 'backlog' end
        if queued == 0 and redis.call('SISMEMBER', KEYS[7], ARGV[4]) == 0
            and redis.call('SCARD', KEYS[7]) >= tonumber(ARGV[7]) then return 'farms' end
        if tonumber(redis.call('GET', KEYS[8]) or '0') >= tonumber(ARGV[6]) then return 'live' end
        redis.call('ZREM', KEYS[1], ARGV[1])
        redis.call('RPUSH', KEYS[5], ARGV[2])
        redis.call('SADD', KEYS[6], ARGV[2])
        redis.call('SADD', KEYS[7], ARGV[4])
        redis.call('INCR', KEYS[8])
        redis.call('HSET', KEYS[9], 'json', ARGV[3], 'state', 'QUEUED', 'farm', ARGV[4], 'index', KEYS[3], 'hits', 0)
        redis.call('SET', KEYS[4], ARGV[2], 'PX', ARGV[9])
        return 'queued'
        ",
    )
});

/// Due results looked at per refresh scan.
const DUE_SCAN_LIMIT: usize = 1000;

static OBSERVE_RUN: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
        -- KEYS: the farm's run model. ARGV: seconds per unit of this run, smoothing
        local m = redis.call('HMGET', KEYS[1], 'seconds_per_unit', 'runs')
        local rate = tonumber(ARGV[1])
        if m[1] then
            local previous = tonumber(m[1])
            rate = previous + tonumber(ARGV[2]) * (rate - previous)
        end
        local runs = tonumber(m[2] or '0') + 1
        redis.call('HSET', KEYS[1], 'seconds_per_unit', string.format('%.17g', rate), 'runs', runs)
        return runs
        ",
    )
});

static RESTORE_ROWS: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
        -- KEYS: record, rows. ARGV: rows, expire_ms
        -- Rows are immutable: put back only for a COMPLETED record, never over rows present.
        if redis.call('HGET', KEYS[1], 'state') ~= 'COMPLETED' then return 0 end
        local t = redis.call('TIME')
        local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
        if tonumber(ARGV[2]) <= now then return 0 end
        if redis.call('SET', KEYS[2], ARGV[1], 'PXAT', ARGV[2], 'NX') then return 1 end
        return 0
        ",
    )
});

/// The store in Redis, with this replica's results cache in front of it.
pub struct RedisStore {
    redis: RedisCoordination,
    near: Arc<ResultsCache>,
    wakeups: Arc<Wakeups>,
    /// What housekeeping last counted.
    counted: Mutex<StoreStats>,
}

impl RedisStore {
    /// A store on `redis`, keeping terminal results it reads in `near`, and waking `wakeups`
    /// on its own writes (other replicas' arrive through [`RedisCoordination::relay_changes`]).
    pub fn new(redis: RedisCoordination, near: Arc<ResultsCache>, wakeups: Arc<Wakeups>) -> Self {
        Self { redis, near, wakeups, counted: Mutex::default() }
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut key = self.redis.prefix.clone();
        parts.iter().for_each(|p| key.push_str(p));
        key
    }

    fn record_key(&self, id: &str) -> String {
        self.key(&["agg:", id])
    }

    fn rows_key(&self, id: &str) -> String {
        self.key(&["rows:", id])
    }

    fn index_key(&self, key: &CanonicalKey) -> String {
        let whole = if key.may_split() { "" } else { "|no-split" };
        self.key(&["key:", &canonical(key.request()), whole])
    }

    fn queue_key(&self, farm: &str) -> String {
        self.redis.farm_key(farm, "queue")
    }

    /// The refresh of `key` no caller has joined yet, if any.
    fn marker_key(&self, key: &CanonicalKey) -> String {
        let whole = if key.may_split() { "" } else { "|no-split" };
        self.key(&["refresh:", &canonical(key.request()), whole])
    }

    /// The farm's refreshes no caller has joined yet.
    fn refreshes_key(&self, farm: &str) -> String {
        self.redis.farm_key(farm, "refreshes")
    }

    fn conn(&self) -> redis::aio::ConnectionManager {
        self.redis.conn.clone()
    }

    /// The terminal result `record`, with its rows when it has any; kept in the near cache.
    async fn terminal(&self, record: AggregationRecord, has_rows: bool) -> Result<Found, StoreError> {
        if record.state == State::Completed && record.is_expired(SystemTime::now()) {
            return Ok(Found::Expired(record.expire_time.unwrap_or_else(SystemTime::now)));
        }
        let rows = if has_rows {
            let bytes: Option<Vec<u8>> = redis::cmd("GET")
                .arg(self.rows_key(&record.id))
                .query_async(&mut self.conn())
                .await
                .map_err(unavailable)?;
            match bytes.map(|b| RowBlock::from_bytes(b.into())) {
                Some(Some(rows)) => Some(Arc::new(rows)),
                Some(None) => return Err(StoreError::Protocol(format!("the rows of {} do not decode", record.id))),
                None => return Ok(Found::RowsLost(Arc::new(record))),
            }
        } else {
            None
        };
        let result = Arc::new(CachedResult::new(Arc::new(record), rows));
        self.near.insert(result.clone());
        Ok(Found::Terminal(result))
    }

    /// What a fenced script's answer (1: written, 0: refused) means.
    fn written(done: i64) -> Written {
        if done == 1 { Written::Done } else { Written::Fenced }
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
    ) -> Result<Claimed, GatewayError> {
        let store = |e: StoreError| GatewayError::StoreUnavailable(e);
        let fresh = AggregationRecord::queued(id.clone(), key.clone());
        let farm = key.farm_id();
        let (verdict, json, position): (String, String, i64) = CLAIM
            .key(self.index_key(key))
            .key(self.queue_key(farm))
            .key(self.key(&["farms"]))
            .key(self.key(&["live"]))
            .key(self.record_key(&id))
            .key(self.key(&["epoch"]))
            .key(self.marker_key(key))
            .key(self.refreshes_key(farm))
            .arg(&*id)
            .arg(to_json(&fresh).map_err(store)?)
            .arg(farm)
            .arg(millis(SystemTime::now()))
            .arg(u64::try_from(freshness.min_remaining.as_millis()).unwrap_or(u64::MAX))
            .arg(freshness.max_staleness.map_or(-1, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)))
            .arg(limits.queue_capacity)
            .arg(limits.max_live)
            .arg(limits.max_farms)
            .arg(self.key(&["agg:"]))
            .arg(self.key(&["rows:"]))
            .arg(super::ids::tag_of(&id).map(|t| t.to_string()).unwrap_or_default())
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| store(unavailable(e)))?;
        let queue_position = u32::try_from(position).unwrap_or(u32::MAX);
        let disposition = match verdict.as_str() {
            "started" => Disposition::Started,
            "joined" => Disposition::Joined,
            "cached" => Disposition::Cached,
            "full" => {
                return Err(GatewayError::QueueFull { farm_id: farm.to_owned(), capacity: limits.queue_capacity });
            }
            "busy" if json == "max_farms" => {
                return Err(GatewayError::Busy { bound: "max_farms", limit: limits.max_farms });
            }
            "busy" => return Err(GatewayError::Busy { bound: "max_active_aggregations", limit: limits.max_live }),
            "epoch" => return Err(store(StoreError::NewEpoch)),
            other => return Err(store(StoreError::Protocol(format!("claim answered '{other}'")))),
        };
        let record = from_json(&json).map_err(store)?;
        let result = match disposition {
            Disposition::Cached => match self.terminal(record.clone(), record.state == State::Completed).await {
                Ok(Found::Terminal(result)) => Some(result),
                _ => None,
            },
            _ => None,
        };
        Ok(Claimed { record: Arc::new(record), queue_position, result, disposition })
    }

    async fn read(&self, id: &str) -> Result<Found, StoreError> {
        if let Some(result) = self.near.get(id) {
            return Ok(Found::Terminal(result));
        }
        let (json, farm, rows): (Option<String>, Option<String>, Option<i64>) = redis::cmd("HMGET")
            .arg(self.record_key(id))
            .arg("json")
            .arg("farm")
            .arg("rows")
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        let Some(json) = json else { return Ok(Found::Unknown) };
        let record = from_json(&json)?;
        if record.state.is_terminal() {
            return self.terminal(record, rows == Some(1)).await;
        }
        let farm = farm.unwrap_or_else(|| record.farm_id().to_owned());
        let position: Option<i64> = redis::cmd("LPOS")
            .arg(self.queue_key(&farm))
            .arg(id)
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        let queue_position = position.and_then(|p| u32::try_from(p).ok()).unwrap_or_default();
        Ok(Found::Active { record: Arc::new(record), queue_position })
    }

    async fn head(&self, farm: &str) -> Result<Option<Arc<AggregationRecord>>, StoreError> {
        let id: Option<String> = redis::cmd("LINDEX")
            .arg(self.queue_key(farm))
            .arg(0)
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        let Some(id) = id else { return Ok(None) };
        let json: Option<String> = redis::cmd("HGET")
            .arg(self.record_key(&id))
            .arg("json")
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        json.map(|j| from_json(&j).map(Arc::new)).transpose()
    }

    async fn update(&self, lease: &Lease, record: AggregationRecord) -> Result<Written, StoreError> {
        let done: i64 = UPDATE
            .key(self.redis.farm_key(&lease.farm, "fence"))
            .key(self.record_key(&record.id))
            .arg(lease.token)
            .arg(to_json(&record)?)
            .arg(state_name(record.state))
            .arg(self.redis.changes_channel())
            .arg(&*record.id)
            .arg(farm_topic(&lease.farm))
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        if done == 1 {
            self.wakeups.wake(&record.id);
            self.wakeups.wake(&farm_topic(&lease.farm));
        }
        Ok(Self::written(done))
    }

    async fn finish(
        &self,
        lease: &Lease,
        record: AggregationRecord,
        rows: Option<Rows>,
    ) -> Result<Written, StoreError> {
        let expire = record.expire_time.unwrap_or_else(SystemTime::now);
        let done: i64 = FINISH
            .key(self.redis.farm_key(&lease.farm, "fence"))
            .key(self.record_key(&record.id))
            .key(self.queue_key(record.farm_id()))
            .key(self.key(&["farms"]))
            .key(self.key(&["live"]))
            .key(self.rows_key(&record.id))
            .key(self.index_key(&record.key))
            .key(self.key(&["due"]))
            .key(self.marker_key(&record.key))
            .key(self.refreshes_key(record.farm_id()))
            .arg(lease.token)
            .arg(to_json(&record)?)
            .arg(state_name(record.state))
            .arg(millis(expire))
            .arg(record.data_time.map_or(0, millis))
            .arg(rows.as_ref().map(|r| r.to_bytes()).unwrap_or_default())
            .arg(record.farm_id())
            .arg(self.redis.changes_channel())
            .arg(&*record.id)
            .arg(u64::try_from(KEEP_AFTER_EXPIRY.as_millis()).unwrap_or(u64::MAX))
            .arg(if record.refresh { "1" } else { "0" })
            .arg(self.key(&["agg:"]))
            .arg(farm_topic(&lease.farm))
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        if done == 1 {
            self.near.insert(Arc::new(CachedResult::new(Arc::new(record.clone()), rows)));
            self.wakeups.wake(&record.id);
            self.wakeups.wake(&farm_topic(&lease.farm));
        }
        Ok(Self::written(done))
    }

    async fn restore_rows(&self, record: Arc<AggregationRecord>, rows: Rows) -> Result<Arc<CachedResult>, StoreError> {
        let expire = record.expire_time.unwrap_or_else(SystemTime::now);
        let _written: i64 = RESTORE_ROWS
            .key(self.record_key(&record.id))
            .key(self.rows_key(&record.id))
            .arg(rows.to_bytes())
            .arg(millis(expire))
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
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
            .key(self.key(&["due"]))
            .arg(millis(SystemTime::now()))
            .arg(millis(due_by))
            .arg(self.key(&["agg:"]))
            .arg(DUE_SCAN_LIMIT)
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        let mut queued = Vec::new();
        for (old_id, hits, json) in due {
            if hits < min_hits {
                continue;
            }
            let old = from_json(&json)?;
            let refresh = AggregationRecord::refresh_of(mint(), &old);
            let farm = old.farm_id();
            let verdict: String = QUEUE_REFRESH
                .key(self.key(&["due"]))
                .key(self.record_key(&old_id))
                .key(self.index_key(&old.key))
                .key(self.marker_key(&old.key))
                .key(self.queue_key(farm))
                .key(self.refreshes_key(farm))
                .key(self.key(&["farms"]))
                .key(self.key(&["live"]))
                .key(self.record_key(&refresh.id))
                .key(self.key(&["epoch"]))
                .arg(&old_id)
                .arg(&*refresh.id)
                .arg(to_json(&refresh)?)
                .arg(farm)
                .arg(min_hits)
                .arg(limits.max_live)
                .arg(limits.max_farms)
                .arg(super::ids::tag_of(&refresh.id).map(|t| t.to_string()).unwrap_or_default())
                .arg(u64::try_from(KEEP_AFTER_EXPIRY.as_millis()).unwrap_or(u64::MAX))
                .invoke_async(&mut self.conn())
                .await
                .map_err(unavailable)?;
            match verdict.as_str() {
                "queued" => queued.push(Arc::new(refresh)),
                "live" | "epoch" => break,
                _ => {}
            }
        }
        Ok(queued)
    }

    async fn farms_with_work(&self) -> Result<Vec<String>, StoreError> {
        redis::cmd("SMEMBERS").arg(self.key(&["farms"])).query_async(&mut self.conn()).await.map_err(unavailable)
    }

    async fn queue(&self, farm: &str, count: usize) -> Result<Vec<Arc<AggregationRecord>>, StoreError> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = redis::cmd("LRANGE")
            .arg(self.queue_key(farm))
            .arg(0)
            .arg(count - 1)
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        ids.iter().for_each(|id| {
            pipe.cmd("HGET").arg(self.record_key(id)).arg("json");
        });
        let records: Vec<Option<String>> = pipe.query_async(&mut self.conn()).await.map_err(unavailable)?;
        records.iter().flatten().map(|json| from_json(json).map(Arc::new)).collect()
    }

    async fn run_model(&self, farm: &str) -> Result<Option<RunModel>, StoreError> {
        let (rate, runs): (Option<f64>, Option<u64>) = redis::cmd("HMGET")
            .arg(self.redis.farm_key(farm, "model"))
            .arg("seconds_per_unit")
            .arg("runs")
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(rate.zip(runs).map(|(seconds_per_unit, runs)| RunModel { seconds_per_unit, runs }))
    }

    async fn observe_run(&self, farm: &str, size: u64, took: Duration) -> Result<(), StoreError> {
        let rate = took.as_secs_f64() / size.max(1) as f64;
        let _runs: i64 = OBSERVE_RUN
            .key(self.redis.farm_key(farm, "model"))
            .arg(format!("{rate:e}"))
            .arg(super::estimate::SMOOTHING)
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn housekeeping(&self) {
        self.near.housekeeping();
        let Ok(farms) = self.farms_with_work().await else {
            self.counted().up = false;
            return;
        };
        let mut loads = std::collections::HashMap::new();
        for farm in farms {
            let queued: Result<usize, _> =
                redis::cmd("LLEN").arg(self.queue_key(&farm)).query_async(&mut self.conn()).await;
            if let Ok(queued) = queued {
                loads.insert(farm, FarmLoad { queued, running: 0 });
            }
        }
        // Expired results leave the refresh candidates (when refresh-ahead is off, nothing
        // else takes them out).
        let _: Result<i64, _> = redis::cmd("ZREMRANGEBYSCORE")
            .arg(self.key(&["due"]))
            .arg("-inf")
            .arg(millis(SystemTime::now()))
            .query_async(&mut self.conn())
            .await;
        let live: Option<usize> =
            redis::cmd("GET").arg(self.key(&["live"])).query_async(&mut self.conn()).await.ok().flatten();
        let mut counted = self.counted();
        counted.active = live.unwrap_or_default();
        counted.farms = loads;
        counted.up = true;
    }

    fn stats(&self) -> StoreStats {
        let (cached, cached_bytes, expirations, evictions) = self.near.stats();
        StoreStats { cached, cached_bytes, expirations, evictions, ..self.counted().clone() }
    }

    fn shared(&self) -> bool {
        true
    }

    async fn epoch(&self) -> Result<Option<u32>, StoreError> {
        self.redis.epoch().await.map(Some)
    }
}

impl RedisStore {
    fn counted(&self) -> MutexGuard<'_, StoreStats> {
        self.counted.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn from_millis(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or_default())
}

fn state_name(s: State) -> &'static str {
    match s {
        State::Queued => "QUEUED",
        State::Running => "RUNNING",
        State::Completed => "COMPLETED",
        State::Failed => "FAILED",
        State::TimedOut => "TIMED_OUT",
    }
}

const STATES: [State; 5] = [State::Queued, State::Running, State::Completed, State::Failed, State::TimedOut];

const CODES: [(FailureCode, &str); 9] = [
    (FailureCode::InvalidArgument, "INVALID_ARGUMENT"),
    (FailureCode::NotFound, "NOT_FOUND"),
    (FailureCode::PermissionDenied, "PERMISSION_DENIED"),
    (FailureCode::ResourceExhausted, "RESOURCE_EXHAUSTED"),
    (FailureCode::FailedPrecondition, "FAILED_PRECONDITION"),
    (FailureCode::Aborted, "ABORTED"),
    (FailureCode::DeadlineExceeded, "DEADLINE_EXCEEDED"),
    (FailureCode::Unavailable, "UNAVAILABLE"),
    (FailureCode::Internal, "INTERNAL"),
];

/// The canonical request as one string: the key index's name.
fn canonical(r: &AggregationRequest) -> String {
    let (kind, ids) = match &r.resources {
        Resources::Queues(ids) => ("q", ids),
        Resources::Fleets(ids) => ("f", ids),
    };
    let list = |v: Vec<&str>| v.join(",");
    format!(
        "{}|{kind}:{}|{}|{}|{}|{}|{}|{}",
        r.farm_id,
        ids.join(","),
        r.start_time.timestamp_millis(),
        r.end_time.timestamp_millis(),
        r.timezone.map(|t| t.to_string()).unwrap_or_default(),
        r.period.map(Period::as_str).unwrap_or_default(),
        list(r.group_by.iter().map(|g| g.as_str()).collect()),
        list(r.statistics.iter().map(|s| s.as_str()).collect()),
    )
}

/// A record as it is stored.
#[derive(serde::Serialize, serde::Deserialize)]
struct Wire {
    id: String,
    farm_id: String,
    fleets: bool,
    resource_ids: Vec<String>,
    start_ms: i64,
    end_ms: i64,
    timezone: Option<String>,
    period: Option<String>,
    group_by: Vec<String>,
    statistics: Vec<String>,
    state: String,
    upstream_id: Option<String>,
    status_message: String,
    error: Option<(String, String)>,
    create_ms: i64,
    expire_ms: Option<i64>,
    data_ms: Option<i64>,
    running_ms: Option<i64>,
    row_count: u64,
    #[serde(default)]
    parts: u32,
    #[serde(default)]
    no_split: bool,
    #[serde(default)]
    refresh: bool,
    #[serde(default)]
    estimate_ms: Option<i64>,
}

fn to_json(r: &AggregationRecord) -> Result<String, StoreError> {
    let q = r.key.request();
    let (fleets, ids) = match &q.resources {
        Resources::Queues(ids) => (false, ids.clone()),
        Resources::Fleets(ids) => (true, ids.clone()),
    };
    let wire = Wire {
        id: r.id.to_string(),
        farm_id: q.farm_id.clone(),
        fleets,
        resource_ids: ids,
        start_ms: q.start_time.timestamp_millis(),
        end_ms: q.end_time.timestamp_millis(),
        timezone: q.timezone.map(|t| t.to_string()),
        period: q.period.map(|p| p.as_str().to_owned()),
        group_by: q.group_by.iter().map(|g| g.as_str().to_owned()).collect(),
        statistics: q.statistics.iter().map(|s| s.as_str().to_owned()).collect(),
        state: state_name(r.state).to_owned(),
        upstream_id: r.upstream_id.clone(),
        status_message: r.status_message.clone(),
        error: r.error.as_ref().map(|e| {
            let code = CODES.iter().find(|(c, _)| *c == e.code).map_or("INTERNAL", |(_, n)| n);
            (code.to_owned(), e.message.clone())
        }),
        create_ms: millis(r.create_time),
        expire_ms: r.expire_time.map(millis),
        data_ms: r.data_time.map(millis),
        running_ms: r.running_since.map(millis),
        row_count: r.row_count,
        parts: r.parts,
        no_split: !r.key.may_split(),
        refresh: r.refresh,
        estimate_ms: r.estimated_completion.map(millis),
    };
    serde_json::to_string(&wire).map_err(|e| StoreError::Protocol(e.to_string()))
}

fn from_json(json: &str) -> Result<AggregationRecord, StoreError> {
    let bad = |what: &str| StoreError::Protocol(format!("a stored record has {what}"));
    let w: Wire = serde_json::from_str(json).map_err(|e| StoreError::Protocol(e.to_string()))?;
    let time = |ms: i64| chrono::DateTime::from_timestamp_millis(ms).ok_or_else(|| bad("a bad time"));
    let request = AggregationRequest {
        farm_id: w.farm_id,
        resources: if w.fleets { Resources::Fleets(w.resource_ids) } else { Resources::Queues(w.resource_ids) },
        start_time: time(w.start_ms)?,
        end_time: time(w.end_ms)?,
        timezone: w.timezone.map(|t| Timezone::parse(&t).ok_or_else(|| bad("a bad timezone"))).transpose()?,
        period: w.period.map(|p| Period::parse(&p).ok_or_else(|| bad("a bad period"))).transpose()?,
        group_by: w
            .group_by
            .iter()
            .map(|g| GroupBy::parse(g).ok_or_else(|| bad("a bad group")))
            .collect::<Result<_, _>>()?,
        statistics: w
            .statistics
            .iter()
            .map(|s| Statistic::parse(s).ok_or_else(|| bad("a bad statistic")))
            .collect::<Result<_, _>>()?,
    };
    let state = STATES.into_iter().find(|s| state_name(*s) == w.state).ok_or_else(|| bad("a bad state"))?;
    let error = w
        .error
        .map(|(code, message)| {
            let code = CODES.iter().find(|(_, n)| *n == code).map(|(c, _)| *c).ok_or_else(|| bad("a bad code"))?;
            Ok::<_, StoreError>(Failure { code, message })
        })
        .transpose()?;
    Ok(AggregationRecord {
        id: w.id.into(),
        key: if w.no_split { CanonicalKey::new(&request).no_split() } else { CanonicalKey::new(&request) },
        state,
        upstream_id: w.upstream_id,
        status_message: w.status_message,
        error,
        create_time: from_millis(w.create_ms),
        expire_time: w.expire_ms.map(from_millis),
        data_time: w.data_ms.map(from_millis),
        running_since: w.running_ms.map(from_millis),
        row_count: w.row_count,
        parts: w.parts,
        refresh: w.refresh,
        estimated_completion: w.estimate_ms.map(from_millis),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_survives_its_wire_form() {
        let key = crate::gateway::key::test_key(1, 2);
        let mut r = AggregationRecord::queued("agg-1".into(), key);
        r.state = State::Failed;
        r.error = Some(Failure { code: FailureCode::Unavailable, message: "gone".into() });
        r.expire_time = Some(from_millis(1_800_000_000_123));
        r.running_since = Some(from_millis(1_800_000_000_000));
        r.create_time = from_millis(millis(r.create_time));
        r.parts = 3;
        let back = from_json(&to_json(&r).expect("encodes")).expect("decodes");
        assert_eq!(back, r);
        r.key = r.key.clone().no_split();
        let back = from_json(&to_json(&r).expect("encodes")).expect("decodes");
        assert!(!back.key.may_split(), "a request that refused a split stays so");
        assert!(from_json("{}").is_err());
    }
}
