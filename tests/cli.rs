//! The binary end to end: `serve --upstream emulator` on a loopback port, then `query` against
//! it, as a user would run them.

mod common;

use common::{BIN, Running, spawn_serve, stdout_lines};
use std::process::{Command, Stdio};
use std::time::Duration;

fn first_line(child: &mut std::process::Child) -> String {
    stdout_lines(child, 1).remove(0)
}

#[test]
fn serve_with_the_emulator_then_query_prints_every_row() {
    let (server, url, _) =
        spawn_serve(&["--emulator-aggregation-duration", "300ms", "--poll-initial-interval", "50ms"], &[]);

    let farm = format!("farm-{}", "1".repeat(32));
    let queue = format!("queue-{}", "2".repeat(32));
    let query = |format: &str| {
        Command::new(BIN)
            .args(["query", "--gateway", &url, "--farm-id", &farm, "--queue-ids", &queue])
            .args(["--start", "2026-10-01T00:00:00Z", "--end", "2026-10-02T00:00:00Z"])
            .args(["--group-by", "usage-type", "--statistics", "sum,avg", "--period", "hourly", "--format", format])
            .output()
            .expect("query runs")
    };
    let out = query("csv");
    assert!(out.status.success(), "query failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("start,end,usage_type,count,cost_sum,cost_avg,runtime_sum,runtime_avg"));
    assert_eq!(lines.count(), 3 * 24, "three usage types for each of 24 hours");
    assert!(text.contains("PERSISTENT_VOLUME"));

    // Progress, on a stderr that is not a terminal: a plain line per change, naming the id.
    let progress = String::from_utf8_lossy(&out.stderr);
    let last = progress.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("aggregation agg-") && last.contains(" COMPLETED ") && last.contains(" rows=72"),
        "{progress}"
    );
    assert!(progress.lines().all(|l| l.starts_with("aggregation agg-")), "only progress lines: {progress}");
    let id = last.split(' ').nth(1).expect("the id").to_owned();

    // Attached to the same aggregation by id, quietly: the same rows, nothing on stderr.
    let watched = Command::new(BIN)
        .args(["query", "--gateway", &url, "--watch", &id, "--quiet", "--format", "csv"])
        .output()
        .expect("query runs");
    assert!(watched.status.success(), "query --watch failed: {}", String::from_utf8_lossy(&watched.stderr));
    assert_eq!(watched.stdout, out.stdout, "the same rows");
    assert!(watched.stderr.is_empty(), "--quiet: {}", String::from_utf8_lossy(&watched.stderr));

    let out = query("table");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("start "));

    let bad = Command::new(BIN)
        .args(["query", "--gateway", &url, "--farm-id", "farm-x", "--queue-ids", "queue-y"])
        .args([
            "--start",
            "2026-10-01T00:00:00Z",
            "--end",
            "2026-10-02T00:00:00Z",
            "--group-by",
            "queue-id",
            "--statistics",
            "sum",
        ])
        .output()
        .expect("query runs");
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("InvalidArgument") && err.contains("farm_id") && err.contains("queue_ids.ids[0]"), "{err}");
    drop(server);
}

#[tokio::test]
async fn serve_with_the_aws_upstream_uses_the_standard_credential_and_endpoint_variables() {
    let emu = deadline_stats_gateway::emulator::EmulatorHandle::spawn(
        deadline_stats_gateway::emulator::EmulatorConfig {
            aggregation_duration: Duration::from_millis(100),
            // The region the gateway signs for below (from AWS_REGION).
            region: "eu-west-1".into(),
            ..Default::default()
        },
        "127.0.0.1:0".parse().expect("addr"),
    )
    .await
    .expect("emulator");
    let endpoint = format!("http://localhost:{}", emu.addr().port());
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--upstream",
            "aws",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--poll-initial-interval",
            "50ms",
        ])
        .env("AWS_REGION", "eu-west-1")
        .env("AWS_ACCESS_KEY_ID", "AKIDFROMENV")
        .env("AWS_SECRET_ACCESS_KEY", "secret")
        .env("AWS_ENDPOINT_URL_DEADLINE", &endpoint)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/nonexistent/config")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_ENDPOINT_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("serve starts");
    let line = tokio::task::spawn_blocking(move || {
        let line = first_line(&mut child);
        (line, child)
    })
    .await
    .expect("joins");
    let (line, child) = line;
    let _server = Running(child);
    let url = line.trim().strip_prefix("listening on ").expect("address line").to_owned();
    let out = tokio::process::Command::new(BIN)
        .args([
            "query",
            "--gateway",
            &url,
            "--farm-id",
            &format!("farm-{}", "3".repeat(32)),
            "--fleet-ids",
            &format!("fleet-{}", "4".repeat(32)),
        ])
        .args([
            "--start",
            "2026-10-01T00:00:00Z",
            "--end",
            "2026-10-08T00:00:00Z",
            "--group-by",
            "fleet-id",
            "--statistics",
            "max",
            "--format",
            "json",
        ])
        .output()
        .await
        .expect("query runs");
    assert!(out.status.success(), "query failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        7,
        "seven daily rows (the upstream's default period)"
    );
    let stats = emu.emulator().stats();
    assert_eq!(stats.hosts.into_iter().collect::<Vec<_>>(), vec![format!("localhost:{}", emu.addr().port())]);
}

#[test]
fn a_bad_setting_stops_serve_with_a_message() {
    let out = Command::new(BIN)
        .args([
            "serve",
            "--upstream",
            "emulator",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--farm-queue-capacity",
            "0",
        ])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--farm-queue-capacity"));
    let out = Command::new(BIN).args(["serve", "--upstream", "mars"]).output().expect("runs");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_lease_shorter_than_three_redis_response_timeouts_is_refused_naming_both() {
    let out = Command::new(BIN)
        .args(["serve", "--upstream", "emulator", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--store", "redis", "--redis-url", "redis://127.0.0.1:9", "--lease-ttl", "5s"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--lease-ttl (5s) must be at least 3 × --redis-response-timeout (2s) = 6s"), "{err}");
}
