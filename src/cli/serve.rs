//! `serve`: the gateway's flags (each also a `DSG_*` variable and a config-file key), mapped onto
//! an [`AppConfig`] and run by [`crate::app`]: against the real upstream (`--upstream aws`) or an
//! in-process emulator reached through the real SDK over loopback HTTP (`--upstream emulator`).

use super::{RunError, announce, parse_per_second, shutdown_signal};
use crate::app::{App, AppConfig, ConsoleConfig, Listeners, StoreConfig, UpstreamConfig};
use crate::emulator::EmulatorConfig;
use crate::emulator::defaults as emulator_defaults;
use crate::gateway::GatewayConfig;
use crate::gateway::backoff::BackoffPolicy;
use crate::gateway::coordination::redis::RedisConfig;
use crate::gateway::defaults as g;
use crate::gateway::lifecycle::LifecycleConfig;
use crate::gateway::rate::{CallerLimits, Rate};
use crate::grpc::identity::IdentitySource;
use crate::grpc::server::{self, ServerOptions};
use crate::grpc::tls::TlsFiles;
use crate::telemetry::Metrics;
use crate::upstream::routed::RoutedConfig;
use crate::upstream::routes::RouteFarms;
use crate::upstream::sdk::defaults as sdk_defaults;
use crate::upstream::sdk::{CredentialSource, SdkUpstreamConfig};
use clap::{Args, ValueEnum};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// How long running work and in-flight RPCs may take once SIGTERM arrives.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Where the gateway keeps its coordination state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// In this process: one replica.
    Memory,
    /// In Redis (or Valkey, ElastiCache, MemoryDB): any number of replicas act as one gateway.
    Redis,
}

/// Where callers' limits hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CallerLimitsKind {
    /// Across every replica sharing the store (tokens taken from Redis in batches).
    Global,
    /// In each replica: a caller spread over N replicas gets N times its rate.
    Local,
}

/// Which upstream the gateway talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UpstreamKind {
    /// AWS Deadline Cloud, with the standard credential chain, region and endpoint variables.
    Aws,
    /// The built-in emulator, started in-process on a loopback port.
    Emulator,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A TOML file of settings named like these flags (`farm-queue-capacity = 50`); flags and
    /// environment variables take precedence over it.
    #[arg(long, env = "DSG_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    /// Check every setting, print "configuration ok" and exit without serving.
    #[arg(long)]
    pub check_config: bool,
    /// Address of the gRPC listener.
    #[arg(long, env = "DSG_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Address of the admin HTTP listener (/metrics, /healthz, /readyz, and the operator
    /// console at /).
    #[arg(long, env = "DSG_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
    pub admin_listen: SocketAddr,
    /// A file holding the bearer token the console and its API (/, /api/v1/) require; read
    /// again when it changes. Without it the console is open on a loopback --admin-listen and
    /// off on any other address. /healthz, /readyz and /metrics never need it.
    #[arg(long, env = "DSG_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<std::path::PathBuf>,
    /// Where the console links an aggregation's trace: a URL with {trace_id}, e.g.
    /// https://grafana.example/explore?traceId={trace_id}.
    #[arg(long, env = "DSG_TRACE_URL_TEMPLATE")]
    pub trace_url_template: Option<String>,
    /// Log format: json, text, or auto (JSON unless stderr is a terminal).
    #[arg(long, env = "DSG_LOG_FORMAT", value_enum, default_value = "auto")]
    pub log_format: crate::telemetry::LogFormat,
    /// On SIGTERM/SIGINT: how long running aggregations and in-flight RPCs (long-polls
    /// included) may take to finish before the process exits anyway.
    #[arg(long, env = "DSG_SHUTDOWN_GRACE", default_value_t = SHUTDOWN_GRACE.into())]
    pub shutdown_grace: humantime::Duration,
    /// Largest gRPC response sent (a page of rows), in bytes.
    #[arg(long, env = "DSG_MAX_MESSAGE_BYTES", default_value_t = server::defaults::MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
    /// Largest gRPC request accepted, in bytes: a larger one is refused (RESOURCE_EXHAUSTED)
    /// before it is decoded. A StartAggregation of 100 queue ids is about 5 KB.
    #[arg(long, env = "DSG_MAX_REQUEST_BYTES", default_value_t = server::defaults::MAX_REQUEST_BYTES)]
    pub max_request_bytes: usize,
    /// Most concurrent HTTP/2 streams per connection.
    #[arg(long, env = "DSG_MAX_CONCURRENT_STREAMS", default_value_t = server::defaults::MAX_CONCURRENT_STREAMS)]
    pub max_concurrent_streams: u32,
    /// Longest an RPC may run (must exceed --max-wait).
    #[arg(long, env = "DSG_REQUEST_TIMEOUT", default_value_t = server::defaults::REQUEST_TIMEOUT.into())]
    pub request_timeout: humantime::Duration,
    /// HTTP/2 PINGs to a connection this long without frames; 0 (the default): none, TCP
    /// keepalive finds vanished peers (PINGs cost every request a clock reading and a lock).
    #[arg(long, env = "DSG_HTTP2_KEEPALIVE_INTERVAL", default_value_t = server::defaults::HTTP2_KEEPALIVE_INTERVAL.into())]
    pub http2_keepalive_interval: humantime::Duration,
    /// How long a keepalive ping may go unanswered before the connection is closed.
    #[arg(long, env = "DSG_HTTP2_KEEPALIVE_TIMEOUT", default_value_t = server::defaults::HTTP2_KEEPALIVE_TIMEOUT.into())]
    pub http2_keepalive_timeout: humantime::Duration,
    /// TCP keepalive on gRPC connections: probes after this long idle, then every third of
    /// it; a peer that misses three is gone and its connection closed. 0: off.
    #[arg(long, env = "DSG_TCP_KEEPALIVE", default_value_t = server::defaults::TCP_KEEPALIVE.into())]
    pub tcp_keepalive: humantime::Duration,
    /// Connections are closed gracefully after this age, so HTTP/2 clients rebalance across replicas.
    #[arg(long, env = "DSG_MAX_CONNECTION_AGE", default_value_t = server::defaults::MAX_CONNECTION_AGE.into())]
    pub max_connection_age: humantime::Duration,
    /// Open gRPC connections at once; one more is closed as soon as it is accepted.
    #[arg(long, env = "DSG_MAX_CONNECTIONS", default_value_t = server::defaults::MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// How long a new connection may take to finish its TLS handshake and send its first
    /// bytes; a socket that never speaks is closed after it.
    #[arg(long, env = "DSG_HANDSHAKE_TIMEOUT", default_value_t = server::defaults::HANDSHAKE_TIMEOUT.into())]
    pub handshake_timeout: humantime::Duration,
    /// HTTP/2 streams a client may reset before the server accepted them, before its
    /// connection is closed (rapid-reset protection).
    #[arg(long, env = "DSG_HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS", default_value_t = server::defaults::HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS)]
    pub http2_max_pending_accept_reset_streams: usize,
    /// Largest request metadata (HTTP/2 header list), in bytes.
    #[arg(long, env = "DSG_HTTP2_MAX_HEADER_LIST_SIZE", default_value_t = server::defaults::HTTP2_MAX_HEADER_LIST_SIZE)]
    pub http2_max_header_list_size: u32,
    /// TLS on the gRPC listener: the certificate chain (PEM), read again when it changes.
    #[arg(long, env = "DSG_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "DSG_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// CA certificates (PEM bundle) client certificates must chain to: turns on mutual TLS.
    #[arg(long, env = "DSG_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<std::path::PathBuf>,
    /// Where the caller's identity comes from: tls (the client certificate), linkerd
    /// (l5d-client-id), xfcc (x-forwarded-client-cert) or header (x-caller-id, unauthenticated).
    /// Default: tls with --tls-client-ca, else header.
    #[arg(long, env = "DSG_IDENTITY_SOURCE", value_enum)]
    pub identity_source: Option<IdentitySource>,
    /// A TOML file of rules saying which identities may call which methods on which farms;
    /// read again when it changes. Without one, every caller may read every farm.
    #[arg(long, env = "DSG_AUTHZ_POLICY")]
    pub authz_policy: Option<std::path::PathBuf>,
    /// When the upstream ends an aggregation as too large: split the request (at bucket
    /// boundaries, or by grouped queue/fleet ids), run the parts and merge their rows.
    #[arg(long, env = "DSG_AUTO_SPLIT", default_value_t = true, action = clap::ArgAction::Set)]
    pub auto_split: bool,
    /// The most parts one aggregation is split into.
    #[arg(long, env = "DSG_SPLIT_MAX_PARTS", default_value_t = g::SPLIT_MAX_PARTS)]
    pub split_max_parts: u32,
    /// Refresh-ahead: a result asked for at least --refresh-min-hits times is re-run in the
    /// background when less than this much of its validity is left, so it never goes cold;
    /// 0 turns it off.
    #[arg(long, env = "DSG_REFRESH_AHEAD", default_value_t = g::REFRESH_AHEAD.into())]
    pub refresh_ahead: humantime::Duration,
    /// Starts a result must have answered during its life to be refreshed ahead.
    #[arg(long, env = "DSG_REFRESH_MIN_HITS", default_value_t = g::REFRESH_MIN_HITS)]
    pub refresh_min_hits: u32,
    /// Where coordination state lives: memory (one replica) or redis (several replicas).
    #[arg(long, env = "DSG_STORE", value_enum, default_value = "memory")]
    pub store: StoreKind,
    /// With --store redis: redis://HOST:PORT or rediss:// for TLS;
    /// redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER to follow the primary Redis Sentinel
    /// names (the Sentinels' password in DSG_REDIS_SENTINEL_PASSWORD); or
    /// redis-cluster://HOST:PORT[,HOST:PORT...] (rediss-cluster:// for TLS) for seed nodes of a
    /// Redis Cluster. Credentials (USER:PASSWORD@) in the URL or in DSG_REDIS_PASSWORD.
    #[arg(long, env = "DSG_REDIS_URL")]
    pub redis_url: Option<String>,
    /// With --store redis: --redis-url names seed nodes of a Redis Cluster (Valkey or Redis
    /// Cluster, MemoryDB, ElastiCache in cluster mode or Serverless), as redis://HOST:PORT[,...]
    /// or rediss:// for TLS: the same as a redis-cluster:// URL.
    #[arg(long, env = "DSG_REDIS_CLUSTER")]
    pub redis_cluster: bool,
    /// With --store redis: the prefix of every key, so several gateways can share one Redis.
    #[arg(long, env = "DSG_REDIS_KEY_PREFIX", default_value = RedisConfig::DEFAULT_PREFIX)]
    pub redis_key_prefix: String,
    /// With --store redis: how long one Redis command may take before it counts as failed (a
    /// lease holder then retries it while its lease lasts; --lease-ttl must be at least three
    /// times this).
    #[arg(long, env = "DSG_REDIS_RESPONSE_TIMEOUT", default_value_t = RedisConfig::DEFAULT_RESPONSE_TIMEOUT.into())]
    pub redis_response_timeout: humantime::Duration,
    /// With --store redis: how many Redis replicas must acknowledge a write that guards the
    /// one-running rule (a farm's lease, a new aggregation, its next state) before the gateway
    /// acts on it, so a failover to a replica loses none of them; 0 waits for none. While fewer
    /// replicas answer, new aggregations are refused as unavailable and running ones wait: run
    /// at least N + 1 replicas.
    #[arg(long, env = "DSG_REDIS_WAIT_REPLICAS", default_value_t = 0)]
    pub redis_wait_replicas: u32,
    /// With --store redis and --redis-wait-replicas: how long a write waits for the replicas
    /// (shorter than --redis-response-timeout).
    #[arg(long, env = "DSG_REDIS_WAIT_TIMEOUT", default_value_t = RedisConfig::DEFAULT_WAIT_TIMEOUT.into())]
    pub redis_wait_timeout: humantime::Duration,
    /// How long a farm lease lasts unless renewed (every third of it): a replica that dies holds
    /// its farms this long before another takes them over.
    #[arg(long, env = "DSG_LEASE_TTL", default_value_t = g::LEASE_TTL.into())]
    pub lease_ttl: humantime::Duration,
    /// This replica's name, as farm lease holder (default: the host name, i.e. the pod's).
    #[arg(long, env = "DSG_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// The upstream: aws or emulator.
    #[arg(long, env = "DSG_UPSTREAM", value_enum)]
    pub upstream: UpstreamKind,
    /// Deadline Cloud endpoint URL (else AWS_ENDPOINT_URL_DEADLINE, AWS_ENDPOINT_URL, the default).
    #[arg(long, env = "DSG_ENDPOINT_URL")]
    pub endpoint_url: Option<String>,
    /// AWS region (else the standard region chain).
    #[arg(long, env = "DSG_REGION")]
    pub region: Option<String>,
    /// With --upstream aws: a TOML file of routes saying which region and account (role) serves
    /// which farm, read again when it changes (README "Several regions and accounts").
    #[arg(long, env = "DSG_UPSTREAM_ROUTES")]
    pub upstream_routes: Option<std::path::PathBuf>,
    /// How often routes with `discover = true` list their farms (ListFarms).
    #[arg(long, env = "DSG_ROUTE_DISCOVERY_INTERVAL", default_value = "5m")]
    pub route_discovery_interval: humantime::Duration,
    /// Connect timeout of upstream calls.
    #[arg(long, env = "DSG_UPSTREAM_CONNECT_TIMEOUT", default_value_t = sdk_defaults::CONNECT_TIMEOUT.into())]
    pub upstream_connect_timeout: humantime::Duration,
    /// Timeout of one upstream HTTP attempt.
    #[arg(long, env = "DSG_UPSTREAM_ATTEMPT_TIMEOUT", default_value_t = sdk_defaults::ATTEMPT_TIMEOUT.into())]
    pub upstream_attempt_timeout: humantime::Duration,
    /// Timeout of one upstream call, retries included.
    #[arg(long, env = "DSG_UPSTREAM_OPERATION_TIMEOUT", default_value_t = sdk_defaults::OPERATION_TIMEOUT.into())]
    pub upstream_operation_timeout: humantime::Duration,
    /// Attempts per upstream Get (Start is never retried by the SDK).
    #[arg(long, env = "DSG_UPSTREAM_GET_MAX_ATTEMPTS", default_value_t = sdk_defaults::GET_MAX_ATTEMPTS)]
    pub upstream_get_max_attempts: u32,
    /// Aggregations that may wait per farm behind the running one.
    #[arg(long, env = "DSG_FARM_QUEUE_CAPACITY", default_value_t = g::FARM_QUEUE_CAPACITY)]
    pub farm_queue_capacity: usize,
    /// The fraction of --farm-queue-capacity one caller may have waiting on one farm (0 to 1;
    /// 1: no share).
    #[arg(long, env = "DSG_FARM_QUEUE_CALLER_SHARE", default_value_t = g::FARM_QUEUE_CALLER_SHARE)]
    pub farm_queue_caller_share: f64,
    /// Fair queueing on each farm: interactive before batch, callers taking turns; false keeps
    /// arrival order.
    #[arg(long, env = "DSG_FAIR_QUEUEING", default_value_t = true, action = clap::ArgAction::Set)]
    pub fair_queueing: bool,
    /// Answer a Start at once from a valid cached result of a larger request that contains it
    /// exactly (same farm, kind, timezone, period and groups; README: "Answers derived from a
    /// cached superset"); false: every distinct request runs upstream.
    #[arg(long, env = "DSG_DERIVE", default_value_t = true, action = clap::ArgAction::Set)]
    pub derive: bool,
    /// How long upstream results live after the Start call.
    #[arg(long, env = "DSG_RESULT_VALIDITY", default_value_t = g::RESULT_VALIDITY.into())]
    pub result_validity: humantime::Duration,
    /// Safety margin: cached results expire this much before the upstream's do.
    #[arg(long, env = "DSG_VALIDITY_MARGIN", default_value_t = g::VALIDITY_MARGIN.into())]
    pub validity_margin: humantime::Duration,
    /// How long FAILED / TIMED_OUT aggregations are kept before a new Start retries.
    #[arg(long, env = "DSG_FAILED_RESULT_TTL", default_value_t = g::FAILED_RESULT_TTL.into())]
    pub failed_result_ttl: humantime::Duration,
    /// Memory budget of the results cache, in bytes (rows plus ~1 KiB per entry); the least
    /// recently used results are evicted first.
    #[arg(long, env = "DSG_CACHE_MAX_BYTES", default_value_t = g::CACHE_MAX_BYTES)]
    pub cache_max_bytes: u64,
    /// A finished result is held at least this long whatever the cache's budget, so its own
    /// long-polls and first pages are served.
    #[arg(long, env = "DSG_RESULT_GRACE", default_value_t = g::RESULT_GRACE.into())]
    pub result_grace: humantime::Duration,
    /// A completed result answers a Start as CACHED only with at least this much validity left
    /// (time to read its pages); otherwise the Start runs afresh.
    #[arg(long, env = "DSG_MIN_REMAINING_VALIDITY", default_value_t = g::MIN_REMAINING_VALIDITY.into())]
    pub min_remaining_validity: humantime::Duration,
    /// Queued and running aggregations across all farms; beyond it Start answers GATEWAY_BUSY.
    #[arg(long, env = "DSG_MAX_ACTIVE_AGGREGATIONS", default_value_t = g::MAX_ACTIVE_AGGREGATIONS)]
    pub max_active_aggregations: usize,
    /// Farms with queued or running work at once; beyond it Start answers GATEWAY_BUSY.
    #[arg(long, env = "DSG_MAX_FARMS", default_value_t = g::MAX_FARMS)]
    pub max_farms: usize,
    /// Longest one aggregation may run before it is ended FAILED (DEADLINE_EXCEEDED) and its
    /// farm moves on (default: --result-validity).
    #[arg(long, env = "DSG_AGGREGATION_RUN_LIMIT", value_parser = humantime::parse_duration)]
    pub aggregation_run_limit: Option<Duration>,
    /// First delay between status polls of a running aggregation.
    #[arg(long, env = "DSG_POLL_INITIAL_INTERVAL", default_value_t = g::POLL_INITIAL_INTERVAL.into())]
    pub poll_initial_interval: humantime::Duration,
    /// Longest delay between status polls.
    #[arg(long, env = "DSG_POLL_MAX_INTERVAL", default_value_t = g::POLL_MAX_INTERVAL.into())]
    pub poll_max_interval: humantime::Duration,
    /// First delay before retrying a throttled or unavailable upstream Start.
    #[arg(long, env = "DSG_START_RETRY_INITIAL", default_value_t = g::START_RETRY_INITIAL.into())]
    pub start_retry_initial: humantime::Duration,
    /// Longest delay between Start retries.
    #[arg(long, env = "DSG_START_RETRY_MAX", default_value_t = g::START_RETRY_MAX.into())]
    pub start_retry_max: humantime::Duration,
    /// How long a throttled or unavailable upstream Start is retried before the aggregation fails.
    #[arg(long, env = "DSG_START_DEADLINE", default_value_t = g::START_DEADLINE.into())]
    pub start_deadline: humantime::Duration,
    /// StartAggregation calls per second per caller (0 = unlimited).
    #[arg(long, env = "DSG_CALLER_START_RATE", default_value_t = g::CALLER_START_RATE, value_parser = parse_per_second)]
    pub caller_start_rate: f64,
    /// Burst of StartAggregation calls per caller.
    #[arg(long, env = "DSG_CALLER_START_BURST", default_value_t = g::CALLER_START_BURST)]
    pub caller_start_burst: u32,
    /// Whether the caller limits hold across every replica (`global`: with `--store redis`, the
    /// buckets are shared through Redis) or in each replica (`local`).
    #[arg(long, env = "DSG_CALLER_LIMITS", value_enum, default_value = "global")]
    pub caller_limits: CallerLimitsKind,
    /// GetAggregation calls per second per caller (0 = unlimited).
    #[arg(long, env = "DSG_CALLER_GET_RATE", default_value_t = g::CALLER_GET_RATE, value_parser = parse_per_second)]
    pub caller_get_rate: f64,
    /// Burst of GetAggregation calls per caller.
    #[arg(long, env = "DSG_CALLER_GET_BURST", default_value_t = g::CALLER_GET_BURST)]
    pub caller_get_burst: u32,
    /// Upstream Start calls per second, across all farms (0 = unpaced).
    #[arg(long, env = "DSG_UPSTREAM_START_RATE", default_value_t = g::UPSTREAM_START_RATE, value_parser = parse_per_second)]
    pub upstream_start_rate: f64,
    /// Upstream Get calls per second, across all farms (0 = unpaced).
    #[arg(long, env = "DSG_UPSTREAM_GET_RATE", default_value_t = g::UPSTREAM_GET_RATE, value_parser = parse_per_second)]
    pub upstream_get_rate: f64,
    /// The longest long-poll a Get may ask for.
    #[arg(long, env = "DSG_MAX_WAIT", default_value_t = g::MAX_WAIT.into())]
    pub max_wait: humantime::Duration,
    /// With --upstream emulator: how long each aggregation stays IN_PROGRESS.
    #[arg(long, env = "DSG_EMULATOR_AGGREGATION_DURATION", default_value_t = emulator_defaults::AGGREGATION_DURATION.into())]
    pub emulator_aggregation_duration: humantime::Duration,
    /// With --upstream emulator: the largest result before an aggregation ends FAILED.
    #[arg(long, env = "DSG_EMULATOR_MAX_ROWS", default_value_t = emulator_defaults::MAX_ROWS)]
    pub emulator_max_rows: u64,
}

impl ServeArgs {
    /// The gateway core's settings, as the flags name them (checked by [`AppConfig::validate`]).
    pub fn gateway_config(&self) -> GatewayConfig {
        GatewayConfig {
            farm_queue_capacity: self.farm_queue_capacity,
            farm_queue_caller_share: self.farm_queue_caller_share,
            fair_queueing: self.fair_queueing,
            derive: self.derive,
            cache_max_bytes: self.cache_max_bytes,
            result_grace: *self.result_grace,
            min_remaining_validity: *self.min_remaining_validity,
            max_active_aggregations: self.max_active_aggregations,
            max_farms: self.max_farms,
            run_limit: self.aggregation_run_limit,
            lifecycle: LifecycleConfig {
                result_validity: *self.result_validity,
                validity_margin: *self.validity_margin,
                failed_ttl: *self.failed_result_ttl,
                poll: BackoffPolicy {
                    initial: *self.poll_initial_interval,
                    max: *self.poll_max_interval,
                    multiplier: g::POLL_MULTIPLIER,
                },
                start_retry: BackoffPolicy {
                    initial: *self.start_retry_initial,
                    max: *self.start_retry_max,
                    multiplier: g::START_RETRY_MULTIPLIER,
                },
                start_deadline: *self.start_deadline,
                split_max_parts: if self.auto_split { self.split_max_parts } else { 0 },
            },
            caller_start: Rate { per_second: self.caller_start_rate, burst: self.caller_start_burst },
            caller_get: Rate { per_second: self.caller_get_rate, burst: self.caller_get_burst },
            caller_limits: match self.caller_limits {
                CallerLimitsKind::Global => CallerLimits::Global,
                CallerLimitsKind::Local => CallerLimits::Local,
            },
            upstream_start: Rate::upstream_start(self.upstream_start_rate),
            upstream_get: Rate::upstream_get(self.upstream_get_rate),
            max_wait: *self.max_wait,
            instance_id: self.instance_id.clone().unwrap_or_else(crate::gateway::defaults::instance_id),
            lease_ttl: *self.lease_ttl,
            refresh: crate::gateway::refresh::RefreshConfig {
                ahead: *self.refresh_ahead,
                min_hits: self.refresh_min_hits.max(1),
            },
            ..GatewayConfig::default()
        }
    }

    /// Everything `serve` is built from, as the flags name it.
    pub fn app_config(&self) -> Result<AppConfig, RunError> {
        let store = match (self.store, &self.redis_url) {
            (StoreKind::Memory, _) => StoreConfig::Memory,
            (StoreKind::Redis, Some(url)) => StoreConfig::Redis(RedisConfig {
                url: with_password(url, std::env::var("DSG_REDIS_PASSWORD").ok().as_deref()),
                prefix: self.redis_key_prefix.clone(),
                response_timeout: *self.redis_response_timeout,
                wait_replicas: self.redis_wait_replicas,
                wait_timeout: *self.redis_wait_timeout,
                sentinel_password: std::env::var("DSG_REDIS_SENTINEL_PASSWORD").ok().filter(|p| !p.is_empty()),
                cluster: self.redis_cluster,
            }),
            (StoreKind::Redis, None) => {
                return Err(RunError::Config("--store redis needs --redis-url (or DSG_REDIS_URL)".into()));
            }
        };
        if self.route_discovery_interval.is_zero() {
            return Err(RunError::Config("--route-discovery-interval must be longer than zero".into()));
        }
        let upstream = match (self.upstream, &self.upstream_routes) {
            (UpstreamKind::Aws, Some(file)) => UpstreamConfig::Routed(RoutedConfig {
                file: file.clone(),
                base: self.upstream_config(self.endpoint_url.clone(), CredentialSource::Chain),
                discovery_interval: *self.route_discovery_interval,
            }),
            (UpstreamKind::Emulator, Some(_)) => {
                return Err(RunError::Config(
                    "--upstream-routes needs --upstream aws (the built-in emulator is one region)".into(),
                ));
            }
            (UpstreamKind::Aws, None) => {
                UpstreamConfig::Sdk(self.upstream_config(self.endpoint_url.clone(), CredentialSource::Chain))
            }
            (UpstreamKind::Emulator, None) => UpstreamConfig::Emulator {
                emulator: Box::new(EmulatorConfig {
                    aggregation_duration: *self.emulator_aggregation_duration,
                    result_validity: *self.result_validity,
                    max_rows: self.emulator_max_rows,
                    ..EmulatorConfig::default()
                }),
                sdk: self.upstream_config(None, CredentialSource::Chain),
            },
        };
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                Some(TlsFiles { cert: cert.clone(), key: key.clone(), client_ca: self.tls_client_ca.clone() })
            }
            _ => None,
        };
        Ok(AppConfig {
            gateway: self.gateway_config(),
            server: self.server_options(),
            store,
            upstream,
            tls,
            identity_source: self.identity_source,
            authz_policy: self.authz_policy.clone(),
            shutdown_grace: *self.shutdown_grace,
            console: ConsoleConfig {
                token_file: self.admin_token_file.clone(),
                trace_url_template: self.trace_url_template.clone(),
            },
        })
    }

    fn upstream_config(&self, endpoint_url: Option<String>, credentials: CredentialSource) -> SdkUpstreamConfig {
        SdkUpstreamConfig {
            endpoint_url,
            region: self.region.clone(),
            credentials,
            assume_role: None,
            connect_timeout: *self.upstream_connect_timeout,
            attempt_timeout: *self.upstream_attempt_timeout,
            operation_timeout: *self.upstream_operation_timeout,
            get_max_attempts: self.upstream_get_max_attempts,
        }
    }

    /// The gRPC server's limits.
    pub fn server_options(&self) -> ServerOptions {
        ServerOptions {
            max_message_bytes: self.max_message_bytes,
            max_request_bytes: self.max_request_bytes,
            max_concurrent_streams: self.max_concurrent_streams,
            request_timeout: *self.request_timeout,
            http2_keepalive_interval: Some(*self.http2_keepalive_interval).filter(|d| !d.is_zero()),
            http2_keepalive_timeout: *self.http2_keepalive_timeout,
            tcp_keepalive: Some(*self.tcp_keepalive).filter(|d| !d.is_zero()),
            max_connection_age: *self.max_connection_age,
            max_connections: self.max_connections,
            handshake_timeout: *self.handshake_timeout,
            http2_max_pending_accept_reset_streams: self.http2_max_pending_accept_reset_streams,
            http2_max_header_list_size: self.http2_max_header_list_size,
        }
    }
}

pub(crate) async fn run(args: ServeArgs) -> Result<(), RunError> {
    let config = args.app_config()?;
    config.validate().map_err(|e| RunError::Config(e.to_string()))?;
    if args.listen == args.admin_listen && args.listen.port() != 0 {
        return Err(RunError::Config("--admin-listen must differ from --listen".into()));
    }
    if args.check_config {
        config.load_access(Arc::new(Metrics::new()))?;
        if let Some(routes) = config.check_routes()? {
            let discovering = routes.routes.iter().filter(|r| r.farms == RouteFarms::Discovered).count();
            super::print_line(&format!(
                "routes ok: {} routes ({discovering} discovering their farms){}",
                routes.routes.len(),
                if routes.default.is_some() { " and a [default]" } else { "" }
            ));
        }
        super::print_line("configuration ok");
        return Ok(());
    }
    let signal = shutdown_signal().map_err(RunError::Signal)?;
    let listeners = Listeners { grpc: server::bind(args.listen).await?, admin: server::bind(args.admin_listen).await? };
    let app = App::build(config, listeners).await?;
    let addr = app.addr().map_err(|source| RunError::Listen { addr: args.listen, source })?;
    let admin_addr = app.admin_addr().map_err(|source| RunError::Listen { addr: args.admin_listen, source })?;
    announce(&format!("{}://{addr}", if app.uses_tls() { "https" } else { "http" }));
    super::print_line(&format!("admin on http://{admin_addr}"));
    if let Some(url) = app.emulator_url() {
        super::print_line(&format!("upstream on {url}"));
    }
    tracing::info!(%addr, %admin_addr, upstream = ?args.upstream, "gateway serving");
    Ok(app.serve(signal).await?)
}

/// `url` with `password` put in when it names none (`redis://:PASSWORD@host`).
fn with_password(url: &str, password: Option<&str>) -> String {
    match (password, url.split_once("://")) {
        (Some(p), Some((scheme, rest))) if !p.is_empty() && !rest.contains('@') => {
            let encoded: String = p
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect();
            format!("{scheme}://:{encoded}@{rest}")
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::with_password;

    #[test]
    fn a_password_from_the_environment_goes_into_a_url_without_credentials() {
        assert_eq!(with_password("redis://h:6379", Some("p@ss word")), "redis://:p%40ss%20word@h:6379");
        assert_eq!(with_password("rediss://u:x@h:6379", Some("other")), "rediss://u:x@h:6379", "the URL's own wins");
        assert_eq!(with_password("redis://h:6379", None), "redis://h:6379");
    }
}
