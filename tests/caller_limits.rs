//! Callers' limits across replicas: one caller sending as fast as it can through three gateway
//! processes on one real `redis-server` gets its configured rate with `--caller-limits global`
//! (the default), and three times it with `local` (each replica's own buckets).

mod common;

use common::*;
use std::time::Duration;
use tokio::time::Instant;

/// How long the caller floods.
const WINDOW: Duration = Duration::from_secs(10);
const RATE: u64 = 20;
const BURST: u64 = 5;

/// Gets (of an id nobody started) sent by one caller through every client in turn, each
/// client as fast as a pause of 5 ms lets it, for [`WINDOW`]: how many were let through (any
/// answer but `RESOURCE_EXHAUSTED`).
async fn flood(clients: &[Client]) -> u64 {
    let end = Instant::now() + WINDOW;
    let mut senders = Vec::new();
    for client in clients {
        let mut client = client.clone();
        senders.push(tokio::spawn(async move {
            let mut through = 0u64;
            while Instant::now() < end {
                let mut request = tonic::Request::new(get_request("agg-nobody-started-this", 0, "", Duration::ZERO));
                request.metadata_mut().insert("x-caller-id", "one-busy-caller".parse().expect("ASCII"));
                match client.get_aggregation(request).await {
                    Err(e) if e.code() == tonic::Code::ResourceExhausted => {}
                    _ => through += 1,
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

/// Three replicas limiting each caller's Gets to [`RATE`] per second (burst [`BURST`]), with
/// `--caller-limits mode`: how many of one caller's flood went through.
async fn through_three_replicas(mode: &str) -> u64 {
    let redis = tokio::task::spawn_blocking(redis_server).await.expect("joins");
    let (_emulator, endpoint) = spawn_emulator(&[]);
    let (rate, burst) = (RATE.to_string(), BURST.to_string());
    let flags = ["--caller-get-rate", &rate, "--caller-get-burst", &burst, "--caller-limits", mode];
    let replicas: Vec<_> = (0..3).map(|n| redis_replica(&endpoint, &redis.url(), n, &flags)).collect();
    let mut clients = Vec::new();
    for (_, url, _) in &replicas {
        clients.push(client_of(url).await);
    }
    flood(&clients).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_caller_through_three_replicas_gets_its_rate_with_global_limits_and_three_times_it_with_local() {
    let configured = RATE * WINDOW.as_secs() + BURST;
    let global = through_three_replicas("global").await;
    let ratio = global as f64 / configured as f64;
    assert!((0.9..=1.1).contains(&ratio), "global: {global} through of {configured} allowed ({ratio:.2})");
    eprintln!("global: {global} through of {configured} allowed ({ratio:.3})");
    let local = through_three_replicas("local").await;
    eprintln!("local: {local} through of {configured} allowed per replica ({:.3})", local as f64 / configured as f64);
    let ratio = local as f64 / configured as f64;
    assert!(
        ratio > 2.5,
        "local: each replica its own bucket, {local} through of {configured} per replica ({ratio:.2})"
    );
}
