//! The drain, in process through `app::App` (what `serve` runs on SIGTERM): a running
//! aggregation gets the grace to finish and its long-poll is answered with the result, a Start
//! during the drain is refused, and serving ends by itself once nothing is left to run; when
//! the grace runs out first, long-polls answer with the state they see.

mod common;

use common::*;
use deadline_stats_gateway::app::{App, AppConfig, Listeners, StoreConfig, UpstreamConfig};
use deadline_stats_gateway::grpc::pb::aggregation_service_client::AggregationServiceClient;
use deadline_stats_gateway::grpc::pb::{AggregationState, GroupBy};
use deadline_stats_gateway::grpc::server;
use std::sync::Arc;
use std::time::Duration;

const HOUR: Duration = Duration::from_secs(3600);

/// A gateway built by `App` over an emulator whose aggregations take `duration`, draining for
/// `grace`; the shutdown trigger, the serving task, and a client.
async fn app(
    duration: Duration,
    grace: Duration,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), deadline_stats_gateway::app::AppError>>,
    AggregationServiceClient<tonic::transport::Channel>,
    deadline_stats_gateway::emulator::EmulatorHandle,
) {
    let emu = emulator(duration, HOUR).await;
    let loopback = "127.0.0.1:0".parse().expect("addr");
    let listeners = Listeners {
        grpc: server::bind(loopback).await.expect("binds"),
        admin: server::bind(loopback).await.expect("binds"),
    };
    let config = AppConfig {
        gateway: fast_config(HOUR),
        server: server::ServerOptions::default(),
        store: StoreConfig::Memory,
        upstream: UpstreamConfig::Given(Arc::new(sdk(&emu.endpoint_url()).await)),
        tls: None,
        identity_source: None,
        authz_policy: None,
        shutdown_grace: grace,
        console: Default::default(),
    };
    let app = App::build(config, listeners).await.expect("builds");
    let addr = app.addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(app.serve(async {
        let _ = stopped.await;
    }));
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).expect("url").connect().await;
    (stop, serving, AggregationServiceClient::new(channel.expect("connects")), emu)
}

type Client = AggregationServiceClient<tonic::transport::Channel>;

/// Starts an aggregation on farm `farm_n` and long-polls it for `wait` in a task of its own.
async fn start_and_long_poll(
    client: &Client,
    farm_n: u64,
    wait: Duration,
) -> tokio::task::JoinHandle<
    Result<tonic::Response<deadline_stats_gateway::grpc::pb::GetAggregationResponse>, tonic::Status>,
> {
    let mut client = client.clone();
    let started = client.start_aggregation(start_request(farm_n, 1, 1, &[GroupBy::QueueId])).await.expect("start");
    let id = started.into_inner().aggregation.expect("aggregation").aggregation_id;
    tokio::spawn(async move { client.get_aggregation(get_request(&id, 0, "", wait)).await })
}

#[tokio::test]
async fn a_running_aggregation_finishes_within_the_grace_and_serving_then_ends() {
    let (stop, serving, client, _emu) = app(Duration::from_secs(1), Duration::from_secs(20)).await;
    let mut starter = client.clone();
    let poll = start_and_long_poll(&client, 1, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.send(()).expect("serving");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = starter.start_aggregation(start_request(1, 2, 1, &[GroupBy::QueueId])).await;
    let code = refused.expect_err("no Start during the drain").code();
    assert!(matches!(code, tonic::Code::Unavailable | tonic::Code::Cancelled), "refused, not queued: {code:?}");
    let page = poll.await.expect("joins").expect("the long-poll is answered").into_inner();
    let agg = page.aggregation.expect("aggregation");
    assert_eq!((agg.state(), agg.row_count), (AggregationState::Completed, 24), "finished within the grace");
    let ended = tokio::time::timeout(Duration::from_secs(10), serving).await;
    ended.expect("serving ends once drained, well before the grace").expect("joins").expect("a clean stop");
}

#[tokio::test]
async fn when_the_grace_runs_out_long_polls_answer_with_the_state_they_see() {
    let (stop, serving, client, _emu) = app(Duration::from_secs(60), Duration::from_millis(500)).await;
    let poll = start_and_long_poll(&client, 2, Duration::from_secs(50)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.send(()).expect("serving");
    let page = tokio::time::timeout(Duration::from_secs(10), poll).await.expect("answered after the grace");
    let agg = page.expect("joins").expect("answered").into_inner().aggregation.expect("aggregation");
    assert_eq!(agg.state(), AggregationState::Running, "the state it sees, not an error");
    tokio::time::timeout(Duration::from_secs(10), serving).await.expect("ends").expect("joins").expect("clean");
}
