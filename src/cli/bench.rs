//! `bench`: run a benchmark scenario and print its report; `bench-baseline`: the bare-tonic
//! baseline server the cache-hit scenario compares against.

use super::{RunError, announce, shutdown_signal};
use crate::bench::scenarios::{self, BenchOptions, BenchStore};
use clap::{Args, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// GetAggregation of a completed aggregation against the bare-tonic baseline.
    CacheHit,
    /// 1,000 concurrent identical StartAggregation calls.
    Coalesce,
    /// 100 distinct aggregations over 10 farms.
    FarmQueue,
    /// 100,000 cached rows: memory per row.
    Memory,
    /// Four concurrent 4 MB hostile requests at a time, while health checks run.
    Hostile,
    /// 50,000 distinct caller ids in a few seconds: memory of the caller buckets.
    Callers,
    /// Three gateways sharing one redis-server: 100 distinct aggregations, each sent to all.
    Replicas,
    /// Three gateways on a Redis primary, replica and Sentinel, 200 aggregations on 20 farms,
    /// a fault every few seconds (pause, failover, SIGKILL, SIGSTOP); against the same run
    /// without faults.
    Chaos,
    /// Rapid reset, stream floods, idle sockets, 1 MB metadata, descriptor exhaustion.
    Transport,
    /// 10,000 watchers (streams and long-polls) on 100 aggregations completing over time.
    Watchers,
    /// Cache hits with and without the console's JSON read every second, 1,000 farms with work.
    Console,
    /// A backfill of 90 batch aggregations and a dashboard's interactive one every 10 s on one
    /// farm: the dashboard's time to rows and the makespan, fair against arrival order.
    Fairness,
    /// A weekly superset, then 200 distinct requests, 60 % inside it: upstream Starts, time to
    /// rows and makespan with answers derived from the superset and without.
    Derive,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    pub scenario: Scenario,
    /// Length of each measured load phase.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Closed-loop workers.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// gRPC connections the workers share.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// A seconds-long run that checks the harness, not the speed.
    #[arg(long)]
    pub smoke: bool,
    /// cache-hit: `redis` also measures a gateway on a redis-server of its own (needs
    /// `redis-server` on the PATH) against the memory store, in the same run.
    #[arg(long, value_enum, default_value_t = BenchStore::Memory)]
    pub store: BenchStore,
    /// cache-hit: measure each server in this many alternating rounds of 250 ms (instead of
    /// --duration / 250 ms): more rounds, a narrower confidence interval of the ratios.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub rounds: Option<u32>,
    /// cache-hit: `perf record` the gateway and the baseline into this directory while the
    /// closed-loop rounds run, and report the symbols the gateway spends more samples per
    /// request on (also written to DIR/comparison.txt). Needs `perf` (Debian's linux-perf).
    #[arg(long, value_name = "DIR")]
    pub profile: Option<PathBuf>,
    /// cache-hit: mutual TLS (certificates made for the run) and an authorization policy on
    /// the gateway, against a baseline on TLS with client certificates as well.
    #[arg(long)]
    pub tls: bool,
}

#[derive(Debug, Args)]
pub struct BaselineArgs {
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// The encoded GetAggregationResponse to answer with.
    #[arg(long)]
    pub response: PathBuf,
    /// TLS: the certificate chain (PEM), with --tls-key and --tls-client-ca.
    #[arg(long, requires_all = ["tls_key", "tls_client_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The CA client certificates must chain to (mutual TLS, as the gateway's).
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

pub(crate) async fn run(args: BenchArgs) -> Result<(), RunError> {
    let opts = BenchOptions {
        duration: if args.smoke { args.duration.min(Duration::from_secs(1)) } else { args.duration },
        concurrency: args.concurrency.max(1),
        connections: args.connections.max(1),
        smoke: args.smoke,
        store: args.store,
        rounds: args.rounds,
        profile: args.profile,
        tls: args.tls,
    };
    // The load generator gets one core; it runs as one thread so that two runtime workers do
    // not take turns on that core in time slices of milliseconds, which would show up as
    // latency of the server under test.
    let scenario = args.scenario;
    let report = tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(async {
            match scenario {
                Scenario::CacheHit => scenarios::cache_hit(&opts).await,
                Scenario::Coalesce => scenarios::coalesce(&opts).await,
                Scenario::FarmQueue => scenarios::farm_queue(&opts).await,
                Scenario::Memory => scenarios::memory(&opts).await,
                Scenario::Hostile => crate::bench::abuse::hostile(&opts).await,
                Scenario::Callers => crate::bench::abuse::callers(&opts).await,
                Scenario::Replicas => crate::bench::replicas::replicas(&opts).await,
                Scenario::Chaos => crate::bench::chaos::chaos(&opts).await,
                Scenario::Transport => crate::bench::transport::transport(&opts).await,
                Scenario::Watchers => crate::bench::watchers::watchers(&opts).await,
                Scenario::Console => crate::bench::console::console(&opts).await,
                Scenario::Fairness => crate::bench::fairness::fairness(&opts).await,
                Scenario::Derive => crate::bench::derive::derive(&opts).await,
            }
        })
    })
    .await
    .map_err(|e| RunError::Bench(e.to_string()))?
    .map_err(|e| RunError::Bench(e.to_string()))?;
    if args.json {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    }
    Ok(())
}

pub(crate) async fn baseline(args: BaselineArgs) -> Result<(), RunError> {
    let response = std::fs::read(&args.response)
        .map_err(|e| RunError::Config(format!("cannot read {}: {e}", args.response.display())))?;
    let signal = shutdown_signal().map_err(RunError::Signal)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| RunError::Listen { addr: args.listen, source })?;
    let addr = listener.local_addr().map_err(|source| RunError::Listen { addr: args.listen, source })?;
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|e| RunError::Config(format!("cannot read {}: {e}", path.display())))
    };
    let tls = match (&args.tls_cert, &args.tls_key, &args.tls_client_ca) {
        (Some(cert), Some(key), Some(ca)) => {
            Some(crate::bench::baseline::Tls { cert: read(cert)?, key: read(key)?, client_ca: read(ca)? })
        }
        _ => None,
    };
    announce(&format!("{}://{addr}", if tls.is_some() { "https" } else { "http" }));
    crate::bench::baseline::serve(listener, response.into(), tls, signal)
        .await
        .map_err(|e| RunError::Serve(crate::grpc::server::ServeError::Transport(e)))
}
