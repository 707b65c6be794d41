//! The emulator's wire format seen raw: REST-JSON error shapes and headers, the admin API, and
//! the `emulator` subcommand as a real process.

mod common;

use common::*;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

const SIGNED: (&str, &str) = (
    "authorization",
    "AWS4-HMAC-SHA256 Credential=AKIDTEST/20261127/us-west-2/deadline/aws4_request, SignedHeaders=host, Signature=00",
);

fn api(base: &str, farm: &str) -> String {
    format!("{base}/2023-10-12/farms/{farm}/sessions-statistics-aggregation")
}

fn start_body() -> String {
    json!({
        "resourceIds": {"queueIds": [queue(1)]},
        "startTime": "2026-10-01T00:00:00Z",
        "endTime": "2026-10-02T00:00:00Z",
        "groupBy": ["QUEUE_ID"],
        "statistics": ["SUM"],
    })
    .to_string()
}

#[tokio::test]
async fn errors_have_the_rest_json_shape() {
    let emu = emulator(Duration::from_secs(30), Duration::from_secs(60)).await;
    let base = emu.endpoint_url();

    let (status, headers, body) =
        http("POST", &api(&base, &farm(1)), Some(r#"{"resourceIds":{"queueIds":["q"]},"groupBy":[]}"#), &[SIGNED])
            .await;
    assert_eq!(status, 400);
    assert_eq!(headers["x-amzn-errortype"], "ValidationException");
    let v: Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(v["reason"], "FIELD_VALIDATION_FAILED");
    let names: Vec<&str> =
        v["fieldList"].as_array().expect("fieldList").iter().filter_map(|f| f["name"].as_str()).collect();
    assert_eq!(names, vec!["resourceIds.queueIds[0]", "startTime", "endTime", "groupBy", "statistics"]);
    assert!(v["fieldList"][0]["message"].as_str().is_some_and(|m| !m.is_empty()));

    let (status, headers, body) = http("POST", &api(&base, &farm(1)), Some("{oops"), &[SIGNED]).await;
    assert_eq!((status, &headers["x-amzn-errortype"]), (400, &"ValidationException".parse().expect("header")));
    assert!(body.contains("CANNOT_PARSE"));

    let (status, _, body) = http("POST", &api(&base, &farm(1)), Some(&start_body()), &[SIGNED]).await;
    assert_eq!(status, 200);
    let id = serde_json::from_str::<Value>(&body).expect("JSON")["aggregationId"].as_str().expect("id").to_owned();

    let (status, headers, body) = http("POST", &api(&base, &farm(1)), Some(&start_body()), &[SIGNED]).await;
    assert_eq!(status, 429);
    assert_eq!(headers["x-amzn-errortype"], "ThrottlingException");
    let retry_after: u64 = headers["retry-after"].to_str().expect("ascii").parse().expect("seconds");
    assert!((1..=30).contains(&retry_after));
    assert!(serde_json::from_str::<Value>(&body).expect("JSON")["message"].is_string());

    let (status, headers, body) =
        http("GET", &format!("{}?aggregationId={id}", api(&base, &farm(2))), None, &[SIGNED]).await;
    assert_eq!((status, headers["x-amzn-errortype"].to_str().ok()), (404, Some("ResourceNotFoundException")));
    let v: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(
        (v["resourceId"].as_str(), v["resourceType"].as_str()),
        (Some(id.as_str()), Some("sessions-statistics-aggregation"))
    );

    let (status, _, body) = http("GET", &format!("{}?aggregationId={id}", api(&base, &farm(1))), None, &[SIGNED]).await;
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&body).expect("JSON")["status"], "IN_PROGRESS");

    let (status, headers, _) = http("GET", &format!("{}?aggregationId={id}", api(&base, &farm(1))), None, &[]).await;
    assert_eq!((status, headers["x-amzn-errortype"].to_str().ok()), (403, Some("AccessDeniedException")));

    set_faults(&emu, json!({"error_rates": {"InternalServerErrorException": 1.0}})).await;
    let (status, headers, _) =
        http("GET", &format!("{}?aggregationId={id}", api(&base, &farm(1))), None, &[SIGNED]).await;
    assert_eq!((status, headers["x-amzn-errortype"].to_str().ok()), (500, Some("InternalServerErrorException")));

    let (status, _, body) = http("GET", &format!("{base}/2023-10-12/queues"), None, &[SIGNED]).await;
    assert_eq!(status, 400);
    assert!(body.contains("UNKNOWN_OPERATION"));
}

#[tokio::test]
async fn the_admin_api_sets_reads_and_clears_faults() {
    let emu = emulator(Duration::from_millis(10), Duration::from_secs(60)).await;
    let url = format!("{}/_emulator/faults", emu.endpoint_url());
    let (status, _, body) = http("POST", &url, Some(r#"{"drop_rate": 2}"#), &[]).await;
    assert_eq!(status, 400, "an impossible rate is refused: {body}");
    let (status, _, _) = http("POST", &url, Some(r#"{"nonsense": true}"#), &[]).await;
    assert_eq!(status, 400, "unknown members are refused");
    set_faults(&emu, json!({"latency_ms": 5, "operations": ["get"]})).await;
    let (_, _, body) = http("GET", &url, None, &[]).await;
    assert_eq!(serde_json::from_str::<Value>(&body).expect("JSON")["latency_ms"], 5);
    let (status, _, _) = http("DELETE", &url, None, &[]).await;
    assert_eq!(status, 204);
    let (_, _, body) = http("GET", &url, None, &[]).await;
    assert_eq!(serde_json::from_str::<Value>(&body).expect("JSON")["latency_ms"], 0);

    http("POST", &api(&emu.endpoint_url(), &farm(3)), Some(&start_body()), &[SIGNED]).await;
    assert_eq!(stats(&emu).await["farms"][&farm(3)]["start_calls"], 1);
    let (status, _, _) = http("POST", &format!("{}/_emulator/reset", emu.endpoint_url()), None, &[]).await;
    assert_eq!(status, 204);
    assert_eq!(stats(&emu).await["farms"], json!({}));
}

#[tokio::test]
async fn the_emulator_command_announces_its_address_and_stops_on_sigterm() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_deadline-stats-gateway"))
        .args(["emulator", "--listen", "127.0.0.1:0", "--aggregation-duration", "100ms", "--fault-latency", "1ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the binary starts");
    let stdout = child.stdout.take().expect("stdout is piped");
    let first = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    });
    let line = tokio::time::timeout(Duration::from_secs(20), first)
        .await
        .expect("announces in time")
        .expect("joins")
        .expect("reads");
    let url = line.trim().strip_prefix("listening on ").expect("the first line names the address").to_owned();
    let (status, _, body) = http("GET", &format!("{url}/_emulator/faults"), None, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&body).expect("JSON")["latency_ms"], 1);

    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill runs");
    assert!(killed.success());
    let status = tokio::task::spawn_blocking(move || child.wait()).await.expect("joins").expect("waits");
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn bad_emulator_flags_stop_start_up_with_a_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_deadline-stats-gateway"))
        .args(["emulator", "--fault-error", "TeapotException=0.5"])
        .output()
        .expect("the binary runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("TeapotException"));
}
