//! Correctness under pressure, one file per topic: a full cache ([`cache`]), a crashing or
//! stuck aggregation ([`supervision`]), an upstream that times out, throttles or refuses
//! ([`upstream_faults`]), gateway-wide bounds ([`bounds`]), ids after restarts and failures
//! ([`lost_ids`]), promises about freshness and deadlines ([`freshness`]), and hostile input
//! ([`hostile_input`]). Each runs the real server on loopback, a real tonic client, and the
//! emulator through the real SDK. One test binary, so the topics share one build.

#[path = "../common/mod.rs"]
mod common;

mod bounds;
mod cache;
mod freshness;
mod hostile_input;
mod lost_ids;
mod supervision;
mod upstream_faults;

pub(crate) use common::*;
pub(crate) use deadline_stats_gateway::grpc::pb::{self, AggregationState, Disposition, GroupBy};
pub(crate) use std::sync::Arc;
pub(crate) use std::time::Duration;
pub(crate) use tonic::Code;
pub(crate) use tonic_types::StatusExt;

pub(crate) const HOUR: Duration = Duration::from_secs(3600);

pub(crate) fn id_of(resp: &pb::StartAggregationResponse) -> String {
    resp.aggregation.as_ref().expect("aggregation").aggregation_id.clone()
}

pub(crate) async fn start(client: &mut Client, req: pb::StartAggregationRequest) -> pb::StartAggregationResponse {
    client.start_aggregation(req).await.expect("start").into_inner()
}

pub(crate) async fn get(client: &mut Client, id: &str) -> Result<pb::Aggregation, tonic::Status> {
    let page = client.get_aggregation(get_request(id, 0, "", Duration::ZERO)).await?.into_inner();
    Ok(page.aggregation.expect("aggregation"))
}

pub(crate) type Client = pb::aggregation_service_client::AggregationServiceClient<tonic::transport::Channel>;

/// One series of the gateway's metrics.
pub(crate) fn metric(gw: &TestGateway, series: &str) -> f64 {
    parse_metrics(&gw.metrics.encode()).get(series).copied().unwrap_or(0.0)
}
