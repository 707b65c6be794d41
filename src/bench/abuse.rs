//! Scenarios of abuse: what hostile input and caller churn cost the gateway.
//!
//! - `hostile`: rounds of four concurrent hostile requests (4 MB Starts of 100,000 distinct
//!   queue ids, 4 MB Get ids, 250 kB Starts of 6,000 ids just under the request limit), while a
//!   health check runs every 10 ms; how long each refusal takes, the health checks' latency.
//! - `callers`: 50,000 Gets, each from a caller id never seen before, in a few seconds; the
//!   gateway's resident memory at the peak and once the idle callers are forgotten.

use super::baseline::RawCodec;
use super::process::{Server, cores, http_get, pin_self};
use super::requests::{get_request, start_request};
use super::scenarios::{BenchError, BenchOptions, BenchStore, RawClient, connect, gateway, raw_clients, serve_args};
use crate::grpc::pb;
use crate::grpc::service::{GET, START};
use prost::Message as _;
use serde_json::{Value, json};
use std::time::Duration;
use tokio::time::Instant;

/// Percentiles of `samples` (microseconds), in milliseconds.
fn percentiles(mut samples: Vec<u64>) -> Value {
    samples.sort_unstable();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples.get(i).map_or(0.0, |us| (*us as f64 / 10.0).round() / 100.0)
    };
    json!({ "count": samples.len(), "p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": at(1.0) })
}

/// A Start that names `n` distinct queue ids (40 bytes each on the wire).
fn hostile_start(n: u64) -> bytes::Bytes {
    let mut req = start_request(1, 1, 1, &[pb::GroupBy::QueueId]);
    req.resources = Some(pb::start_aggregation_request::Resources::QueueIds(pb::ResourceIds {
        ids: (0..n).map(|n| format!("queue-{n:032x}")).collect(),
    }));
    bytes::Bytes::from(req.encode_to_vec())
}

pub(crate) async fn hostile(opts: &BenchOptions) -> Result<Value, BenchError> {
    let (server_core, load_core) = cores().map_or((None, None), |(s, l)| (Some(s), Some(l)));
    if let Some(core) = load_core {
        pin_self(core);
    }
    let gw = gateway(server_core, &[])?;
    let url = gw.url("listening on ").ok_or("no gRPC address")?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let probing = std::thread::spawn({
        let url = url.clone();
        move || probe_health(&url, stopped)
    });
    let clients = raw_clients(&url, 4).await?;
    let bogus = bytes::Bytes::from(get_request(&"x".repeat(4 * 1024 * 1024), 0, "", Duration::ZERO).encode_to_vec());
    // 4 MB Starts and Gets, and a Start just under the request limit that must be decoded.
    let kinds = [
        ("start_4mb", START.path, hostile_start(100_000)),
        ("get_4mb", GET.path, bogus),
        ("start_250kb", START.path, hostile_start(6_000)),
    ];
    let rounds = if opts.smoke { 3 } else { 30 };
    let mut refusals: std::collections::BTreeMap<&str, Vec<u64>> = Default::default();
    let mut codes = std::collections::BTreeMap::<String, u64>::new();
    let begin = Instant::now();
    for round in 0..rounds {
        let calls: Vec<_> = clients
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, client)| {
                let (kind, path, body) = kinds[(i + round) % kinds.len()].clone();
                tokio::spawn(async move {
                    let sent = Instant::now();
                    let code = raw_call(client, path, body).await;
                    (kind, code, sent.elapsed().as_micros() as u64)
                })
            })
            .collect();
        for call in calls {
            let (kind, code, took) = call.await?;
            *codes.entry(format!("{kind} {code:?}")).or_default() += 1;
            refusals.entry(kind).or_default().push(took);
        }
    }
    let elapsed = begin.elapsed();
    let rss = gw.rss_bytes();
    stop.send_replace(true);
    let health = probing.join().map_err(|_| "the health prober panicked")??;
    drop(gw);
    Ok(json!({
        "scenario": "hostile",
        "hostile_requests": refusals.values().map(Vec::len).sum::<usize>(),
        "codes": codes,
        "refusal": refusals.into_iter().map(|(k, v)| (k.to_owned(), percentiles(v))).collect::<serde_json::Map<_, _>>(),
        "health": percentiles(health),
        "elapsed_s": elapsed.as_secs_f64(),
        "gateway_rss_bytes": rss,
        "smoke": opts.smoke,
    }))
}

/// One raw unary call; its status code.
async fn raw_call(mut client: RawClient, path: &'static str, body: bytes::Bytes) -> tonic::Code {
    if client.ready().await.is_err() {
        return tonic::Code::Unavailable;
    }
    let path = http::uri::PathAndQuery::from_static(path);
    client.unary(tonic::Request::new(body), path, RawCodec).await.map_or_else(|s| s.code(), |_| tonic::Code::Ok)
}

/// Checks health every 10 ms on a thread and connection of its own (so the load generator's
/// own work never shows as health latency) until `stop`; the latencies in microseconds.
fn probe_health(url: &str, stop: tokio::sync::watch::Receiver<bool>) -> Result<Vec<u64>, BenchError> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let channel = tonic::transport::Channel::from_shared(url.to_owned())?.connect().await?;
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let mut latencies = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        while !*stop.borrow() {
            tick.tick().await;
            let sent = Instant::now();
            health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await?;
            latencies.push(sent.elapsed().as_micros() as u64);
        }
        Ok(latencies)
    })
}

/// The value of one series in a Prometheus/OpenMetrics text.
fn series(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

pub(crate) async fn callers(opts: &BenchOptions) -> Result<Value, BenchError> {
    let (server_core, load_core) = cores().map_or((None, None), |(s, l)| (Some(s), Some(l)));
    if let Some(core) = load_core {
        pin_self(core);
    }
    let args = serve_args();
    let gw = Server::start(server_core, &args, 3)?;
    let url = gw.url("listening on ").ok_or("no gRPC address")?;
    let admin = gw.url("admin on ").ok_or("no admin address")?;
    let clients = connect(&url, 8).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = gw.rss_bytes();
    let callers: u64 = if opts.smoke { 2_000 } else { 50_000 };
    let workers = 64u64;
    let begin = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let mut client = clients[w as usize % clients.len()].clone();
            tokio::spawn(async move {
                let mut refused = 0u64;
                for n in (w..callers).step_by(workers as usize) {
                    let mut req = tonic::Request::new(get_request("agg-unknown", 0, "", Duration::ZERO));
                    let caller = format!("caller-{n:08}-{}", "c".repeat(100));
                    if let Ok(value) = caller.parse() {
                        req.metadata_mut().insert("x-caller-id", value);
                    }
                    if client.get_aggregation(req).await.err().is_some_and(|s| s.code() != tonic::Code::NotFound) {
                        refused += 1;
                    }
                }
                refused
            })
        })
        .collect();
    let mut unexpected = 0;
    for t in tasks {
        unexpected += t.await?;
    }
    let sent_in = begin.elapsed();
    let peak = gw.rss_bytes();
    let buckets_at_peak = series(&http_get(&admin, "/metrics").await?, "dsg_caller_buckets");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let idle = gw.rss_bytes();
    let buckets_idle = series(&http_get(&admin, "/metrics").await?, "dsg_caller_buckets");
    drop(gw);
    let across_replicas = match opts.store {
        BenchStore::Memory => Value::Null,
        BenchStore::Redis => across_replicas(opts).await?,
    };
    Ok(json!({
        "scenario": "callers",
        "across_replicas": across_replicas,
        "callers": callers,
        "caller_id_bytes": 124,
        "seconds": sent_in.as_secs_f64(),
        "unexpected_answers": unexpected,
        "rss_before_bytes": before,
        "rss_peak_bytes": peak,
        "rss_idle_bytes": idle,
        "rss_growth_per_caller_bytes": (peak.saturating_sub(before) as f64 / callers as f64).round(),
        "caller_buckets_at_peak": buckets_at_peak,
        "caller_buckets_idle": buckets_idle,
        "smoke": opts.smoke,
    }))
}

/// With `--store redis`: one caller sending Gets as fast as it can through three gateways on
/// one `redis-server`, its Get limit held across them (`--caller-limits global`) or by each
/// (`local`): how many went through against how many the limit allows in the window.
async fn across_replicas(opts: &BenchOptions) -> Result<Value, BenchError> {
    const RATE: f64 = 50.0;
    const BURST: u32 = 10;
    let redis = super::replicas::Redis::start()?;
    let url = redis.url();
    let window = if opts.smoke { Duration::from_secs(2) } else { opts.duration };
    let mut report = serde_json::Map::new();
    for mode in ["global", "local"] {
        let mut gateways = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..3 {
            let mut args = serve_args();
            let (rate, burst) = (RATE.to_string(), BURST.to_string());
            let limits = ["--caller-get-rate", &rate, "--caller-get-burst", &burst, "--caller-limits", mode];
            let store = ["--store", "redis", "--redis-url", &url, "--caller-start-rate", "0"];
            args.extend(store.iter().chain(&limits).map(|a| (*a).to_owned()));
            let gw = Server::start(None, &args, 3)?;
            clients.extend(connect(&gw.url("listening on ").ok_or("no gRPC address")?, 1).await?);
            gateways.push(gw);
        }
        let end = Instant::now() + window;
        let senders: Vec<_> = clients
            .into_iter()
            .map(|mut client| {
                tokio::spawn(async move {
                    let mut through = 0u64;
                    while Instant::now() < end {
                        let mut req = tonic::Request::new(get_request("agg-unknown", 0, "", Duration::ZERO));
                        req.metadata_mut()
                            .insert("x-caller-id", tonic::metadata::MetadataValue::from_static("one-caller"));
                        if client
                            .get_aggregation(req)
                            .await
                            .err()
                            .is_none_or(|s| s.code() != tonic::Code::ResourceExhausted)
                        {
                            through += 1;
                        }
                    }
                    through
                })
            })
            .collect();
        let mut through = 0;
        for sender in senders {
            through += sender.await?;
        }
        let allowed = RATE * window.as_secs_f64() + f64::from(BURST);
        report.insert(
            mode.to_owned(),
            json!({
                "through": through,
                "allowed": allowed,
                "ratio": (through as f64 / allowed * 1000.0).round() / 1000.0,
            }),
        );
    }
    Ok(json!({ "replicas": 3, "get_rate": RATE, "get_burst": BURST, "seconds": window.as_secs_f64(), "modes": report }))
}
