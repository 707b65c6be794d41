//! The connection to the shared Redis (or Valkey, ElastiCache, MemoryDB) and what it shares
//! besides the store: farm leases with fencing tokens, the upstream rates every replica paces
//! together, and the change notifications relayed to this replica's wake-ups. Each operation
//! is one Lua script ([`super::scripts`]), atomic however many replicas race; time comes from
//! Redis itself (`PX` expiry, `TIME`), never from a replica's clock.
//!
//! A replica keeps one subscription to the changes channel and fans it out to its local
//! waiters ([`Wakeups`]); after every (re)connect it wakes them all, since messages published
//! while it was disconnected are lost. The subscription is pinged every two seconds: one that
//! does not answer within the response timeout is made anew. On a Redis Cluster with sharded
//! pub/sub (Redis 7, Valkey), changes are published per bucket (`SPUBLISH`) and the
//! subscription (`SSUBSCRIBE`, one per shard, which the cluster connection moves with the
//! slots) covers every bucket.

use super::conn::{Conn, Endpoint, cluster_url};
use super::keys::Keys;
use super::scripts::{ACQUIRE, CALLER_TAKE, EPOCH, GCRA, RELEASE, RENEW};
use crate::gateway::coordination::lease::{FarmLeases, Lease};
use crate::gateway::coordination::pacing::{CallerTokens, RateSource, Taken};
use crate::gateway::coordination::wakeups::Wakeups;
use crate::gateway::coordination::{StoreError, StoreMemory};
use crate::gateway::ids::Bucket;
use crate::gateway::rate::Rate;
use redis::aio::ConnectionManagerConfig;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;

/// How often connections behind Sentinel check that they reach the primary it names.
const FOLLOW_PRIMARY: Duration = Duration::from_secs(1);
/// How often the change subscription proves itself alive.
const PUBSUB_HEALTH_CHECK: Duration = Duration::from_secs(2);

fn timed_out() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
}

/// How long a farm's fence outlives its last lease (its next token is larger anyway: tokens
/// come from Redis's clock).
const FENCE_OUTLIVES_LEASE: Duration = Duration::from_secs(24 * 3600);

/// How a replica reaches the shared Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `redis://HOST:PORT`, `rediss://` for TLS, or
    /// `redis+sentinel://HOST:PORT[,HOST:PORT…]/MASTER` for the primary Redis Sentinel names;
    /// credentials included.
    pub url: String,
    /// The prefix of every key, so several gateways can share one Redis.
    pub prefix: String,
    /// How long one command may take before it counts as unreachable (and is tried again).
    pub response_timeout: Duration,
    /// How many replicas must acknowledge a write that guards the one-running rule (a lease
    /// taken, a claim, an aggregation's next state) before the gateway acts on it; 0: none.
    pub wait_replicas: u32,
    /// How long such a write waits for them before it counts as failed (and is tried again).
    pub wait_timeout: Duration,
    /// With a `redis+sentinel://` URL: the Sentinels' own password.
    pub sentinel_password: Option<String>,
    /// The URL names seed nodes of a Redis Cluster (as a `redis-cluster://` URL does).
    pub cluster: bool,
}

impl RedisConfig {
    pub const DEFAULT_PREFIX: &str = "dsg:";
    pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
    pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_millis(500);

    /// The Redis at `url`, with the default prefix and timeouts, waiting for no replica.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: Self::DEFAULT_PREFIX.to_owned(),
            response_timeout: Self::DEFAULT_RESPONSE_TIMEOUT,
            wait_replicas: 0,
            wait_timeout: Self::DEFAULT_WAIT_TIMEOUT,
            sentinel_password: None,
            cluster: false,
        }
    }

    /// The URL to connect with: with [`Self::cluster`], `redis://` and `rediss://` seed lists
    /// read as `redis-cluster://` and `rediss-cluster://`.
    fn endpoint_url(&self) -> String {
        if !self.cluster || cluster_url(&self.url).is_some() {
            return self.url.clone();
        }
        match (self.url.strip_prefix("redis://"), self.url.strip_prefix("rediss://")) {
            (Some(rest), _) => format!("redis-cluster://{rest}"),
            (_, Some(rest)) => format!("rediss-cluster://{rest}"),
            _ => self.url.clone(),
        }
    }

    /// Whether the settings fit together: a wait must end before the command times out.
    pub fn validate(&self) -> Result<(), String> {
        if self.cluster && self.url.starts_with("redis+sentinel://") {
            return Err("--redis-cluster takes seed nodes (redis://HOST:PORT[,HOST:PORT…]), not Sentinels".to_owned());
        }
        if self.wait_replicas > 0 && self.wait_timeout >= self.response_timeout {
            return Err(format!(
                "--redis-wait-timeout ({}) must be shorter than --redis-response-timeout ({})",
                humantime::format_duration(self.wait_timeout),
                humantime::format_duration(self.response_timeout)
            ));
        }
        Ok(())
    }

    /// The same, keys under `prefix`.
    pub fn with_prefix(self, prefix: impl Into<String>) -> Self {
        Self { prefix: prefix.into(), ..self }
    }
}

/// A connection to the shared Redis, reconnecting by itself, and the names of this gateway's
/// keys there.
#[derive(Clone)]
pub struct RedisClient {
    endpoint: Endpoint,
    conn: Conn,
    /// With replicas to wait for: a connection of its own for guarded writes, since `WAIT`
    /// counts one connection's writes and blocks it meanwhile.
    guarded: Option<(Conn, u32, Duration)>,
    /// How long the change subscription may take to answer (the response timeout).
    health_timeout: Duration,
    pub(crate) keys: Keys,
    /// Gateway replicas subscribed to the changes channel, as housekeeping last counted (at
    /// least 1): what each replica's share of a caller's limit is while Redis is unreachable.
    pub(crate) replicas: Arc<AtomicUsize>,
}

impl std::fmt::Debug for RedisClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisClient").field("keys", &self.keys).finish_non_exhaustive()
    }
}

/// A Redis error as the store's: its memory is full (`OOM` under `noeviction`), or it could not
/// be reached or did not answer.
pub(crate) fn store_error(e: redis::RedisError) -> StoreError {
    if e.code() == Some("OOM") { StoreError::Full(Arc::new(e)) } else { StoreError::Unavailable(Arc::new(e)) }
}

impl RedisClient {
    /// Connects as `config` says.
    pub async fn connect(config: &RedisConfig) -> Result<Self, StoreError> {
        let endpoint =
            Endpoint::parse(&config.endpoint_url(), config.sentinel_password.as_deref(), config.response_timeout)
                .map_err(store_error)?;
        // One quick reconnect attempt per failure: a call during an outage fails within about a
        // response timeout (not after the manager's own backoff), and `Conn` decides what next.
        let manager = ConnectionManagerConfig::new()
            .set_response_timeout(Some(config.response_timeout))
            .set_connection_timeout(Some(config.response_timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(200));
        let cluster = cluster_config(config.response_timeout);
        let conn = Conn::connect(&endpoint, &manager, cluster.clone()).await.map_err(store_error)?;
        let guarded = match config.wait_replicas {
            0 => None,
            n => {
                let own = Conn::connect(&endpoint, &manager, cluster).await.map_err(store_error)?;
                Some((own, n, config.wait_timeout))
            }
        };
        let sharded = endpoint.is_cluster() && sharded_pubsub(&conn).await?;
        Ok(Self {
            endpoint,
            conn,
            guarded,
            health_timeout: config.response_timeout,
            keys: Keys::new(&config.prefix, sharded),
            replicas: Arc::new(AtomicUsize::new(1)),
        })
    }

    /// Whether it is a Redis Cluster (scripts cannot reach the admission sums with a bucket's
    /// keys there: the replica reads and tallies them itself).
    pub(crate) fn is_cluster(&self) -> bool {
        self.endpoint.is_cluster()
    }

    /// Runs a script whose write guards the one-running rule; with replicas to wait for, it
    /// counts as done only once they acknowledged it ([`StoreError::NotReplicated`] else: the
    /// write may be lost in a failover, so the caller must not act on it yet).
    /// `at` is the script's first key: on a cluster, the shard whose replicas are waited for.
    pub(crate) async fn guarded<T: redis::FromRedisValue>(
        &self,
        at: &str,
        script: &redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let (answer, replicated) = self.write_then_wait(at, script).await?;
        replicated.map(|()| answer)
    }

    /// The script's answer, and whether the replicas to wait for acknowledged it.
    async fn write_then_wait<T: redis::FromRedisValue>(
        &self,
        at: &str,
        script: &redis::ScriptInvocation<'_>,
    ) -> Result<(T, Result<(), StoreError>), StoreError> {
        let Some((conn, replicas, timeout)) = &self.guarded else {
            return Ok((script.invoke_async(&mut self.conn()).await.map_err(store_error)?, Ok(())));
        };
        let mut conn = conn.clone();
        let answer = script.invoke_async(&mut conn).await.map_err(store_error)?;
        // As many as asked, however many the primary has now: a primary cut off from its
        // replicas (the one a failover just left behind) must not take writes it would lose.
        let wanted = *replicas;
        let mut wait = redis::cmd("WAIT");
        wait.arg(wanted).arg(millis(*timeout));
        let acked: u32 = conn.at_key(at, wait).await.map_err(store_error)?;
        let replicated =
            if acked < wanted { Err(StoreError::NotReplicated { wanted, acked, within: *timeout }) } else { Ok(()) };
        Ok((answer, replicated))
    }

    /// A handle on the shared connection.
    pub(crate) fn conn(&self) -> Conn {
        self.conn.clone()
    }

    /// The generation of `bucket`'s shared state: a random number kept in Redis, made anew
    /// when it is missing or the server holding it is not the one it was made on (its `run_id`
    /// changed: a restart, a failover; on a cluster also a resharding that moved the bucket,
    /// which lost nothing but only changes what an id found nowhere answers), so after Redis
    /// lost writes ids minted in the lost window can be told apart from ids that never existed.
    pub async fn epoch(&self, bucket: Bucket) -> Result<u32, StoreError> {
        let run_id = self.run_id_at(&self.keys.epoch(bucket)).await?;
        self.epoch_on(bucket, &run_id).await
    }

    /// Every bucket's epoch, in bucket order (on one Redis, its `run_id` asked once).
    pub async fn epochs(&self) -> Result<Vec<u32>, StoreError> {
        if self.is_cluster() {
            return futures::future::try_join_all(Bucket::all().map(|b| self.epoch(b))).await;
        }
        let run_id = self.run_id_at(&self.keys.epoch(Bucket::default())).await?;
        futures::future::try_join_all(Bucket::all().map(|b| self.epoch_on(b, &run_id))).await
    }

    /// The `run_id` of the server holding `key`.
    async fn run_id_at(&self, key: &str) -> Result<String, StoreError> {
        let mut info = redis::cmd("INFO");
        info.arg("server");
        let info: String = self.conn.at_key(key, info).await.map_err(store_error)?;
        info.lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .map(|id| id.trim().to_owned())
            .ok_or_else(|| StoreError::UnexpectedAnswer { script: "INFO server", answer: "no run_id".into() })
    }

    /// `bucket`'s epoch on the server whose `run_id` is `run_id`.
    async fn epoch_on(&self, bucket: Bucket, run_id: &str) -> Result<u32, StoreError> {
        let epoch: String = EPOCH
            .key(self.keys.epoch(bucket))
            .key(self.keys.server(bucket))
            .arg(rand::random::<u32>())
            .arg(run_id)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(store_error)?;
        epoch.parse().map_err(|e| StoreError::corrupt(format!("the epoch {epoch:?}"), e))
    }

    /// Counts the gateway replicas subscribed to the changes channel (`PUBSUB NUMSUB`; on a
    /// cluster, `SHARDNUMSUB` of the first bucket's channel, or `NUMSUB` summed over the
    /// primaries, each of which serves its own subscribers).
    pub(crate) async fn count_replicas(&self) -> Result<usize, StoreError> {
        let channel = self.keys.changes(Bucket::default());
        let mut numsub = redis::cmd("PUBSUB");
        let counted: usize = if self.keys.sharded() {
            numsub.arg("SHARDNUMSUB").arg(&channel);
            let counts: Vec<(String, usize)> = self.conn.at_key(&channel, numsub).await.map_err(store_error)?;
            counts.first().map_or(1, |(_, n)| *n)
        } else {
            numsub.arg("NUMSUB").arg(&channel);
            let counts: Vec<Vec<(String, usize)>> = self.conn.on_primaries(numsub).await.map_err(store_error)?;
            counts.iter().filter_map(|c| c.first()).map(|(_, n)| n).sum()
        };
        let replicas = counted.max(1);
        self.replicas.store(replicas, Ordering::Relaxed);
        Ok(replicas)
    }

    /// How many keys Redis holds and how much memory it uses (`DBSIZE`, `INFO memory`; on a
    /// cluster, summed over its primaries).
    pub(crate) async fn memory(&self) -> Result<StoreMemory, StoreError> {
        let keys: Vec<u64> = self.conn.on_primaries(redis::cmd("DBSIZE")).await.map_err(store_error)?;
        let mut info = redis::cmd("INFO");
        info.arg("memory");
        let infos: Vec<String> = self.conn.on_primaries(info).await.map_err(store_error)?;
        let field = |name: &str| -> u64 {
            infos
                .iter()
                .filter_map(|info| info.lines().find_map(|l| l.strip_prefix(name)))
                .filter_map(|v| v.trim().parse::<u64>().ok())
                .sum()
        };
        Ok(StoreMemory { keys: keys.iter().sum(), used_bytes: field("used_memory:"), max_bytes: field("maxmemory:") })
    }

    /// Refuses a Redis that may evict keys: leases, fences and records must never be evicted,
    /// or the one-running rule and accepted aggregations could be lost. Only `noeviction` is
    /// safe (the `volatile-*` policies may evict leases and records, which expire). Reads
    /// `INFO memory`, which managed services (ElastiCache, MemoryDB) allow where `CONFIG` is not.
    /// On a cluster, every primary's.
    pub async fn check_eviction_policy(&self) -> Result<(), StoreError> {
        let mut info = redis::cmd("INFO");
        info.arg("memory");
        let infos: Vec<String> = self.conn.on_primaries(info).await.map_err(store_error)?;
        for info in infos {
            let policy =
                info.lines().find_map(|l| l.strip_prefix("maxmemory_policy:")).map(str::trim).ok_or_else(|| {
                    StoreError::UnexpectedAnswer { script: "INFO memory", answer: "no maxmemory_policy".into() }
                })?;
            if policy != "noeviction" {
                return Err(StoreError::EvictionPolicy { policy: policy.to_owned() });
            }
        }
        Ok(())
    }

    /// Refuses a node of a Redis Cluster given as one server (`INFO cluster`): one connection
    /// would reach one shard, and every other shard's keys answer `MOVED`; better said at
    /// start-up, with what to use instead. A cluster connection passes.
    pub async fn check_not_a_cluster(&self) -> Result<(), StoreError> {
        if self.is_cluster() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let info: String = redis::cmd("INFO").arg("cluster").query_async(&mut conn).await.map_err(store_error)?;
        let enabled = info.lines().any(|l| l.trim() == "cluster_enabled:1");
        if enabled { Err(StoreError::ClusterMode) } else { Ok(()) }
    }

    /// Behind Sentinel, until `stop` fires: every `FOLLOW_PRIMARY` (a second), moves every connection
    /// to the primary Sentinel names, if it reaches another (one a failover left behind).
    pub async fn follow_primary(&self, stop: CancellationToken) {
        if !matches!(self.endpoint, Endpoint::Sentinel(_)) {
            return;
        }
        let mut every = crate::every::Every::new(FOLLOW_PRIMARY, stop);
        while every.tick().await {
            let named = match self.endpoint.client().await {
                Ok(named) => named,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot ask Sentinel for the primary");
                    continue;
                }
            };
            let guarded = self.guarded.as_ref().map(|(conn, _, _)| conn);
            for conn in std::iter::once(&self.conn).chain(guarded) {
                if let Err(e) = conn.follow_primary(named.clone()).await {
                    tracing::debug!(error = %e, "cannot connect to the primary Sentinel names");
                }
            }
        }
    }

    /// Relays every published change to `wakeups` until `stop` fires: one subscription,
    /// re-made after any loss (with backoff), and every waiter woken after each (re)connect.
    pub async fn relay_changes(&self, wakeups: Arc<Wakeups>, stop: CancellationToken) {
        if self.is_cluster() {
            return self.relay_cluster_changes(wakeups, stop).await;
        }
        let mut backoff = Duration::from_millis(100);
        while !stop.is_cancelled() {
            let subscribed = async {
                let client = self.endpoint.client().await?;
                let primary = client.get_connection_info().addr().clone();
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(self.keys.channels()).await?;
                Ok::<_, redis::RedisError>((pubsub, primary))
            };
            let subscribed = tokio::time::timeout(self.health_timeout, subscribed);
            match tokio::select! { s = subscribed => s.unwrap_or_else(|_| Err(timed_out())), () = stop.cancelled() => return }
            {
                Ok((pubsub, primary)) => {
                    backoff = Duration::from_millis(100);
                    wakeups.wake_all();
                    let (mut sink, mut messages) = pubsub.split();
                    let mut health = tokio::time::interval(PUBSUB_HEALTH_CHECK);
                    health.tick().await;
                    loop {
                        tokio::select! {
                            message = messages.next() => match message {
                                Some(m) => match std::str::from_utf8(m.get_payload_bytes()) {
                                    Ok(id) => wakeups.wake(id),
                                    Err(_) => tracing::warn!("a change notification that is not an id"),
                                },
                                None => break,
                            },
                            _ = health.tick() => {
                                // A socket whose far end vanished without a word delivers
                                // nothing and fails nothing: only an answer proves it alive.
                                let pong = tokio::time::timeout(self.health_timeout, sink.ping::<redis::Value>()).await;
                                if !matches!(pong, Ok(Ok(_))) {
                                    tracing::warn!("the change subscription to Redis stopped answering");
                                    break;
                                }
                                // Changes are published on the primary: follow it when it moves.
                                if let Endpoint::Sentinel(_) = &self.endpoint
                                    && let Ok(Ok(now)) = tokio::time::timeout(self.health_timeout, self.endpoint.client()).await
                                    && now.get_connection_info().addr() != &primary
                                {
                                    tracing::warn!("Sentinel names another primary; subscribing there");
                                    break;
                                }
                            }
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

    /// On a cluster: the changes subscribed through a cluster connection of its own (RESP3
    /// push messages; `SSUBSCRIBE` to every bucket's channel where sharded), which subscribes
    /// again by itself when a shard's primary moves or a slot migrates. Every waiter is woken
    /// after each (re)subscription and disconnection: messages may have been missed.
    async fn relay_cluster_changes(&self, wakeups: Arc<Wakeups>, stop: CancellationToken) {
        let Endpoint::Cluster { pushes: client, .. } = &self.endpoint else { return };
        let mut backoff = Duration::from_millis(100);
        while !stop.is_cancelled() {
            let (tx, mut pushes) = tokio::sync::mpsc::unbounded_channel::<redis::PushInfo>();
            let config = cluster_config(self.health_timeout).set_push_sender(tx);
            let subscribed = async {
                let mut conn = client.get_async_connection_with_config(config).await?;
                // One channel at a time: each bucket's lives in a slot of its own.
                for channel in self.keys.channels() {
                    if self.keys.sharded() {
                        conn.ssubscribe(&channel).await?;
                    } else {
                        conn.subscribe(&channel).await?;
                    }
                }
                Ok::<_, redis::RedisError>(conn)
            };
            let subscribed = tokio::time::timeout(self.health_timeout, subscribed);
            let mut conn = match tokio::select! { s = subscribed => s.unwrap_or_else(|_| Err(timed_out())), () = stop.cancelled() => return }
            {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, ?backoff, "cannot subscribe to changes in the Redis Cluster; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            wakeups.wake_all();
            let mut health = tokio::time::interval(PUBSUB_HEALTH_CHECK);
            health.tick().await;
            loop {
                tokio::select! {
                    push = pushes.recv() => match push {
                        Some(push) => match push.kind {
                            redis::PushKind::Message | redis::PushKind::SMessage => {
                                match push.data.last().cloned().map(redis::from_redis_value::<String>) {
                                    Some(Ok(id)) => wakeups.wake(&id),
                                    _ => tracing::warn!("a change notification that is not an id"),
                                }
                            }
                            redis::PushKind::Subscribe | redis::PushKind::SSubscribe | redis::PushKind::Disconnection => {
                                wakeups.wake_all();
                            }
                            _ => {}
                        },
                        None => break,
                    },
                    _ = health.tick() => {
                        let pong = tokio::time::timeout(self.health_timeout, redis::cmd("PING").query_async::<redis::Value>(&mut conn)).await;
                        if !matches!(pong, Ok(Ok(_))) {
                            tracing::warn!("the Redis Cluster stopped answering the change subscription");
                            break;
                        }
                    }
                    () = stop.cancelled() => return,
                }
            }
            tracing::warn!("the change subscription to the Redis Cluster was lost; re-subscribing");
        }
    }

    /// Callers' buckets of `rate` for `operation`, shared by every replica; `None` when `rate`
    /// does not limit.
    pub fn caller_tokens(&self, operation: &str, rate: Rate) -> Option<RedisCallerTokens> {
        let (interval_us, tolerance_us) = rate.gcra_us()?;
        Some(RedisCallerTokens { redis: self.clone(), prefix: self.keys.caller(operation), interval_us, tolerance_us })
    }

    /// A rate shared by every replica under `name`; `None` when `rate` does not pace.
    pub fn rate(&self, name: &str, rate: Rate) -> Option<RedisRate> {
        let (interval_us, tolerance_us) = rate.gcra_us()?;
        Some(RedisRate { redis: self.clone(), key: self.keys.rate(name), interval_us, tolerance_us })
    }
}

impl crate::gateway::coordination::pacing::UpstreamRates for RedisClient {
    fn source(
        &self,
        name: &str,
        rate: Rate,
    ) -> Option<std::sync::Arc<dyn crate::gateway::coordination::pacing::RateSource>> {
        self.rate(name, rate).map(|r| std::sync::Arc::new(r) as _)
    }
}

/// A cluster connection's timeouts: a command within `timeout`, like one Redis's.
fn cluster_config(timeout: Duration) -> redis::cluster::ClusterConfig {
    redis::cluster::ClusterConfig::new().set_connection_timeout(timeout).set_response_timeout(timeout)
}

/// Whether every primary has sharded pub/sub (`SPUBLISH`: Redis and Valkey 7 and later).
async fn sharded_pubsub(conn: &Conn) -> Result<bool, StoreError> {
    let mut info = redis::cmd("INFO");
    info.arg("server");
    let infos: Vec<String> = conn.on_primaries(info).await.map_err(store_error)?;
    let major = |info: &String| {
        info.lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .and_then(|v| v.trim().split('.').next()?.parse::<u32>().ok())
    };
    Ok(!infos.is_empty() && infos.iter().all(|info| major(info).is_some_and(|m| m >= 7)))
}

fn owner(lease: &Lease) -> String {
    format!("{}:{}", lease.token, lease.holder)
}

fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[async_trait::async_trait]
impl FarmLeases for RedisClient {
    async fn acquire(&self, farm: &str, holder: &str, ttl: Duration) -> Result<Option<Lease>, StoreError> {
        let asked = tokio::time::Instant::now();
        let lease_key = self.keys.lease(farm);
        let mut acquire = ACQUIRE.key(&lease_key);
        acquire.key(self.keys.fence(farm)).arg(holder).arg(millis(ttl)).arg(millis(FENCE_OUTLIVES_LEASE));
        let (token, replicated) = self.write_then_wait::<Option<u64>>(&lease_key, &acquire).await?;
        let Some(token) = token else { return Ok(None) };
        let lease = Lease::granted(farm, holder, token, asked, ttl);
        if let Err(e) = replicated {
            // Taken, but it could be lost in a failover: give it back, and take it later.
            let _ = self.release(&lease).await;
            return Err(e);
        }
        Ok(Some(lease))
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let renewed: i64 = RENEW
            .key(self.keys.lease(&lease.farm))
            .key(self.keys.fence(&lease.farm))
            .arg(owner(lease))
            .arg(millis(ttl))
            .arg(millis(FENCE_OUTLIVES_LEASE))
            .invoke_async(&mut conn)
            .await
            .map_err(store_error)?;
        Ok(renewed == 1)
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = RELEASE
            .key(self.keys.lease(&lease.farm))
            .arg(owner(lease))
            .invoke_async(&mut conn)
            .await
            .map_err(store_error)?;
        Ok(())
    }

    async fn is_current(&self, lease: &Lease) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let fence: Option<u64> =
            redis::cmd("GET").arg(self.keys.fence(&lease.farm)).query_async(&mut conn).await.map_err(store_error)?;
        Ok(fence == Some(lease.token))
    }

    async fn holder(&self, farm: &str) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn.clone();
        let lease: Option<String> =
            redis::cmd("GET").arg(self.keys.lease(farm)).query_async(&mut conn).await.map_err(store_error)?;
        // `token:holder`, as `owner` writes it.
        Ok(lease.and_then(|l| l.split_once(':').map(|(_, holder)| holder.to_owned())))
    }
}

/// Callers' token buckets shared by every replica, one GCRA per caller in Redis.
pub struct RedisCallerTokens {
    redis: RedisClient,
    prefix: String,
    interval_us: u64,
    tolerance_us: u64,
}

#[async_trait::async_trait]
impl CallerTokens for RedisCallerTokens {
    async fn take(&self, caller: &str, want: u32) -> Result<Taken, StoreError> {
        let mut conn = self.redis.conn.clone();
        let (taken, wait_us): (u32, u64) = CALLER_TAKE
            .key(format!("{}{caller}", self.prefix))
            .arg(self.interval_us)
            .arg(self.tolerance_us)
            .arg(want.max(1))
            .invoke_async(&mut conn)
            .await
            .map_err(store_error)?;
        Ok(if taken > 0 { Taken::Tokens(taken) } else { Taken::Wait(Duration::from_micros(wait_us.max(1))) })
    }

    fn replicas(&self) -> usize {
        self.redis.replicas.load(Ordering::Relaxed).max(1)
    }
}

/// A token bucket shared by every replica: a GCRA in Redis.
pub struct RedisRate {
    redis: RedisClient,
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
            .map_err(store_error)?;
        Ok(u64::try_from(early_us).ok().filter(|us| *us > 0).map(Duration::from_micros))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_for_replicas_must_end_before_the_command_times_out() {
        let config = RedisConfig { wait_replicas: 1, ..RedisConfig::new("redis://h") };
        assert_eq!(config.validate(), Ok(()));
        let long = RedisConfig { wait_timeout: Duration::from_secs(2), ..config.clone() };
        assert_eq!(
            long.validate(),
            Err("--redis-wait-timeout (2s) must be shorter than --redis-response-timeout (2s)".to_owned())
        );
        assert_eq!(RedisConfig { wait_replicas: 0, ..long }.validate(), Ok(()), "no wait, nothing to check");
    }
}
