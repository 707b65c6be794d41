//! `bench replicas`: three gateway processes sharing their state in one `redis-server`, in
//! front of one emulator process (2 s per aggregation). 100 distinct aggregations over 10
//! farms are started, each identical request sent to all three replicas at once; the report
//! says whether they acted as one gateway (one upstream Start per distinct key, never two
//! aggregations in progress on a farm, no Start throttled by the upstream) and how close the
//! makespan came to the lower bound (10 aggregations of 2 s, one after another, per farm).
//! The same on a Redis Cluster (`cluster`: three shards, 300 farms of 3 aggregations), and on
//! both how many commands Redis processed per gRPC request the replicas were sent (Starts and
//! the Gets that followed each to its end; the replicas' background work included).
//!
//! Needs `redis-server` and `redis-cli` on the PATH (Debian's packages; the test suite
//! installs them).

use super::process::{Server, http_get};
use super::requests::{farm, start_request};
use super::scenarios::{BenchError, BenchOptions, FAST_AND_UNPACED, connect, finish_counted, ratio, string};
use crate::grpc::pb;
use serde_json::{Value, json};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;

/// A `redis-server` of the benchmark's own, stopped when dropped.
pub(crate) struct Redis {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Redis {
    pub(crate) fn start() -> Result<Self, BenchError> {
        Self::start_with(&[])
    }

    /// [`Redis::start`] with `extra` arguments (`--replicaof 127.0.0.1 PORT`).
    pub(crate) fn start_with(extra: &[&str]) -> Result<Self, BenchError> {
        Self::spawn("redis", |port, dir| {
            let mut cmd = Command::new("redis-server");
            cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--maxmemory-policy", "noeviction", "--dir"])
                .arg(dir)
                .args(extra);
            Ok(cmd)
        })
    }

    /// A Redis Sentinel watching the primary on `primary` as `mymaster` (quorum 1, down after
    /// 1 s).
    pub(crate) fn sentinel(primary: u16) -> Result<Self, BenchError> {
        Self::spawn("sentinel", |port, dir| {
            let conf = dir.join("sentinel.conf");
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor mymaster 127.0.0.1 {primary} 1\n\
                     sentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 3000\n",
                    dir.display()
                ),
            )?;
            let mut cmd = Command::new("redis-server");
            cmd.arg(&conf).arg("--sentinel");
            Ok(cmd)
        })
    }

    /// `command(port, dir)` on a free port with a directory of its own, answering connections.
    fn spawn(
        what: &str,
        command: impl FnOnce(u16, &std::path::Path) -> Result<Command, BenchError>,
    ) -> Result<Self, BenchError> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = std::env::temp_dir().join(format!("dsg-bench-{what}-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let child = command(port, &dir)?.stdout(Stdio::null()).stderr(Stdio::null()).spawn().map_err(|e| {
            format!("this benchmark needs redis-server on the PATH (apt-get install redis-server): {e}")
        })?;
        let redis = Self { child, port, dir };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if std::time::Instant::now() > deadline {
                return Err("redis-server did not start within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(redis)
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }
}

/// The environment that sends a gateway's AWS SDK to the emulator at `endpoint`.
pub(crate) fn emulator_as_aws(endpoint: &str) -> Vec<(String, String)> {
    [
        ("AWS_ENDPOINT_URL_DEADLINE", endpoint),
        ("AWS_ACCESS_KEY_ID", "bench"),
        ("AWS_SECRET_ACCESS_KEY", "bench"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ]
    .iter()
    .map(|(k, v)| (string(*k), string(*v)))
    .collect()
}

/// `serve` through the AWS SDK (the emulator's, with [`emulator_as_aws`]) on the Redis at
/// `redis_url`, as `instance`, listening on `listen`, without caller limits, polling fast and
/// unpaced; then `extra`.
pub(crate) fn serve_on_redis(listen: &str, redis_url: &str, instance: &str, extra: &[&str]) -> Vec<String> {
    [
        "serve",
        "--upstream",
        "aws",
        "--region",
        "us-west-2",
        "--listen",
        listen,
        "--admin-listen",
        "127.0.0.1:0",
        "--store",
        "redis",
        "--redis-url",
        redis_url,
        "--instance-id",
        instance,
        "--caller-start-rate",
        "0",
        "--caller-get-rate",
        "0",
    ]
    .into_iter()
    .chain(FAST_AND_UNPACED)
    .chain(extra.iter().copied())
    .map(string)
    .collect()
}

/// A Redis Cluster of the benchmark's own: three primaries with a replica each, stopped when
/// dropped.
pub(crate) struct Cluster {
    nodes: Vec<Redis>,
}

impl Cluster {
    pub(crate) fn start() -> Result<Self, BenchError> {
        let mut nodes = Vec::new();
        for _ in 0..6 {
            let bus = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port().to_string();
            nodes.push(Redis::start_with(&[
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                &bus,
                "--cluster-node-timeout",
                "2000",
            ])?);
        }
        let addresses: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())).collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("this benchmark needs redis-cli on the PATH (apt-get install redis-tools): {e}"))?;
        if !created.success() {
            return Err("redis-cli --cluster create failed".into());
        }
        let cluster = Self { nodes };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !cluster.nodes.iter().all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok")) {
            if std::time::Instant::now() > deadline {
                return Err("the cluster did not come up within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(cluster)
    }

    /// `redis-cluster://` with every node as a seed.
    pub(crate) fn url(&self) -> String {
        let seeds: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())).collect();
        format!("redis-cluster://{}", seeds.join(","))
    }

    /// Commands the primaries have processed (`total_commands_processed`).
    fn commands(&self) -> u64 {
        self.nodes.iter().filter(|n| n.cli(&["ROLE"]).starts_with("master")).map(Redis::commands).sum()
    }
}

impl Redis {
    /// `redis-cli` against it: its output, empty when it fails.
    fn cli(&self, args: &[&str]) -> String {
        Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Commands it has processed (`total_commands_processed`).
    fn commands(&self) -> u64 {
        let info = self.cli(&["INFO", "stats"]);
        info.lines()
            .find_map(|l| l.strip_prefix("total_commands_processed:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_default()
    }
}

/// The shape of one run: farms, distinct aggregations per farm, and how long each runs.
struct Workload {
    farms: u64,
    per_farm: u64,
    first_farm: u64,
    in_progress: Duration,
}

pub(crate) async fn replicas(opts: &BenchOptions) -> Result<Value, BenchError> {
    let in_progress = if opts.smoke { Duration::from_millis(100) } else { Duration::from_secs(2) };
    let redis = Redis::start()?;
    let (farms, per_farm) = if opts.smoke { (3, 3) } else { (10, 10) };
    let before = redis.commands();
    let mut one = run(&redis.url(), &Workload { farms, per_farm, first_farm: 200, in_progress }).await?;
    one["redis_commands"] = json!(redis.commands().saturating_sub(before));
    drop(redis);
    // The cluster variant: many farms, so every shard holds some of their buckets.
    let cluster = Cluster::start()?;
    let (farms, per_farm) = if opts.smoke { (30, 2) } else { (300, 3) };
    let before = cluster.commands();
    let mut on_cluster = run(&cluster.url(), &Workload { farms, per_farm, first_farm: 1000, in_progress }).await?;
    on_cluster["redis_commands"] = json!(cluster.commands().saturating_sub(before));
    on_cluster["shards"] = json!(3);
    for variant in [&mut one, &mut on_cluster] {
        let per = ratio(variant["redis_commands"].as_f64().unwrap_or(0.0), variant["requests"].as_f64().unwrap_or(1.0));
        variant["redis_commands_per_request"] = json!(per);
    }
    let mut report = one;
    report["cluster"] = on_cluster;
    report["smoke"] = json!(opts.smoke);
    Ok(report)
}

/// Three replicas on the Redis at `redis_url` in front of an emulator; every distinct request
/// sent to all three at once, then read to its end on one.
async fn run(redis_url: &str, w: &Workload) -> Result<Value, BenchError> {
    let in_progress = w.in_progress;
    let duration_flag = format!("{}ms", in_progress.as_millis());
    let emulator_args: Vec<String> = ["emulator", "--listen", "127.0.0.1:0", "--aggregation-duration", &duration_flag]
        .into_iter()
        .map(string)
        .collect();
    let emulator = Server::start(None, &emulator_args, 1)?;
    let endpoint = emulator.url("listening on ").ok_or("no emulator address")?;
    let env = emulator_as_aws(&endpoint);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let replica_count = 3;
    let mut gateways = Vec::new();
    for n in 0..replica_count {
        let args = serve_on_redis("127.0.0.1:0", redis_url, &format!("bench-{n}"), &["--log-format", "json"]);
        gateways.push(Server::start_with_env(None, &args, &env, 2)?);
    }
    let mut clients = Vec::new();
    for gw in &gateways {
        clients.push(connect(&gw.url("listening on ").ok_or("no gRPC address")?, 1).await?.remove(0));
    }
    let (farms, per_farm, first) = (w.farms, w.per_farm, w.first_farm);
    let gets = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let begin = Instant::now();
    let runs: Vec<_> = (0..farms * per_farm)
        .map(|i| {
            let request = start_request(first + i % farms, 1, 1 + (i / farms) as i64, &[pb::GroupBy::QueueId]);
            let replicas: Vec<_> = clients.clone();
            let gets = gets.clone();
            tokio::spawn(async move {
                // The same request on every replica at once: they must agree on one aggregation.
                let starts: Vec<_> = replicas
                    .iter()
                    .cloned()
                    .map(|mut c| {
                        let request = request.clone();
                        tokio::spawn(async move { c.start_aggregation(request).await.map(|r| r.into_inner()) })
                    })
                    .collect();
                let mut ids = std::collections::HashSet::new();
                for start in starts {
                    ids.insert(start.await??.aggregation.unwrap_or_default().aggregation_id);
                }
                let id = ids.iter().next().cloned().unwrap_or_default();
                let mut reader = replicas[(i % 3) as usize].clone();
                let (_, polls) = finish_counted(&mut reader, &id).await?;
                gets.fetch_add(polls, std::sync::atomic::Ordering::Relaxed);
                Ok::<(Duration, usize), BenchError>((begin.elapsed(), ids.len()))
            })
        })
        .collect();
    let (mut makespan, mut split) = (Duration::ZERO, 0);
    for run in runs {
        let (done, ids) = run.await??;
        makespan = makespan.max(done);
        split += usize::from(ids != 1);
    }
    let stats: Value = serde_json::from_str(&http_get(&endpoint, "/_emulator/stats").await?)?;
    let (mut starts, mut max_in_progress, mut throttled) = (0, 0, 0);
    for f in 0..farms {
        let s = &stats["farms"][farm(first + f)];
        starts += s["start_calls"].as_u64().unwrap_or(0);
        max_in_progress = max_in_progress.max(s["max_in_progress"].as_u64().unwrap_or(0));
        throttled += s["throttled_starts"].as_u64().unwrap_or(0);
    }
    let lower_bound = in_progress * per_farm as u32;
    let starts_sent = farms * per_farm * replica_count;
    Ok(json!({
        "scenario": "replicas",
        "replicas": replica_count,
        "farms": farms,
        "distinct_keys": farms * per_farm,
        "starts_sent": starts_sent,
        "requests": starts_sent + gets.load(std::sync::atomic::Ordering::Relaxed),
        "keys_split_across_ids": split,
        "upstream_starts": starts,
        "max_in_progress": max_in_progress,
        "makespan_s": (makespan.as_secs_f64() * 1000.0).round() / 1000.0,
        "lower_bound_s": lower_bound.as_secs_f64(),
        "makespan_ratio": ratio(makespan.as_secs_f64(), lower_bound.as_secs_f64()),
        "upstream_throttled": throttled,
    }))
}
