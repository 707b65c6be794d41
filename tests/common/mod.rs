//! Shared pieces of the integration tests: an emulator on a loopback port, the real SDK client
//! pointed at it, a tiny HTTP client for the admin API, and sample requests.
#![allow(dead_code)]

use bytes::Bytes;
use chrono::{TimeZone, Utc};
use deadline_stats_gateway::domain::ids::format_id;
use deadline_stats_gateway::domain::{AggregationRequest, GroupBy, Period, Resources, Statistic};
use deadline_stats_gateway::emulator::{EmulatorConfig, EmulatorHandle};
use deadline_stats_gateway::upstream::sdk::{CredentialSource, SdkUpstream, SdkUpstreamConfig};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

/// An emulator on `127.0.0.1:0` with the given timing.
pub async fn emulator(aggregation_duration: Duration, result_validity: Duration) -> EmulatorHandle {
    let config = EmulatorConfig { aggregation_duration, result_validity, ..EmulatorConfig::default() };
    EmulatorHandle::spawn(config, "127.0.0.1:0".parse().expect("loopback address"))
        .await
        .expect("emulator binds a loopback port")
}

/// The SDK client settings for an emulator at `endpoint`.
pub fn sdk_config(endpoint: &str) -> SdkUpstreamConfig {
    SdkUpstreamConfig {
        endpoint_url: Some(endpoint.to_owned()),
        region: Some("us-west-2".into()),
        credentials: CredentialSource::Static { access_key_id: "AKIDTEST".into(), secret_access_key: "secret".into() },
        ..SdkUpstreamConfig::default()
    }
}

/// The real SDK client pointed at `endpoint`.
pub async fn sdk(endpoint: &str) -> SdkUpstream {
    SdkUpstream::connect(&sdk_config(endpoint)).await.expect("SDK client builds")
}

pub fn farm(n: u64) -> String {
    format_id("farm-", 0xfa, n)
}

pub fn queue(n: u64) -> String {
    format_id("queue-", 0x9e, n)
}

/// A request over `queues` queues for `days` days, hourly, grouped by `group_by`.
pub fn request(farm_n: u64, queues: u64, days: i64, group_by: Vec<GroupBy>) -> AggregationRequest {
    let start = Utc.with_ymd_and_hms(2026, 10, 1, 0, 0, 0).single().expect("start time");
    AggregationRequest {
        farm_id: farm(farm_n),
        resources: Resources::Queues((0..queues).map(queue).collect()),
        start_time: start,
        end_time: start + chrono::Duration::days(days),
        timezone: None,
        period: Some(Period::Hourly),
        group_by,
        statistics: vec![Statistic::Sum, Statistic::Avg],
    }
}

/// A plain HTTP/1 call: `(status, headers, body)`.
pub async fn http(
    method: &str,
    url: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, http::HeaderMap, String) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req.body(Full::new(Bytes::from(body.unwrap_or_default().to_owned()))).expect("request builds");
    let resp = client.request(req).await.expect("HTTP call succeeds");
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.expect("body reads").to_bytes();
    (parts.status.as_u16(), parts.headers, String::from_utf8_lossy(&bytes).into_owned())
}

/// `GET /_emulator/stats` as JSON.
pub async fn stats(emu: &EmulatorHandle) -> serde_json::Value {
    let (status, _, body) = http("GET", &format!("{}/_emulator/stats", emu.endpoint_url()), None, &[]).await;
    assert_eq!(status, 200, "stats answers: {body}");
    serde_json::from_str(&body).expect("stats are JSON")
}

/// `POST /_emulator/faults` with `spec`.
pub async fn set_faults(emu: &EmulatorHandle, spec: serde_json::Value) {
    let (status, _, body) =
        http("POST", &format!("{}/_emulator/faults", emu.endpoint_url()), Some(&spec.to_string()), &[]).await;
    assert_eq!(status, 200, "faults accepted: {body}");
}

/// Polls `check` every 20 ms until it returns `Some`, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "condition not reached within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

use deadline_stats_gateway::gateway::backoff::BackoffPolicy;
use deadline_stats_gateway::gateway::throttle::Rate;
use deadline_stats_gateway::gateway::{Gateway, GatewayConfig};
use deadline_stats_gateway::grpc::pb;
use deadline_stats_gateway::grpc::pb::aggregation_service_client::AggregationServiceClient;
use deadline_stats_gateway::grpc::server;
use std::net::SocketAddr;
use std::sync::Arc;
use tonic::transport::Channel;

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
    c
}

/// A gateway served on a loopback port, in front of its own emulator.
pub struct TestGateway {
    pub emu: EmulatorHandle,
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
    let metrics = Arc::new(deadline_stats_gateway::telemetry::Metrics::new());
    let gateway =
        Arc::new(Gateway::new(config, upstream, metrics.clone(), deadline_stats_gateway::grpc::convert::encode_row));
    let listener = server::bind("127.0.0.1:0".parse().expect("addr")).await.expect("binds");
    let addr = listener.local_addr().expect("local addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (ready, _) = tokio::sync::watch::channel(false);
    let serving = server::Serving {
        gateway: gateway.clone(),
        metrics: metrics.clone(),
        options: server::ServerOptions::default(),
        ready,
    };
    tokio::spawn(server::serve(listener, serving, async {
        let _ = stopped.await;
    }));
    TestGateway { emu, addr, gateway, metrics, stop: Some(stop) }
}

/// A StartAggregation request over `queues` queues of farm `farm_n` for `days` days, hourly.
pub fn start_request(farm_n: u64, queues: u64, days: i64, group_by: &[pb::GroupBy]) -> pb::StartAggregationRequest {
    let start = Utc.with_ymd_and_hms(2026, 10, 1, 0, 0, 0).single().expect("start time");
    pb::StartAggregationRequest {
        farm_id: farm(farm_n),
        resources: Some(pb::start_aggregation_request::Resources::QueueIds(pb::ResourceIds {
            ids: (0..queues).map(queue).collect(),
        })),
        start_time: Some(prost_types::Timestamp { seconds: start.timestamp(), nanos: 0 }),
        end_time: Some(prost_types::Timestamp {
            seconds: (start + chrono::Duration::days(days)).timestamp(),
            nanos: 0,
        }),
        timezone: String::new(),
        period: pb::Period::Hourly as i32,
        group_by: group_by.iter().map(|g| *g as i32).collect(),
        statistics: vec![pb::Statistic::Sum as i32, pb::Statistic::Avg as i32],
        max_staleness: None,
    }
}

/// A Get request that long-polls up to `wait`.
pub fn get_request(id: &str, page_size: i32, page_token: &str, wait: Duration) -> pb::GetAggregationRequest {
    pb::GetAggregationRequest {
        aggregation_id: id.to_owned(),
        page_size,
        page_token: page_token.to_owned(),
        wait: prost_types::Duration::try_from(wait).ok(),
    }
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

/// The gateway binary.
pub const BIN: &str = env!("CARGO_BIN_EXE_deadline-stats-gateway");

/// A child process, killed if the test ends before stopping it.
pub struct Running(pub std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Running {
    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let sent =
            std::process::Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status().expect("kill runs");
        assert!(sent.success(), "kill -TERM failed");
    }

    /// Waits up to `limit` for the process to exit; its exit status.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.0.try_wait().expect("try_wait") {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "the process did not exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Reads `n` lines of the child's stdout (waiting at most 30 s).
pub fn stdout_lines(child: &mut std::process::Child, n: usize) -> Vec<String> {
    deadline_stats_gateway::bench::process::announced_lines(child, n, Duration::from_secs(30))
        .expect("the process announces itself")
}

/// `serve --upstream emulator` on loopback ports with `extra` flags and `env`; returns the
/// process, the gRPC URL and the admin URL.
pub fn spawn_serve(extra: &[&str], env: &[(&str, &str)]) -> (Running, String, String) {
    spawn_serve_logging(extra, env, std::process::Stdio::null())
}

/// [`spawn_serve`] with its stderr (the logs) sent to `stderr`.
pub fn spawn_serve_logging(
    extra: &[&str],
    env: &[(&str, &str)],
    stderr: std::process::Stdio,
) -> (Running, String, String) {
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(["serve", "--upstream", "emulator", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(extra)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(stderr);
    let mut child = cmd.spawn().expect("serve starts");
    let lines = stdout_lines(&mut child, 2);
    let grpc = lines[0].strip_prefix("listening on ").expect("gRPC address line").to_owned();
    let admin = lines[1].strip_prefix("admin on ").expect("admin address line").to_owned();
    (Running(child), grpc, admin)
}

/// Parses the Prometheus text format into `series → value` (`name{labels}` as written).
pub fn parse_metrics(text: &str) -> std::collections::HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// A `PYTHONPATH` under `target/` where `probe` (Python code) runs, installing `packages`
/// there with pip first when it does not.
pub fn python_packages(dir: &str, packages: &[&str], probe: &str) -> std::path::PathBuf {
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join(dir);
    let works = |path: &std::path::Path| {
        std::process::Command::new("python3")
            .args(["-c", probe])
            .env("PYTHONPATH", path)
            .status()
            .is_ok_and(|s| s.success())
    };
    if !works(&target) {
        let installed = std::process::Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--upgrade", "--target"])
            .arg(&target)
            .args(packages)
            .status()
            .expect("python3 -m pip runs");
        assert!(installed.success(), "pip could not install {packages:?} into {}", target.display());
        assert!(works(&target), "{packages:?} installed but the probe still fails");
    }
    target
}
