//! Callers' limits across replicas: one caller sending Gets and Starts as fast as it can through
//! three gateway processes on one real `redis-server` gets its configured rates with
//! `--caller-limits global` (the default), and three times them with `local` (each replica's own
//! buckets).

mod common;

use common::*;
use deadline_stats_gateway::grpc::pb::GroupBy;
use std::time::Duration;
use tokio::time::Instant;

/// How long the caller floods.
const WINDOW: Duration = Duration::from_secs(10);
/// Gets per second, and their burst.
const GETS: (u64, u64) = (20, 5);
/// Starts per second, and their burst.
const STARTS: (u64, u64) = (8, 4);

/// What one caller sends.
#[derive(Clone, Copy)]
enum Call {
    /// A Get of an id nobody started.
    Get,
    /// A Start of the same request every time (one aggregation, joined or answered from cache).
    Start,
}

/// `call`s sent by one caller through every client at once, each client as fast as a pause of
/// 5 ms lets it, for [`WINDOW`]: how many were let through (any answer but
/// `RESOURCE_EXHAUSTED`).
async fn flood(clients: &[Client], call: Call) -> u64 {
    let end = Instant::now() + WINDOW;
    let mut senders = Vec::new();
    for client in clients {
        let mut client = client.clone();
        senders.push(tokio::spawn(async move {
            let mut through = 0u64;
            while Instant::now() < end {
                let answered = match call {
                    Call::Get => {
                        let get = get_request("agg-nobody-started-this", 0, "", Duration::ZERO);
                        client.get_aggregation(as_one_caller(get)).await.map(|_| ())
                    }
                    Call::Start => {
                        let start = start_request(430, 1, 1, &[GroupBy::QueueId]);
                        client.start_aggregation(as_one_caller(start)).await.map(|_| ())
                    }
                };
                if !matches!(answered, Err(e) if e.code() == tonic::Code::ResourceExhausted) {
                    through += 1;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            through
        }));
    }
    let mut through = 0;
    for sender in senders {
        through += sender.await.expect("the sender ran");
    }
    through
}

fn as_one_caller<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("x-caller-id", "one-busy-caller".parse().expect("ASCII"));
    request
}

/// Three replicas limiting each caller's Gets and Starts ([`GETS`], [`STARTS`]), with
/// `--caller-limits mode`: how many of one caller's Gets, and of its Starts, went through, the
/// two sent at once.
async fn through_three_replicas(mode: &str) -> (u64, u64) {
    let redis = tokio::task::spawn_blocking(redis_server).await.expect("joins");
    let (_emulator, endpoint) = spawn_emulator(&[]);
    let [get_rate, get_burst, start_rate, start_burst] = [GETS.0, GETS.1, STARTS.0, STARTS.1].map(|n| n.to_string());
    let flags = [
        "--caller-get-rate",
        &get_rate,
        "--caller-get-burst",
        &get_burst,
        "--caller-start-rate",
        &start_rate,
        "--caller-start-burst",
        &start_burst,
        "--caller-limits",
        mode,
    ];
    let replicas: Vec<_> = (0..3).map(|n| redis_replica(&endpoint, &redis.url(), n, &flags)).collect();
    let mut clients = Vec::new();
    for (_, url, _) in &replicas {
        clients.push(client_of(url).await);
    }
    tokio::join!(flood(&clients, Call::Get), flood(&clients, Call::Start))
}

/// How many a limit of `(rate, burst)` lets through in [`WINDOW`].
fn allowed((rate, burst): (u64, u64)) -> u64 {
    rate * WINDOW.as_secs() + burst
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_caller_through_three_replicas_gets_its_rates_with_global_limits_and_three_times_them_with_local() {
    let (gets, starts) = through_three_replicas("global").await;
    for (what, through, allowed) in [("Gets", gets, allowed(GETS)), ("Starts", starts, allowed(STARTS))] {
        let ratio = through as f64 / allowed as f64;
        eprintln!("global: {through} {what} through of {allowed} allowed ({ratio:.3})");
        assert!((0.9..=1.1).contains(&ratio), "global: {through} {what} through of {allowed} allowed ({ratio:.2})");
    }
    let (gets, starts) = through_three_replicas("local").await;
    for (what, through, allowed) in [("Gets", gets, allowed(GETS)), ("Starts", starts, allowed(STARTS))] {
        let ratio = through as f64 / allowed as f64;
        eprintln!("local: {through} {what} through of {allowed} allowed per replica ({ratio:.3})");
        assert!(ratio > 2.5, "local: each replica its own bucket: {through} {what} of {allowed} ({ratio:.2})");
    }
}
