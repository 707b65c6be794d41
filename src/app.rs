//! The composition root: the one place that builds a gateway from its settings (the upstream,
//! the coordination store, TLS and the access policy, the gateway core, the gRPC and admin
//! listeners) and serves it until a shutdown future resolves, draining on the way out. The
//! binary's `serve` and the integration tests both call it (as mini-redis's tests call
//! `server::run`); the command line only maps its flags onto an [`AppConfig`].
//!
//! The drain: on shutdown, Starts are refused and new connections closed; running
//! aggregations get the grace to finish and be cached while long-polls on them keep waiting;
//! when the grace ends (or nothing is left to run) the gateway stops and every long-poll
//! answers with the state it sees.

use crate::emulator::{EmulatorConfig, EmulatorHandle};
use crate::gateway::config::ConfigError;
use crate::gateway::coordination::redis::RedisConfig;
use crate::gateway::{Coordination, Gateway, GatewayConfig, StoreError};
use crate::grpc::authz::Authorizer;
use crate::grpc::identity::IdentitySource;
use crate::grpc::reload::Reload;
use crate::grpc::server::{self, ServeError, ServerOptions, Serving};
use crate::grpc::service::Access;
use crate::grpc::tls::{ReloadingTls, TlsFiles};
use crate::telemetry::{Metrics, admin};
use crate::upstream::Upstream;
use crate::upstream::routed::{RoutedConfig, RoutedUpstream};
use crate::upstream::routes::Routes;
use crate::upstream::sdk::{CredentialSource, SdkUpstream, SdkUpstreamConfig};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How often the TLS files and the policy file are looked at for changes.
const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// Everything a gateway process is built from.
pub struct AppConfig {
    pub gateway: GatewayConfig,
    pub server: ServerOptions,
    pub store: StoreConfig,
    pub upstream: UpstreamConfig,
    /// TLS on the gRPC listener.
    pub tls: Option<TlsFiles>,
    /// Where callers' identities come from; `None`: from the client certificate with mutual
    /// TLS, else from a header.
    pub identity_source: Option<IdentitySource>,
    /// Who may call what; `None`: every caller may call anything.
    pub authz_policy: Option<PathBuf>,
    /// On shutdown: how long running aggregations and in-flight RPCs may take.
    pub shutdown_grace: Duration,
    pub console: ConsoleConfig,
}

/// The operator console's settings.
#[derive(Debug, Clone, Default)]
pub struct ConsoleConfig {
    /// The bearer token's file; `None`: open on a loopback admin address, off elsewhere.
    pub token_file: Option<PathBuf>,
    /// A URL with `{trace_id}` where the operator's tracing UI shows a trace.
    pub trace_url_template: Option<String>,
}

/// Where coordination state lives.
pub enum StoreConfig {
    /// In this process: one replica.
    Memory,
    /// In Redis: any number of replicas act as one gateway.
    Redis(RedisConfig),
    /// Built by the caller (a test sharing one store between replicas of one process).
    Given(Coordination),
}

/// Which upstream the gateway talks to.
pub enum UpstreamConfig {
    /// Deadline Cloud (or anything speaking its API) through `aws-sdk-deadline`.
    Sdk(SdkUpstreamConfig),
    /// The built-in emulator, started on a loopback port, reached through the SDK with these
    /// settings (its endpoint and credentials filled in).
    Emulator { emulator: Box<EmulatorConfig>, sdk: SdkUpstreamConfig },
    /// Deadline Cloud in several regions and accounts, as the routes file says.
    Routed(RoutedConfig),
    /// Built by the caller (a test's upstream with faults).
    Given(Arc<dyn Upstream>),
}

/// Why a gateway could not be built or served.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("invalid configuration: TLS: {0}")]
    Tls(String),
    #[error("invalid configuration: --authz-policy {0}")]
    Policy(String),
    #[error("invalid configuration: --store redis: {0}")]
    Store(#[from] StoreError),
    #[error("invalid configuration: {0}")]
    Console(#[from] crate::console::token::TokenError),
    #[error("invalid configuration: the upstream: {0}")]
    Upstream(String),
    #[error("invalid configuration: {0}")]
    Routes(#[from] crate::upstream::routed::RoutedError),
    #[error("cannot start the emulator on {addr}: {source}")]
    Emulator { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// The two listeners a gateway serves on, bound by the caller (port 0 in tests).
pub struct Listeners {
    pub grpc: TcpListener,
    pub admin: TcpListener,
}

impl AppConfig {
    /// Every check across settings, the core's and the server's.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.gateway.validate()?;
        if let StoreConfig::Redis(redis) = &self.store {
            redis.validate().map_err(ConfigError::Other)?;
            self.gateway.fits_store_timeout(redis.response_timeout, "redis-response-timeout")?;
        }
        let s = &self.server;
        if s.request_timeout <= self.gateway.max_wait {
            return Err(ConfigError::Other("--request-timeout must be longer than --max-wait".into()));
        }
        if s.max_message_bytes < 1024 || s.max_request_bytes < 1024 || s.max_concurrent_streams == 0 {
            return Err(ConfigError::Other(
                "--max-message-bytes and --max-request-bytes must be at least 1024 and --max-concurrent-streams at least 1"
                    .into(),
            ));
        }
        if let Some(template) = &self.console.trace_url_template
            && !template.contains("{trace_id}")
        {
            return Err(ConfigError::Other("--trace-url-template must contain {trace_id}".into()));
        }
        if self.identity_source == Some(IdentitySource::Tls) && self.tls.as_ref().is_none_or(|t| t.client_ca.is_none())
        {
            return Err(ConfigError::Other(
                "--identity-source tls needs mutual TLS: --tls-cert, --tls-key and --tls-client-ca".into(),
            ));
        }
        Ok(())
    }

    /// TLS and the access policy, loaded now, so a bad file stops start-up (and `--check-config`
    /// reads them too).
    pub fn load_access(&self, metrics: Arc<Metrics>) -> Result<(Option<Arc<ReloadingTls>>, Access), AppError> {
        let tls = match &self.tls {
            Some(files) => Some(Arc::new(ReloadingTls::load(files.clone()).map_err(|e| AppError::Tls(e.to_string()))?)),
            None => None,
        };
        let mutual = self.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        let source = self.identity_source.unwrap_or(IdentitySource::default_for(mutual));
        tracing::info!(identity_source = source.name(), trust = source.trust(), "caller identity");
        let authorizer = match &self.authz_policy {
            Some(path) => {
                let authorizer = Authorizer::load(path, metrics).map_err(|e| AppError::Policy(e.to_string()))?;
                tracing::info!(path = %path.display(), rules = authorizer.policy().rules(), "authorization policy in force: default deny");
                Some(Arc::new(authorizer))
            }
            None => {
                tracing::warn!("no --authz-policy: every caller may start and read aggregations of every farm");
                None
            }
        };
        Ok((tls, Access { identity_source: source, authorizer }))
    }

    /// The routes file, read and checked (what `--check-config` adds to [`Self::load_access`]);
    /// the routes, or `None` without a routes file.
    pub fn check_routes(&self) -> Result<Option<Routes>, AppError> {
        let UpstreamConfig::Routed(routed) = &self.upstream else { return Ok(None) };
        let path = routed.file.display().to_string();
        let file = |message: String| crate::upstream::routed::RoutedError::File { path: path.clone(), message };
        let text = std::fs::read_to_string(&routed.file).map_err(|e| file(e.to_string()))?;
        Ok(Some(Routes::parse(&text).map_err(|e| file(e.to_string()))?))
    }
}

/// A gateway built and ready to serve.
pub struct App {
    gateway: Arc<Gateway>,
    metrics: Arc<Metrics>,
    console: Console,
    serving: Serving,
    listeners: Listeners,
    ready: watch::Receiver<bool>,
    emulator: Option<EmulatorHandle>,
    /// The routes file and its discovery, watched while serving.
    routes: Option<Arc<RoutedUpstream>>,
    grace: Duration,
}

impl App {
    /// Builds everything `config` names (after checking it): the upstream (and the emulator),
    /// the coordination store (Redis must be reachable and must not evict keys now; later
    /// outages are survived), TLS, the access policy and the gateway core.
    pub async fn build(config: AppConfig, listeners: Listeners) -> Result<Self, AppError> {
        config.validate()?;
        let metrics = Arc::new(Metrics::new());
        let (tls, access) = config.load_access(metrics.clone())?;
        let token = match &config.console.token_file {
            Some(path) => Some(Arc::new(crate::console::token::TokenFile::load(path)?)),
            None => None,
        };
        let upstream_rate = |r: crate::gateway::rate::Rate| (r.per_second, r.burst);
        let console = Console {
            token,
            trace_url_template: config.console.trace_url_template.clone(),
            upstream_start: upstream_rate(config.gateway.upstream_start),
            upstream_get: upstream_rate(config.gateway.upstream_get),
        };
        let Built { upstream, emulator, routes } = upstream(config.upstream, &metrics).await?;
        let coordination = coordination(config.store, &config.gateway).await?;
        let gateway = Arc::new(Gateway::with_store(
            config.gateway,
            coordination,
            upstream,
            metrics.clone(),
            crate::grpc::convert::ROW_CODEC,
        ));
        let (ready, ready_rx) = watch::channel(false);
        let serving =
            Serving { gateway: gateway.clone(), metrics: metrics.clone(), options: config.server, ready, tls, access };
        Ok(Self {
            gateway,
            metrics,
            console,
            serving,
            listeners,
            ready: ready_rx,
            emulator,
            routes,
            grace: config.shutdown_grace,
        })
    }

    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The gRPC listener's address.
    pub fn addr(&self) -> std::io::Result<SocketAddr> {
        self.listeners.grpc.local_addr()
    }

    /// The admin listener's address (/metrics, /healthz, /readyz).
    pub fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        self.listeners.admin.local_addr()
    }

    /// Whether the gRPC listener speaks TLS.
    pub fn uses_tls(&self) -> bool {
        self.serving.tls.is_some()
    }

    /// The built-in emulator's endpoint, when it is the upstream.
    pub fn emulator_url(&self) -> Option<String> {
        self.emulator.as_ref().map(EmulatorHandle::endpoint_url)
    }

    /// Serves until `shutdown` resolves, then drains (see the module's doc) and stops.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), AppError> {
        let Self { gateway, metrics, console, serving, listeners, ready, emulator, routes, grace } = self;
        let (stop, stopped) = watch::channel(false);
        let watching = tokio_util::sync::CancellationToken::new();
        let console_routes = console.router(&listeners.admin, gateway.clone(), metrics.clone(), watching.clone());
        let admin =
            tokio::spawn(admin::serve(listeners.admin, metrics, ready, console_routes, until_true(stopped.clone())));
        let reloadable = [
            serving.tls.clone().map(|t| t as Arc<dyn Reload>),
            serving.access.authorizer.clone().map(|a| a as Arc<dyn Reload>),
            console.token.clone().map(|t| t as Arc<dyn Reload>),
        ];
        for target in reloadable.into_iter().flatten() {
            tokio::spawn(crate::grpc::reload::watch(target, RELOAD_INTERVAL, watching.clone()));
        }
        if let Some(routes) = &routes {
            routes.spawn(watching.clone());
        }
        let _stop_watching = watching.drop_guard();
        let server = server::serve(listeners.grpc, serving, until_true(stopped));
        tokio::pin!(server);
        let outcome = tokio::select! {
            ended = &mut server => ended,
            () = shutdown => {
                tracing::info!(?grace, "shutdown requested; draining running aggregations and in-flight RPCs");
                drain(&gateway, &mut server, &stop, grace).await
            }
        };
        stop.send_replace(true);
        gateway.shutdown();
        if tokio::time::timeout(Duration::from_secs(5), admin).await.is_err() {
            tracing::warn!("the admin listener did not stop in time");
        }
        if let Some(emulator) = emulator {
            emulator.shutdown().await;
        }
        tracing::info!("gateway stopped");
        Ok(outcome?)
    }
}

/// Builds and serves a gateway until `shutdown` resolves.
pub async fn run(config: AppConfig, listeners: Listeners, shutdown: impl Future<Output = ()>) -> Result<(), AppError> {
    App::build(config, listeners).await?.serve(shutdown).await
}

/// The drain: no new connections or Starts; running aggregations get the whole grace to
/// finish and be cached, long-polls on them keep waiting; when the grace ends (or nothing is
/// left to run) the gateway stops and every long-poll answers with the state it sees.
async fn drain<F>(
    gateway: &Gateway,
    server: &mut std::pin::Pin<&mut F>,
    stop: &watch::Sender<bool>,
    grace: Duration,
) -> Result<(), ServeError>
where
    F: Future<Output = Result<(), ServeError>>,
{
    let deadline = tokio::time::Instant::now() + grace;
    gateway.begin_drain();
    stop.send_replace(true);
    let finished = async {
        tokio::select! {
            () = gateway.drained() => {}
            () = tokio::time::sleep_until(deadline) => {}
        }
    };
    tokio::pin!(finished);
    let mut served = None;
    loop {
        tokio::select! {
            () = &mut finished => break,
            ended = &mut *server, if served.is_none() => served = Some(ended),
        }
    }
    if tokio::time::Instant::now() >= deadline {
        tracing::warn!("aggregations still running at the end of the shutdown grace; they are abandoned");
    }
    gateway.shutdown();
    gateway.release_farms().await;
    if let Some(ended) = served {
        return ended;
    }
    // Long-polls answer at once now; the rest of the grace (at least a moment) for them.
    let rest = deadline.saturating_duration_since(tokio::time::Instant::now()).max(Duration::from_secs(2));
    match tokio::time::timeout(rest, &mut *server).await {
        Ok(ended) => ended,
        Err(_) => {
            tracing::warn!("RPCs still in flight at the end of the shutdown grace; exiting anyway");
            Ok(())
        }
    }
}

/// The coordination the chosen store gives.
async fn coordination(store: StoreConfig, config: &GatewayConfig) -> Result<Coordination, AppError> {
    Ok(match store {
        StoreConfig::Memory => Coordination::memory(&config.coordination()),
        StoreConfig::Redis(redis) => {
            let coordination = Coordination::redis(&config.coordination(), &redis).await?;
            tracing::info!(prefix = %redis.prefix, instance = %config.instance_id, "coordination shared through Redis");
            coordination
        }
        StoreConfig::Given(coordination) => coordination,
    })
}

/// The upstream as built, with what it needs while serving.
struct Built {
    upstream: Arc<dyn Upstream>,
    /// The in-process emulator when it is the upstream.
    emulator: Option<EmulatorHandle>,
    /// The routed upstream, whose file and discovery are watched.
    routes: Option<Arc<RoutedUpstream>>,
}

/// The upstream `config` names.
async fn upstream(config: UpstreamConfig, metrics: &Arc<Metrics>) -> Result<Built, AppError> {
    let connect = |sdk: SdkUpstreamConfig| async move {
        SdkUpstream::connect(&sdk).await.map(|u| Arc::new(u) as Arc<dyn Upstream>).map_err(|e| e.to_string())
    };
    let plain = |upstream| Built { upstream, emulator: None, routes: None };
    match config {
        UpstreamConfig::Sdk(sdk) => Ok(plain(connect(sdk).await.map_err(AppError::Upstream)?)),
        UpstreamConfig::Given(upstream) => Ok(plain(upstream)),
        UpstreamConfig::Routed(routed) => {
            let routes = RoutedUpstream::load(routed, metrics.clone()).await?;
            Ok(Built { upstream: routes.clone(), emulator: None, routes: Some(routes) })
        }
        UpstreamConfig::Emulator { emulator, mut sdk } => {
            let mut emulator = *emulator;
            // The built-in emulator answers for the region the client signs for.
            emulator.region = sdk.region.get_or_insert_with(|| emulator.region.clone()).clone();
            let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
            let handle = EmulatorHandle::spawn(emulator, loopback)
                .await
                .map_err(|source| AppError::Emulator { addr: loopback, source })?;
            tracing::info!(endpoint = %handle.endpoint_url(), "emulator upstream started");
            sdk.endpoint_url = Some(handle.endpoint_url());
            sdk.credentials =
                CredentialSource::Static { access_key_id: "emulator".into(), secret_access_key: "emulator".into() };
            let upstream = connect(sdk).await.map_err(AppError::Upstream)?;
            Ok(Built { upstream, emulator: Some(handle), routes: None })
        }
    }
}

/// The operator console's parts, built with the app.
struct Console {
    token: Option<Arc<crate::console::token::TokenFile>>,
    trace_url_template: Option<String>,
    upstream_start: (f64, u32),
    upstream_get: (f64, u32),
}

impl Console {
    /// The console's routes: behind the token when there is one; open when the admin listener
    /// is on a loopback address; else off (and said so).
    fn router(
        &self,
        admin: &TcpListener,
        gateway: Arc<Gateway>,
        metrics: Arc<Metrics>,
        stop: tokio_util::sync::CancellationToken,
    ) -> axum::Router {
        use crate::console::{ConsoleAccess, ConsoleSettings};
        let loopback = admin.local_addr().is_ok_and(|a| a.ip().is_loopback());
        let access = ConsoleAccess::for_listener(self.token.clone(), loopback);
        if matches!(access, ConsoleAccess::Off) {
            tracing::warn!(
                "the operator console is off: the admin listener is not on loopback and no --admin-token-file is set"
            );
        }
        let settings = ConsoleSettings {
            access,
            trace_url_template: self.trace_url_template.clone(),
            upstream_start: self.upstream_start,
            upstream_get: self.upstream_get,
        };
        crate::console::router(gateway, metrics, settings, stop)
    }
}

/// Resolves once the flag turns true.
async fn until_true(mut flag: watch::Receiver<bool>) {
    let _ = flag.wait_for(|stop| *stop).await;
}
