//! Hostile input: malformed and oversized messages, hostile values, endless farm ids.

use super::*;
use deadline_stats_gateway::bench::baseline::RawCodec;
use deadline_stats_gateway::grpc::service::{GET, START};

/// Sends `body` (a gRPC message's bytes, or anything) to `path` as a unary call.
async fn raw_call(gw: &TestGateway, path: &'static str, body: Vec<u8>) -> tonic::Status {
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", gw.addr))
        .expect("URL")
        .connect()
        .await
        .expect("connects");
    let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(64 * 1024 * 1024);
    grpc.ready().await.expect("ready");
    let path = http::uri::PathAndQuery::from_static(path);
    grpc.unary(tonic::Request::new(bytes::Bytes::from(body)), path, RawCodec).await.expect_err("refused")
}

#[tokio::test]
async fn malformed_and_oversized_messages_get_the_right_codes_on_both_methods() {
    let gw = gateway(Duration::from_millis(20), fast_config(HOUR)).await;
    // Field 1 (a string) with a bad UTF-8 byte; then bytes that are no protobuf at all.
    let bad_utf8 = vec![0x0a, 0x02, 0xc3, 0x28];
    let garbage = vec![0xff, 0xff, 0xff, 0xff, 0x0f];
    for path in [START.path, GET.path] {
        for body in [bad_utf8.clone(), garbage.clone()] {
            let status = raw_call(&gw, path, body).await;
            assert_eq!(status.code(), Code::InvalidArgument, "{path}: {status:?}");
        }
        let status = raw_call(&gw, path, vec![0x0a; 17 * 1024 * 1024]).await;
        assert_eq!(status.code(), Code::ResourceExhausted, "{path}: {status:?}");
    }
}

#[tokio::test]
async fn hostile_values_are_quoted_short_and_violations_bounded() {
    let gw = gateway(Duration::from_millis(20), fast_config(HOUR)).await;
    let mut client = gw.client().await;
    let mut req = start_request(60, 1, 1, &[GroupBy::QueueId]);
    req.farm_id = "f".repeat(3000);
    req.resources = Some(pb::start_aggregation_request::Resources::QueueIds(pb::ResourceIds {
        ids: (0..90).map(|n| format!("{}{n}", "q".repeat(2000))).collect(),
    }));
    let status = client.start_aggregation(req).await.expect_err("invalid");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().len() < 4096, "message of {} bytes", status.message().len());
    assert!(status.message().contains("more"), "{}", status.message());
    let violations = status.get_details_bad_request().expect("BadRequest").field_violations;
    assert!(violations.len() <= 20, "{} violations", violations.len());
    assert!(status.details().len() < 8192, "details of {} bytes", status.details().len());

    let many_ids = |n: u64| {
        let mut req = start_request(60, 1, 1, &[GroupBy::QueueId]);
        req.resources = Some(pb::start_aggregation_request::Resources::QueueIds(pb::ResourceIds {
            ids: (0..n).map(|n| format!("queue-{n:032x}")).collect(),
        }));
        req
    };
    let status = client.start_aggregation(many_ids(6_000)).await.expect_err("too many ids");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("6000 values"), "{}", status.message());
    let status = client.start_aggregation(many_ids(100_000)).await.expect_err("4 MB");
    assert_eq!(status.code(), Code::ResourceExhausted, "larger than --max-request-bytes: refused before decoding");

    let status = get(&mut client, &"x".repeat(200_000)).await.expect_err("bogus id");
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().len() < 256 && status.details().len() < 512, "{}", status.message());
}

#[tokio::test]
async fn per_farm_series_stay_bounded_whatever_farms_callers_send() {
    let mut config = fast_config(HOUR);
    config.lifecycle.poll.initial = Duration::from_secs(30);
    config.lifecycle.poll.max = Duration::from_secs(30);
    let gw = gateway(Duration::from_secs(60), config).await;
    let client = gw.client().await;
    let starts: Vec<_> = (0..300)
        .map(|farm| {
            let mut client = client.clone();
            tokio::spawn(async move { start(&mut client, start_request(1000 + farm, 1, 1, &[GroupBy::QueueId])).await })
        })
        .collect();
    for s in starts {
        s.await.expect("joins");
    }
    let text = gw.metrics.encode();
    let series = text.lines().filter(|l| l.starts_with("dsg_farm_queue_depth{")).count();
    assert_eq!(series, deadline_stats_gateway::telemetry::metrics::MAX_FARM_SERIES + 1, "the busiest and other");
    let running: f64 =
        parse_metrics(&text).iter().filter(|(k, _)| k.starts_with("dsg_farm_running{")).map(|(_, v)| v).sum();
    assert_eq!(running, 300.0, "the sum is kept");
}
