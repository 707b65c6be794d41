//! `bench chaos`: three gateway processes on a Redis primary with two replicas and a Sentinel
//! (`--redis-url redis+sentinel://…`, `--redis-wait-replicas 1`), in front of one emulator
//! process. 200 aggregations on 20 farms are started (a Start refused as unavailable or full is
//! retried, as a client does), and every few seconds a fault strikes: `CLIENT PAUSE` of the
//! primary's writes past the response timeout, a Sentinel failover, a gateway SIGKILLed (and
//! started again on its port), a gateway SIGSTOPped past its lease (10 s). The same run without
//! faults is the baseline.
//!
//! The report: aggregations accepted, completed, lost (accepted, never COMPLETED: must be 0),
//! double Starts (upstream aggregations beyond one per accepted aggregation: must be 0), the
//! most aggregations ever in progress on a farm (must be 1), and completion time p50/p99 with
//! and without faults. Needs `redis-server` on the PATH (it runs the Sentinel too).

use super::process::{Server, http_get};
use super::replicas::{Redis, emulator_as_aws, serve_on_redis};
use super::requests::{farm, get_request, start_request};
use super::scenarios::{BenchError, BenchOptions, string};
use crate::grpc::pb;
use crate::grpc::pb::aggregation_service_client::AggregationServiceClient;
use serde_json::{Value, json};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

type Client = AggregationServiceClient<tonic::transport::Channel>;

pub(crate) async fn chaos(opts: &BenchOptions) -> Result<Value, BenchError> {
    let calm = run(opts, false).await?;
    let stormy = run(opts, true).await?;
    Ok(json!({ "scenario": "chaos", "without_faults": calm, "with_faults": stormy, "smoke": opts.smoke }))
}

/// A command to the Redis (or Sentinel) at `port`.
async fn redis_cmd<T: redis::FromRedisValue>(port: u16, cmd: &mut redis::Cmd) -> Result<T, BenchError> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    Ok(tokio::time::timeout(Duration::from_secs(5), cmd.query_async(&mut conn)).await??)
}

/// Polls `check` every 100 ms for up to 30 s.
async fn until<F, Fut>(what: &str, mut check: F) -> Result<(), BenchError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await {
        if Instant::now() > deadline {
            return Err(format!("{what} did not happen within 30 s").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// The gateways, each on a fixed port so a restarted one is found where it was.
struct Gateways {
    args: Vec<Vec<String>>,
    env: Vec<(String, String)>,
    running: Vec<Option<Server>>,
}

impl Gateways {
    fn start(&mut self, n: usize) -> Result<(), BenchError> {
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        self.running[n] = Some(Server::start_with_env(None, &self.args[n], &env, 2)?);
        Ok(())
    }

    fn signal(&self, n: usize, signal: &str) {
        if let Some(server) = &self.running[n] {
            let _ = Command::new("kill").args([signal, &server.pid().to_string()]).status();
        }
    }
}

/// What became of one aggregation.
enum Fate {
    Completed(Duration),
    Ended(String),
    Refused,
}

async fn run(opts: &BenchOptions, faults: bool) -> Result<Value, BenchError> {
    let primary = Redis::start()?;
    // Two replicas: `--redis-wait-replicas 1` needs one left after a failover.
    let replicas = [
        Redis::start_with(&["--replicaof", "127.0.0.1", &primary.port().to_string()])?,
        Redis::start_with(&["--replicaof", "127.0.0.1", &primary.port().to_string()])?,
    ];
    for replica in &replicas {
        until("replication", || async {
            let info: Result<String, _> = redis_cmd(replica.port(), redis::cmd("INFO").arg("replication")).await;
            info.is_ok_and(|i| i.contains("master_link_status:up"))
        })
        .await?;
    }
    let sentinel = Redis::sentinel(primary.port())?;
    until("the Sentinel finding the replicas", || async {
        let found: Result<Vec<redis::Value>, _> =
            redis_cmd(sentinel.port(), redis::cmd("SENTINEL").arg("REPLICAS").arg("mymaster")).await;
        found.is_ok_and(|r| r.len() == 2)
    })
    .await?;
    let run_for = if opts.smoke { "200ms" } else { "1s" };
    let emulator_args: Vec<String> =
        ["emulator", "--listen", "127.0.0.1:0", "--aggregation-duration", run_for].into_iter().map(string).collect();
    let emulator = Server::start(None, &emulator_args, 1)?;
    let endpoint = emulator.url("listening on ").ok_or("no emulator address")?;
    let url = format!("redis+sentinel://127.0.0.1:{}/mymaster", sentinel.port());
    // `DSG_CHAOS_WAIT_REPLICAS=N` (default 1): the gateways' `--redis-wait-replicas`.
    let wait_replicas = std::env::var("DSG_CHAOS_WAIT_REPLICAS").unwrap_or_else(|_| "1".to_owned());
    let mut gateways = Gateways { args: Vec::new(), env: emulator_as_aws(&endpoint), running: Vec::new() };
    // Smoke runs take farms over quickly; full runs keep the default-like lease a failover fits in.
    let lease = if opts.smoke { "3s" } else { "10s" };
    let mut urls = Vec::new();
    for n in 0..3 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let listen = format!("127.0.0.1:{port}");
        let instance = format!("chaos-{n}");
        let extra = [
            "--redis-response-timeout",
            "1s",
            "--redis-wait-replicas",
            &wait_replicas,
            "--redis-wait-timeout",
            "300ms",
            "--lease-ttl",
            lease,
            "--farm-queue-capacity",
            "50",
        ];
        let args = serve_on_redis(&listen, &url, &instance, &extra);
        gateways.args.push(args);
        gateways.running.push(None);
        gateways.start(n)?;
        urls.push(format!("http://{listen}"));
    }
    let mut clients = Vec::new();
    for u in &urls {
        clients.push(AggregationServiceClient::new(tonic::transport::Channel::from_shared(u.clone())?.connect_lazy()));
    }
    let (farms, per_farm) = if opts.smoke { (3u64, 4u64) } else { (20u64, 10u64) };
    let begin = Instant::now();
    let runs: Vec<_> = (0..farms * per_farm)
        .map(|i| {
            let request = start_request(500 + i % farms, 1, 1 + (i / farms) as i64, &[pb::GroupBy::QueueId]);
            let clients = clients.clone();
            tokio::spawn(async move { fate(clients, i as usize, request).await })
        })
        .collect();
    let gateways = Arc::new(Mutex::new(gateways));
    let struck = Arc::new(Mutex::new(Vec::new()));
    let storm = faults.then(|| tokio::spawn(storm(gateways.clone(), sentinel.port(), opts.smoke, struck.clone())));
    let mut fates = Vec::new();
    for run in runs {
        fates.push(run.await?);
    }
    if let Some(storm) = storm {
        storm.abort();
        let _ = storm.await;
    }
    let struck = struck.lock().map(|s| s.clone()).unwrap_or_default();
    let stats: Value = serde_json::from_str(&http_get(&endpoint, "/_emulator/stats").await?)?;
    let mut accepted_on = std::collections::HashMap::<u64, u64>::new();
    for (i, f) in fates.iter().enumerate() {
        if !matches!(f, Fate::Refused) {
            *accepted_on.entry(500 + i as u64 % farms).or_default() += 1;
        }
    }
    let (mut double, mut max_in_progress) = (0u64, 0u64);
    for f in 0..farms {
        let s = &stats["farms"][farm(500 + f)];
        let started = s["aggregations_started"].as_u64().unwrap_or(0);
        double += started.saturating_sub(accepted_on.get(&(500 + f)).copied().unwrap_or(0));
        max_in_progress = max_in_progress.max(s["max_in_progress"].as_u64().unwrap_or(0));
    }
    let mut times: Vec<f64> =
        fates.iter().filter_map(|f| if let Fate::Completed(d) = f { Some(d.as_secs_f64()) } else { None }).collect();
    times.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        times.get(((times.len() as f64 * p).ceil() as usize).saturating_sub(1)).map(|t| (t * 1000.0).round() / 1000.0)
    };
    let lost: Vec<&String> =
        fates.iter().filter_map(|f| if let Fate::Ended(why) = f { Some(why) } else { None }).collect();
    drop(gateways);
    Ok(json!({
        "aggregations": farms * per_farm,
        "farms": farms,
        "accepted": fates.iter().filter(|f| !matches!(f, Fate::Refused)).count(),
        "completed": times.len(),
        "lost": lost.len(),
        "lost_why": lost.iter().take(5).collect::<Vec<_>>(),
        "double_starts": double,
        "max_in_progress_per_farm": max_in_progress,
        "completion_p50_s": pct(0.5),
        "completion_p99_s": pct(0.99),
        "makespan_s": (begin.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
        "faults": struck,
    }))
}

/// A fault every few seconds, in turn, until aborted; each struck is added to `struck`.
async fn storm(gateways: Arc<Mutex<Gateways>>, sentinel: u16, smoke: bool, struck: Arc<Mutex<Vec<String>>>) {
    let every = if smoke { Duration::from_millis(300) } else { Duration::from_secs(3) };
    // `DSG_CHAOS_FIRST=N` begins with the Nth fault (0 pause, 1 failover, 2 SIGKILL, 3 SIGSTOP).
    let first: usize = std::env::var("DSG_CHAOS_FIRST").ok().and_then(|n| n.parse().ok()).unwrap_or(0);
    for turn in first.. {
        tokio::time::sleep(every).await;
        let victim = turn / 4 % 3;
        let what = match turn % 4 {
            0 => {
                let master: Result<Vec<String>, _> =
                    redis_cmd(sentinel, redis::cmd("SENTINEL").arg("GET-MASTER-ADDR-BY-NAME").arg("mymaster")).await;
                if let Some(port) = master.ok().and_then(|m| m.get(1).and_then(|p| p.parse::<u16>().ok())) {
                    let _: Result<String, _> =
                        redis_cmd(port, redis::cmd("CLIENT").arg("PAUSE").arg(2000).arg("WRITE")).await;
                }
                "client_pause_2s".to_owned()
            }
            1 => {
                let _: Result<String, _> =
                    redis_cmd(sentinel, redis::cmd("SENTINEL").arg("FAILOVER").arg("mymaster")).await;
                "sentinel_failover".to_owned()
            }
            2 => {
                let g = gateways.lock().map(|g| g.running[victim].as_ref().map(Server::pid)).ok().flatten();
                if let Some(pid) = g {
                    let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                if let Ok(mut g) = gateways.lock() {
                    g.running[victim] = None;
                    let _ = g.start(victim);
                }
                format!("sigkill_gateway_{victim}")
            }
            _ => {
                // Past its lease: its farms go to the others, and thawed it must not act.
                let frozen = if smoke { Duration::from_millis(3500) } else { Duration::from_secs(11) };
                if let Ok(g) = gateways.lock() {
                    g.signal(victim, "-STOP");
                }
                tokio::time::sleep(frozen).await;
                if let Ok(g) = gateways.lock() {
                    g.signal(victim, "-CONT");
                }
                format!("sigstop_gateway_{victim}_{}ms", frozen.as_millis())
            }
        };
        if let Ok(mut s) = struck.lock() {
            s.push(what);
        }
    }
}

/// Starts `request` (retrying refusals a client retries, on the next replica) and follows it
/// to its end.
async fn fate(mut clients: Vec<Client>, i: usize, request: pb::StartAggregationRequest) -> Fate {
    let begin = Instant::now();
    let deadline = begin + Duration::from_secs(300);
    let retryable = |c: tonic::Code| {
        matches!(
            c,
            tonic::Code::Unavailable | tonic::Code::ResourceExhausted | tonic::Code::Unknown | tonic::Code::Cancelled
        )
    };
    let mut n = i;
    let id = loop {
        if Instant::now() > deadline {
            return Fate::Refused;
        }
        match clients[n % 3].start_aggregation(request.clone()).await {
            Ok(resp) => break resp.into_inner().aggregation.unwrap_or_default().aggregation_id,
            Err(e) if retryable(e.code()) => {
                n += 1;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(e) => return Fate::Ended(format!("start refused: {e}")),
        }
    };
    loop {
        if Instant::now() > deadline {
            return Fate::Ended(format!("{id} not terminal after 300 s"));
        }
        match clients[n % 3].get_aggregation(get_request(&id, 1, "", Duration::from_secs(10))).await {
            Ok(page) => {
                let agg = page.into_inner().aggregation.unwrap_or_default();
                match agg.state() {
                    pb::AggregationState::Completed => return Fate::Completed(begin.elapsed()),
                    pb::AggregationState::Failed | pb::AggregationState::TimedOut => {
                        return Fate::Ended(format!("{id} ended {:?}: {}", agg.state(), agg.status_message));
                    }
                    _ => {}
                }
            }
            Err(e) if retryable(e.code()) => {
                n += 1;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(e) => return Fate::Ended(format!("{id}: {e}")),
        }
    }
}
