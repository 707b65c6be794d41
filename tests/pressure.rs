//! Correctness under pressure: a full cache, a crashing or stuck aggregation, Starts whose
//! outcome is unknown, gateway-wide bounds, a throttling upstream, restarts, promises about
//! freshness and deadlines, and hostile input. Each runs the real server on loopback, a real
//! tonic client, and the emulator through the real SDK.

mod common;

use common::*;
use deadline_stats_gateway::bench::baseline::RawCodec;
use deadline_stats_gateway::domain::AggregationRequest;
use deadline_stats_gateway::gateway::throttle::Rate;
use deadline_stats_gateway::grpc::pb::{self, AggregationState, Disposition, GroupBy};
use deadline_stats_gateway::grpc::service::{GET, START};
use deadline_stats_gateway::upstream::sdk::{SdkUpstream, SdkUpstreamConfig};
use deadline_stats_gateway::upstream::{Upstream, UpstreamError, UpstreamPage};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tonic::Code;
use tonic_types::StatusExt;

const HOUR: Duration = Duration::from_secs(3600);

fn id_of(resp: &pb::StartAggregationResponse) -> String {
    resp.aggregation.as_ref().expect("aggregation").aggregation_id.clone()
}

async fn start(client: &mut Client, req: pb::StartAggregationRequest) -> pb::StartAggregationResponse {
    client.start_aggregation(req).await.expect("start").into_inner()
}

async fn get(client: &mut Client, id: &str) -> Result<pb::Aggregation, tonic::Status> {
    let page = client.get_aggregation(get_request(id, 0, "", Duration::ZERO)).await?.into_inner();
    Ok(page.aggregation.expect("aggregation"))
}

type Client = pb::aggregation_service_client::AggregationServiceClient<tonic::transport::Channel>;

/// One series of the gateway's metrics.
fn metric(gw: &TestGateway, series: &str) -> f64 {
    parse_metrics(&gw.metrics.encode()).get(series).copied().unwrap_or(0.0)
}

// §1 -----------------------------------------------------------------------------------------

#[tokio::test]
async fn a_full_cache_evicts_the_least_recently_used_result_not_the_fresh_one() {
    // One result's weight, measured on a gateway of its own.
    let probe = gateway(Duration::from_millis(20), fast_config(HOUR)).await;
    let mut c = probe.client().await;
    let id = id_of(&start(&mut c, start_request(40, 1, 10, &[GroupBy::QueueId])).await);
    wait_terminal(&mut c, &id).await;
    let weight = probe.gateway.stats().store.cached_bytes;
    assert!(weight > 10_000, "a result of 240 rows: {weight} bytes");

    let mut config = fast_config(HOUR);
    config.cache_max_bytes = weight * 2 + weight / 2;
    config.result_grace = Duration::from_millis(300);
    let gw = gateway(Duration::from_millis(20), config).await;
    let mut client = gw.client().await;
    let mut ids = Vec::new();
    for farm in 41..=43 {
        let id = id_of(&start(&mut client, start_request(farm, 1, 10, &[GroupBy::QueueId])).await);
        wait_terminal(&mut client, &id).await;
        ids.push(id);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (a, b, c) = (&ids[0], &ids[1], &ids[2]);
    let page = client.get_aggregation(get_request(c, 1000, "", Duration::ZERO)).await.expect("C is served");
    assert_eq!(page.into_inner().statistics.len(), 240, "every row of the fresh result");
    get(&mut client, b).await.expect("B stays");
    let evicted = get(&mut client, a).await.expect_err("A, the least recently used, is evicted");
    assert_eq!(evicted.get_details_error_info().map(|e| e.reason), Some("AGGREGATION_EVICTED".into()));
    let again = start(&mut client, start_request(43, 1, 10, &[GroupBy::QueueId])).await;
    assert_eq!(again.disposition(), Disposition::Cached, "C's identical Start is not run again");
    assert_eq!(gw.upstream(&farm(43)).await["start_calls"], 1);
}

// §2 -----------------------------------------------------------------------------------------

/// The real SDK upstream, except that the first Start for `farm` panics (a bug in the task
/// driving that aggregation) or, with `hang`, never returns.
struct Sabotaged {
    inner: deadline_stats_gateway::upstream::sdk::SdkUpstream,
    farm: String,
    hang: bool,
    fired: AtomicBool,
}

impl Sabotaged {
    async fn new(emu: &deadline_stats_gateway::emulator::EmulatorHandle, farm_n: u64, hang: bool) -> Self {
        Self { inner: sdk(&emu.endpoint_url()).await, farm: farm(farm_n), hang, fired: AtomicBool::new(false) }
    }
}

#[async_trait::async_trait]
impl Upstream for Sabotaged {
    async fn start(&self, request: &AggregationRequest) -> Result<String, UpstreamError> {
        if request.farm_id == self.farm && !self.fired.swap(true, Ordering::SeqCst) {
            if self.hang {
                std::future::pending::<()>().await;
            }
            panic!("injected bug in the aggregation task");
        }
        self.inner.start(request).await
    }

    async fn get_page(
        &self,
        farm_id: &str,
        aggregation_id: &str,
        max_results: u32,
        next_token: Option<&str>,
    ) -> Result<UpstreamPage, UpstreamError> {
        self.inner.get_page(farm_id, aggregation_id, max_results, next_token).await
    }
}

#[tokio::test]
async fn a_panicking_aggregation_ends_failed_internal_and_its_farm_moves_on() {
    let emu = emulator(Duration::from_millis(50), HOUR).await;
    let upstream = Sabotaged::new(&emu, 44, false).await;
    let gw = gateway_over(emu, Arc::new(upstream), fast_config(HOUR)).await;
    let mut client = gw.client().await;
    let doomed = id_of(&start(&mut client, start_request(44, 1, 1, &[GroupBy::QueueId])).await);
    let next = id_of(&start(&mut client, start_request(44, 1, 2, &[GroupBy::QueueId])).await);
    let failed = wait_terminal(&mut client, &doomed).await.aggregation.expect("aggregation");
    assert_eq!(failed.state(), AggregationState::Failed);
    let error = failed.error.expect("error");
    assert_eq!(error.code, Code::Internal as i32);
    assert!(error.message.contains("injected bug"), "{}", error.message);
    let done = wait_terminal(&mut client, &next).await.aggregation.expect("aggregation");
    assert_eq!(done.state(), AggregationState::Completed, "the farm moved on");
    assert_eq!(metric(&gw, r#"dsg_aggregations_abandoned_total{reason="crashed"}"#), 1.0);
    let retried = start(&mut client, start_request(44, 1, 1, &[GroupBy::QueueId])).await;
    assert_eq!(retried.disposition(), Disposition::Cached, "its identical Starts see why, for the failed TTL");
}

#[tokio::test]
async fn an_aggregation_over_the_run_limit_ends_deadline_exceeded_and_its_farm_moves_on() {
    let mut config = fast_config(HOUR);
    config.run_limit = Some(Duration::from_millis(800));
    let emu = emulator(Duration::from_millis(100), HOUR).await;
    let upstream = Sabotaged::new(&emu, 45, true).await;
    let gw = gateway_over(emu, Arc::new(upstream), config).await;
    let mut client = gw.client().await;
    let stuck = id_of(&start(&mut client, start_request(45, 1, 1, &[GroupBy::QueueId])).await);
    let next = id_of(&start(&mut client, start_request(45, 1, 2, &[GroupBy::QueueId])).await);
    let over = wait_terminal(&mut client, &stuck).await.aggregation.expect("aggregation");
    assert_eq!(
        (over.state(), over.error.map(|e| e.code)),
        (AggregationState::Failed, Some(Code::DeadlineExceeded as i32))
    );
    let page = wait_terminal(&mut client, &next).await;
    assert_eq!(page.aggregation.expect("aggregation").state(), AggregationState::Completed, "the farm moved on");
    assert_eq!(metric(&gw, r#"dsg_aggregations_abandoned_total{reason="overran"}"#), 1.0);
}

// §3 -----------------------------------------------------------------------------------------

#[tokio::test]
async fn a_start_whose_outcome_is_unknown_waits_out_its_orphan_and_says_so() {
    let mut config = fast_config(HOUR);
    config.lifecycle.start_deadline = Duration::from_millis(300);
    let gw = gateway(Duration::from_millis(2000), config).await;
    set_faults(&gw.emu, serde_json::json!({"lose_response_rate": 1.0, "operations": ["start"], "remaining": 1})).await;
    let mut client = gw.client().await;
    let id = id_of(&start(&mut client, start_request(46, 1, 1, &[GroupBy::QueueId])).await);
    let waiting = eventually(Duration::from_secs(5), || {
        let (mut client, id) = (client.clone(), id.clone());
        async move { get(&mut client, &id).await.ok().filter(|a| a.status_message.contains("outcome unknown")) }
    })
    .await;
    assert_eq!(waiting.state(), AggregationState::Running);
    assert_eq!(waiting.status_message, "previous Start's outcome unknown; waiting for the farm to be free");
    let done = wait_terminal(&mut client, &id).await.aggregation.expect("aggregation");
    assert_eq!(done.state(), AggregationState::Completed, "not UNAVAILABLE after --start-deadline: {done:?}");
    assert_eq!(metric(&gw, "dsg_upstream_start_outcome_unknown_total"), 1.0);
    let upstream = gw.upstream(&farm(46)).await;
    assert_eq!(upstream["max_in_progress"], 1);
}

// §4 -----------------------------------------------------------------------------------------

#[tokio::test]
async fn gateway_wide_bounds_answer_gateway_busy_with_retry_info() {
    let mut config = fast_config(HOUR);
    config.max_active_aggregations = 3;
    config.max_farms = 2;
    let gw = gateway(Duration::from_secs(20), config).await;
    let mut client = gw.client().await;
    start(&mut client, start_request(47, 1, 1, &[GroupBy::QueueId])).await;
    start(&mut client, start_request(48, 1, 1, &[GroupBy::QueueId])).await;
    let third_farm = client.start_aggregation(start_request(49, 1, 1, &[GroupBy::QueueId])).await.expect_err("busy");
    start(&mut client, start_request(47, 1, 2, &[GroupBy::QueueId])).await;
    let fourth = client.start_aggregation(start_request(48, 1, 2, &[GroupBy::QueueId])).await.expect_err("busy");
    for (status, bound) in [(third_farm, "max_farms"), (fourth, "max_active_aggregations")] {
        assert_eq!(status.code(), Code::ResourceExhausted);
        let details = status.get_error_details();
        assert!(details.retry_info().and_then(|r| r.retry_delay).is_some());
        let info = details.error_info().expect("ErrorInfo");
        assert_eq!((info.reason.as_str(), info.metadata["bound"].as_str()), ("GATEWAY_BUSY", bound));
    }
    let joined = start(&mut client, start_request(47, 1, 1, &[GroupBy::QueueId])).await;
    assert_eq!(joined.disposition(), Disposition::Joined, "joining takes no room");
}

#[tokio::test]
async fn an_aggregation_waiting_for_the_upstream_pacer_is_still_queued() {
    let mut config = fast_config(HOUR);
    config.upstream_start = Rate { per_second: 0.5, burst: 1 };
    let gw = gateway(Duration::from_millis(50), config).await;
    let mut client = gw.client().await;
    let first = id_of(&start(&mut client, start_request(50, 1, 1, &[GroupBy::QueueId])).await);
    eventually(Duration::from_secs(5), || {
        let (mut client, id) = (client.clone(), first.clone());
        async move { (get(&mut client, &id).await.ok()?.state() != AggregationState::Queued).then_some(()) }
    })
    .await;
    let second = id_of(&start(&mut client, start_request(51, 1, 1, &[GroupBy::QueueId])).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let waiting = get(&mut client, &second).await.expect("get");
    assert_eq!(
        (waiting.state(), waiting.queue_position),
        (AggregationState::Queued, 0),
        "its Start has not been sent: it waits for the pacer"
    );
    assert_eq!(gw.upstream(&farm(51)).await, serde_json::Value::Null, "nothing reached the upstream yet");
    let done = wait_terminal(&mut client, &second).await.aggregation.expect("aggregation");
    assert_eq!(done.state(), AggregationState::Completed);
}

// §5 -----------------------------------------------------------------------------------------

#[tokio::test]
async fn a_completed_result_is_fetched_whole_while_the_upstream_throttles_ninety_percent_of_gets() {
    let emu = emulator(Duration::from_millis(50), HOUR).await;
    let mut sdk_settings = sdk_config(&emu.endpoint_url());
    sdk_settings.get_max_attempts = 1;
    let upstream = deadline_stats_gateway::upstream::sdk::SdkUpstream::connect(&sdk_settings).await.expect("SDK");
    let mut config = fast_config(HOUR);
    config.lifecycle.start_retry = deadline_stats_gateway::gateway::backoff::BackoffPolicy {
        initial: Duration::from_millis(5),
        max: Duration::from_millis(20),
        multiplier: 2.0,
    };
    let gw = gateway_over(emu, Arc::new(upstream), config).await;
    set_faults(
        &gw.emu,
        serde_json::json!({"error_rates": {"ThrottlingException": 0.9}, "operations": ["get"], "retry_after_secs": 0}),
    )
    .await;
    let mut client = gw.client().await;
    let id = id_of(&start(&mut client, start_request(52, 2, 4, &[GroupBy::QueueId, GroupBy::JobId])).await);
    let done = wait_terminal(&mut client, &id).await.aggregation.expect("aggregation");
    assert_eq!(done.state(), AggregationState::Completed, "{done:?}");
    assert_eq!(done.row_count, 1152, "every row of twelve upstream pages");
    let throttled =
        metric(&gw, r#"dsg_upstream_calls_total{operation="GetSessionsStatisticsAggregation",outcome="throttled"}"#);
    assert!(throttled >= 20.0, "the upstream did throttle: {throttled}");
}

// §6 -----------------------------------------------------------------------------------------

#[tokio::test]
async fn an_id_from_before_a_restart_is_lost_and_an_unknown_one_not_found() {
    let before = gateway(Duration::from_millis(20), fast_config(HOUR)).await;
    let mut client = before.client().await;
    let id = id_of(&start(&mut client, start_request(53, 1, 1, &[GroupBy::QueueId])).await);
    let after = gateway(Duration::from_millis(20), fast_config(HOUR)).await;
    let mut client = after.client().await;
    let lost = get(&mut client, &id).await.expect_err("the restarted gateway does not know it");
    assert_eq!(lost.code(), Code::NotFound);
    assert_eq!(lost.get_details_error_info().map(|e| e.reason), Some("AGGREGATION_LOST".into()));
    assert!(lost.message().contains("restarted") && lost.message().contains("start the aggregation again"));
    let ours = id_of(&start(&mut client, start_request(53, 1, 1, &[GroupBy::QueueId])).await);
    let never = format!("{}{}", &ours[..12], "0".repeat(24));
    let unknown = get(&mut client, &never).await.expect_err("never existed");
    assert_eq!(unknown.get_details_error_info().map(|e| e.reason), Some("AGGREGATION_NOT_FOUND".into()));
    let garbage = get(&mut client, "not-an-id").await.expect_err("not an id");
    assert_eq!(garbage.get_details_error_info().map(|e| e.reason), Some("AGGREGATION_NOT_FOUND".into()));
}

#[tokio::test]
async fn a_failed_id_still_says_why_after_its_failed_ttl() {
    let gw = gateway(Duration::from_millis(20), fast_config(HOUR)).await;
    set_faults(&gw.emu, serde_json::json!({"force_status": "FAILED"})).await;
    let mut client = gw.client().await;
    let id = id_of(&start(&mut client, start_request(54, 1, 1, &[GroupBy::QueueId])).await);
    wait_terminal(&mut client, &id).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let later = get(&mut client, &id).await.expect("a failure is remembered past its TTL");
    assert_eq!(later.state(), AggregationState::Failed);
    assert_eq!(later.error.map(|e| e.code), Some(Code::FailedPrecondition as i32));
    let again = start(&mut client, start_request(54, 1, 1, &[GroupBy::QueueId])).await;
    assert_eq!(again.disposition(), Disposition::Started, "after the TTL a Start retries");
}

#[tokio::test]
async fn an_upstream_throttling_for_the_whole_polling_window_ends_unavailable() {
    // One SDK attempt per call, so the gateway's own retries (not the SDK's jittered backoff)
    // fill the window and each throttled answer reaches it.
    let config = fast_config(Duration::from_millis(1500));
    let emu = emulator(Duration::from_millis(20), config.lifecycle.result_validity).await;
    let sdk_config = SdkUpstreamConfig { get_max_attempts: 1, ..sdk_config(&emu.endpoint_url()) };
    let upstream = SdkUpstream::connect(&sdk_config).await.expect("SDK client builds");
    let gw = gateway_over(emu, Arc::new(upstream), config).await;
    set_faults(
        &gw.emu,
        serde_json::json!({"error_rates": {"ThrottlingException": 1.0}, "operations": ["get"], "retry_after_secs": 0}),
    )
    .await;
    let mut client = gw.client().await;
    let id = id_of(&start(&mut client, start_request(55, 1, 1, &[GroupBy::QueueId])).await);
    let agg = wait_terminal(&mut client, &id).await.aggregation.expect("aggregation");
    let state = agg.state();
    let error = agg.error.expect("error");
    assert_eq!((state, error.code), (AggregationState::Failed, Code::Unavailable as i32), "{error:?}");
    assert!(error.message.contains("throttled"), "names the last upstream error: {}", error.message);
}

// §7 -----------------------------------------------------------------------------------------

#[tokio::test]
async fn cached_is_only_answered_with_enough_validity_left_to_read_it() {
    let mut config = fast_config(Duration::from_secs(4));
    config.min_remaining_validity = Duration::from_secs(2);
    let gw = gateway(Duration::from_millis(20), config).await;
    let mut client = gw.client().await;
    let req = start_request(56, 1, 1, &[GroupBy::QueueId]);
    let first = id_of(&start(&mut client, req.clone()).await);
    wait_terminal(&mut client, &first).await;
    let cached = start(&mut client, req.clone()).await;
    assert_eq!((cached.disposition(), id_of(&cached)), (Disposition::Cached, first.clone()));
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let fresh = start(&mut client, req).await;
    assert_eq!(fresh.disposition(), Disposition::Started, "too little validity left to read it");
    assert_ne!(id_of(&fresh), first);
    get(&mut client, &first).await.expect("the old id keeps working until its expiry");
}

#[tokio::test]
async fn max_staleness_refuses_an_older_cached_result() {
    let gw = gateway(Duration::from_millis(20), fast_config(HOUR)).await;
    let mut client = gw.client().await;
    let req = start_request(57, 1, 1, &[GroupBy::QueueId]);
    let first = id_of(&start(&mut client, req.clone()).await);
    wait_terminal(&mut client, &first).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut lax = req.clone();
    lax.max_staleness = Some(prost_types::Duration { seconds: 60, nanos: 0 });
    assert_eq!(start(&mut client, lax).await.disposition(), Disposition::Cached);
    let mut strict = req.clone();
    strict.max_staleness = Some(prost_types::Duration { seconds: 0, nanos: 100_000_000 });
    let fresh = start(&mut client, strict).await;
    assert_eq!(fresh.disposition(), Disposition::Started, "older than 100 ms");
    assert_eq!(start(&mut client, req).await.disposition(), Disposition::Joined, "the key now names the fresh one");
    let mut negative = start_request(57, 1, 1, &[GroupBy::QueueId]);
    negative.max_staleness = Some(prost_types::Duration { seconds: -5, nanos: 0 });
    let status = client.start_aggregation(negative).await.expect_err("negative");
    assert_eq!(
        status.get_details_bad_request().map(|b| b.field_violations[0].field.clone()),
        Some("max_staleness".into())
    );
}

#[tokio::test]
async fn a_long_poll_returns_the_current_state_before_the_callers_deadline() {
    let gw = gateway(Duration::from_secs(20), fast_config(HOUR)).await;
    let mut client = gw.client().await;
    let id = id_of(&start(&mut client, start_request(58, 1, 1, &[GroupBy::QueueId])).await);
    let mut req = tonic::Request::new(get_request(&id, 0, "", Duration::from_secs(30)));
    req.set_timeout(Duration::from_secs(2));
    let begin = std::time::Instant::now();
    let page = client.get_aggregation(req).await.expect("answered, not DEADLINE_EXCEEDED").into_inner();
    assert!(begin.elapsed() < Duration::from_secs(2));
    let state = page.aggregation.expect("aggregation").state();
    assert!(matches!(state, AggregationState::Queued | AggregationState::Running), "{state:?}");
}

#[tokio::test]
async fn an_omitted_timezone_and_period_coalesce_with_their_defaults_given_explicitly() {
    let gw = gateway(Duration::from_millis(300), fast_config(HOUR)).await;
    let mut client = gw.client().await;
    let mut omitted = start_request(59, 1, 1, &[GroupBy::QueueId]);
    omitted.period = pb::Period::Unspecified as i32;
    let mut explicit = omitted.clone();
    explicit.period = pb::Period::Daily as i32;
    explicit.timezone = "UTC+00:00".into();
    let a = start(&mut client, omitted).await;
    let b = start(&mut client, explicit).await;
    assert_eq!((id_of(&a), b.disposition()), (id_of(&b), Disposition::Joined));
    wait_terminal(&mut client, &id_of(&a)).await;
    assert_eq!(gw.upstream(&farm(59)).await["start_calls"], 1);
}

// §8 -----------------------------------------------------------------------------------------

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
