//! Observability end to end: spans received by an in-test OTLP collector, `/metrics` scraped
//! and parsed, the Grafana dashboard checked against what is exported, a SIGTERM drain, and
//! configuration errors.

mod common;

use common::*;
use deadline_stats_gateway::grpc::pb::{self, AggregationState, Disposition, GroupBy};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// An OTLP trace collector that keeps every span with its resource's service name.
#[derive(Default, Clone)]
struct Collector(Arc<Mutex<Vec<(String, Span)>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                .and_then(|a| attr_text(a.value.as_ref()?.value.as_ref()?))
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                spans.push((service.clone(), span));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn attr_text(v: &AnyValue) -> Option<String> {
    match v {
        AnyValue::StringValue(s) => Some(s.clone()),
        AnyValue::IntValue(i) => Some(i.to_string()),
        AnyValue::BoolValue(b) => Some(b.to_string()),
        AnyValue::DoubleValue(d) => Some(d.to_string()),
        _ => None,
    }
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| attr_text(a.value.as_ref()?.value.as_ref()?))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn client(url: &str) -> pb::aggregation_service_client::AggregationServiceClient<tonic::transport::Channel> {
    let channel =
        tonic::transport::Channel::from_shared(url.to_owned()).expect("URL").connect().await.expect("connects");
    pb::aggregation_service_client::AggregationServiceClient::new(channel)
}

fn traced<T>(message: T, traceparent: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("traceparent", traceparent.parse().expect("ascii"));
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_collector_with_parents_links_and_rpc_attributes() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binds");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(collector.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(server);

    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_SERVICE_NAME", "dsg-under-test"),
        ("OTEL_TRACES_SAMPLER", "always_on"),
    ];
    let (mut gateway, url, _) =
        spawn_serve(&["--emulator-aggregation-duration", "300ms", "--poll-initial-interval", "50ms"], &env);
    let mut client = client(&url).await;
    let (caller_trace, caller_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let (joiner_trace, joiner_span) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let request = start_request(1, 1, 1, &[GroupBy::QueueId]);
    let started = client
        .start_aggregation(traced(request.clone(), &format!("00-{caller_trace}-{caller_span}-01")))
        .await
        .expect("start")
        .into_inner();
    let joined = client
        .start_aggregation(traced(request, &format!("00-{joiner_trace}-{joiner_span}-01")))
        .await
        .expect("start")
        .into_inner();
    assert_eq!(joined.disposition(), Disposition::Joined);
    let id = started.aggregation.expect("aggregation").aggregation_id;
    assert_eq!(
        wait_terminal(&mut client, &id).await.aggregation.expect("aggregation").state(),
        AggregationState::Completed
    );

    gateway.terminate();
    let exit = tokio::task::spawn_blocking(move || gateway.wait_exit(Duration::from_secs(20))).await.expect("joins");
    assert!(exit.success(), "clean exit flushes the spans");
    let spans = collector.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert!(spans.iter().all(|(service, _)| service == "dsg-under-test"), "OTEL_SERVICE_NAME names the service");
    let spans: Vec<Span> = spans.into_iter().map(|(_, s)| s).collect();

    let server = |trace: &str| {
        spans
            .iter()
            .find(|s| s.name == "deadline.stats.v1.AggregationService/StartAggregation" && hex(&s.trace_id) == trace)
            .unwrap_or_else(|| panic!("no server span in trace {trace}"))
    };
    let first = server(caller_trace);
    assert_eq!(hex(&first.parent_span_id), caller_span, "the caller's span is the parent");
    assert_eq!(first.kind, 2, "SPAN_KIND_SERVER");
    assert_eq!(attr(first, "rpc.system").as_deref(), Some("grpc"));
    assert_eq!(attr(first, "rpc.service").as_deref(), Some("deadline.stats.v1.AggregationService"));
    assert_eq!(attr(first, "rpc.method").as_deref(), Some("StartAggregation"));
    assert_eq!(attr(first, "rpc.grpc.status_code").as_deref(), Some("0"));
    let second = server(joiner_trace);

    let lifecycle = spans.iter().find(|s| s.name == "aggregation.lifecycle").expect("a lifecycle span");
    assert_eq!(attr(lifecycle, "aggregation.id").as_deref(), Some(id.as_str()));
    assert_eq!(attr(lifecycle, "aggregation.state").as_deref(), Some("COMPLETED"));
    let links: HashSet<(String, String)> =
        lifecycle.links.iter().map(|l| (hex(&l.trace_id), hex(&l.span_id))).collect();
    assert!(links.contains(&(caller_trace.to_owned(), hex(&first.span_id))), "linked from the Start that started it");
    assert!(links.contains(&(joiner_trace.to_owned(), hex(&second.span_id))), "linked from the Start that joined it");

    let upstream: Vec<&Span> = spans.iter().filter(|s| s.parent_span_id == lifecycle.span_id).collect();
    let names: HashSet<&str> = upstream.iter().map(|s| s.name.as_str()).collect();
    assert!(
        names.contains("StartSessionsStatisticsAggregation") && names.contains("GetSessionsStatisticsAggregation"),
        "{names:?}"
    );
    for call in &upstream {
        assert_eq!(call.kind, 3, "SPAN_KIND_CLIENT");
        assert_eq!(attr(call, "farm.id"), Some(farm(1)));
        assert_eq!(attr(call, "aggregation.id").as_deref(), Some(id.as_str()));
        assert_eq!(attr(call, "outcome").as_deref(), Some("ok"));
        assert_eq!(attr(call, "upstream.route").as_deref(), Some("default"), "the farm's route");
    }
    assert_eq!(attr(lifecycle, "upstream.route").as_deref(), Some("default"));
    let get = upstream.iter().find(|s| s.name == "GetSessionsStatisticsAggregation").expect("a Get");
    assert!(attr(get, "upstream.aggregation_id").is_some_and(|u| u.len() == 32), "both aggregation ids");
}

#[tokio::test]
async fn metrics_are_scraped_and_move_with_starts_joins_and_cache_hits() {
    let gw = gateway(Duration::from_millis(300), fast_config(Duration::from_secs(3600))).await;
    let metrics = gw.metrics.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binds");
    let admin = format!("http://{}", listener.local_addr().expect("addr"));
    let (_ready, ready_rx) = tokio::sync::watch::channel(true);
    tokio::spawn(deadline_stats_gateway::telemetry::admin::serve(
        listener,
        metrics,
        ready_rx,
        axum::Router::new(),
        std::future::pending(),
    ));
    let scrape = || async {
        let (status, headers, body) = http("GET", &format!("{admin}/metrics"), None, &[]).await;
        assert_eq!(status, 200);
        assert_eq!(headers["content-type"], "application/openmetrics-text; version=1.0.0; charset=utf-8");
        parse_metrics(&body)
    };
    let value = |m: &std::collections::HashMap<String, f64>, series: &str| m.get(series).copied().unwrap_or(0.0);

    let mut client = gw.client().await;
    let request = start_request(2, 1, 1, &[GroupBy::QueueId]);
    let first = client.start_aggregation(request.clone()).await.expect("start").into_inner();
    client.start_aggregation(request.clone()).await.expect("join");
    let m = scrape().await;
    assert_eq!(value(&m, r#"dsg_start_dispositions_total{disposition="started"}"#), 1.0);
    assert_eq!(value(&m, r#"dsg_start_dispositions_total{disposition="joined"}"#), 1.0);
    assert_eq!(value(&m, "dsg_cache_misses_total"), 1.0);
    assert_eq!(value(&m, r#"dsg_rpc_requests_total{method="StartAggregation",code="OK"}"#), 2.0);
    assert_eq!(value(&m, "dsg_aggregations_active"), 1.0);

    wait_terminal(&mut client, &first.aggregation.expect("aggregation").aggregation_id).await;
    let cached = client.start_aggregation(request).await.expect("cache hit").into_inner();
    assert_eq!(cached.disposition(), Disposition::Cached);
    let status = client.get_aggregation(get_request("agg-unknown", 0, "", Duration::ZERO)).await.expect_err("unknown");
    assert_eq!(status.code(), tonic::Code::NotFound);
    let m = scrape().await;
    assert_eq!(value(&m, r#"dsg_start_dispositions_total{disposition="cached"}"#), 1.0);
    assert_eq!(value(&m, "dsg_cache_hits_total"), 1.0);
    assert_eq!(value(&m, r#"dsg_queue_wait_seconds_count{class="interactive"}"#), 1.0, "its wait, by class");
    assert_eq!(value(&m, r#"dsg_queue_wait_seconds_count{class="batch"}"#), 0.0);
    assert_eq!(value(&m, "dsg_cache_entries"), 1.0);
    assert!(value(&m, "dsg_cache_bytes") > 0.0);
    assert_eq!(value(&m, "dsg_aggregations_active"), 0.0);
    assert_eq!(
        value(
            &m,
            r#"dsg_upstream_calls_total{operation="StartSessionsStatisticsAggregation",outcome="ok",route="default"}"#
        ),
        1.0
    );
    assert!(
        value(
            &m,
            r#"dsg_upstream_calls_total{operation="GetSessionsStatisticsAggregation",outcome="ok",route="default"}"#
        ) >= 1.0
    );
    assert_eq!(value(&m, r#"dsg_aggregations_finished_total{state="COMPLETED"}"#), 1.0);
    assert_eq!(value(&m, "dsg_aggregation_time_to_complete_seconds_count"), 1.0);
    assert_eq!(value(&m, r#"dsg_rpc_requests_total{method="GetAggregation",code="NOT_FOUND"}"#), 1.0);
    assert!(value(&m, r#"dsg_rpc_duration_seconds_count{method="GetAggregation"}"#) >= 2.0);

    // Fewer statistics of the same day: cut out of the cached result.
    let mut fewer = start_request(2, 1, 1, &[GroupBy::QueueId]);
    fewer.statistics = vec![deadline_stats_gateway::grpc::pb::Statistic::Sum as i32];
    let derived = client.start_aggregation(fewer).await.expect("derived").into_inner();
    assert_eq!(derived.disposition(), Disposition::Derived);
    let m = scrape().await;
    assert_eq!(value(&m, r#"dsg_start_dispositions_total{disposition="derived"}"#), 1.0);
    assert_eq!(value(&m, "dsg_derived_total"), 1.0);
    assert_eq!(value(&m, "dsg_cache_hits_total"), 2.0, "a derived answer is a cache hit");
    assert_eq!(value(&m, "dsg_cache_misses_total"), 1.0);
}

/// Python's `prometheus_client` OpenMetrics parser (strict: it refuses what Prometheus would
/// mis-read) reads a scrape; prints `name type` per family.
const OPENMETRICS_CHECK: &str = r#"
import sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
for family in text_string_to_metric_families(sys.stdin.read()):
    print(family.name, family.type)
"#;

#[tokio::test]
async fn metrics_are_valid_openmetrics_with_typed_counters() {
    let path = tokio::task::spawn_blocking(|| {
        python_packages("pydeps-openmetrics", &["prometheus-client"], "import prometheus_client.openmetrics.parser")
    })
    .await
    .expect("joins");
    // On Redis, so the shared store's gauges are scraped too.
    let redis = tokio::task::spawn_blocking(redis_server).await.expect("joins");
    let (gateway, _url, admin) =
        spawn_serve(&["--caller-start-rate", "0", "--store", "redis", "--redis-url", &redis.url()], &[]);
    let (status, headers, body) = eventually(Duration::from_secs(10), || {
        let admin = admin.clone();
        async move {
            let scrape = http("GET", &format!("{admin}/metrics"), None, &[]).await;
            scrape.2.contains("dsg_store_keys").then_some(scrape)
        }
    })
    .await;
    drop(gateway);
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "application/openmetrics-text; version=1.0.0; charset=utf-8");
    let mut child = std::process::Command::new("python3")
        .args(["-c", OPENMETRICS_CHECK])
        .env("PYTHONPATH", path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    use std::io::Write as _;
    child.stdin.take().expect("stdin").write_all(body.as_bytes()).expect("writes");
    let out = child.wait_with_output().expect("finishes");
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused the scrape: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let families: std::collections::HashMap<String, String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' ').map(|(n, t)| (n.to_owned(), t.to_owned())))
        .collect();
    for counter in ["dsg_rpc_requests", "dsg_upstream_calls", "dsg_aggregations_abandoned", "dsg_gateway_busy"] {
        assert_eq!(families.get(counter).map(String::as_str), Some("counter"), "{counter}: {families:?}");
    }
    assert_eq!(families.get("dsg_rpc_duration_seconds").map(String::as_str), Some("histogram"));
    assert_eq!(families.get("dsg_queue_wait_seconds").map(String::as_str), Some("histogram"), "{families:?}");
    assert_eq!(families.get("dsg_queue_refused").map(String::as_str), Some("counter"), "{families:?}");
    assert_eq!(families.get("dsg_aggregations_active").map(String::as_str), Some("gauge"));
    for gauge in ["dsg_store_keys", "dsg_store_memory_bytes", "dsg_store_max_memory_bytes"] {
        assert_eq!(families.get(gauge).map(String::as_str), Some("gauge"), "{gauge}: {families:?}");
    }
    assert_eq!(families.get("dsg_store_corrupt").map(String::as_str), Some("counter"), "{families:?}");
    let m = parse_metrics(&body);
    assert!(m.get("dsg_store_keys").is_some_and(|n| *n >= 1.0), "the epoch at least: {m:?}");
    assert!(m.get("dsg_store_memory_bytes").is_some_and(|n| *n > 0.0), "{m:?}");
}

#[tokio::test]
async fn sigterm_lets_running_aggregations_finish_and_answers_their_long_polls() {
    let (mut gateway, url, admin) = spawn_serve(
        &["--emulator-aggregation-duration", "2s", "--shutdown-grace", "20s", "--caller-start-rate", "0"],
        &[],
    );
    eventually(Duration::from_secs(10), || async {
        (http("GET", &format!("{admin}/readyz"), None, &[]).await.0 == 200).then_some(())
    })
    .await;
    let mut client = client(&url).await;
    let resp = client.start_aggregation(start_request(5, 1, 1, &[GroupBy::QueueId])).await.expect("start").into_inner();
    let id = resp.aggregation.expect("aggregation").aggregation_id;
    let poll = {
        let (mut client, id) = (client.clone(), id.clone());
        tokio::spawn(async move { client.get_aggregation(get_request(&id, 0, "", Duration::from_secs(60))).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    gateway.terminate();
    let page = poll.await.expect("joins").expect("the long-poll is answered").into_inner();
    let agg = page.aggregation.expect("aggregation");
    assert_eq!(agg.state(), AggregationState::Completed, "answered when the aggregation finished, not at SIGTERM");
    assert_eq!(agg.row_count, 24);
    let exit = tokio::task::spawn_blocking(move || gateway.wait_exit(Duration::from_secs(15))).await.expect("joins");
    assert!(exit.success(), "exit status {exit:?}");
}

#[tokio::test]
async fn every_metric_the_dashboard_queries_is_exported() {
    let gw = gateway(Duration::from_millis(50), fast_config(Duration::from_secs(3600))).await;
    let exported: HashSet<String> = gw
        .metrics
        .encode()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .flat_map(|l| {
            let mut parts = l.split_whitespace();
            let (name, kind) = (parts.next().unwrap_or_default().to_owned(), parts.next().unwrap_or_default());
            match kind {
                "counter" => vec![format!("{name}_total")],
                "histogram" => vec![format!("{name}_bucket"), format!("{name}_sum"), format!("{name}_count")],
                _ => vec![name],
            }
        })
        .collect();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/deadline-stats-gateway.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard exists")).expect("dashboard is JSON");
    let mut queried = HashSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("expr");
            let mut rest = expr;
            while let Some(at) = rest.find("dsg_") {
                let name: String = rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                rest = &rest[at + name.len()..];
                queried.insert(name);
            }
        }
    }
    assert!(queried.len() >= 15, "the dashboard covers traffic, queues, upstream and cache: {queried:?}");
    let missing: Vec<&String> = queried.iter().filter(|q| !exported.contains(*q)).collect();
    assert!(missing.is_empty(), "queried but not exported: {missing:?}");
}

#[tokio::test]
async fn sigterm_drains_long_polls_and_starts_then_exits_cleanly() {
    let (mut gateway, url, admin) = spawn_serve(
        &["--emulator-aggregation-duration", "30s", "--shutdown-grace", "10s", "--caller-start-rate", "0"],
        &[],
    );
    eventually(Duration::from_secs(10), || async {
        (http("GET", &format!("{admin}/readyz"), None, &[]).await.0 == 200).then_some(())
    })
    .await;
    let client = client(&url).await;
    let mut ids = Vec::new();
    for n in 0..3 {
        let resp = client
            .clone()
            .start_aggregation(start_request(3, 1, n + 1, &[GroupBy::QueueId]))
            .await
            .expect("start")
            .into_inner();
        ids.push(resp.aggregation.expect("aggregation").aggregation_id);
    }
    let polls: Vec<_> = ids
        .iter()
        .map(|id| {
            let (mut client, id) = (client.clone(), id.clone());
            tokio::spawn(async move { client.get_aggregation(get_request(&id, 0, "", Duration::from_secs(60))).await })
        })
        .collect();
    let starts: Vec<_> = (0..20)
        .map(|n| {
            let mut client = client.clone();
            tokio::spawn(
                async move { client.start_aggregation(start_request(4 + n % 4, 1, 1, &[GroupBy::QueueId])).await },
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    gateway.terminate();
    for start in starts {
        start.await.expect("joins").expect("Starts in flight succeed");
    }
    for poll in polls {
        let page = poll.await.expect("joins").expect("long-polls in flight succeed").into_inner();
        let state = page.aggregation.expect("aggregation").state();
        assert!(
            matches!(state, AggregationState::Queued | AggregationState::Running),
            "returned early with the current state: {state:?}"
        );
    }
    let exit = tokio::task::spawn_blocking(move || gateway.wait_exit(Duration::from_secs(15))).await.expect("joins");
    assert!(exit.success(), "exit status {exit:?}");
    assert!(
        tonic::transport::Channel::from_shared(url).expect("URL").connect().await.is_err(),
        "nothing listens any more"
    );
}

/// Runs a gateway logging JSON with `rust_log`, sends one refused Start carrying the caller's
/// trace context `trace` and one good Start, and returns the log lines.
async fn json_logs_of_a_refusal(name: &str, rust_log: &str, trace: &str) -> Vec<serde_json::Value> {
    let path = std::env::temp_dir().join(format!("dsg-logs-{name}-{}.jsonl", std::process::id()));
    let file = std::fs::File::create(&path).expect("log file");
    let (mut gateway, url, _) = spawn_serve_logging(&["--log-format", "json"], &[("RUST_LOG", rust_log)], file.into());
    let mut client = client(&url).await;
    let mut bad = start_request(5, 1, 1, &[GroupBy::QueueId]);
    bad.farm_id = "farm-nope".into();
    let status =
        client.start_aggregation(traced(bad, &format!("00-{trace}-10f067aa0ba902b7-01"))).await.expect_err("invalid");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    client.start_aggregation(start_request(5, 1, 1, &[GroupBy::QueueId])).await.expect("start");
    gateway.terminate();
    assert!(
        tokio::task::spawn_blocking(move || gateway.wait_exit(Duration::from_secs(20))).await.expect("joins").success()
    );
    let text = std::fs::read_to_string(&path).expect("logs");
    let _ = std::fs::remove_file(&path);
    let lines: Vec<serde_json::Value> =
        text.lines().map(|l| serde_json::from_str(l).expect("every line is JSON")).collect();
    assert!(lines.iter().all(|l| l["timestamp"].is_string() && l["level"].is_string() && l["message"].is_string()));
    let in_spans: Vec<&serde_json::Value> = lines.iter().filter(|l| l["span"].is_string()).collect();
    assert!(!in_spans.is_empty(), "the lifecycle logged: {text}");
    for line in &in_spans {
        let (t, s) = (line["trace_id"].as_str().unwrap_or_default(), line["span_id"].as_str().unwrap_or_default());
        assert!(t.len() == 32 && s.len() == 16, "trace and span ids on {line}");
    }
    lines
}

fn refusal(lines: &[serde_json::Value]) -> &serde_json::Value {
    let refused = lines.iter().find(|l| l["message"] == "rpc refused").expect("the refusal is logged");
    assert_eq!(
        (refused["rpc.method"].as_str(), refused["code"].as_str()),
        (Some("StartAggregation"), Some("InvalidArgument"))
    );
    refused
}

#[tokio::test]
async fn json_log_lines_of_a_request_carry_its_trace_and_span_ids() {
    // At `info` without trace export RPCs get no span; the refusal names the caller's trace.
    let trace = "5bf92f3577b34da6a3ce929d0e0e4736";
    let lines = json_logs_of_a_refusal("info", "info", trace).await;
    let refused = refusal(&lines);
    assert_eq!(refused["trace_id"], trace, "the caller's trace id");
    assert!(refused["span"].is_null(), "no RPC span at info: {refused}");

    // With debug logs the RPC has its span, a child of the caller's.
    let trace = "6cf92f3577b34da6a3ce929d0e0e4736";
    let lines = json_logs_of_a_refusal("debug", "info,deadline_stats_gateway::grpc=debug", trace).await;
    let refused = refusal(&lines);
    assert_eq!((refused["span"].as_str(), refused["trace_id"].as_str()), (Some("rpc"), Some(trace)));
    assert_eq!(refused["span_id"].as_str().map(str::len), Some(16));
    assert_ne!(refused["span_id"], "10f067aa0ba902b7", "the RPC's own span, not the caller's");
}

#[test]
fn bad_configuration_stops_start_up_with_a_message_naming_it() {
    let dir = std::env::temp_dir().join(format!("dsg-obs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("bad.toml");
    std::fs::write(&file, "farm-queue-capacity = 10\nshutdown-grace = \"soon\"\n").expect("write");
    let run = |args: &[&str], env: &[(&str, &str)]| {
        std::process::Command::new(BIN)
            .args(["serve", "--upstream", "emulator", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(args)
            .envs(env.iter().copied())
            .output()
            .expect("runs")
    };
    let out = run(&["--config", &file.to_string_lossy()], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--shutdown-grace"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    std::fs::write(&file, "farm-queue-capacity = 10\nno-such-setting = 1\n").expect("write");
    let out = run(&["--config", &file.to_string_lossy()], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown setting 'no-such-setting'"));

    let out = run(&[], &[("DSG_FARM_QUEUE_CAPACITY", "many")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--farm-queue-capacity"));

    let out = run(&["--max-wait", "2m", "--request-timeout", "1m"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--request-timeout must be longer than --max-wait"));
    let _ = std::fs::remove_dir_all(&dir);
}
