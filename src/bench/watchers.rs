//! `bench watchers`: many callers waiting on few aggregations. 100 aggregations on 10 farms
//! (ten after one another on each, so they complete over time), each watched by 100 callers:
//! half through WatchAggregation streams, half through GetAggregation long-polls, 10,000 in
//! all, over connections of at most 500 streams each.
//!
//! - `rss_bytes_per_watcher`: the gateway's resident memory once every watcher is attached,
//!   less what it was before the first attached, per watcher attached.
//! - `wake_p50_ms` / `wake_p99_ms`: from the gateway completing an aggregation (the time of its
//!   "aggregation completed" log line) to each watcher receiving COMPLETED, over the watchers
//!   that were attached before it completed.
//! - `upstream_gets`: the upstream Get calls the gateway made, against a second run with one
//!   watcher per aggregation: the watchers add none.

use super::process::{Server, cores, http_get, pin_self};
use super::requests::{farm, get_request, start_request};
use super::scenarios::{BenchError, BenchOptions, connect, ratio, serve_args, string};
use crate::grpc::pb::{self, AggregationState, WatchAggregationRequest};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::{Duration, SystemTime};

/// Streams one connection carries (the server allows 1,024).
const STREAMS_PER_CONNECTION: usize = 500;
const FARMS: u64 = 10;

/// What one watcher saw: when it was attached, and when COMPLETED reached it.
struct Seen {
    aggregation: String,
    attached: SystemTime,
    completed: SystemTime,
}

/// One run: `per_aggregation` watchers on each of `farms × per_farm` aggregations.
struct Run {
    seen: Vec<Seen>,
    rss_before: u64,
    rss_attached: u64,
    attached: usize,
    /// When the gateway completed each aggregation, from its log.
    completions: HashMap<String, SystemTime>,
    upstream_gets: u64,
}

pub(crate) async fn watchers(opts: &BenchOptions) -> Result<Value, BenchError> {
    let (server_core, load_core) = cores().map_or((None, None), |(s, l)| (Some(s), Some(l)));
    if let Some(core) = load_core {
        pin_self(core);
    }
    let (per_farm, per_aggregation, duration) =
        if opts.smoke { (2, 10, Duration::from_millis(1500)) } else { (10, 100, Duration::from_secs(3)) };
    let many = run(server_core, per_farm, per_aggregation, duration).await?;
    let one = run(server_core, per_farm, 1, duration).await?;
    let mut wakes: Vec<f64> = many
        .seen
        .iter()
        .filter_map(|s| {
            let done = many.completions.get(&s.aggregation)?;
            (s.attached < *done).then(|| s.completed.duration_since(*done).unwrap_or_default().as_secs_f64() * 1e3)
        })
        .collect();
    wakes.sort_by(f64::total_cmp);
    let at = |q: f64| wakes.get(((wakes.len().max(1) - 1) as f64 * q).round() as usize).copied().unwrap_or(0.0);
    let round = |x: f64| (x * 100.0).round() / 100.0;
    let aggregations = FARMS * per_farm;
    let grown = many.rss_attached.saturating_sub(many.rss_before);
    Ok(json!({
        "scenario": "watchers",
        "aggregations": aggregations,
        "watchers": aggregations as usize * per_aggregation,
        "streams": aggregations as usize * per_aggregation / 2,
        "long_polls": aggregations as usize * (per_aggregation - per_aggregation / 2),
        "attached_at_measurement": many.attached,
        "rss_before_bytes": many.rss_before,
        "rss_attached_bytes": many.rss_attached,
        "rss_bytes_per_watcher": grown / many.attached.max(1) as u64,
        "woken_before_completion": wakes.len(),
        "wake_p50_ms": round(at(0.5)),
        "wake_p99_ms": round(at(0.99)),
        "wake_max_ms": round(at(1.0)),
        "upstream_gets": many.upstream_gets,
        "upstream_gets_with_one_watcher_each": one.upstream_gets,
        "upstream_gets_ratio": ratio(many.upstream_gets as f64, one.upstream_gets as f64),
        "aggregation_duration_s": duration.as_secs_f64(),
    }))
}

async fn run(
    core: Option<usize>,
    per_farm: u64,
    per_aggregation: usize,
    duration: Duration,
) -> Result<Run, BenchError> {
    let log_path = std::env::temp_dir().join(format!("dsg-watchers-{}-{per_aggregation}.log", std::process::id()));
    let log = std::fs::File::create(&log_path)?;
    let mut args = serve_args();
    let duration_flag = format!("{}ms", duration.as_millis());
    for flag in [
        "--caller-start-rate",
        "0",
        "--caller-get-rate",
        "0",
        "--emulator-aggregation-duration",
        &duration_flag,
        "--poll-initial-interval",
        "100ms",
        "--poll-max-interval",
        "200ms",
    ] {
        args.push(string(flag));
    }
    let gw = Server::start_logging(core, &args, 3, log)?;
    let url = gw.url("listening on ").ok_or("no gRPC address")?;
    let watchers = (FARMS * per_farm) as usize * per_aggregation;
    let mut clients = connect(&url, watchers.div_ceil(STREAMS_PER_CONNECTION).max(1)).await?;
    let mut ids = Vec::new();
    for i in 0..FARMS * per_farm {
        let request = start_request(300 + i % FARMS, 1, 1 + (i / FARMS) as i64, &[pb::GroupBy::QueueId]);
        let started = clients[0].start_aggregation(request).await?.into_inner();
        ids.push(started.aggregation.unwrap_or_default().aggregation_id);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_before = gw.rss_bytes();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Result<Seen, String>>();
    let mut n = 0usize;
    for id in &ids {
        for w in 0..per_aggregation {
            let client = clients[n % clients.len()].clone();
            n += 1;
            let (tx, id) = (tx.clone(), id.clone());
            if w % 2 == 0 {
                tokio::spawn(async move { tx.send(stream(client, id).await) });
            } else {
                tokio::spawn(async move { tx.send(long_poll(client, id).await) });
            }
        }
    }
    drop(tx);
    // Attached: as many streams and long-polls as the gateway counts open (it may be fewer if
    // an aggregation completed meanwhile).
    let admin = gw.url("admin on ").ok_or("no admin address")?;
    let deadline = tokio::time::Instant::now() + duration;
    let mut attached = 0;
    while tokio::time::Instant::now() < deadline {
        attached = waiting(&admin).await.unwrap_or(0);
        if attached >= watchers {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rss_attached = gw.rss_bytes();
    let mut seen = Vec::new();
    while let Some(s) = rx.recv().await {
        seen.push(s.map_err(|e| -> BenchError { e.into() })?);
    }
    let stats = serde_json::from_str::<Value>(
        &http_get(&gw.url("upstream on ").ok_or("no emulator")?, "/_emulator/stats").await?,
    )?;
    let upstream_gets = (0..FARMS).map(|f| stats["farms"][farm(300 + f)]["get_calls"].as_u64().unwrap_or(0)).sum();
    drop(clients.drain(..));
    drop(gw);
    let completions = completions(&std::fs::read_to_string(&log_path)?);
    let _ = std::fs::remove_file(&log_path);
    Ok(Run { seen, rss_before, rss_attached, attached: attached.min(watchers), completions, upstream_gets })
}

/// Watch streams plus long-polls open at the gateway, from its metrics.
async fn waiting(admin: &str) -> Option<usize> {
    let text = http_get(admin, "/metrics").await.ok()?;
    let gauge = |name: &str| {
        let line = text.lines().find(|l| l.split(' ').next() == Some(name))?;
        line.rsplit(' ').next()?.parse::<f64>().ok().map(|v| v as usize)
    };
    Some(gauge("dsg_watch_streams")? + gauge("dsg_long_polls")?)
}

/// When the gateway completed each aggregation: its "aggregation completed" log lines.
fn completions(log: &str) -> HashMap<String, SystemTime> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == "aggregation completed")
        .filter_map(|v| {
            let at = chrono::DateTime::parse_from_rfc3339(v["timestamp"].as_str()?).ok()?;
            Some((v["aggregation"].as_str()?.to_owned(), SystemTime::from(at)))
        })
        .collect()
}

type Client = crate::grpc::pb::aggregation_service_client::AggregationServiceClient<tonic::transport::Channel>;

/// A WatchAggregation stream until COMPLETED.
async fn stream(mut client: Client, id: String) -> Result<Seen, String> {
    let attached = SystemTime::now();
    let request = WatchAggregationRequest { aggregation_id: id.clone() };
    let mut stream = client.watch_aggregation(request).await.map_err(|e| e.to_string())?.into_inner();
    while let Some(agg) = stream.message().await.map_err(|e| e.to_string())? {
        if agg.state() == AggregationState::Completed {
            return Ok(Seen { aggregation: id, attached, completed: SystemTime::now() });
        }
    }
    Err(format!("the watch of {id} ended before COMPLETED"))
}

/// GetAggregation long-polls until COMPLETED.
async fn long_poll(mut client: Client, id: String) -> Result<Seen, String> {
    let attached = SystemTime::now();
    loop {
        let page = client
            .get_aggregation(get_request(&id, 0, "", Duration::from_secs(60)))
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        match page.aggregation.map(|a| a.state()) {
            Some(AggregationState::Completed) => {
                return Ok(Seen { aggregation: id, attached, completed: SystemTime::now() });
            }
            Some(AggregationState::Failed | AggregationState::TimedOut) => return Err(format!("{id} failed")),
            _ => {}
        }
    }
}
