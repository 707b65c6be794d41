//! The listener's own bounds, against the real `serve` process: `--max-connections` closes
//! what is over it at once and serves again when a connection goes, and a socket that never
//! speaks is closed after `--handshake-timeout`. (Floods, rapid reset, big metadata and
//! descriptor exhaustion are measured by `bench transport`; its smoke run is a test.)

mod common;

use common::*;
use deadline_stats_gateway::bench::transport::closed_within;
use deadline_stats_gateway::grpc::pb::GroupBy;
use std::time::Duration;
use tokio::net::TcpStream;

#[tokio::test]
async fn connections_over_the_bound_are_closed_and_served_again_once_one_goes() {
    let (_gateway, url, _) = spawn_serve(&["--max-connections", "3", "--handshake-timeout", "30s"], &[]);
    let addr = url.trim_start_matches("http://").to_owned();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(&addr).await.expect("connects"));
    }
    let mut over = TcpStream::connect(&addr).await.expect("the kernel accepts it");
    assert!(closed_within(&mut over, Duration::from_secs(5)).await, "the fourth is closed at once");
    assert!(!closed_within(&mut held[0], Duration::from_millis(300)).await, "the three are kept");

    drop(held.pop());
    let served = eventually(Duration::from_secs(10), || {
        let url = url.clone();
        async move {
            let mut client = client_of(&url).await;
            client.start_aggregation(start_request(1, 1, 1, &[GroupBy::QueueId])).await.ok()
        }
    })
    .await;
    assert!(served.into_inner().aggregation.is_some());
}

#[tokio::test]
async fn a_socket_that_never_speaks_is_closed_after_the_handshake_timeout() {
    let (_gateway, url, _) = spawn_serve(&["--handshake-timeout", "1s"], &[]);
    let addr = url.trim_start_matches("http://").to_owned();
    let mut silent = TcpStream::connect(&addr).await.expect("connects");
    assert!(closed_within(&mut silent, Duration::from_secs(10)).await, "closed after about a second");
    let mut client = client_of(&url).await;
    client.start_aggregation(start_request(1, 1, 1, &[GroupBy::QueueId])).await.expect("a speaking client is served");
}
