//! The connection every command goes through: the `redis` crate's connection manager, which
//! reconnects by itself after a connection drops, made to survive two more faults.
//!
//! - A command whose connection had dropped under it is sent once more (the manager
//!   reconnects meanwhile), so a restart or failover of Redis costs callers nothing. Every
//!   command and script of the gateway is safe to repeat: scripts are fenced and idempotent,
//!   and a repeated claim joins the aggregation the first one queued.
//! - A socket whose far end vanished without a word (a half-open connection: a failover behind
//!   a load balancer, a dropped NAT entry) never fails, it only times out, and the manager
//!   does not reconnect on timeouts. After a timeout a probe (`PING`) checks the connection;
//!   if the probe times out too, the manager is replaced by a new one. A command that was
//!   merely slow is not repeated: its caller decides.
//! - Behind Redis Sentinel ([`Endpoint::Sentinel`]), the primary moves: a dropped connection
//!   or a `READONLY` answer (the old primary, demoted) makes a new manager on the primary
//!   Sentinel names now. A plain URL's host name is resolved again by every reconnect, which
//!   follows a primary endpoint whose DNS moves (ElastiCache).
//! - On a Redis Cluster ([`Endpoint::Cluster`]) the `redis` crate's cluster connection routes
//!   each command to the shard of its keys and follows `MOVED` and `ASK` (a resharding) and
//!   new primaries (a failover) by itself; commands without keys that must reach a given
//!   shard or every primary are routed explicitly ([`Conn::at_key`], [`Conn::on_primaries`]).

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often a cluster command is tried again (redirections included) within its timeout.
const RETRIES: u32 = 16;

/// Where the primary is.
#[derive(Clone)]
pub(crate) enum Endpoint {
    /// At a URL (its host name resolved again on every reconnect).
    Fixed(Box<redis::Client>),
    /// Wherever Redis Sentinel says the primary of its master name is now.
    Sentinel(Arc<tokio::sync::Mutex<SentinelClient>>),
    /// The shards of a Redis Cluster, found from its seed nodes: a client for commands, and
    /// one speaking RESP3 for the change subscription (push messages need it).
    Cluster { commands: Box<ClusterClient>, pushes: Box<ClusterClient> },
}

impl Endpoint {
    /// `redis://…`, `rediss://…`, or
    /// `redis+sentinel://[USER:PASSWORD@]HOST:PORT[,HOST:PORT…]/MASTER` (the credentials are the
    /// data nodes'; `sentinel_password` is the Sentinels').
    /// On a cluster, a command with its redirections and retries takes at most `timeout`.
    pub(crate) fn parse(url: &str, sentinel_password: Option<&str>, timeout: Duration) -> redis::RedisResult<Self> {
        if let Some((tls, rest)) = cluster_url(url) {
            return Self::cluster(tls, rest, timeout);
        }
        let Some(rest) = url.strip_prefix("redis+sentinel://") else {
            return redis::Client::open(url).map(|c| Self::Fixed(Box::new(c)));
        };
        let invalid = |why: &str| {
            redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "redis+sentinel URL", why.to_owned()))
        };
        let (credentials, rest) = match rest.rsplit_once('@') {
            Some((credentials, rest)) => (Some(credentials), rest),
            None => (None, rest),
        };
        let (hosts, master) = rest.split_once('/').ok_or_else(|| invalid("it names no master: …/MASTER"))?;
        if master.is_empty() || hosts.is_empty() {
            return Err(invalid("it needs HOST:PORT[,HOST:PORT…]/MASTER"));
        }
        let auth = sentinel_password.map(|p| format!(":{}@", percent(p))).unwrap_or_default();
        let sentinels: Vec<String> = hosts.split(',').map(|h| format!("redis://{auth}{h}")).collect();
        let mut node = redis::RedisConnectionInfo::default();
        if let Some((user, password)) = credentials.map(|c| c.split_once(':').unwrap_or(("", c))) {
            if !user.is_empty() {
                node = node.set_username(decode(user));
            }
            if !password.is_empty() {
                node = node.set_password(decode(password));
            }
        }
        let info = SentinelNodeConnectionInfo::default().set_redis_connection_info(node);
        let client = SentinelClient::build(sentinels, master, Some(info), SentinelServerType::Master)?;
        Ok(Self::Sentinel(Arc::new(tokio::sync::Mutex::new(client))))
    }

    /// `[USER:PASSWORD@]HOST:PORT[,HOST:PORT…]`: a cluster's seed nodes (any of its nodes; the
    /// rest are found from them), with TLS when `tls`.
    /// A command is retried quickly (10 ms, doubling up to 100 ms) after `TRYAGAIN` (a
    /// resharding moving its slot's keys) or a lost connection, within `timeout` in all; the
    /// crate's defaults wait seconds to minutes, which would outlast a farm's lease.
    fn cluster(tls: bool, rest: &str, timeout: Duration) -> redis::RedisResult<Self> {
        let invalid = |why: &str| {
            redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "redis-cluster URL", why.to_owned()))
        };
        let (credentials, hosts) = match rest.rsplit_once('@') {
            Some((credentials, hosts)) => (Some(credentials), hosts),
            None => (None, rest),
        };
        let hosts = hosts.trim_end_matches('/');
        if hosts.is_empty() || hosts.split(',').any(str::is_empty) {
            return Err(invalid("it needs HOST:PORT[,HOST:PORT…]"));
        }
        let scheme = if tls { "rediss" } else { "redis" };
        let seeds: Vec<String> = hosts.split(',').map(|h| format!("{scheme}://{h}")).collect();
        let credentials = credentials.map(|c| c.split_once(':').unwrap_or(("", c)));
        let client = |protocol| {
            let mut builder = ClusterClient::builder(seeds.clone())
                .response_timeout(timeout)
                .connection_timeout(timeout)
                .retries(RETRIES)
                .min_retry_wait(10)
                .max_retry_wait(100)
                .retry_wait_formula(10, 2)
                .use_protocol(protocol);
            if let Some((user, password)) = credentials {
                if !user.is_empty() {
                    builder = builder.username(decode(user));
                }
                if !password.is_empty() {
                    builder = builder.password(decode(password));
                }
            }
            builder.build().map(Box::new)
        };
        // Push messages (the change subscription) need RESP3 on a cluster connection; commands
        // keep RESP2.
        let pushes = client(redis::ProtocolVersion::RESP3)?;
        Ok(Self::Cluster { commands: client(redis::ProtocolVersion::RESP2)?, pushes })
    }

    /// A client of the primary now (on a cluster: of a seed node, for what is not keyed).
    pub(crate) async fn client(&self) -> redis::RedisResult<redis::Client> {
        match self {
            Self::Fixed(client) => Ok((**client).clone()),
            Self::Sentinel(sentinel) => sentinel.lock().await.async_get_client().await,
            Self::Cluster { .. } => {
                Err(redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "a cluster has no single primary")))
            }
        }
    }

    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster { .. })
    }
}

/// A cluster URL's TLS and the rest after its scheme: `redis-cluster://` (`rediss-cluster://`
/// for TLS).
pub(crate) fn cluster_url(url: &str) -> Option<(bool, &str)> {
    url.strip_prefix("redis-cluster://")
        .map(|rest| (false, rest))
        .or_else(|| url.strip_prefix("rediss-cluster://").map(|rest| (true, rest)))
}

fn percent(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A connection shared by clones: to one Redis (behind Sentinel or not), or to a cluster.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(Single),
    Cluster(Cluster),
}

/// The connection to a cluster, made anew when it stops answering: a command that timed out
/// is followed by a probe (`PING`, once at a time), and when the probe times out too the
/// connection is replaced. Besides half-open sockets this covers the `redis` crate's cluster
/// connection stalling for good after a slot migration under load (seen here with 1.8.1).
#[derive(Clone)]
pub(crate) struct Cluster {
    shared: Arc<ClusterShared>,
}

struct ClusterShared {
    current: Mutex<ClusterConnection>,
    client: Box<ClusterClient>,
    config: redis::cluster::ClusterConfig,
    probing: AtomicBool,
}

impl Cluster {
    fn current(&self) -> ClusterConnection {
        self.shared.current.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// After `e`: a timeout is probed, and the connection replaced when the probe times out.
    fn after(&self, e: &redis::RedisError) {
        if !e.is_timeout() || self.shared.probing.swap(true, Ordering::SeqCst) {
            return;
        }
        let shared = self.shared.clone();
        let mut suspect = self.current();
        tokio::spawn(async move {
            let probe: redis::RedisResult<redis::Value> = redis::cmd("PING").query_async(&mut suspect).await;
            if probe.as_ref().is_err_and(redis::RedisError::is_timeout) {
                tracing::warn!("the Redis Cluster connection stopped answering; connecting anew");
                match shared.client.get_async_connection_with_config(shared.config.clone()).await {
                    Ok(fresh) => *shared.current.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = fresh,
                    Err(e) => tracing::warn!(error = %e, "cannot connect to the Redis Cluster anew"),
                }
            }
            shared.probing.store(false, Ordering::SeqCst);
        });
    }

    async fn route(&self, cmd: redis::Cmd, route: RoutingInfo) -> redis::RedisResult<redis::Value> {
        self.noticed(self.current().route_command(cmd, route).await)
    }

    /// `answer`, after [`Self::after`] saw its error.
    fn noticed<T>(&self, answer: redis::RedisResult<T>) -> redis::RedisResult<T> {
        if let Err(e) = &answer {
            self.after(e);
        }
        answer
    }
}

impl ConnectionLike for Cluster {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        Box::pin(async move { self.noticed(self.current().req_packed_command(cmd).await) })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        Box::pin(async move { self.noticed(self.current().req_packed_commands(pipeline, offset, count).await) })
    }

    fn get_db(&self) -> i64 {
        0
    }
}

/// The connection to one Redis.
#[derive(Clone)]
pub(crate) struct Single {
    shared: Arc<Shared>,
}

struct Shared {
    current: Mutex<ConnectionManager>,
    /// Where `current` connects to.
    addr: Mutex<redis::ConnectionAddr>,
    endpoint: Endpoint,
    config: ConnectionManagerConfig,
    /// A probe of the current connection is running.
    probing: AtomicBool,
}

impl Conn {
    /// A connection to `endpoint`; on a cluster, `cluster` gives its timeouts (and, for the
    /// change subscription, where push messages go).
    pub(crate) async fn connect(
        endpoint: &Endpoint,
        config: &ConnectionManagerConfig,
        cluster: redis::cluster::ClusterConfig,
    ) -> redis::RedisResult<Self> {
        match endpoint {
            Endpoint::Cluster { commands, .. } => {
                let current = commands.get_async_connection_with_config(cluster.clone()).await?;
                Ok(Self::Cluster(Cluster {
                    shared: Arc::new(ClusterShared {
                        current: Mutex::new(current),
                        client: commands.clone(),
                        config: cluster,
                        probing: AtomicBool::new(false),
                    }),
                }))
            }
            _ => Ok(Self::Single(Single::connect(endpoint, config).await?)),
        }
    }

    /// Sends `cmd`, which names no key, to the primary of the shard holding `key`.
    pub(crate) async fn at_key<T: redis::FromRedisValue>(&self, key: &str, cmd: redis::Cmd) -> redis::RedisResult<T> {
        match self {
            Self::Single(single) => cmd.query_async(&mut single.clone()).await,
            Self::Cluster(cluster) => {
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::with_key(
                    key.as_bytes(),
                    SlotAddr::Master,
                )));
                Ok(redis::from_redis_value(cluster.route(cmd, route).await?)?)
            }
        }
    }

    /// Sends `cmd` to every primary (the one Redis, or each shard's), answering each one's.
    pub(crate) async fn on_primaries<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> redis::RedisResult<Vec<T>> {
        match self {
            Self::Single(single) => Ok(vec![cmd.query_async(&mut single.clone()).await?]),
            Self::Cluster(cluster) => {
                let route = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                match cluster.route(cmd, route).await? {
                    redis::Value::Map(answers) => {
                        answers.into_iter().map(|(_, answer)| Ok(redis::from_redis_value(answer)?)).collect()
                    }
                    other => Ok(vec![redis::from_redis_value(other)?]),
                }
            }
        }
    }

    /// Behind Sentinel: see [`Single::follow_primary`]; nothing elsewhere.
    pub(crate) async fn follow_primary(&self, named: redis::Client) -> redis::RedisResult<()> {
        match self {
            Self::Single(single) => single.follow_primary(named).await,
            Self::Cluster(_) => Ok(()),
        }
    }
}

impl Single {
    async fn connect(endpoint: &Endpoint, config: &ConnectionManagerConfig) -> redis::RedisResult<Self> {
        let client = endpoint.client().await?;
        let addr = client.get_connection_info().addr().clone();
        let manager = client.get_connection_manager_with_config(config.clone()).await?;
        Ok(Self {
            shared: Arc::new(Shared {
                current: Mutex::new(manager),
                addr: Mutex::new(addr),
                endpoint: endpoint.clone(),
                config: config.clone(),
                probing: AtomicBool::new(false),
            }),
        })
    }

    fn current(&self) -> ConnectionManager {
        self.shared.current.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// After `e`: behind Sentinel, a connection that dropped or reached a demoted primary is
    /// made anew on the primary now; a connection that timed out is probed (once at a time)
    /// and made anew when the probe times out too.
    fn after(&self, e: &redis::RedisError) {
        // A demoted primary answers writes READONLY, wherever it was found; behind Sentinel a
        // dropped or refused connection may also mean the primary moved.
        let moved = e.code() == Some("READONLY")
            || (matches!(self.shared.endpoint, Endpoint::Sentinel(_))
                && (e.is_connection_dropped() || e.is_connection_refusal()));
        if !(moved || e.is_timeout()) || self.shared.probing.swap(true, Ordering::SeqCst) {
            return;
        }
        let shared = self.shared.clone();
        let mut suspect = self.current();
        tokio::spawn(async move {
            let replace = moved || {
                let probe: redis::RedisResult<redis::Value> = redis::cmd("PING").query_async(&mut suspect).await;
                probe.as_ref().is_err_and(redis::RedisError::is_timeout)
            };
            if replace {
                tracing::warn!("a Redis connection stopped answering or its primary moved; connecting anew");
                if let Err(e) = shared.connect_anew().await {
                    tracing::warn!(error = %e, "cannot connect to Redis anew; trying again after the next failure");
                }
            }
            shared.probing.store(false, Ordering::SeqCst);
        });
    }

    /// `answer`, after [`Self::after`] saw its error.
    fn noticed<T>(&self, answer: redis::RedisResult<T>) -> redis::RedisResult<T> {
        if let Err(e) = &answer {
            self.after(e);
        }
        answer
    }

    /// Behind Sentinel: when `named`, the primary Sentinel names now, is another than the one
    /// this connection reaches, connects to it. A primary a failover left behind answers reads
    /// (and, until Sentinel demotes it, writes) without an error, so nothing else would move a
    /// connection off it. Nothing while a probe runs.
    pub(crate) async fn follow_primary(&self, named: redis::Client) -> redis::RedisResult<()> {
        let now = named.get_connection_info().addr().clone();
        let reached = self.shared.addr.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        if now == reached || self.shared.probing.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        tracing::warn!(primary = %now, was = %reached, "Sentinel names another primary; connecting to it");
        let connected = self.shared.connect_anew_to(named).await;
        self.shared.probing.store(false, Ordering::SeqCst);
        connected
    }
}

impl Shared {
    /// A new manager on the primary now, in place of the current one.
    async fn connect_anew(&self) -> redis::RedisResult<()> {
        let client = self.endpoint.client().await?;
        self.connect_anew_to(client).await
    }

    async fn connect_anew_to(&self, client: redis::Client) -> redis::RedisResult<()> {
        let addr = client.get_connection_info().addr().clone();
        let fresh = client.get_connection_manager_with_config(self.config.clone()).await?;
        *self.current.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = fresh;
        *self.addr.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = addr;
        Ok(())
    }
}

fn dropped(e: &redis::RedisError) -> bool {
    e.is_connection_dropped() && !e.is_timeout()
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Self::Single(single) => single.req_packed_command(cmd),
            Self::Cluster(cluster) => cluster.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Self::Single(single) => single.req_packed_commands(pipeline, offset, count),
            Self::Cluster(cluster) => cluster.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(single) => single.get_db(),
            Self::Cluster(_) => 0,
        }
    }
}

impl ConnectionLike for Single {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        Box::pin(async move {
            let answer = match self.current().req_packed_command(cmd).await {
                Err(e) if dropped(&e) => self.current().req_packed_command(cmd).await,
                answer => answer,
            };
            self.noticed(answer)
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        Box::pin(async move {
            let answer = match self.current().req_packed_commands(pipeline, offset, count).await {
                Err(e) if dropped(&e) => self.current().req_packed_commands(pipeline, offset, count).await,
                answer => answer,
            };
            self.noticed(answer)
        })
    }

    fn get_db(&self) -> i64 {
        self.current().get_db()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(1);

    #[test]
    fn a_sentinel_url_names_its_sentinels_and_master_and_a_plain_url_stays_plain() {
        assert!(matches!(Endpoint::parse("redis://127.0.0.1:6379", None, T), Ok(Endpoint::Fixed(_))));
        let sentinel =
            Endpoint::parse("redis+sentinel://u:p%40ss@10.0.0.1:26379,10.0.0.2:26379/mymaster", Some("s"), T);
        assert!(matches!(sentinel, Ok(Endpoint::Sentinel(_))));
        for bad in ["redis+sentinel://10.0.0.1:26379", "redis+sentinel://10.0.0.1:26379/", "redis+sentinel:///m"] {
            let err = Endpoint::parse(bad, None, T).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("redis+sentinel URL"), "{bad}: {err}");
        }
        assert!(matches!(
            Endpoint::parse("redis-cluster://u:p@10.0.0.1:7000,10.0.0.2:7000", None, T),
            Ok(Endpoint::Cluster { .. })
        ));
        assert!(matches!(Endpoint::parse("rediss-cluster://10.0.0.1:7000", None, T), Ok(Endpoint::Cluster { .. })));
        for bad in ["redis-cluster://", "redis-cluster://h:1,,h:2", "redis-cluster://u:p@"] {
            let err = Endpoint::parse(bad, None, T).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("redis-cluster URL"), "{bad}: {err}");
        }
        assert_eq!(decode("p%40ss%20word"), "p@ss word");
        assert_eq!(percent("p@ss word"), "p%40ss%20word");
    }
}
