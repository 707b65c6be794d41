//! Coordination shared by replicas through Redis (or Valkey, ElastiCache, MemoryDB): farm
//! leases with fencing tokens, and the upstream rate shared by every replica. Each operation is
//! one Lua script, so it is atomic however many replicas race; time comes from Redis itself
//! (`PX` expiry, `TIME`), never from a replica's clock.
//!
//! Keys (under the configurable prefix, `dsg:` by default) carry a hash tag per farm, so a
//! farm's keys stay in one slot of a cluster:
//! - `{prefix}{farm-…}:lease`: `token:holder`, expiring with the lease;
//! - `{prefix}{farm-…}:fence`: the farm's newest token (`INCR`), never expiring;
//! - `{prefix}rate:{name}`: a GCRA's theoretical arrival time, in microseconds;
//! - `{prefix}changes`: the channel on which an aggregation's id is published when it changes.
//!
//! A replica keeps one subscription to the channel and fans it out to its local waiters
//! ([`super::wakeups::Wakeups`]); after every (re)connect it wakes them all, since messages
//! published while it was disconnected are lost.

use super::error::StoreError;
use super::lease::{FarmLeases, Lease};
use super::throttle::{Rate, RateSource};
use super::wakeups::Wakeups;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::sync::LazyLock;
use std::time::Duration;
use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;

/// How long one Redis command may take before it counts as unreachable.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(2);

/// Takes the lease if nobody holds it; its token is the farm's next fence.
/// KEYS: lease, fence. ARGV: holder, ttl in ms. Returns the token, or nil.
static ACQUIRE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
        if redis.call('EXISTS', KEYS[1]) == 1 then return false end
        local token = redis.call('INCR', KEYS[2])
        redis.call('SET', KEYS[1], token .. ':' .. ARGV[1], 'PX', ARGV[2])
        return token
        ",
    )
});

/// Extends the lease while it is still held under this token. KEYS: lease. ARGV: `token:holder`,
/// ttl in ms. Returns 1 or 0.
static RENEW: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
        if redis.call('GET', KEYS[1]) == ARGV[1] then
            redis.call('PEXPIRE', KEYS[1], ARGV[2])
            return 1
        end
        return 0
        ",
    )
});

/// Drops the lease if it is still held under this token. KEYS: lease. ARGV: `token:holder`.
static RELEASE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
        if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
        return 0
        ",
    )
});

/// GCRA: takes a token, or returns how many microseconds until one is due.
/// KEYS: the rate's key. ARGV: emission interval µs, tolerance µs (interval × (burst − 1)).
static EPOCH: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
        -- KEYS: epoch. ARGV: a fresh random epoch, taken when there is none.
        local e = redis.call('GET', KEYS[1])
        if e then return e end
        redis.call('SET', KEYS[1], ARGV[1])
        return ARGV[1]
        ",
    )
});

static GCRA: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
        local t = redis.call('TIME')
        local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
        local interval = tonumber(ARGV[1])
        local tolerance = tonumber(ARGV[2])
        local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
        if tat < now then tat = now end
        local early = tat - now - tolerance
        if early > 0 then return math.ceil(early) end
        local next_tat = tat + interval
        redis.call('SET', KEYS[1], string.format('%d', next_tat), 'PX', math.ceil((next_tat - now) / 1000) + 1000)
        return 0
        ",
    )
});

/// A connection to the shared Redis, reconnecting by itself, and the key prefix of this
/// gateway's data there.
#[derive(Clone)]
pub struct RedisCoordination {
    client: redis::Client,
    pub(crate) conn: ConnectionManager,
    pub(crate) prefix: String,
}

impl std::fmt::Debug for RedisCoordination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCoordination").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

pub(crate) fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl RedisCoordination {
    /// Connects to `url` (`redis://` or `rediss://` for TLS) and keeps its keys under `prefix`.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(unavailable)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(CONNECTION_TIMEOUT));
        let conn = client.get_connection_manager_with_config(config).await.map_err(unavailable)?;
        Ok(Self { client, conn, prefix: prefix.to_owned() })
    }

    /// The generation of the shared state: a random number kept in Redis, made anew when it is
    /// missing, so a Redis that restarted empty (or was flushed) has a new epoch, and ids
    /// minted under the old one can be told apart from ids that never existed.
    pub async fn epoch(&self) -> Result<u32, StoreError> {
        let epoch: String = EPOCH
            .key(format!("{}epoch", self.prefix))
            .arg(rand::random::<u32>())
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        epoch.parse().map_err(|_| StoreError::Protocol(format!("the stored epoch '{epoch}' is not a number")))
    }

    /// Refuses a Redis that may evict keys: leases, fences and records must never be evicted,
    /// or the one-running rule and accepted aggregations could be lost. Only `noeviction` is
    /// safe (the `volatile-*` policies may evict leases and records, which expire). Reads
    /// `INFO memory`, which managed services (ElastiCache, MemoryDB) allow where `CONFIG` is not.
    pub async fn check_eviction_policy(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let info: String = redis::cmd("INFO").arg("memory").query_async(&mut conn).await.map_err(unavailable)?;
        let policy = info
            .lines()
            .find_map(|l| l.strip_prefix("maxmemory_policy:"))
            .map(str::trim)
            .ok_or_else(|| StoreError::Protocol("INFO memory names no maxmemory_policy".into()))?;
        if policy == "noeviction" {
            Ok(())
        } else {
            Err(StoreError::Misconfigured(format!(
                "Redis maxmemory-policy is {policy}: it may evict the gateway's leases and records; set it to noeviction"
            )))
        }
    }

    pub(crate) fn changes_channel(&self) -> String {
        format!("{}changes", self.prefix)
    }

    /// Tells every replica that aggregation `id` changed.
    pub async fn publish_change(&self, id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = redis::cmd("PUBLISH")
            .arg(self.changes_channel())
            .arg(id)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Relays every published change to `wakeups` until `stop` fires: one subscription,
    /// re-made after any loss (with backoff), and every waiter woken after each (re)connect.
    pub async fn relay_changes(&self, wakeups: std::sync::Arc<Wakeups>, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        while !stop.is_cancelled() {
            let subscribed = async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.subscribe(self.changes_channel()).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            match tokio::select! { s = subscribed => s, () = stop.cancelled() => return } {
                Ok(pubsub) => {
                    backoff = Duration::from_millis(100);
                    wakeups.wake_all();
                    let mut messages = pubsub.into_on_message();
                    loop {
                        tokio::select! {
                            message = messages.next() => match message {
                                Some(m) => match std::str::from_utf8(m.get_payload_bytes()) {
                                    Ok(id) => wakeups.wake(id),
                                    Err(_) => tracing::warn!("a change notification that is not an id"),
                                },
                                None => break,
                            },
                            () = stop.cancelled() => return,
                        }
                    }
                    tracing::warn!("the change subscription to Redis was lost; re-subscribing");
                }
                Err(e) => {
                    tracing::warn!(error = %e, ?backoff, "cannot subscribe to changes in Redis; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    pub(crate) fn farm_key(&self, farm: &str, what: &str) -> String {
        format!("{}{{{farm}}}:{what}", self.prefix)
    }

    /// A rate shared by every replica under `name`; `None` when `rate` does not pace.
    pub fn rate(&self, name: &str, rate: Rate) -> Option<RedisRate> {
        let (interval, burst) = rate.interval_and_burst()?;
        let interval_us = u64::try_from(interval.as_micros()).unwrap_or(u64::MAX).max(1);
        Some(RedisRate {
            redis: self.clone(),
            key: format!("{}rate:{name}", self.prefix),
            interval_us,
            tolerance_us: interval_us.saturating_mul(u64::from(burst.saturating_sub(1))),
        })
    }
}

fn owner(lease: &Lease) -> String {
    format!("{}:{}", lease.token, lease.holder)
}

fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[async_trait::async_trait]
impl FarmLeases for RedisCoordination {
    async fn acquire(&self, farm: &str, holder: &str, ttl: Duration) -> Result<Option<Lease>, StoreError> {
        let mut conn = self.conn.clone();
        let token: Option<u64> = ACQUIRE
            .key(self.farm_key(farm, "lease"))
            .key(self.farm_key(farm, "fence"))
            .arg(holder)
            .arg(millis(ttl))
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(token.map(|token| Lease { farm: farm.to_owned(), holder: holder.to_owned(), token }))
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let renewed: i64 = RENEW
            .key(self.farm_key(&lease.farm, "lease"))
            .arg(owner(lease))
            .arg(millis(ttl))
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(renewed == 1)
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = RELEASE
            .key(self.farm_key(&lease.farm, "lease"))
            .arg(owner(lease))
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn is_current(&self, lease: &Lease) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let fence: Option<u64> = redis::cmd("GET")
            .arg(self.farm_key(&lease.farm, "fence"))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(fence == Some(lease.token))
    }
}

/// A token bucket shared by every replica: a GCRA in Redis.
pub struct RedisRate {
    redis: RedisCoordination,
    key: String,
    interval_us: u64,
    tolerance_us: u64,
}

#[async_trait::async_trait]
impl RateSource for RedisRate {
    async fn try_take(&self) -> Result<Option<Duration>, StoreError> {
        let mut conn = self.redis.conn.clone();
        let early_us: i64 = GCRA
            .key(&self.key)
            .arg(self.interval_us)
            .arg(self.tolerance_us)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(u64::try_from(early_us).ok().filter(|us| *us > 0).map(Duration::from_micros))
    }
}
