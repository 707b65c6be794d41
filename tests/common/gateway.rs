//! A gateway served in-process on a loopback port in front of its own emulator, with test
//! settings, a tonic client, and the gRPC requests the benchmarks send too.

use super::{emulator, sdk, stats};
use deadline_stats_gateway::app::{App, AppConfig, Listeners, StoreConfig, UpstreamConfig};
use deadline_stats_gateway::emulator::EmulatorHandle;
use deadline_stats_gateway::gateway::backoff::BackoffPolicy;
use deadline_stats_gateway::gateway::coordination::redis::RedisConfig;
use deadline_stats_gateway::gateway::coordination::{Coordination, MemoryStore, Wakeups};
use deadline_stats_gateway::gateway::rate::Rate;
use deadline_stats_gateway::gateway::{Gateway, GatewayConfig};
use deadline_stats_gateway::grpc::pb;
use deadline_stats_gateway::grpc::pb::aggregation_service_client::AggregationServiceClient;
use deadline_stats_gateway::grpc::server;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::Channel;

pub use deadline_stats_gateway::bench::requests::{get_request, start_request};
pub use deadline_stats_gateway::gateway::GatewayConfig as Config;

/// Gateway settings for tests: quick polling, no caller limits, upstream unpaced.
pub fn fast_config(result_validity: Duration) -> GatewayConfig {
    let mut c = GatewayConfig::default();
    c.lifecycle.result_validity = result_validity;
    c.lifecycle.validity_margin = Duration::from_millis(100).min(result_validity / 4);
    c.lifecycle.failed_ttl = Duration::from_millis(500);
    c.lifecycle.poll =
        BackoffPolicy { initial: Duration::from_millis(20), max: Duration::from_millis(100), multiplier: 1.5 };
    c.lifecycle.start_retry =
        BackoffPolicy { initial: Duration::from_millis(20), max: Duration::from_millis(200), multiplier: 2.0 };
    c.lifecycle.start_deadline = Duration::from_secs(20);
    c.caller_start = Rate { per_second: 0.0, burst: 1 };
    c.caller_get = Rate { per_second: 0.0, burst: 1 };
    c.upstream_start = Rate { per_second: 0.0, burst: 1 };
    c.upstream_get = Rate { per_second: 0.0, burst: 1 };
    c.housekeeping_interval = Duration::from_millis(100);
    c.min_remaining_validity = Duration::ZERO;
    if c.refresh.ahead >= result_validity {
        // Results this short are not refreshed ahead (the default lead is longer than them).
        c.refresh.ahead = Duration::ZERO;
    }
    c
}

/// A gateway served on a loopback port, in front of its own emulator.
pub struct TestGateway {
    pub emu: Arc<EmulatorHandle>,
    pub addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    pub metrics: Arc<deadline_stats_gateway::telemetry::Metrics>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.gateway.shutdown();
    }
}

impl TestGateway {
    /// Stops the gRPC server (the gateway's background work goes on until it is shut down).
    pub fn stop_serving(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// A tonic client on a fresh connection.
    pub async fn client(&self) -> AggregationServiceClient<Channel> {
        let channel =
            Channel::from_shared(format!("http://{}", self.addr)).expect("URL").connect().await.expect("connects");
        AggregationServiceClient::new(channel)
    }

    /// The emulator's counters for `farm`.
    pub async fn upstream(&self, farm: &str) -> serde_json::Value {
        stats(&self.emu).await["farms"][farm].clone()
    }
}

/// An emulator with `aggregation_duration` and a gateway with `config` in front of it.
pub async fn gateway(aggregation_duration: Duration, config: GatewayConfig) -> TestGateway {
    let emu = emulator(aggregation_duration, config.lifecycle.result_validity).await;
    let upstream = sdk(&emu.endpoint_url()).await;
    gateway_over(emu, Arc::new(upstream), config).await
}

/// A gateway over any upstream, with `emu` kept alive beside it.
pub async fn gateway_over(
    emu: EmulatorHandle,
    upstream: Arc<dyn deadline_stats_gateway::upstream::Upstream>,
    config: GatewayConfig,
) -> TestGateway {
    serve_app(emu, config, StoreConfig::Memory, upstream).await
}

/// One replica of a gateway on `coordination` (whose store other replicas in the same test
/// may share), in front of `emu` through the real SDK.
pub async fn replica(emu: Arc<EmulatorHandle>, config: GatewayConfig, coordination: Coordination) -> TestGateway {
    let upstream = Arc::new(sdk(&emu.endpoint_url()).await);
    serve_app(emu, config, StoreConfig::Given(coordination), upstream).await
}

/// The coordination of one replica on the Redis at `url` (its own connection, results cache
/// and wake-ups), as `serve --store redis` builds it.
pub async fn on_redis(url: &str, config: &GatewayConfig) -> Coordination {
    Coordination::redis(&config.coordination(), &RedisConfig::new(url)).await.expect("connects to redis-server")
}

/// Upstream calls not paced at all.
struct Unpaced;

impl deadline_stats_gateway::gateway::coordination::pacing::UpstreamRates for Unpaced {
    fn source(
        &self,
        _name: &str,
        _rate: deadline_stats_gateway::gateway::rate::Rate,
    ) -> Option<Arc<dyn deadline_stats_gateway::gateway::coordination::pacing::RateSource>> {
        None
    }
}

/// The coordination of one more replica on an in-memory `store` that several share (a test
/// of what replicas do, without Redis): its results cache and wake-ups are the store's.
pub fn on_memory(store: &Arc<MemoryStore>, wakeups: &Arc<Wakeups>) -> Coordination {
    Coordination {
        store: store.clone(),
        activity: Arc::new(deadline_stats_gateway::gateway::activity::MemoryActivity::default()),
        results: store.results(),
        wakeups: wakeups.clone(),
        upstream_rates: Arc::new(Unpaced),
        caller_start_tokens: None,
        caller_get_tokens: None,
        epochs: None,
        // `MemoryStore::new`'s.
        clock: deadline_stats_gateway::gateway::clock::Clock::system(),
    }
}

/// The gateway as `serve` builds it (`app::App`), on loopback ports, with no shutdown grace.
async fn serve_app(
    emu: impl Into<Arc<EmulatorHandle>>,
    config: GatewayConfig,
    store: StoreConfig,
    upstream: Arc<dyn deadline_stats_gateway::upstream::Upstream>,
) -> TestGateway {
    let loopback = "127.0.0.1:0".parse().expect("addr");
    let listeners = Listeners {
        grpc: server::bind(loopback).await.expect("binds"),
        admin: server::bind(loopback).await.expect("binds"),
    };
    let config = AppConfig {
        gateway: config,
        server: server::ServerOptions::default(),
        store,
        upstream: UpstreamConfig::Given(upstream),
        tls: None,
        identity_source: None,
        authz_policy: None,
        shutdown_grace: Duration::ZERO,
        console: Default::default(),
    };
    let app = App::build(config, listeners).await.expect("the gateway builds");
    let (addr, gateway, metrics) = (app.addr().expect("local addr"), app.gateway().clone(), app.metrics().clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.serve(async {
        let _ = stopped.await;
    }));
    TestGateway { emu: emu.into(), addr, gateway, metrics, stop: Some(stop) }
}

/// Long-polls until the aggregation is terminal; returns the first page.
pub async fn wait_terminal(client: &mut AggregationServiceClient<Channel>, id: &str) -> pb::GetAggregationResponse {
    for _ in 0..20 {
        let page =
            client.get_aggregation(get_request(id, 0, "", Duration::from_secs(10))).await.expect("get").into_inner();
        let state = page.aggregation.as_ref().map(|a| a.state()).unwrap_or_default();
        if matches!(
            state,
            pb::AggregationState::Completed | pb::AggregationState::Failed | pb::AggregationState::TimedOut
        ) {
            return page;
        }
    }
    panic!("aggregation {id} never became terminal");
}
