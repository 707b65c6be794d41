//! `bench console`: the cache-hit path while the operator console is read. One gateway (pinned
//! to its core) holds 1,000 farms with work, one aggregation running on each and nine queued
//! behind it (10,000 active; the emulator's aggregations then take an hour), and serves pages
//! of a completed result to a closed-loop load. In alternate turns of two seconds a poller
//! reads the console's JSON every second (the overview, the first 100 farms, a farm's queue
//! and an aggregation), as an open console and a script would. Target: throughput with the
//! poller at least 0.98 × without; the console's answers in milliseconds.

use super::loadgen::{LoadReport, closed_loop};
use super::process::{Server, cores, http_get, http_post, pin_self};
use super::replicas::emulator_as_aws;
use super::requests::start_request;
use super::scenarios::{
    BenchError, BenchOptions, BenchStore, RawClient, connect, ratio, raw_clients, raw_get, string, with_a_result,
};
use crate::grpc::pb;
use futures::StreamExt as _;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// One turn with the poller, one without.
const TURN: Duration = Duration::from_secs(2);
/// Aggregations per farm: one running, the rest queued.
const PER_FARM: u64 = 10;
/// The console's paths the poller reads each second (`{farm}` and `{id}` filled in).
const PATHS: [&str; 4] = [
    "/api/v1/overview",
    "/api/v1/farms?limit=100&order=queued",
    "/api/v1/farms/{farm}?limit=50",
    "/api/v1/aggregations/{id}",
];

pub(crate) async fn console(opts: &BenchOptions) -> Result<Value, BenchError> {
    let (server_core, load_core) = cores().map_or((None, None), |(s, l)| (Some(s), Some(l)));
    if let Some(core) = load_core {
        pin_self(core);
    }
    let farms: u64 = if opts.smoke { 20 } else { 1000 };
    let emulator_args: Vec<String> =
        ["emulator", "--listen", "127.0.0.1:0", "--aggregation-duration", "200ms"].into_iter().map(string).collect();
    let emulator = Server::start(load_core, &emulator_args, 1)?;
    let endpoint = emulator.url("listening on ").ok_or("no emulator address")?;
    let mut args: Vec<String> = [
        "serve",
        "--upstream",
        "aws",
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
        "--upstream-start-rate",
        "0",
        "--poll-initial-interval",
        "20ms",
    ]
    .into_iter()
    .map(string)
    .collect();
    // With `--store redis`, on a redis-server of its own.
    let redis = match opts.store {
        BenchStore::Memory => None,
        BenchStore::Redis => Some(super::replicas::Redis::start()?),
    };
    if let Some(redis) = &redis {
        args.extend(["--store".into(), "redis".into(), "--redis-url".into(), redis.url()]);
    }
    let env = emulator_as_aws(&endpoint);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let gw = Server::start_with_env(server_core, &args, &env, 2)?;
    let url = gw.url("listening on ").ok_or("no gRPC address")?;
    let admin = gw.url("admin on ").ok_or("no admin address")?;
    let (request, _) = with_a_result(&gw).await?;

    // From now on the upstream takes an hour: the farms keep their work while measured.
    http_post(&endpoint, "/_emulator/faults", r#"{"aggregation_duration_ms": 3600000}"#).await?;
    let fill_started = Instant::now();
    let ids = fill(&url, farms).await?;
    let running = until_running(&admin, farms).await?;
    let filled_in = fill_started.elapsed();

    let clients = raw_clients(&url, opts.connections).await?;
    let first = ids.first().cloned().unwrap_or_default();
    let (polling, done) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let poller = tokio::spawn(poll(admin.clone(), ids, polling.clone(), done.clone()));
    // Warm up, then turns: without the poller in even ones, with it in odd ones.
    load(&clients, &request, Duration::from_millis(500), opts).await;
    let turns = if opts.smoke { 2 } else { (opts.duration.as_millis() / TURN.as_millis()).max(2) as u32 };
    let (mut off, mut on) = (LoadReport::empty(), LoadReport::empty());
    for turn in 0..turns {
        let with = turn % 2 == 1;
        polling.store(with, Ordering::Relaxed);
        let report = load(&clients, &request, TURN, opts).await;
        if with { on.merge(&report) } else { off.merge(&report) }
    }
    polling.store(false, Ordering::Relaxed);
    done.store(true, Ordering::Relaxed);
    let latencies = poller.await.unwrap_or_default();
    let answers = answer_sizes(&admin, &first).await;
    drop(gw);
    drop(redis);
    Ok(json!({
        "scenario": "console",
        "store": opts.store.name(),
        "farms": farms,
        "aggregations": farms * PER_FARM,
        "running": running,
        "filled_in_seconds": filled_in.as_secs_f64().round(),
        "rps_without_console": off.rps().round(),
        "rps_with_console": on.rps().round(),
        "throughput_ratio": ratio(on.rps(), off.rps()),
        "target_throughput_ratio": 0.98,
        "p99_us_without_console": off.percentile_us(0.99),
        "p99_us_with_console": on.percentile_us(0.99),
        "errors": off.errors + on.errors,
        "console_answer_ms": latencies,
        "console_answer_bytes": answers,
        "turns": turns,
        "pinned": server_core.is_some(),
        "concurrency": opts.concurrency,
        "connections": opts.connections,
    }))
}

/// A closed-loop phase of GetAggregation of the completed result.
async fn load(clients: &[RawClient], request: &bytes::Bytes, length: Duration, opts: &BenchOptions) -> LoadReport {
    let request = request.clone();
    closed_loop(clients, opts.concurrency, length, move |c: RawClient| raw_get(c, request.clone())).await
}

/// Queues `PER_FARM` distinct aggregations on each of `farms` farms; one id per farm.
async fn fill(url: &str, farms: u64) -> Result<Vec<(String, String)>, BenchError> {
    let clients = connect(url, 8).await?;
    let starts = (0..farms).flat_map(|f| (0..PER_FARM).map(move |k| (f, k)));
    let answers: Vec<Result<Option<(String, String)>, BenchError>> = futures::stream::iter(starts)
        .map(|(f, k)| {
            let mut client = clients[(f % 8) as usize].clone();
            async move {
                let request = start_request(5000 + f, 1, 1 + k as i64, &[pb::GroupBy::UsageType]);
                let farm = request.farm_id.clone();
                let started = client.start_aggregation(request).await?.into_inner();
                let id = started.aggregation.map(|a| a.aggregation_id).unwrap_or_default();
                Ok((k == 0).then_some((farm, id)))
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let mut heads = Vec::new();
    for answer in answers {
        heads.extend(answer?);
    }
    Ok(heads)
}

/// Waits until every farm's head runs upstream (as the console counts it); how many run.
async fn until_running(admin: &str, farms: u64) -> Result<u64, BenchError> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let overview: Value = serde_json::from_str(&http_get(admin, "/api/v1/overview").await?)?;
        let running = overview["work"]["running"].as_u64().unwrap_or(0);
        if running >= farms || Instant::now() > deadline {
            return Ok(running);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Each second while `polling`, until `done`, reads every console path; the latencies per
/// path, in ms.
async fn poll(admin: String, heads: Vec<(String, String)>, polling: Arc<AtomicBool>, done: Arc<AtomicBool>) -> Value {
    let mut histograms: Vec<Histogram<u64>> = PATHS.iter().map(|_| Histogram::new(3).expect("a histogram")).collect();
    let mut n = 0usize;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while !done.load(Ordering::Relaxed) {
        tick.tick().await;
        if !polling.load(Ordering::Relaxed) {
            continue;
        }
        let (farm, id) = heads.get(n % heads.len().max(1)).cloned().unwrap_or_default();
        n += 1;
        for (i, path) in PATHS.iter().enumerate() {
            let path = path.replace("{farm}", &farm).replace("{id}", &id);
            let began = Instant::now();
            if http_get(&admin, &path).await.is_ok() {
                let _ = histograms[i].record(began.elapsed().as_micros() as u64);
            }
        }
    }
    let ms = |us: u64| (us as f64 / 10.0).round() / 100.0;
    PATHS
        .iter()
        .zip(&histograms)
        .map(|(path, h)| {
            let summary = json!({
                "reads": h.len(),
                "p50": ms(h.value_at_quantile(0.5)),
                "p99": ms(h.value_at_quantile(0.99)),
                "max": ms(h.max()),
            });
            ((*path).to_owned(), summary)
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// The size of each console answer, read once (`{farm}` and `{id}` of `head`).
async fn answer_sizes(admin: &str, head: &(String, String)) -> Value {
    let mut sizes = serde_json::Map::new();
    for path in PATHS {
        let filled = path.replace("{farm}", &head.0).replace("{id}", &head.1);
        let bytes = http_get(admin, &filled).await.map_or(0, |body| body.len());
        sizes.insert(path.to_owned(), json!(bytes));
    }
    sizes.into()
}
