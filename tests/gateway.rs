//! The gateway end to end: a real server on loopback, a real tonic client, and the emulator
//! upstream reached by the real SDK over HTTP.

mod common;

use common::*;
use deadline_stats_gateway::grpc::pb::{self, AggregationState, Disposition, GroupBy};
use std::collections::HashSet;
use std::time::Duration;
use tonic::Code;
use tonic_types::StatusExt;

const HOUR: Duration = Duration::from_secs(3600);

fn aggregation(resp: &pb::StartAggregationResponse) -> &pb::Aggregation {
    resp.aggregation.as_ref().expect("aggregation is set")
}

#[tokio::test]
async fn start_long_poll_and_page_through_every_row() {
    let gw = gateway(Duration::from_millis(200), fast_config(HOUR)).await;
    let mut client = gw.client().await;
    let started = client
        .start_aggregation(start_request(1, 2, 4, &[GroupBy::QueueId, GroupBy::JobId]))
        .await
        .expect("start")
        .into_inner();
    assert_eq!(started.disposition(), Disposition::Started);
    let agg = aggregation(&started);
    assert!(agg.aggregation_id.starts_with("agg-") && agg.aggregation_id.len() == 36);
    assert!(matches!(agg.state(), AggregationState::Queued | AggregationState::Running));
    assert!(agg.create_time.is_some() && agg.expire_time.is_none());

    let first = wait_terminal(&mut client, &agg.aggregation_id).await;
    let done = first.aggregation.as_ref().expect("aggregation");
    assert_eq!(done.state(), AggregationState::Completed);
    assert_eq!(done.row_count, 2 * 6 * 96);
    let (created, expires) = (done.create_time.expect("create"), done.expire_time.expect("expire"));
    let life = expires.seconds - created.seconds;
    assert!((3500..=3600).contains(&life), "results live an hour less the margin: {life}s");

    let (mut rows, mut token, mut pages) = (Vec::new(), String::new(), 0);
    loop {
        let page = client
            .get_aggregation(get_request(&agg.aggregation_id, 500, &token, Duration::ZERO))
            .await
            .expect("page")
            .into_inner();
        pages += 1;
        rows.extend(page.statistics);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!((rows.len(), pages), (1152, 3));
    let distinct: HashSet<_> =
        rows.iter().map(|r| (r.job_id.clone(), r.aggregation_start_time.map(|t| t.seconds))).collect();
    assert_eq!(distinct.len(), 1152, "no row twice");
    assert!(rows.iter().all(|r| { r.cost_in_usd.is_some_and(|c| c.sum.is_some() && c.min.is_none()) }));

    let default_page = client
        .get_aggregation(get_request(&agg.aggregation_id, 0, "", Duration::ZERO))
        .await
        .expect("page")
        .into_inner();
    assert_eq!(default_page.statistics.len(), 100);
    let capped = client
        .get_aggregation(get_request(&agg.aggregation_id, 5000, "", Duration::ZERO))
        .await
        .expect("page")
        .into_inner();
    assert_eq!(capped.statistics.len(), 1000);
}

#[tokio::test]
async fn a_thousand_identical_starts_make_one_upstream_start() {
    let gw = gateway(Duration::from_millis(500), fast_config(HOUR)).await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(gw.client().await);
    }
    let request = start_request(2, 3, 2, &[GroupBy::UserId]);
    let calls = (0..1000).map(|i| {
        let mut client = clients[i % clients.len()].clone();
        let mut req = request.clone();
        if i % 2 == 1 {
            // The same aggregation written differently: order and repeats do not matter.
            if let Some(pb::start_aggregation_request::Resources::QueueIds(ids)) = &mut req.resources {
                ids.ids.reverse();
                ids.ids.push(ids.ids[0].clone());
            }
            req.statistics.reverse();
        }
        tokio::spawn(async move { client.start_aggregation(req).await.map(|r| r.into_inner()) })
    });
    let mut ids = HashSet::new();
    let mut started = 0;
    for call in calls.collect::<Vec<_>>() {
        let resp = call.await.expect("joins").expect("start succeeds");
        ids.insert(aggregation(&resp).aggregation_id.clone());
        started += usize::from(resp.disposition() == Disposition::Started);
    }
    assert_eq!((ids.len(), started), (1, 1), "one aggregation, started once");
    let id = ids.into_iter().next().expect("one id");
    let mut client = gw.client().await;
    wait_terminal(&mut client, &id).await;
    let upstream = gw.upstream(&farm(2)).await;
    assert_eq!(upstream["start_calls"], 1);

    let gets_before = upstream["get_calls"].as_u64();
    let again = client.start_aggregation(request).await.expect("start").into_inner();
    assert_eq!((again.disposition(), aggregation(&again).aggregation_id.as_str()), (Disposition::Cached, id.as_str()));
    let upstream = gw.upstream(&farm(2)).await;
    assert_eq!(
        (upstream["start_calls"].as_u64(), upstream["get_calls"].as_u64()),
        (Some(1), gets_before),
        "a cache hit calls nothing upstream"
    );
}

#[tokio::test]
async fn distinct_requests_run_one_at_a_time_per_farm_in_order() {
    let gw = gateway(Duration::from_millis(150), fast_config(HOUR)).await;
    let mut client = gw.client().await;
    let mut ids = Vec::new();
    for n in 0..6 {
        let resp = client
            .start_aggregation(start_request(3, 1, n + 1, &[GroupBy::QueueId]))
            .await
            .expect("start")
            .into_inner();
        assert_eq!(resp.disposition(), Disposition::Started);
        let agg = aggregation(&resp);
        if n > 0 {
            assert_eq!(
                (agg.state(), agg.queue_position),
                (AggregationState::Queued, n as u32),
                "position of request {n}"
            );
        }
        ids.push(agg.aggregation_id.clone());
    }
    let other =
        client.start_aggregation(start_request(4, 1, 1, &[GroupBy::QueueId])).await.expect("start").into_inner();
    assert!(aggregation(&other).queue_position == 0, "another farm does not wait");

    let mut expiries = Vec::new();
    for id in &ids {
        let page = wait_terminal(&mut client, id).await;
        let agg = page.aggregation.expect("aggregation");
        assert_eq!(agg.state(), AggregationState::Completed);
        expiries.push(agg.expire_time.map(|t| (t.seconds, t.nanos)).expect("expire time"));
    }
    assert!(expiries.windows(2).all(|w| w[0] < w[1]), "upstream starts happened in arrival order");
    let upstream = gw.upstream(&farm(3)).await;
    assert_eq!(
        (upstream["start_calls"].as_u64(), upstream["throttled_starts"].as_u64(), upstream["max_in_progress"].as_u64()),
        (Some(6), Some(0), Some(1))
    );

    eventually(Duration::from_secs(5), || async { gw.gateway.stats().farms.is_empty().then_some(()) }).await;
    assert_eq!(gw.gateway.stats().store.active, 0, "nothing is left active");
}

#[tokio::test]
async fn many_concurrent_distinct_requests_never_break_the_one_running_rule() {
    let gw = gateway(Duration::from_millis(50), fast_config(HOUR)).await;
    let client = gw.client().await;
    let calls: Vec<_> = (0..30u64)
        .map(|n| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let resp = client
                    .start_aggregation(start_request(30 + n % 3, 1, 1 + (n / 3) as i64, &[GroupBy::QueueId]))
                    .await
                    .expect("start")
                    .into_inner();
                assert_eq!(resp.disposition(), Disposition::Started);
                let id = aggregation(&resp).aggregation_id.clone();
                wait_terminal(&mut client, &id).await.aggregation.expect("aggregation").state()
            })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.expect("joins"), AggregationState::Completed);
    }
    for f in 30..33 {
        let upstream = gw.upstream(&farm(f)).await;
        assert_eq!(
            (
                upstream["start_calls"].as_u64(),
                upstream["throttled_starts"].as_u64(),
                upstream["max_in_progress"].as_u64()
            ),
            (Some(10), Some(0), Some(1)),
            "farm {f}"
        );
    }
}

#[tokio::test]
async fn a_full_farm_queue_is_resource_exhausted_with_retry_info() {
    let mut config = fast_config(HOUR);
    config.farm_queue_capacity = 2;
    // One caller fills the farm: its share may be all of it.
    config.farm_queue_caller_share = 1.0;
    let gw = gateway(Duration::from_secs(30), config).await;
    let mut client = gw.client().await;
    let first =
        client.start_aggregation(start_request(5, 1, 1, &[GroupBy::QueueId])).await.expect("start").into_inner();
    eventually(Duration::from_secs(5), || async {
        (gw.gateway.stats().store.active == 1 && gw.gateway.stats().farms[&farm(5)].running == 1).then_some(())
    })
    .await;
    for days in 2..=3 {
        client.start_aggregation(start_request(5, 1, days, &[GroupBy::QueueId])).await.expect("room in the queue");
    }
    let status = client.start_aggregation(start_request(5, 1, 4, &[GroupBy::QueueId])).await.expect_err("queue full");
    assert_eq!(status.code(), Code::ResourceExhausted);
    let details = status.get_error_details();
    assert!(details.retry_info().and_then(|r| r.retry_delay).is_some());
    assert_eq!(details.error_info().map(|e| e.reason.as_str()), Some("FARM_QUEUE_FULL"));
    let joined = client
        .start_aggregation(start_request(5, 1, 1, &[GroupBy::QueueId]))
        .await
        .expect("joining needs no room")
        .into_inner();
    assert_eq!(aggregation(&joined).aggregation_id, aggregation(&first).aggregation_id);
    client
        .start_aggregation(start_request(6, 1, 4, &[GroupBy::QueueId]))
        .await
        .expect("other farms have their own queue");
}

#[tokio::test]
async fn an_aggregation_started_outside_the_gateway_is_waited_out() {
    let gw = gateway(Duration::from_millis(600), fast_config(HOUR)).await;
    let outsider = sdk(&gw.emu.endpoint_url()).await;
    use deadline_stats_gateway::upstream::Upstream as _;
    outsider
        .start(&request(7, 1, 1, vec![deadline_stats_gateway::domain::GroupBy::JobId]))
        .await
        .expect("outside start");
    let mut client = gw.client().await;
    let resp = client.start_aggregation(start_request(7, 1, 2, &[GroupBy::QueueId])).await.expect("start").into_inner();
    let page = wait_terminal(&mut client, &aggregation(&resp).aggregation_id).await;
    assert_eq!(page.aggregation.expect("aggregation").state(), AggregationState::Completed);
    let upstream = gw.upstream(&farm(7)).await;
    assert!(
        upstream["throttled_starts"].as_u64().is_some_and(|n| n >= 1),
        "the gateway met the outsider's aggregation: {upstream}"
    );
}

#[tokio::test]
async fn callers_are_throttled_per_caller_with_retry_info() {
    let mut config = fast_config(HOUR);
    config.caller_start = deadline_stats_gateway::gateway::rate::Rate { per_second: 0.5, burst: 2 };
    config.caller_get = deadline_stats_gateway::gateway::rate::Rate { per_second: 0.5, burst: 1 };
    let gw = gateway(Duration::from_millis(100), config).await;
    let mut client = gw.client().await;
    let as_caller = |caller: &str, req: pb::StartAggregationRequest| {
        let mut r = tonic::Request::new(req);
        r.metadata_mut().insert("x-caller-id", caller.parse().expect("ascii"));
        r
    };
    for _ in 0..2 {
        client
            .start_aggregation(as_caller("render-farm-ui", start_request(8, 1, 1, &[GroupBy::QueueId])))
            .await
            .expect("within the burst");
    }
    let status = client
        .start_aggregation(as_caller("render-farm-ui", start_request(8, 1, 1, &[GroupBy::QueueId])))
        .await
        .expect_err("over");
    assert_eq!(status.code(), Code::ResourceExhausted);
    let delay = status.get_details_retry_info().and_then(|r| r.retry_delay).expect("retry info");
    assert!(delay > Duration::ZERO && delay <= Duration::from_secs(2), "{delay:?}");
    assert_eq!(status.get_details_error_info().map(|e| e.reason), Some("RATE_LIMITED".to_owned()));
    client
        .start_aggregation(as_caller("billing", start_request(8, 1, 1, &[GroupBy::QueueId])))
        .await
        .expect("another caller has its own bucket");
    client
        .start_aggregation(start_request(8, 1, 1, &[GroupBy::QueueId]))
        .await
        .expect("no caller id: the peer address is the caller");

    let mut get = tonic::Request::new(get_request("agg-00000000000000000000000000000000", 0, "", Duration::ZERO));
    get.metadata_mut().insert("x-caller-id", "poller".parse().expect("ascii"));
    assert_eq!(client.get_aggregation(get).await.expect_err("unknown").code(), Code::NotFound);
    let mut get = tonic::Request::new(get_request("agg-00000000000000000000000000000000", 0, "", Duration::ZERO));
    get.metadata_mut().insert("x-caller-id", "poller".parse().expect("ascii"));
    assert_eq!(client.get_aggregation(get).await.expect_err("limited").code(), Code::ResourceExhausted);
}

#[tokio::test]
async fn invalid_requests_name_every_bad_field_and_never_reach_upstream() {
    let gw = gateway(Duration::from_millis(100), fast_config(HOUR)).await;
    let mut client = gw.client().await;
    let mut req = start_request(9, 4, 1, &[GroupBy::QueueId, GroupBy::Unspecified]);
    if let Some(pb::start_aggregation_request::Resources::QueueIds(ids)) = &mut req.resources {
        ids.ids[3] = "queue-nope".into();
    }
    req.timezone = "UTC+8".into();
    req.statistics = vec![];
    req.end_time = req.start_time;
    let status = client.start_aggregation(req).await.expect_err("invalid");
    assert_eq!(status.code(), Code::InvalidArgument);
    let fields: Vec<String> =
        status.get_details_bad_request().expect("BadRequest").field_violations.into_iter().map(|v| v.field).collect();
    assert_eq!(fields, vec!["group_by[1]", "queue_ids.ids[3]", "end_time", "timezone", "statistics"]);
    assert_eq!(gw.upstream(&farm(9)).await, serde_json::Value::Null, "nothing reached the upstream");

    let status = client.get_aggregation(get_request("", 0, "", Duration::ZERO)).await.expect_err("no id");
    assert_eq!(status.code(), Code::InvalidArgument);
    let status =
        client.get_aggregation(get_request("agg-x", -1, "", Duration::ZERO)).await.expect_err("negative page size");
    assert_eq!(status.get_details_bad_request().map(|b| b.field_violations[0].field.clone()), Some("page_size".into()));
}

#[tokio::test]
async fn page_tokens_are_bound_to_their_aggregation() {
    let gw = gateway(Duration::from_millis(50), fast_config(HOUR)).await;
    let mut client = gw.client().await;
    let a = client.start_aggregation(start_request(10, 1, 2, &[GroupBy::JobId])).await.expect("start").into_inner();
    let b = client.start_aggregation(start_request(11, 1, 2, &[GroupBy::JobId])).await.expect("start").into_inner();
    let (a, b) = (aggregation(&a).aggregation_id.clone(), aggregation(&b).aggregation_id.clone());
    let token = wait_terminal(&mut client, &a).await.next_page_token;
    wait_terminal(&mut client, &b).await;
    assert!(!token.is_empty());
    for bad in [token.as_str(), "garbage"] {
        let status = client.get_aggregation(get_request(&b, 10, bad, Duration::ZERO)).await.expect_err("foreign token");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(
            status.get_details_bad_request().map(|r| r.field_violations[0].field.clone()),
            Some("page_token".into())
        );
    }
    let status = client.get_aggregation(get_request("agg-unknown", 0, "", Duration::ZERO)).await.expect_err("unknown");
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(status.get_details_error_info().map(|e| e.reason), Some("AGGREGATION_NOT_FOUND".to_owned()));
}

#[tokio::test]
async fn results_expire_with_their_validity_and_a_new_start_starts_afresh() {
    let validity = Duration::from_millis(1500);
    let gw = gateway(Duration::from_millis(50), fast_config(validity)).await;
    let mut client = gw.client().await;
    let req = start_request(12, 1, 1, &[GroupBy::QueueId]);
    let first = client.start_aggregation(req.clone()).await.expect("start").into_inner();
    let id = aggregation(&first).aggregation_id.clone();
    wait_terminal(&mut client, &id).await;
    let status = eventually(Duration::from_secs(10), || {
        let mut client = client.clone();
        let id = id.clone();
        async move { client.get_aggregation(get_request(&id, 0, "", Duration::ZERO)).await.err() }
    })
    .await;
    assert_eq!(status.code(), Code::NotFound);
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "AGGREGATION_EXPIRED");
    assert!(info.metadata.contains_key("expire_time"));

    let again = client.start_aggregation(req).await.expect("start").into_inner();
    assert_eq!(again.disposition(), Disposition::Started);
    assert_ne!(aggregation(&again).aggregation_id, id);
    assert_eq!(gw.upstream(&farm(12)).await["start_calls"], 2);
}

#[tokio::test]
async fn upstream_failures_show_in_the_aggregation_and_are_retried_after_the_failed_ttl() {
    let gw = gateway(Duration::from_millis(50), fast_config(HOUR)).await;
    let mut client = gw.client().await;
    set_faults(&gw.emu, serde_json::json!({"force_status": "FAILED"})).await;
    let req = start_request(13, 1, 1, &[GroupBy::QueueId]);
    let resp = client.start_aggregation(req.clone()).await.expect("start").into_inner();
    let id = aggregation(&resp).aggregation_id.clone();
    let page = wait_terminal(&mut client, &id).await;
    let agg = page.aggregation.expect("aggregation");
    assert_eq!(agg.state(), AggregationState::Failed);
    assert_eq!(agg.error.as_ref().map(|e| e.code), Some(Code::FailedPrecondition as i32));
    assert!(agg.status_message.contains("FAILED"));

    let cached = client.start_aggregation(req.clone()).await.expect("start").into_inner();
    assert_eq!(
        (cached.disposition(), aggregation(&cached).aggregation_id.as_str()),
        (Disposition::Cached, id.as_str()),
        "callers see why, briefly"
    );
    set_faults(&gw.emu, serde_json::json!({})).await;
    let retried = eventually(Duration::from_secs(10), || {
        let (mut client, req) = (client.clone(), req.clone());
        async move {
            let resp = client.start_aggregation(req).await.expect("start").into_inner();
            (resp.disposition() == Disposition::Started).then_some(resp)
        }
    })
    .await;
    let page = wait_terminal(&mut client, &aggregation(&retried).aggregation_id).await;
    assert_eq!(page.aggregation.expect("aggregation").state(), AggregationState::Completed);
}

#[tokio::test]
async fn access_denied_and_timeouts_map_to_canonical_codes() {
    let gw = gateway(Duration::from_millis(50), fast_config(HOUR)).await;
    let mut client = gw.client().await;
    set_faults(&gw.emu, serde_json::json!({"error_rates": {"AccessDeniedException": 1.0}, "operations": ["start"]}))
        .await;
    let resp =
        client.start_aggregation(start_request(14, 1, 1, &[GroupBy::QueueId])).await.expect("accepted").into_inner();
    let agg = wait_terminal(&mut client, &aggregation(&resp).aggregation_id).await.aggregation.expect("aggregation");
    assert_eq!(
        (agg.state(), agg.error.map(|e| e.code)),
        (AggregationState::Failed, Some(Code::PermissionDenied as i32))
    );

    set_faults(&gw.emu, serde_json::json!({"force_status": "TIMEOUT"})).await;
    let resp =
        client.start_aggregation(start_request(15, 1, 1, &[GroupBy::QueueId])).await.expect("accepted").into_inner();
    let agg = wait_terminal(&mut client, &aggregation(&resp).aggregation_id).await.aggregation.expect("aggregation");
    assert_eq!(
        (agg.state(), agg.error.map(|e| e.code)),
        (AggregationState::TimedOut, Some(Code::DeadlineExceeded as i32))
    );
}

#[tokio::test]
async fn an_unreachable_upstream_fails_the_aggregation_as_unavailable() {
    let emu = emulator(Duration::from_millis(50), HOUR).await;
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binds");
    let dead_end = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    let mut config = fast_config(HOUR);
    config.lifecycle.start_deadline = Duration::from_millis(300);
    let upstream = sdk(&dead_end).await;
    let gw = gateway_over(emu, std::sync::Arc::new(upstream), config).await;
    let mut client = gw.client().await;
    let resp =
        client.start_aggregation(start_request(16, 1, 1, &[GroupBy::QueueId])).await.expect("accepted").into_inner();
    let agg = wait_terminal(&mut client, &aggregation(&resp).aggregation_id).await.aggregation.expect("aggregation");
    assert_eq!((agg.state(), agg.error.map(|e| e.code)), (AggregationState::Failed, Some(Code::Unavailable as i32)));
}

#[tokio::test]
async fn a_caller_that_goes_away_does_not_disturb_the_others() {
    let gw = gateway(Duration::from_millis(400), fast_config(HOUR)).await;
    let mut client = gw.client().await;
    let resp =
        client.start_aggregation(start_request(17, 1, 1, &[GroupBy::QueueId])).await.expect("start").into_inner();
    let id = aggregation(&resp).aggregation_id.clone();
    let mut quitter = gw.client().await;
    let quitting_id = id.clone();
    let impatient = tokio::spawn(async move {
        quitter.get_aggregation(get_request(&quitting_id, 0, "", Duration::from_secs(10))).await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    impatient.abort();
    assert!(impatient.await.is_err(), "the caller vanished mid long-poll");
    let page =
        client.get_aggregation(get_request(&id, 0, "", Duration::from_secs(30))).await.expect("long-poll").into_inner();
    assert_eq!(
        page.aggregation.expect("aggregation").state(),
        AggregationState::Completed,
        "returns as soon as terminal"
    );
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    let gw = gateway(Duration::from_millis(50), fast_config(HOUR)).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", gw.addr))
        .expect("URL")
        .connect()
        .await
        .expect("connects");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in ["", "deadline.stats.v1.AggregationService"] {
        let resp = health
            .check(tonic_health::pb::HealthCheckRequest { service: service.into() })
            .await
            .expect("check")
            .into_inner();
        assert_eq!(resp.status(), tonic_health::pb::health_check_response::ServingStatus::Serving, "{service:?}");
    }
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream =
        reflection.server_reflection_info(tokio_stream::once(request)).await.expect("reflection").into_inner();
    let resp = stream.message().await.expect("message").expect("one response");
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("expected a service list")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"deadline.stats.v1.AggregationService".to_owned()), "{names:?}");

    // The service's file, as grpcurl would fetch it: WatchAggregation is a server stream.
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol("deadline.stats.v1.AggregationService".to_owned())),
    };
    let mut stream =
        reflection.server_reflection_info(tokio_stream::once(request)).await.expect("reflection").into_inner();
    let resp = stream.message().await.expect("message").expect("one response");
    let Some(MessageResponse::FileDescriptorResponse(files)) = resp.message_response else {
        panic!("expected file descriptors")
    };
    let methods: Vec<(String, bool)> = files
        .file_descriptor_proto
        .iter()
        .filter_map(|bytes| <prost_types::FileDescriptorProto as prost::Message>::decode(bytes.as_slice()).ok())
        .flat_map(|f| f.service)
        .flat_map(|s| s.method)
        .map(|m| (m.name().to_owned(), m.server_streaming()))
        .collect();
    assert!(methods.contains(&("WatchAggregation".to_owned(), true)), "{methods:?}");
}
