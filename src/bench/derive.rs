//! `bench derive`: a dashboard mix on one farm. A weekly superset (10 queues, 7 days, daily,
//! grouped by queue, every statistic) completes first; then 200 distinct requests arrive at
//! once, 60 % of them inside the superset (some queues, whole days of the week, some
//! statistics: derivable) and 40 % not (a window that ends mid-day: each must run upstream).
//! Measured twice in one run: with `--derive true` and with `--derive false`.
//!
//! Reported per side: upstream Starts (the superset's included), the time to rows of the 200
//! (Start to rows in hand) p50/p99/max, and the farm-queue makespan (the first of the 200
//! Starts to the last rows in hand).

use super::process::{cores, pin_self};
use super::requests::{WINDOW_START, queue, start_request};
use super::scenarios::{BenchError, BenchOptions, FAST_AND_UNPACED, connect, finish, gateway, ratio, upstream_stats};
use crate::grpc::pb::{self, Disposition};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use std::time::Duration;
use tokio::time::Instant;

/// The dashboard's farm.
const FARM: u64 = 710;
const DAY: i64 = 86_400;
/// Queues of the superset.
const QUEUES: u64 = 10;
/// Statistics, as subsets are drawn from them.
const STATISTICS: [pb::Statistic; 4] = [pb::Statistic::Sum, pb::Statistic::Avg, pb::Statistic::Min, pb::Statistic::Max];

struct Shape {
    requests: usize,
    derivable_share: f64,
    run: Duration,
}

struct RunReport {
    time_to_rows: Histogram<u64>,
    makespan: Duration,
    upstream_starts: u64,
    derived: u64,
}

type Client = pb::aggregation_service_client::AggregationServiceClient<tonic::transport::Channel>;

pub(crate) async fn derive(opts: &BenchOptions) -> Result<Value, BenchError> {
    let (server_core, load_core) = cores().map_or((None, None), |(s, l)| (Some(s), Some(l)));
    if let Some(core) = load_core {
        pin_self(core);
    }
    let shape = if opts.smoke {
        Shape { requests: 20, derivable_share: 0.6, run: Duration::from_millis(100) }
    } else {
        Shape { requests: 200, derivable_share: 0.6, run: Duration::from_millis(500) }
    };
    let with = one_run(server_core, &shape, true).await?;
    let without = one_run(server_core, &shape, false).await?;
    // Recorded in µs.
    let ms = |h: &Histogram<u64>, q: f64| (h.value_at_quantile(q) as f64 / 100.0).round() / 10.0;
    let side = |r: &RunReport| {
        json!({
            "upstream_starts": r.upstream_starts,
            "derived": r.derived,
            "time_to_rows_ms": {
                "p50": ms(&r.time_to_rows, 0.5),
                "p99": ms(&r.time_to_rows, 0.99),
                "max": ms(&r.time_to_rows, 1.0),
            },
            "makespan_s": (r.makespan.as_secs_f64() * 1000.0).round() / 1000.0,
        })
    };
    Ok(json!({
        "scenario": "derive",
        "requests": shape.requests,
        "derivable": derivable_count(&shape),
        "upstream_run_s": shape.run.as_secs_f64(),
        "derive": side(&with),
        "no_derive": side(&without),
        "upstream_starts_saved": without.upstream_starts.saturating_sub(with.upstream_starts),
        "makespan_no_derive_over_derive": ratio(without.makespan.as_secs_f64(), with.makespan.as_secs_f64()),
        "time_to_rows_p50_no_derive_over_derive": ratio(ms(&without.time_to_rows, 0.5), ms(&with.time_to_rows, 0.5)),
        "pinned": server_core.is_some(),
    }))
}

fn derivable_count(shape: &Shape) -> usize {
    (shape.requests as f64 * shape.derivable_share).round() as usize
}

/// One gateway (deriving or not) on a fresh emulator: the superset, then the mix.
async fn one_run(core: Option<usize>, shape: &Shape, derive: bool) -> Result<RunReport, BenchError> {
    let run = format!("{}ms", shape.run.as_millis());
    let flags = [
        &["--emulator-aggregation-duration", &run, "--derive", if derive { "true" } else { "false" }][..],
        &["--farm-queue-capacity", "1000", "--farm-queue-caller-share", "1"][..],
        &FAST_AND_UNPACED[..],
    ]
    .concat();
    let gw = gateway(core, &flags)?;
    let url = gw.url("listening on ").ok_or("no gRPC address")?;
    let clients = connect(&url, 4).await?;
    let (superset, _) = start(&clients[0], week()).await?;
    rows(clients[0].clone(), superset).await?;
    let begin = Instant::now();
    let derivable = derivable_count(shape);
    let mut inside = inside(derivable).into_iter();
    let mut tasks = Vec::new();
    for n in 0..shape.requests {
        let request = inside.next().unwrap_or_else(|| outside(n));
        let client = clients[n % clients.len()].clone();
        tasks.push(tokio::spawn(async move {
            let asked = Instant::now();
            let (id, disposition) = start(&client, request).await?;
            rows(client, id).await?;
            Ok::<_, BenchError>((asked.elapsed(), disposition))
        }));
    }
    let mut time_to_rows = Histogram::<u64>::new(3)?;
    let mut derived = 0;
    for task in tasks {
        let (took, disposition) = task.await??;
        time_to_rows.record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX))?;
        derived += u64::from(disposition == Disposition::Derived);
    }
    let makespan = begin.elapsed();
    let stats = upstream_stats(&gw).await?;
    let upstream_starts = stats["farms"][super::requests::farm(FARM)]["start_calls"].as_u64().unwrap_or_default();
    drop(gw);
    Ok(RunReport { time_to_rows, makespan, upstream_starts, derived })
}

/// The farm's week: queues `0..QUEUES`, daily, grouped by queue, every statistic.
fn week() -> pb::StartAggregationRequest {
    let mut r = start_request(FARM, QUEUES, 7, &[pb::GroupBy::QueueId]);
    r.period = pb::Period::Daily as i32;
    r.statistics = STATISTICS.map(|s| s as i32).to_vec();
    r
}

/// `n` distinct requests inside the week (none the week itself): each a run of queues, whole
/// days of the week, some statistics.
fn inside(n: usize) -> Vec<pb::StartAggregationRequest> {
    let mut draw = Draw(1);
    let mut drawn = std::collections::HashSet::new();
    drawn.insert((0, QUEUES, 0, 7, 15));
    let mut requests = Vec::new();
    while requests.len() < n {
        let first = draw.below(QUEUES);
        let shape = (first, 1 + draw.below(QUEUES - first), draw.below(7), 0, 1 + draw.below(15));
        let shape = (shape.0, shape.1, shape.2, shape.2 + 1 + draw.below(7 - shape.2), shape.4);
        if drawn.insert(shape) {
            requests.push(inside_as(shape));
        }
    }
    requests
}

/// The request inside the week of queues `first..first + count`, days `from..to` and the
/// statistics of `mask`.
fn inside_as((first, count, from, to, mask): (u64, u64, u64, u64, u64)) -> pb::StartAggregationRequest {
    let mut r = week();
    r.resources = Some(pb::start_aggregation_request::Resources::QueueIds(pb::ResourceIds {
        ids: (first..first + count).map(queue).collect(),
    }));
    r.start_time =
        Some(prost_types::Timestamp { seconds: WINDOW_START + i64::try_from(from).unwrap_or(0) * DAY, nanos: 0 });
    r.end_time =
        Some(prost_types::Timestamp { seconds: WINDOW_START + i64::try_from(to).unwrap_or(0) * DAY, nanos: 0 });
    r.statistics = (0..4).filter(|i| mask & (1 << i) != 0).map(|i| STATISTICS[i as usize] as i32).collect();
    r
}

/// The `n`th request the week does not contain: one queue, from a day's start to its noon
/// (a window that cuts a bucket), distinct by its length in days.
fn outside(n: usize) -> pb::StartAggregationRequest {
    let mut r = start_request(FARM, 1, 1, &[pb::GroupBy::QueueId]);
    r.period = pb::Period::Daily as i32;
    let days = i64::try_from(n).unwrap_or(0);
    r.end_time = Some(prost_types::Timestamp { seconds: WINDOW_START + days * DAY + DAY / 2, nanos: 0 });
    r
}

/// A small deterministic generator (splitmix64): the same mix every run.
struct Draw(u64);

impl Draw {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n.max(1)
    }
}

async fn start(client: &Client, request: pb::StartAggregationRequest) -> Result<(String, Disposition), BenchError> {
    let answer = client.clone().start_aggregation(request).await?.into_inner();
    let disposition = answer.disposition();
    Ok((answer.aggregation.map(|a| a.aggregation_id).unwrap_or_default(), disposition))
}

/// Long-polls `id` until it is COMPLETED, its first page of rows in hand.
async fn rows(mut client: Client, id: String) -> Result<(), BenchError> {
    finish(&mut client, &id).await.map(|_| ())
}
