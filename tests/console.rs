//! The operator console: in a real browser (headless Chromium driven by Selenium through
//! chromedriver), its JSON API against its JSON Schema (checked by Python's `jsonschema`), the
//! token rules, and `status`. On one gateway and on two replicas sharing Redis.
//!
//! Debian's `chromium` and `chromium-driver` are installed (apt) when missing; Selenium and
//! jsonschema come from PyPI into `target/pydeps-console`.

mod common;

use common::*;
use deadline_stats_gateway::grpc::pb;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// Hostile identities a caller may claim (ASCII without spaces passes identity checks).
const HOSTILE: [&str; 2] = ["<img/src=x/onerror=window.pwned=1>", "\"><script>window.pwned=2</script>"];
const TRACES: &str = "https://grafana.example/explore?traceId=";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn python_tools() -> PathBuf {
    python_packages("pydeps-console", &["selenium", "jsonschema"], "import selenium, jsonschema")
}

/// Chromium and chromedriver, installed from Debian when missing.
fn browser() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        if Path::new("/usr/bin/chromium").exists() && Path::new("/usr/bin/chromedriver").exists() {
            return;
        }
        if let Err(e) = apt_install(&["chromium", "chromium-driver"]) {
            panic!("chromium cannot be installed: {e}");
        }
    });
}

/// Chromium, chromedriver and the Python packages, installed when missing. Runs before the
/// work is made: on a fresh machine installing takes minutes, longer than the work runs.
async fn browser_ready() {
    tokio::task::spawn_blocking(|| {
        browser();
        python_tools();
    })
    .await
    .expect("installs");
}

/// A Start of `days` days on farm `farm_n` as `caller`; its id.
async fn start(client: &mut Client, farm_n: u64, days: i64, caller: &str) -> String {
    let mut request = tonic::Request::new(start_request(farm_n, 1, days, &[pb::GroupBy::UsageType]));
    request.metadata_mut().insert("x-caller-id", caller.parse().expect("ASCII"));
    client
        .start_aggregation(request)
        .await
        .expect("started")
        .into_inner()
        .aggregation
        .expect("aggregation")
        .aggregation_id
}

/// Work on three farms: one completed on farm 401, one running on 402, and on 403 one running
/// with another queued behind it, started by a team and joined by hostile identities. (Each
/// runs 15 s upstream: long enough for a cold browser to start while the work is still there.)
struct Work {
    /// The farms with work now (402 and 403).
    farms: Vec<String>,
    completed: String,
    running: String,
    queued: String,
}

async fn make_work(clients: &mut [Client]) -> Work {
    let n = clients.len();
    let completed = start(&mut clients[0], 401, 1, "team-done").await;
    until_terminal(&mut clients[0], &completed).await;
    let running = start(&mut clients[1 % n], 402, 1, "team-b").await;
    let head = start(&mut clients[0], 403, 1, "team-c").await;
    let queued = start(&mut clients[0], 403, 2, "team-a").await;
    for (i, caller) in HOSTILE.iter().enumerate() {
        assert_eq!(start(&mut clients[(i + 1) % n], 403, 2, caller).await, queued, "joined");
    }
    for id in [&running, &head] {
        until_running(&mut clients[0], id).await;
    }
    Work { farms: [402, 403].map(farm).to_vec(), completed, running, queued }
}

/// Waits until `id` runs upstream.
async fn until_running(client: &mut Client, id: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let page = client.get_aggregation(get_request(id, 0, "", Duration::ZERO)).await.expect("get");
        let aggregation = page.into_inner().aggregation.expect("aggregation");
        if aggregation.state() == pb::AggregationState::Running {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{id} never ran: {aggregation:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the browser script against the console at `admin`; its screenshot's path.
/// (`traced`: the gateway exports traces, so the aggregation's trace is linked.)
/// (`token`: the console asks for it first.)
/// (`browser_ready` has run first: the scenario's work is timed and an install is not.)
fn drive_browser(admin: &str, work: &Work, replicas: usize, traced: bool, token: Option<&str>, name: &str) -> PathBuf {
    let tools = python_tools();
    let dir = root().join("target/console");
    std::fs::create_dir_all(&dir).expect("target/console");
    let scenario = serde_json::json!({
        "farms": work.farms,
        "queued": work.queued,
        "callers": HOSTILE.iter().chain(["team-a"].iter()).map(|c| format!("id:{c}")).collect::<Vec<_>>(),
        "replicas": replicas,
        "trace_prefix": traced.then_some(TRACES),
        "token": token,
    });
    let scenario_path = dir.join(format!("{name}.json"));
    std::fs::write(&scenario_path, scenario.to_string()).expect("writes the scenario");
    let screenshot = dir.join(format!("{name}.png"));
    let out = Command::new("python3")
        .arg(root().join("tests/console_browser.py"))
        .arg(admin)
        .arg(&scenario_path)
        .arg(&screenshot)
        .env("PYTHONPATH", tools)
        .output()
        .expect("python3 runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the browser checks failed:\n{stdout}\n{stderr}");
    eprintln!("{stdout}");
    assert!(std::fs::metadata(&screenshot).is_ok_and(|m| m.len() > 10_000), "a screenshot");
    screenshot
}

/// Traces exported (to nowhere), so aggregations have trace ids to link.
const TRACING: [(&str, &str); 2] =
    [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9"), ("OTEL_BSP_MAX_QUEUE_SIZE", "64")];

fn console_flags() -> Vec<&'static str> {
    vec!["--trace-url-template", "https://grafana.example/explore?traceId={trace_id}", "--caller-start-rate", "0"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_browser_the_console_shows_three_farms_and_follows_an_aggregation_to_completed() {
    let dir = test_dir("console-browser");
    let token = dir.join("token");
    std::fs::write(&token, "a-console-token-0123456789").expect("writes");
    let mut flags = console_flags();
    flags.extend(["--emulator-aggregation-duration", "15s", "--poll-initial-interval", "100ms"]);
    flags.extend(["--admin-token-file", token.to_str().expect("UTF-8")]);
    browser_ready().await;
    let (_gateway, url, admin) = spawn_serve(&flags, &TRACING);
    let mut clients = vec![client_of(&url).await];
    let work = make_work(&mut clients).await;
    let shot = tokio::task::spawn_blocking(move || {
        drive_browser(&admin, &work, 1, true, Some("a-console-token-0123456789"), "one-gateway")
    })
    .await
    .expect("joins");
    eprintln!("screenshot: {}", shot.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_browser_the_console_of_either_of_two_replicas_on_redis_shows_the_work_of_both() {
    browser_ready().await;
    let redis = tokio::task::spawn_blocking(redis_server).await.expect("joins");
    let (_emulator, endpoint) = spawn_emulator(&["--aggregation-duration", "15s"]);
    let flags = console_flags();
    let (_a, url_a, admin_a) = redis_replica(&endpoint, &redis.url(), 1, &flags);
    let (_b, url_b, _admin_b) = redis_replica(&endpoint, &redis.url(), 2, &flags);
    let mut clients = vec![client_of(&url_a).await, client_of(&url_b).await];
    // Both replicas have said they are alive.
    eventually(Duration::from_secs(15), || {
        let admin = admin_a.clone();
        async move {
            let (_, _, body) = http("GET", &format!("{admin}/api/v1/overview"), None, &[]).await;
            let overview: serde_json::Value = serde_json::from_str(&body).ok()?;
            (overview["replicas"].as_array()?.len() == 2).then_some(())
        }
    })
    .await;
    let work = make_work(&mut clients).await;
    tokio::task::spawn_blocking(move || drive_browser(&admin_a, &work, 2, false, None, "two-replicas"))
        .await
        .expect("joins");
}

/// `GET` of the console's `path` as JSON, with its status.
async fn get_json(admin: &str, path: &str, token: Option<&str>) -> (u16, serde_json::Value) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    let (status, _, body) = http("GET", &format!("{admin}{path}"), None, &headers).await;
    (status, serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {body}")))
}

/// Checks `answers` (`[definition, JSON]`) against the schema with Python's jsonschema.
fn check_schema(answers: &serde_json::Value) {
    let tools = python_tools();
    let mut child = Command::new("python3")
        .arg(root().join("tests/console_schema.py"))
        .arg(root().join("docs/console-api-v1.schema.json"))
        .env("PYTHONPATH", tools)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    use std::io::Write as _;
    child.stdin.take().expect("stdin").write_all(answers.to_string().as_bytes()).expect("writes");
    let out = child.wait_with_output().expect("waits");
    assert!(
        out.status.success(),
        "schema violations:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_api_answers_as_its_schema_says_and_refuses_bad_parameters() {
    let mut flags = console_flags();
    flags.extend(["--emulator-aggregation-duration", "3s", "--poll-initial-interval", "100ms"]);
    browser_ready().await;
    let (_gateway, url, admin) = spawn_serve(&flags, &TRACING);
    let mut client = client_of(&url).await;
    let work = make_work(std::slice::from_mut(&mut client)).await;

    let (_, overview) = get_json(&admin, "/api/v1/overview", None).await;
    assert_eq!(overview["store"]["kind"], "memory");
    assert_eq!(overview["work"]["running"], 2, "{overview}");
    assert_eq!(overview["work"]["queued"], 1, "{overview}");
    let (_, farms) = get_json(&admin, "/api/v1/farms?order=queued&limit=10", None).await;
    assert_eq!(farms["total"], 2, "farms 402 and 403 have work: {farms}");
    assert_eq!(farms["farms"][0]["farm_id"], farm(403), "the longest queue first");
    assert_eq!(farms["farms"][0]["route"], "default", "one upstream: the default route");
    let (_, page) = get_json(&admin, "/api/v1/farms?limit=1&offset=1", None).await;
    assert_eq!(page["farms"].as_array().map(Vec::len), Some(1));
    let (_, farm_view) = get_json(&admin, &format!("/api/v1/farms/{}", farm(403)), None).await;
    assert_eq!(farm_view["queue"][1]["id"], work.queued.as_str());
    assert_eq!(farm_view["route"], "default");
    let callers: Vec<String> = serde_json::from_value(farm_view["queue"][1]["callers"].clone()).expect("callers");
    assert_eq!(callers, ["id:team-a", &format!("id:{}", HOSTILE[0]), &format!("id:{}", HOSTILE[1])], "first first");
    let (_, queued) = get_json(&admin, &format!("/api/v1/aggregations/{}", work.queued), None).await;
    assert_eq!(queued["state"], "QUEUED");
    assert_eq!(queued["queue_position"], 1);
    let (_, running) = get_json(&admin, &format!("/api/v1/aggregations/{}", work.running), None).await;
    assert_eq!(running["state"], "RUNNING");
    let trace_url = running["trace_url"].as_str().expect("a trace link");
    assert!(trace_url.starts_with(TRACES) && trace_url.ends_with(running["trace_id"].as_str().expect("a trace id")));
    let (_, completed) = get_json(&admin, &format!("/api/v1/aggregations/{}", work.completed), None).await;
    assert_eq!(completed["state"], "COMPLETED");
    assert_eq!(completed["rows_preview"].as_array().map(Vec::len), Some(20), "the first 20 of 72 rows");
    let (_, farm_401) = get_json(&admin, &format!("/api/v1/farms/{}", farm(401)), None).await;
    assert_eq!(farm_401["recent"][0]["aggregation_id"], work.completed.as_str());
    // A request inside the completed one is derived from it: its page says so.
    let mut inside = start_request(401, 1, 1, &[pb::GroupBy::UsageType]);
    inside.statistics = vec![pb::Statistic::Avg as i32];
    let answer = client.start_aggregation(inside).await.expect("derived").into_inner();
    assert_eq!(answer.disposition(), pb::Disposition::Derived);
    let derived_id = answer.aggregation.expect("aggregation").aggregation_id;
    let (_, derived) = eventually(Duration::from_secs(10), || {
        let (admin, id) = (admin.clone(), derived_id.clone());
        async move {
            let answer = get_json(&admin, &format!("/api/v1/aggregations/{id}"), None).await;
            (answer.1["timeline"].as_array()?.first()?["event"] == "derived").then_some(answer)
        }
    })
    .await;
    assert_eq!(
        (derived["state"].as_str(), derived["derived_from"].as_str()),
        (Some("COMPLETED"), Some(work.completed.as_str()))
    );
    assert_eq!(derived["timeline"][0]["from"], work.completed.as_str(), "{derived}");

    // Refusals: each says what is wrong.
    let mut answers = vec![
        serde_json::json!(["overview", overview]),
        serde_json::json!(["farms", farms]),
        serde_json::json!(["farms", page]),
        serde_json::json!(["farm", farm_view]),
        serde_json::json!(["farm", farm_401]),
        serde_json::json!(["aggregation", queued]),
        serde_json::json!(["aggregation", running]),
        serde_json::json!(["aggregation", completed]),
        serde_json::json!(["aggregation", derived]),
    ];
    for (path, status, code) in [
        ("/api/v1/farms?limit=501", 400, "invalid_parameter"),
        ("/api/v1/farms?order=oldest", 400, "invalid_parameter"),
        ("/api/v1/farms?sort=x", 400, "invalid_parameter"),
        ("/api/v1/farms/farm-%3Cscript%3E", 400, "invalid_farm_id"),
        ("/api/v1/aggregations/agg-%22%3E%3Cimg%3E", 400, "invalid_aggregation_id"),
        ("/api/v1/aggregations/agg-0000000000000000000000000000dead", 404, "not_found"),
        ("/api/v1/nothing", 404, "not_found"),
    ] {
        let (got, body) = get_json(&admin, path, None).await;
        assert_eq!((got, body["error"].as_str()), (status, Some(code)), "{path}: {body}");
        answers.push(serde_json::json!(["error", body]));
    }
    tokio::task::spawn_blocking(move || check_schema(&serde_json::Value::Array(answers))).await.expect("joins");

    // Once the queued one completed, its timeline tells the whole story.
    until_terminal(&mut client, &work.queued).await;
    let (_, done) = eventually(Duration::from_secs(10), || {
        let admin = admin.clone();
        let id = work.queued.clone();
        async move {
            let answer = get_json(&admin, &format!("/api/v1/aggregations/{id}"), None).await;
            (answer.1["timeline"].as_array()?.last()?["event"] == "ended").then_some(answer)
        }
    })
    .await;
    let events: Vec<&str> =
        done["timeline"].as_array().expect("timeline").iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(events, ["queued", "joined", "joined", "driving", "running", "ended"], "{done}");
    tokio::task::spawn_blocking(move || check_schema(&serde_json::json!([["aggregation", done]])))
        .await
        .expect("joins");
}

#[tokio::test]
async fn with_a_token_file_the_console_needs_the_token_and_the_probes_do_not() {
    let dir = test_dir("console-token");
    let token_file = dir.join("token");
    std::fs::write(&token_file, "first-secret-token-0123456789\n").expect("writes");
    let token_arg = token_file.to_str().expect("UTF-8").to_owned();
    let (_gateway, _url, admin) = spawn_serve(&["--admin-token-file", &token_arg], &[]);
    for path in ["/api/v1/overview", "/api/v1/farms", &format!("/api/v1/farms/{}", farm(1))] {
        let (status, headers, _) = http("GET", &format!("{admin}{path}"), None, &[]).await;
        assert_eq!(status, 401, "{path} without the token");
        assert!(headers.get("www-authenticate").is_some_and(|v| v.to_str().is_ok_and(|v| v.starts_with("Bearer"))));
        let (status, _, _) =
            http("GET", &format!("{admin}{path}"), None, &[("authorization", "Bearer wrong-token-0123456789")]).await;
        assert_eq!(status, 401, "{path} with a wrong token");
        let (status, _) = get_json(&admin, path, Some("first-secret-token-0123456789")).await;
        assert_eq!(status, 200, "{path} with the token");
    }
    for probe in ["/healthz", "/readyz", "/metrics"] {
        let (status, _, _) = http("GET", &format!("{admin}{probe}"), None, &[]).await;
        assert_eq!(status, 200, "{probe} stays open");
    }
    // The page itself holds no data; its headers forbid anything from elsewhere.
    let (status, headers, body) = http("GET", &format!("{admin}/"), None, &[]).await;
    assert_eq!(status, 200);
    assert!(body.contains("<script src=\"/console.js\">") && !body.contains("farm-"), "{body}");
    let csp = headers.get("content-security-policy").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );

    // A rotated token is in force within seconds; the old one no longer is.
    std::fs::write(&token_file, "second-secret-token-0123456789").expect("writes");
    eventually(Duration::from_secs(10), || {
        let admin = admin.clone();
        async move {
            (get_json(&admin, "/api/v1/overview", Some("second-secret-token-0123456789")).await.0 == 200).then_some(())
        }
    })
    .await;
    assert_eq!(get_json(&admin, "/api/v1/overview", Some("first-secret-token-0123456789")).await.0, 401);
}

#[tokio::test]
async fn a_token_file_too_short_stops_start_up_with_what_to_do() {
    let dir = test_dir("console-short-token");
    let token_file = dir.join("token");
    std::fs::write(&token_file, "short").expect("writes");
    let out = Command::new(BIN)
        .args(["serve", "--upstream", "emulator", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .arg("--admin-token-file")
        .arg(&token_file)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("at least 16 characters"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_prints_the_overview_a_farm_and_an_aggregation() {
    let mut flags = console_flags();
    flags.extend(["--emulator-aggregation-duration", "3s", "--poll-initial-interval", "100ms"]);
    let (_gateway, url, admin) = spawn_serve(&flags, &[]);
    let mut client = client_of(&url).await;
    let work = make_work(std::slice::from_mut(&mut client)).await;
    let status = |args: Vec<String>| {
        let admin = admin.clone();
        tokio::task::spawn_blocking(move || {
            let out = Command::new(BIN).args(["status", "--admin", &admin]).args(&args).output().expect("runs");
            assert!(out.status.success(), "status {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
    };
    let overview = status(vec![]).await.expect("joins");
    assert!(overview.contains(&farm(403)) && overview.contains("FARM") && overview.contains("RUNNING"), "{overview}");
    let json = status(vec!["--format".into(), "json".into()]).await.expect("joins");
    let parsed: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(parsed["farms"]["total"], 2);
    let farm_text = status(vec!["--farm".into(), farm(403)]).await.expect("joins");
    assert!(
        farm_text.contains(&work.queued)
            && farm_text.contains("id:team-a")
            && farm_text.contains("upstream route default"),
        "{farm_text}"
    );
    let agg_text = status(vec!["--aggregation".into(), work.queued.clone()]).await.expect("joins");
    assert!(agg_text.contains("QUEUED") && agg_text.contains("joined"), "{agg_text}");
    let missing = Command::new(BIN)
        .args(["status", "--admin", &admin, "--aggregation", "agg-0000000000000000000000000000dead"])
        .output()
        .expect("runs");
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("404"), "{}", String::from_utf8_lossy(&missing.stderr));
}

/// The same history rules on both logs: a long timeline keeps its first event and the latest,
/// a farm keeps its last 50 terminal aggregations, newest first, and silent replicas drop out.
async fn activity_log_conforms(log: &dyn deadline_stats_gateway::gateway::activity::ActivityLog) {
    use deadline_stats_gateway::gateway::activity::{Event, Replica, What};
    let id = "agg-07000000000000000000000000000001";
    let event = |n: u64, what: What| Event { at_ms: n, aggregation: id.into(), farm: farm(7), what };
    let first = event(0, What::Queued { caller: Some("a".into()), trace_id: None });
    log.append(std::slice::from_ref(&first)).await.expect("appends");
    let joins: Vec<Event> =
        (1..100).map(|n| event(n, What::Joined { caller: format!("c{n}"), trace_id: None })).collect();
    log.append(&joins).await.expect("appends");
    let timeline = log.timeline(id).await.expect("reads");
    assert_eq!(timeline.len(), deadline_stats_gateway::gateway::activity::TIMELINE_EVENTS);
    assert_eq!((timeline[0].clone(), timeline.last().map(|e| e.at_ms)), (first, Some(99)));
    let ended: Vec<Event> = (0..60u64)
        .map(|n| Event {
            at_ms: 1000 + n,
            aggregation: format!("agg-070000000000000000000000000001{n:02}"),
            farm: farm(7),
            what: What::Ended {
                state: "COMPLETED".into(),
                rows: n,
                parts: 1,
                error: None,
                queued_ms: 0,
                running_since_ms: None,
                estimated_completion_ms: None,
            },
        })
        .collect();
    log.append(&ended).await.expect("appends");
    let recent = log.recent(&farm(7), 100).await.expect("reads");
    assert_eq!((recent.len(), recent[0].at_ms), (50, 1059), "the last 50, newest first");
    assert!(log.recent(&farm(8), 10).await.expect("reads").is_empty());
    let replica = |id: &str, seen_ms| Replica {
        id: id.into(),
        version: "v".into(),
        started_ms: 0,
        seen_ms,
        farms_held: 1,
        farms: vec![farm(7)],
    };
    log.heartbeat(&replica("r-1", 100_000)).await.expect("beats");
    assert_eq!(log.replicas(100_500).await.expect("reads"), vec![replica("r-1", 100_000)]);
    assert!(log.replicas(100_000 + 31_000).await.expect("reads").is_empty(), "silent for over 30 s");
}

#[tokio::test]
async fn the_activity_log_keeps_the_same_history_in_memory_and_in_redis() {
    activity_log_conforms(&deadline_stats_gateway::gateway::activity::MemoryActivity::default()).await;
    let redis = tokio::task::spawn_blocking(redis_server).await.expect("joins");
    let coordination = on_redis(&redis.url(), &deadline_stats_gateway::gateway::GatewayConfig::default()).await;
    activity_log_conforms(coordination.activity.as_ref()).await;
}
