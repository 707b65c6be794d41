//! The scenarios of `deadline-stats-gateway bench`. Each starts what it measures as separate
//! processes of this executable, pinned to core 0, drives them from this process pinned to
//! core 1, and returns a JSON report.

use super::baseline::RawCodec;
use super::loadgen::{LoadReport, closed_loop, open_loop};
use super::paired::{MedianRatio, PRECISE_ENOUGH};
use super::process::{CpuTime, Server, cores, http_get, pin_self};
use super::requests::{farm, get_request, start_request};
use super::tls::BenchTls;
use crate::grpc::pb::aggregation_service_client::AggregationServiceClient;
use crate::grpc::pb::{self, AggregationState, Disposition};
use crate::grpc::service::GET;
use prost::Message as _;
use serde_json::{Value, json};
use std::time::Duration;
use tokio::time::Instant;
use tonic::transport::Channel;

/// How a scenario runs.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Length of each measured load phase.
    pub duration: Duration,
    /// Closed-loop workers.
    pub concurrency: usize,
    /// gRPC connections the workers share.
    pub connections: usize,
    /// Seconds-long, small-sized runs that check the harness, not the speed.
    pub smoke: bool,
    /// The store of the gateway measured (cache-hit: `redis` adds a gateway on Redis).
    pub store: BenchStore,
    /// cache-hit: rounds of [`ROUND`] per server instead of `duration` / [`ROUND`].
    pub rounds: Option<u32>,
    /// cache-hit: `perf record` the gateway and the baseline into this directory during the
    /// closed-loop rounds, and compare their profiles.
    pub profile: Option<std::path::PathBuf>,
    /// cache-hit: mutual TLS and an authorization policy on the gateway, TLS on the baseline.
    pub tls: bool,
}

/// Which store a scenario's gateway keeps its state in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchStore {
    #[default]
    Memory,
    Redis,
}

impl BenchStore {
    pub fn name(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Redis => "redis",
        }
    }
}

type Client = AggregationServiceClient<Channel>;

pub(crate) use super::process::BenchError;

pub(crate) fn string(s: impl Into<String>) -> String {
    s.into()
}

/// Settings that make the farm queue the only thing a makespan measures: quick polling, the
/// gateway's own upstream pacing off.
pub(crate) const FAST_AND_UNPACED: [&str; 8] = [
    "--poll-initial-interval",
    "25ms",
    "--poll-max-interval",
    "100ms",
    "--upstream-start-rate",
    "0",
    "--upstream-get-rate",
    "0",
];

/// Starts the gateway with the emulator as upstream and no caller limits (one load generator
/// would exceed them); `extra` flags are appended.
pub(crate) fn gateway(core: Option<usize>, extra: &[&str]) -> Result<Server, BenchError> {
    let mut args = serve_args();
    args.extend(["--caller-start-rate", "0", "--caller-get-rate", "0"].into_iter().map(string));
    args.extend(extra.iter().map(|s| string(*s)));
    Ok(Server::start(core, &args, 3)?)
}

/// `serve` with the emulator as upstream on loopback ports, JSON logs, every other setting at
/// its default.
pub(crate) fn serve_args() -> Vec<String> {
    [
        "serve",
        "--upstream",
        "emulator",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
    ]
    .into_iter()
    .map(string)
    .collect()
}

pub(crate) async fn connect(url: &str, n: usize) -> Result<Vec<Client>, BenchError> {
    connect_over(url, n, None).await
}

/// [`connect`], over mutual TLS when `tls` is given.
pub(crate) async fn connect_over(url: &str, n: usize, tls: Option<&BenchTls>) -> Result<Vec<Client>, BenchError> {
    let mut out = Vec::new();
    for _ in 0..n.max(1) {
        let mut endpoint = Channel::from_shared(url.to_owned())?;
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls.channel())?;
        }
        let channel = endpoint.connect().await?;
        out.push(AggregationServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024));
    }
    Ok(out)
}

/// Long-polls an aggregation until it is terminal; its final view.
pub(crate) async fn finish(client: &mut Client, id: &str) -> Result<pb::Aggregation, BenchError> {
    finish_counted(client, id).await.map(|(agg, _)| agg)
}

/// [`finish`], and how many Gets it took.
pub(crate) async fn finish_counted(client: &mut Client, id: &str) -> Result<(pb::Aggregation, u64), BenchError> {
    let mut gets = 0;
    loop {
        gets += 1;
        let page = client.get_aggregation(get_request(id, 1, "", Duration::from_secs(30))).await?.into_inner();
        let agg = page.aggregation.unwrap_or_default();
        match agg.state() {
            AggregationState::Completed => return Ok((agg, gets)),
            AggregationState::Failed | AggregationState::TimedOut => {
                return Err(format!("aggregation {id} ended {:?}: {}", agg.state(), agg.status_message).into());
            }
            _ => {}
        }
    }
}

/// Upstream counters of the emulator behind a gateway.
pub(crate) async fn upstream_stats(server: &Server) -> Result<Value, BenchError> {
    let url = server.url("upstream on ").ok_or("the gateway did not name its emulator")?;
    Ok(serde_json::from_str(&http_get(&url, "/_emulator/stats").await?)?)
}

/// A client that sends a pre-encoded GetAggregation request and skips the response bytes, so
/// the load generator spends as little as it can per call and the server is what is measured.
/// It is tonic's client over one HTTP/2 connection driven by hyper directly: a tonic `Channel`
/// would add a queue and a worker task between every call and the connection, which on the
/// load generator's single core cost as much as the server's work.
pub(crate) type RawClient = tonic::client::Grpc<Connection>;

/// One HTTP/2 connection as a tower service, for [`tonic::client::Grpc`].
#[derive(Clone)]
pub(crate) struct Connection(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

impl tower::Service<http::Request<tonic::body::Body>> for Connection {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, hyper::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), hyper::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(request))
    }
}

pub(crate) async fn raw_clients(url: &str, n: usize) -> Result<Vec<RawClient>, BenchError> {
    raw_clients_over(url, n, None).await
}

/// [`raw_clients`], over mutual TLS when `tls` is given.
pub(crate) async fn raw_clients_over(
    url: &str,
    n: usize,
    tls: Option<&BenchTls>,
) -> Result<Vec<RawClient>, BenchError> {
    let origin: http::Uri = url.parse()?;
    let authority = origin.authority().ok_or("the URL names no host")?.as_str().to_owned();
    let connector = tls.map(BenchTls::connector).transpose()?;
    let mut out = Vec::new();
    for _ in 0..n.max(1) {
        let stream = tokio::net::TcpStream::connect(&authority).await?;
        stream.set_nodelay(true)?;
        let send = match &connector {
            None => handshake(stream).await?,
            Some(connector) => handshake(connector.connect(BenchTls::server_name()?, stream).await?).await?,
        };
        out.push(tonic::client::Grpc::with_origin(Connection(send), origin.clone()));
    }
    Ok(out)
}

/// An HTTP/2 connection over `io`, driven by a task of its own.
async fn handshake<T>(io: T) -> Result<hyper::client::conn::http2::SendRequest<tonic::body::Body>, BenchError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, connection) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(io))
            .await?;
    tokio::spawn(connection);
    Ok(send)
}
pub(crate) async fn raw_get(mut client: RawClient, request: bytes::Bytes) -> bool {
    if client.ready().await.is_err() {
        return false;
    }
    let path = http::uri::PathAndQuery::from_static(GET.path);
    client.unary(tonic::Request::new(request), path, RawCodec).await.is_ok()
}

/// A server under measurement, with the connections the load goes over.
struct Target<'a> {
    server: &'a Server,
    clients: Vec<RawClient>,
    /// The encoded GetAggregation request it answers.
    request: bytes::Bytes,
}

/// `time` spread over `requests`, in µs.
fn us_per_request(time: Duration, requests: u64) -> f64 {
    time.as_secs_f64() * 1e6 / (requests.max(1) as f64)
}

/// What the rounds of one target added up to.
struct Measured {
    closed: LoadReport,
    cpu: CpuTime,
    open: LoadReport,
    open_cpu: CpuTime,
}

impl Measured {
    fn new() -> Self {
        Self {
            closed: LoadReport::empty(),
            cpu: CpuTime::default(),
            open: LoadReport::empty(),
            open_cpu: CpuTime::default(),
        }
    }

    /// Server CPU per open-loop request, in µs: both servers at the same rate.
    fn open_cpu_us(&self) -> f64 {
        us_per_request(self.open_cpu.total(), self.open.requests)
    }

    /// Server CPU per closed-loop request, in µs: (total, user, system).
    fn cpu_us(&self) -> (f64, f64, f64) {
        let per = |d: Duration| us_per_request(d, self.closed.requests);
        (per(self.cpu.total()), per(self.cpu.user), per(self.cpu.system))
    }
}

/// One closed-loop phase of `length` against `target`: the load and the server CPU it cost.
async fn closed_phase(target: &Target<'_>, length: Duration, opts: &BenchOptions) -> (LoadReport, CpuTime) {
    let request = target.request.clone();
    let before = target.server.cpu_time();
    let report =
        closed_loop(&target.clients, opts.concurrency, length, move |c: RawClient| raw_get(c, request.clone())).await;
    (report, target.server.cpu_time().since(before))
}

async fn open_phase(target: &Target<'_>, rate: f64, length: Duration) -> (LoadReport, CpuTime) {
    let request = target.request.clone();
    let before = target.server.cpu_time();
    let report =
        open_loop(&target.clients, rate, length, 10_000, move |c: RawClient| raw_get(c, request.clone())).await;
    (report, target.server.cpu_time().since(before))
}

pub(crate) fn ratio(a: f64, b: f64) -> f64 {
    ((a / b.max(1e-9)) * 1000.0).round() / 1000.0
}

fn one_decimal(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// How long one server is measured before the other takes its turn.
pub(crate) const ROUND: Duration = Duration::from_millis(250);

/// Measurement rounds: the two servers take turns of [`ROUND`] (gateway first in even rounds,
/// baseline first in odd ones) so that drift and bursts of load from elsewhere on a shared
/// machine, which last seconds, fall on both alike.
fn rounds(opts: &BenchOptions) -> u32 {
    match opts.rounds {
        _ if opts.smoke => 1,
        Some(rounds) => rounds.max(1),
        None => (opts.duration.as_millis() / ROUND.as_millis()).clamp(1, 400) as u32,
    }
}

/// Minimum, quartiles and maximum of `values`, each to three decimals.
fn spread(mut values: Vec<f64>) -> Value {
    values.sort_by(f64::total_cmp);
    let at = |q: f64| values.get(((values.len().max(1) - 1) as f64 * q).round() as usize).copied().unwrap_or(0.0);
    let r = |x: f64| (x * 1000.0).round() / 1000.0;
    json!({ "min": r(at(0.0)), "p25": r(at(0.25)), "median": r(at(0.5)), "p75": r(at(0.75)), "max": r(at(1.0)) })
}

/// A gateway with one completed aggregation: the encoded request for its first page of 100
/// rows, and the encoded answer.
pub(crate) async fn with_a_result(gw: &Server) -> Result<(bytes::Bytes, Vec<u8>), BenchError> {
    with_a_result_over(gw, None).await
}

/// [`with_a_result`], over mutual TLS when `tls` is given.
async fn with_a_result_over(gw: &Server, tls: Option<&BenchTls>) -> Result<(bytes::Bytes, Vec<u8>), BenchError> {
    let url = gw.url("listening on ").ok_or("no gRPC address")?;
    let mut clients = connect_over(&url, 1, tls).await?;
    let started = clients[0].start_aggregation(start_request(1, 1, 1, &[pb::GroupBy::JobId])).await?.into_inner();
    let id = started.aggregation.unwrap_or_default().aggregation_id;
    finish(&mut clients[0], &id).await?;
    let page = get_request(&id, 100, "", Duration::ZERO);
    let response = clients[0].get_aggregation(page.clone()).await?.into_inner();
    if response.statistics.len() != 100 {
        return Err(format!("expected a page of 100 rows, got {}", response.statistics.len()).into());
    }
    Ok((bytes::Bytes::from(page.encode_to_vec()), response.encode_to_vec()))
}

/// The bytes of an encoded GetAggregationResponse before its rows: the view and the token.
fn head_bytes(encoded: &[u8]) -> usize {
    let rows = pb::GetAggregationResponse::decode(encoded)
        .map_or(0, |r| prost::encoding::message::encoded_len_repeated(crate::grpc::wire::STATISTICS, &r.statistics));
    encoded.len().saturating_sub(rows)
}

/// GetAggregation of a completed aggregation, pages of 100 rows: the gateway against the
/// bare-tonic baseline answering the same bytes; with `--store redis`, also a gateway on a
/// `redis-server` of its own, whose near cache must keep its throughput close to the memory
/// store's. The servers take turns of a quarter second.
pub(crate) async fn cache_hit(opts: &BenchOptions) -> Result<Value, BenchError> {
    let (server_core, load_core) = cores().map_or((None, None), |(s, l)| (Some(s), Some(l)));
    if let Some(core) = load_core {
        pin_self(core);
    }
    let quick = ["--emulator-aggregation-duration", "50ms", "--poll-initial-interval", "20ms"];
    let tls = if opts.tls { Some(BenchTls::make()?) } else { None };
    let tls_flags = tls.as_ref().map(BenchTls::gateway_flags).unwrap_or_default();
    let gw = gateway(server_core, &[&quick[..], &tls_flags.iter().map(String::as_str).collect::<Vec<_>>()].concat())?;
    let (request_bytes, encoded) = with_a_result_over(&gw, tls.as_ref()).await?;

    let file = std::env::temp_dir().join(format!("dsg-baseline-{}.bin", std::process::id()));
    std::fs::write(&file, &encoded)?;
    let baseline_args: Vec<String> = ["bench-baseline", "--listen", "127.0.0.1:0", "--response"]
        .into_iter()
        .map(string)
        .chain([file.to_string_lossy().into_owned()])
        .chain(tls.as_ref().map(BenchTls::baseline_flags).unwrap_or_default())
        .collect();
    let base = Server::start(server_core, &baseline_args, 1);
    let _ = std::fs::remove_file(&file);
    let base = base?;

    let redis = match opts.store {
        BenchStore::Memory => None,
        BenchStore::Redis => {
            let redis = super::replicas::Redis::start()?;
            let url = redis.url();
            let mut flags = quick.to_vec();
            flags.extend(["--store", "redis", "--redis-url", &url]);
            let on_redis = gateway(server_core, &flags)?;
            let (request, _) = with_a_result(&on_redis).await?;
            // The same gateway with a caller limit the load never reaches (the load generator
            // is one caller), kept by each replica (`local`) or shared through Redis (`global`:
            // a round trip per batch of 1,000 tokens).
            let mut limited = Vec::new();
            for mode in ["local", "global"] {
                let mut args = serve_args();
                args.extend(flags.iter().map(|f| string(*f)));
                let caller =
                    ["--caller-start-rate", "0", "--caller-get-rate", "1000000", "--caller-get-burst", "10000"];
                args.extend(caller.into_iter().chain(["--caller-limits", mode]).map(string));
                limited.push(Server::start(server_core, &args, 3)?);
            }
            Some((redis, on_redis, request, limited))
        }
    };
    let mut targets = vec![
        Target {
            server: &gw,
            clients: raw_clients_over(&address(&gw)?, opts.connections, tls.as_ref()).await?,
            request: request_bytes.clone(),
        },
        Target {
            server: &base,
            clients: raw_clients_over(&address(&base)?, opts.connections, tls.as_ref()).await?,
            request: request_bytes,
        },
    ];
    if let Some((_, on_redis, request, limited)) = &redis {
        for server in std::iter::once(on_redis).chain(limited) {
            targets.push(Target {
                server,
                clients: raw_clients(&address(server)?, opts.connections).await?,
                request: request.clone(),
            });
        }
    }

    let rounds = rounds(opts);
    let length = if opts.rounds.is_some() && !opts.smoke { ROUND } else { opts.duration / rounds };
    for t in &targets {
        closed_phase(t, Duration::from_millis(300).min(opts.duration), opts).await;
    }
    let mut measured: Vec<Measured> = targets.iter().map(|_| Measured::new()).collect();
    let recordings = match &opts.profile {
        Some(dir) => Some((
            super::profile::record(dir, "gateway", gw.pid())?,
            super::profile::record(dir, "baseline", base.pid())?,
        )),
        None => None,
    };
    // Each round: every target's throughput and CPU per request.
    let mut per_round: Vec<Vec<Round>> = targets.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for i in turn(round, targets.len()) {
            let (report, cpu) = closed_phase(&targets[i], length, opts).await;
            per_round[i].push(Round { rps: report.rps(), cpu_us: us_per_request(cpu.total(), report.requests) });
            measured[i].closed.merge(&report);
            measured[i].cpu.add(cpu);
        }
    }
    let profile = match recordings {
        Some((gateway, baseline)) => {
            let (g, b) = (gateway.finish()?, baseline.finish()?);
            let comparison = super::profile::compare(&g, measured[0].closed.requests, &b, measured[1].closed.requests);
            if let Some(dir) = &opts.profile {
                std::fs::write(dir.join("comparison.txt"), super::profile::table(&comparison))?;
            }
            Some(comparison)
        }
        None => None,
    };
    let paired = |a: usize, b: usize, of: fn(&Round) -> f64| -> Vec<f64> {
        match (per_round.get(a), per_round.get(b)) {
            (Some(a), Some(b)) => a.iter().zip(b).map(|(x, y)| of(x) / of(y)).collect(),
            _ => Vec::new(),
        }
    };
    let rps: fn(&Round) -> f64 = |r| r.rps;
    let cpu: fn(&Round) -> f64 = |r| r.cpu_us;
    let round_cpu_ratios = paired(0, 1, cpu);
    let mut comparisons = vec![
        ("throughput_ratio", MedianRatio::of(&paired(0, 1, rps))),
        ("cpu_per_request_ratio", MedianRatio::of(&round_cpu_ratios)),
    ];
    if per_round.len() > 2 {
        comparisons.push(("redis_vs_memory_throughput_ratio", MedianRatio::of(&paired(2, 0, rps))));
        comparisons.push(("redis_vs_memory_cpu_ratio", MedianRatio::of(&paired(2, 0, cpu))));
    }
    let rate = (measured[1].closed.rps() / 2.0).max(10.0);
    for round in 0..rounds {
        for i in turn(round, targets.len()) {
            let (report, cpu) = open_phase(&targets[i], rate, length).await;
            measured[i].open.merge(&report);
            measured[i].open_cpu.add(cpu);
        }
    }
    drop(targets);
    drop(base);

    let (g, b) = (&measured[0], &measured[1]);
    let ((g_cpu, g_user, g_sys), (b_cpu, b_user, b_sys)) = (g.cpu_us(), b.cpu_us());
    let mut report = json!({
        "scenario": "cache-hit",
        "response_bytes": encoded.len(),
        "response_head_bytes": head_bytes(&encoded),
        "gateway_rps": g.closed.rps().round(),
        "baseline_rps": b.closed.rps().round(),
        "throughput_ratio": ratio(g.closed.rps(), b.closed.rps()),
        "gateway_p99_us": g.closed.percentile_us(0.99),
        "baseline_p99_us": b.closed.percentile_us(0.99),
        "p99_ratio": ratio(g.closed.percentile_us(0.99) as f64, b.closed.percentile_us(0.99) as f64),
        "gateway_cpu_us_per_request": one_decimal(g_cpu),
        "baseline_cpu_us_per_request": one_decimal(b_cpu),
        "cpu_per_request_ratio": ratio(g_cpu, b_cpu),
        "cpu_per_request_ratio_of_rounds": spread(round_cpu_ratios),
        "paired": paired_report(&comparisons),
        "gateway_cpu_user_us_per_request": one_decimal(g_user),
        "gateway_cpu_system_us_per_request": one_decimal(g_sys),
        "baseline_cpu_user_us_per_request": one_decimal(b_user),
        "baseline_cpu_system_us_per_request": one_decimal(b_sys),
        "open_loop_rate": rate.round(),
        "gateway_open_cpu_us_per_request": one_decimal(g.open_cpu_us()),
        "baseline_open_cpu_us_per_request": one_decimal(b.open_cpu_us()),
        "equal_rate_cpu_per_request_ratio": ratio(g.open_cpu_us(), b.open_cpu_us()),
        "gateway_open_p99_us": g.open.percentile_us(0.99),
        "baseline_open_p99_us": b.open.percentile_us(0.99),
        "gateway": { "closed": g.closed.json(), "open": g.open.json() },
        "baseline": { "closed": b.closed.json(), "open": b.open.json() },
        "store": opts.store.name(),
        "tls": opts.tls,
        "rounds": rounds,
        "pinned": server_core.is_some(),
        "concurrency": opts.concurrency,
        "connections": opts.connections,
    });
    if let Some(r) = measured.get(2) {
        let (r_cpu, _, _) = r.cpu_us();
        report["redis_rps"] = json!(r.closed.rps().round());
        report["redis_vs_memory_throughput_ratio"] = json!(ratio(r.closed.rps(), g.closed.rps()));
        report["redis_p99_us"] = json!(r.closed.percentile_us(0.99));
        report["redis_cpu_us_per_request"] = json!(one_decimal(r_cpu));
        report["redis_vs_memory_cpu_ratio"] = json!(ratio(r_cpu, g_cpu));
        report["redis_open_cpu_us_per_request"] = json!(one_decimal(r.open_cpu_us()));
        report["redis"] = json!({ "closed": r.closed.json(), "open": r.open.json() });
    }
    if let (Some(local), Some(global)) = (measured.get(3), measured.get(4)) {
        let ((local_cpu, _, _), (global_cpu, _, _)) = (local.cpu_us(), global.cpu_us());
        report["caller_limits"] = json!({
            "local_cpu_us_per_request": one_decimal(local_cpu),
            "global_cpu_us_per_request": one_decimal(global_cpu),
            "global_vs_local_cpu_ratio": ratio(global_cpu, local_cpu),
            "local_open_cpu_us_per_request": one_decimal(local.open_cpu_us()),
            "global_open_cpu_us_per_request": one_decimal(global.open_cpu_us()),
            "global_vs_local_equal_rate_cpu_ratio": ratio(global.open_cpu_us(), local.open_cpu_us()),
            "local_rps": local.closed.rps().round(),
            "global_rps": global.closed.rps().round(),
        });
    }
    if let Some(profile) = profile {
        report["profile"] = profile;
    }
    if let Some((redis, _, _, _)) = &redis {
        report["global_caller_bucket_round_trip_us"] = gcra_round_trips(&redis.url(), opts).await?;
    }
    drop(redis);
    Ok(report)
}

/// One server's round: its throughput and CPU per request.
struct Round {
    rps: f64,
    cpu_us: f64,
}

/// The paired comparisons as the report gives them: each median with its interval, and a
/// warning when an interval is wider than ±2 % (more `--rounds` narrow it).
fn paired_report(comparisons: &[(&str, Option<MedianRatio>)]) -> Value {
    let mut report = serde_json::Map::new();
    let mut wide = Vec::new();
    for (name, m) in comparisons {
        let Some(m) = m else { continue };
        if !m.precise_enough() {
            wide.push(format!("{name} ±{:.1} %", m.half_width() * 100.0));
        }
        report.insert((*name).to_owned(), m.json());
    }
    report.insert("precise_enough".into(), json!(wide.is_empty()));
    if !wide.is_empty() {
        report.insert(
            "warning".into(),
            json!(format!(
                "the 95 % interval is wider than ±{} % ({}): run more --rounds to tell a change of that size",
                PRECISE_ENOUGH * 100.0,
                wide.join(", ")
            )),
        );
    }
    Value::Object(report)
}

/// What a caller bucket kept in Redis would add to every request: the round trip of one GCRA
/// take (the script the upstream rates use), one at a time from this process, in µs.
async fn gcra_round_trips(url: &str, opts: &BenchOptions) -> Result<Value, BenchError> {
    use crate::gateway::coordination::pacing::RateSource as _;
    use crate::gateway::rate::Rate;
    let redis = crate::gateway::coordination::redis::RedisClient::connect(
        &crate::gateway::coordination::redis::RedisConfig::new(url).with_prefix("bench:"),
    )
    .await?;
    let rate = redis.rate("caller", Rate { per_second: 1e6, burst: 1_000 }).ok_or("a rate")?;
    let n = if opts.smoke { 100 } else { 5_000 };
    let mut took = Vec::with_capacity(n);
    for _ in 0..n {
        let begin = Instant::now();
        rate.try_take().await?;
        took.push(begin.elapsed().as_secs_f64() * 1e6);
    }
    Ok(spread(took))
}

fn address(server: &Server) -> Result<String, BenchError> {
    Ok(server.url("listening on ").ok_or("no gRPC address")?)
}

/// The order the targets take in `round`: each round starts one later, so each is measured
/// first, last and in between alike.
fn turn(round: u32, targets: usize) -> Vec<usize> {
    (0..targets).map(|i| (i + round as usize) % targets.max(1)).collect()
}

/// 1,000 concurrent identical StartAggregation calls.
pub(crate) async fn coalesce(opts: &BenchOptions) -> Result<Value, BenchError> {
    let (server_core, load_core) = cores().map_or((None, None), |(s, l)| (Some(s), Some(l)));
    if let Some(core) = load_core {
        pin_self(core);
    }
    let gw = gateway(server_core, &["--emulator-aggregation-duration", "2s"])?;
    let url = gw.url("listening on ").ok_or("no gRPC address")?;
    let clients = connect(&url, opts.connections).await?;
    let callers = 1000;
    let request = start_request(2, 3, 7, &[pb::GroupBy::UserId]);
    let calls: Vec<_> = (0..callers)
        .map(|i| {
            let (mut client, request) = (clients[i % clients.len()].clone(), request.clone());
            tokio::spawn(async move {
                let sent = Instant::now();
                let resp = client.start_aggregation(request).await.map(|r| r.into_inner());
                (resp, sent.elapsed())
            })
        })
        .collect();
    let mut joiners = hdrhistogram::Histogram::<u64>::new(3)?;
    let (mut ids, mut errors) = (std::collections::HashSet::new(), 0);
    for call in calls {
        match call.await? {
            (Ok(resp), latency) => {
                if resp.disposition() == Disposition::Joined {
                    joiners.record(latency.as_micros().max(1) as u64)?;
                }
                ids.insert(resp.aggregation.unwrap_or_default().aggregation_id);
            }
            (Err(_), _) => errors += 1,
        }
    }
    // The upstream Start is sent after the callers are answered: it is counted once the
    // aggregation completed.
    for id in &ids {
        finish(&mut clients[0].clone(), id).await?;
    }
    let stats = upstream_stats(&gw).await?;
    let upstream_starts = stats["farms"][farm(2)]["start_calls"].as_u64().unwrap_or(0);
    Ok(json!({
        "scenario": "coalesce",
        "callers": callers,
        "errors": errors,
        "aggregations": ids.len(),
        "upstream_starts": upstream_starts,
        "joiner_p99_us": joiners.value_at_quantile(0.99),
        "joiner_p50_us": joiners.value_at_quantile(0.5),
        "smoke": opts.smoke,
    }))
}

/// 100 distinct aggregations over 10 farms against the emulator.
pub(crate) async fn farm_queue(opts: &BenchOptions) -> Result<Value, BenchError> {
    let (server_core, load_core) = cores().map_or((None, None), |(s, l)| (Some(s), Some(l)));
    if let Some(core) = load_core {
        pin_self(core);
    }
    let in_progress = if opts.smoke { Duration::from_millis(100) } else { Duration::from_secs(2) };
    let in_progress_flag = format!("{}ms", in_progress.as_millis());
    let gw = gateway(
        server_core,
        &[&["--emulator-aggregation-duration", &in_progress_flag][..], &FAST_AND_UNPACED[..]].concat(),
    )?;
    let url = gw.url("listening on ").ok_or("no gRPC address")?;
    let clients = connect(&url, opts.connections).await?;
    let (farms, per_farm) = (10u64, 10u64);
    let begin = Instant::now();
    let runs: Vec<_> = (0..farms * per_farm)
        .map(|i| {
            let mut client = clients[i as usize % clients.len()].clone();
            let request = start_request(100 + i % farms, 1, 1 + (i / farms) as i64, &[pb::GroupBy::QueueId]);
            tokio::spawn(async move {
                let id = client
                    .start_aggregation(request)
                    .await?
                    .into_inner()
                    .aggregation
                    .unwrap_or_default()
                    .aggregation_id;
                finish(&mut client, &id).await?;
                Ok::<Duration, BenchError>(begin.elapsed())
            })
        })
        .collect();
    let mut makespan = Duration::ZERO;
    for run in runs {
        makespan = makespan.max(run.await??);
    }
    let stats = upstream_stats(&gw).await?;
    let (mut calls, mut throttled) = (0, 0);
    for f in 0..farms {
        let s = &stats["farms"][farm(100 + f)];
        calls += s["start_calls"].as_u64().unwrap_or(0) + s["get_calls"].as_u64().unwrap_or(0);
        throttled += s["throttled_starts"].as_u64().unwrap_or(0);
    }
    let lower_bound = in_progress * per_farm as u32;
    Ok(json!({
        "scenario": "farm-queue",
        "aggregations": farms * per_farm,
        "farms": farms,
        "in_progress_s": in_progress.as_secs_f64(),
        "makespan_s": (makespan.as_secs_f64() * 1000.0).round() / 1000.0,
        "lower_bound_s": lower_bound.as_secs_f64(),
        "makespan_ratio": ratio(makespan.as_secs_f64(), lower_bound.as_secs_f64()),
        "upstream_calls_per_aggregation": ratio(calls as f64, (farms * per_farm) as f64),
        "upstream_throttled": throttled,
    }))
}

/// 100,000 rows cached: the gateway's resident memory growth against the rows' encoded size.
/// The emulator runs as a process of its own so that only the gateway's memory is counted.
pub(crate) async fn memory(opts: &BenchOptions) -> Result<Value, BenchError> {
    let emulator_args: Vec<String> =
        ["emulator", "--listen", "127.0.0.1:0", "--aggregation-duration", "50ms"].into_iter().map(string).collect();
    let emulator = Server::start(None, &emulator_args, 1)?;
    let endpoint = emulator.url("listening on ").ok_or("no emulator address")?;
    let gateway_args: Vec<String> = [
        "serve",
        "--upstream",
        "aws",
        "--endpoint-url",
        &endpoint,
        "--region",
        "us-west-2",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--caller-start-rate",
        "0",
        "--caller-get-rate",
        "0",
        "--upstream-get-rate",
        "0",
        "--poll-initial-interval",
        "20ms",
    ]
    .into_iter()
    .map(string)
    .collect();
    let credentials =
        [("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"), ("AWS_EC2_METADATA_DISABLED", "true")];
    let gw = Server::start_with_env(None, &gateway_args, &credentials, 2)?;
    let url = gw.url("listening on ").ok_or("no gRPC address")?;
    let mut client = connect(&url, 1).await?.remove(0);
    let warm = client.start_aggregation(start_request(3, 1, 1, &[pb::GroupBy::QueueId])).await?.into_inner();
    finish(&mut client, &warm.aggregation.unwrap_or_default().aggregation_id).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = gw.rss_bytes();
    // 10 queues x 6 jobs x 1,656 hours = 99,360 rows (1 queue x 6 jobs x 168 hours when smoke).
    let big = if opts.smoke {
        start_request(4, 1, 7, &[pb::GroupBy::JobId])
    } else {
        start_request(4, 10, 69, &[pb::GroupBy::JobId])
    };
    let id = client.start_aggregation(big).await?.into_inner().aggregation.unwrap_or_default().aggregation_id;
    let done = finish(&mut client, &id).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = gw.rss_bytes();
    let (mut encoded, mut rows, mut token) = (0usize, 0u64, String::new());
    loop {
        let page = client.get_aggregation(get_request(&id, 1000, &token, Duration::ZERO)).await?.into_inner();
        rows += page.statistics.len() as u64;
        encoded += page.statistics.iter().map(|r| r.encoded_len()).sum::<usize>();
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let delta = after.saturating_sub(before);
    Ok(json!({
        "scenario": "memory",
        "rows": rows,
        "row_count": done.row_count,
        "encoded_bytes": encoded,
        "rss_before_bytes": before,
        "rss_after_bytes": after,
        "rss_bytes_delta": delta,
        "overhead_bytes_per_row": ((delta as f64 - encoded as f64) / rows.max(1) as f64).round(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(duration: Duration, smoke: bool) -> BenchOptions {
        BenchOptions {
            duration,
            concurrency: 1,
            connections: 1,
            smoke,
            store: BenchStore::Memory,
            rounds: None,
            profile: None,
            tls: false,
        }
    }

    #[test]
    fn the_servers_take_turns_of_a_quarter_second() {
        assert_eq!(rounds(&opts(Duration::from_secs(10), false)), 40);
        assert_eq!(rounds(&opts(Duration::from_millis(100), false)), 1);
        assert_eq!(rounds(&opts(Duration::from_secs(10), true)), 1);
        assert_eq!(turn(0, 2), [0, 1]);
        assert_eq!(turn(1, 2), [1, 0]);
        assert_eq!((turn(1, 3), turn(2, 3), turn(3, 3)), (vec![1, 2, 0], vec![2, 0, 1], vec![0, 1, 2]));
    }

    #[test]
    fn spread_reports_extremes_and_quartiles() {
        let s = spread(vec![1.3, 0.9, 1.1, 1.0, 1.2]);
        assert_eq!(s, json!({ "min": 0.9, "p25": 1.0, "median": 1.1, "p75": 1.2, "max": 1.3 }));
        assert_eq!(spread(Vec::new())["median"], 0.0);
    }
}
