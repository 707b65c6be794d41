//! `bench fairness`: one farm shared by a backfill and a dashboard. The backfill caller submits
//! 90 distinct batch aggregations at once; the dashboard caller sends one interactive
//! aggregation every 10 s until the backfill is done. Each aggregation runs 2 s upstream (the
//! emulator's), so the farm is busy for the whole run. Measured twice in one run: with fair
//! queueing, and with `--fair-queueing false` (arrival order, as before it existed).
//!
//! Reported: the dashboard's time to rows (its Start to its rows in hand) p50/p99/max, and the
//! farm's makespan (the first Start to the last rows) against its lower bound (every
//! aggregation's upstream run back to back). Targets: the dashboard's p99 within a few runs
//! with fair queueing; makespan at most 1.05 × the lower bound (fairness must not waste
//! upstream time).

use super::process::{cores, pin_self};
use super::requests::{get_request, start_request};
use super::scenarios::{BenchError, BenchOptions, FAST_AND_UNPACED, connect, gateway, ratio};
use crate::grpc::pb::{self, AggregationState};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use std::time::Duration;
use tokio::time::Instant;

/// The shared farm.
const FARM: u64 = 700;

struct Shape {
    batch: i64,
    run: Duration,
    every: Duration,
}

struct RunReport {
    /// The dashboard's times to rows.
    dashboard: Histogram<u64>,
    makespan: Duration,
    aggregations: u64,
}

pub(crate) async fn fairness(opts: &BenchOptions) -> Result<Value, BenchError> {
    let (server_core, load_core) = cores().map_or((None, None), |(s, l)| (Some(s), Some(l)));
    if let Some(core) = load_core {
        pin_self(core);
    }
    let shape = if opts.smoke {
        Shape { batch: 6, run: Duration::from_millis(150), every: Duration::from_millis(400) }
    } else {
        Shape { batch: 90, run: Duration::from_secs(2), every: Duration::from_secs(10) }
    };
    let fair = one_run(server_core, &shape, true).await?;
    let fifo = one_run(server_core, &shape, false).await?;
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let side = |r: &RunReport| {
        let lower_bound = shape.run * u32::try_from(r.aggregations).unwrap_or(u32::MAX);
        json!({
            "dashboard_aggregations": r.dashboard.len(),
            "dashboard_time_to_rows_s": {
                "p50": ms(&r.dashboard, 0.5),
                "p99": ms(&r.dashboard, 0.99),
                "max": r.dashboard.max() as f64 / 1000.0,
            },
            "aggregations": r.aggregations,
            "makespan_s": (r.makespan.as_secs_f64() * 1000.0).round() / 1000.0,
            "lower_bound_s": lower_bound.as_secs_f64(),
            "makespan_ratio": ratio(r.makespan.as_secs_f64(), lower_bound.as_secs_f64()),
        })
    };
    Ok(json!({
        "scenario": "fairness",
        "batch_aggregations": shape.batch,
        "upstream_run_s": shape.run.as_secs_f64(),
        "dashboard_every_s": shape.every.as_secs_f64(),
        "fair": side(&fair),
        "fifo": side(&fifo),
        "dashboard_p99_fifo_over_fair": ratio(ms(&fifo.dashboard, 0.99), ms(&fair.dashboard, 0.99)),
        "target_makespan_ratio": 1.05,
        "pinned": server_core.is_some(),
    }))
}

/// One gateway (fair or not) on a fresh emulator: the backfill and the dashboard.
async fn one_run(core: Option<usize>, shape: &Shape, fair: bool) -> Result<RunReport, BenchError> {
    let run = format!("{}ms", shape.run.as_millis());
    let fair_flag = if fair { "true" } else { "false" };
    let flags = [
        &["--emulator-aggregation-duration", &run, "--fair-queueing", fair_flag][..],
        &["--farm-queue-capacity", "1000"][..],
        &FAST_AND_UNPACED[..],
    ]
    .concat();
    let gw = gateway(core, &flags)?;
    let url = gw.url("listening on ").ok_or("no gRPC address")?;
    let clients = connect(&url, 2).await?;
    let begin = Instant::now();
    let mut backfill = Vec::new();
    for days in 1..=shape.batch {
        let id = start(&clients[0], days, "backfill", pb::Priority::Batch).await?;
        backfill.push(tokio::spawn(rows(clients[0].clone(), id)));
    }
    // The dashboard, until the backfill is done.
    let mut dashboard = Histogram::<u64>::new(3)?;
    let mut sent = 0;
    let mut tick = tokio::time::interval(shape.every);
    tick.tick().await;
    let mut pending = Vec::new();
    while backfill.iter().any(|t| !t.is_finished()) {
        tick.tick().await;
        if backfill.iter().all(tokio::task::JoinHandle::is_finished) {
            break;
        }
        sent += 1;
        let client = clients[1].clone();
        pending.push(tokio::spawn(async move {
            let asked = Instant::now();
            let id = start(&client, sent, "dashboard", pb::Priority::Interactive).await?;
            rows(client, id).await?;
            Ok::<Duration, BenchError>(asked.elapsed())
        }));
    }
    for task in backfill {
        task.await??;
    }
    for task in pending {
        let took = task.await??;
        dashboard.record(u64::try_from(took.as_millis()).unwrap_or(u64::MAX))?;
    }
    let makespan = begin.elapsed();
    drop(gw);
    Ok(RunReport { dashboard, makespan, aggregations: u64::try_from(shape.batch + sent).unwrap_or(0) })
}

type Client = pb::aggregation_service_client::AggregationServiceClient<tonic::transport::Channel>;

/// A Start of `days` days (daily) on the shared farm as `caller`; its id. The dashboard's
/// group by queue, so that its requests are distinct from the backfill's.
async fn start(client: &Client, days: i64, caller: &str, priority: pb::Priority) -> Result<String, BenchError> {
    let group = if priority == pb::Priority::Interactive { pb::GroupBy::QueueId } else { pb::GroupBy::UsageType };
    let mut message = start_request(FARM, 1, days, &[group]);
    message.period = pb::Period::Daily as i32;
    message.priority = priority as i32;
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("x-caller-id", caller.parse()?);
    let answer = client.clone().start_aggregation(request).await?.into_inner();
    Ok(answer.aggregation.map(|a| a.aggregation_id).unwrap_or_default())
}

/// Long-polls `id` until its rows are in hand (its first page, COMPLETED).
async fn rows(mut client: Client, id: String) -> Result<(), BenchError> {
    loop {
        let page = client.get_aggregation(get_request(&id, 100, "", Duration::from_secs(30))).await?.into_inner();
        let agg = page.aggregation.unwrap_or_default();
        match agg.state() {
            AggregationState::Completed => return Ok(()),
            AggregationState::Failed | AggregationState::TimedOut => {
                return Err(format!("{id} ended {:?}: {}", agg.state(), agg.status_message).into());
            }
            _ => {}
        }
    }
}
