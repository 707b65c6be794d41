//! grpcio (the reference Python client, default settings) sees hostile input refused with the
//! right code and a small status: a 3,000-character farm id used to make its metadata limit
//! answer RESOURCE_EXHAUSTED instead of INVALID_ARGUMENT. It also follows a WatchAggregation
//! stream to its end. grpcio is installed into `target/` by pip when the machine lacks it.

mod common;

use common::*;
use deadline_stats_gateway::grpc::pb::{self, GroupBy};
use std::path::Path;
use std::time::Duration;

fn hex(message: &impl prost::Message) -> String {
    message.encode_to_vec().iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn grpcio_sees_invalid_argument_with_a_small_status_for_hostile_values() {
    let path = tokio::task::spawn_blocking(|| python_packages("pydeps-grpcio", &["grpcio"], "import grpc"))
        .await
        .expect("joins");
    let gw = gateway(Duration::from_millis(20), fast_config(Duration::from_secs(3600))).await;
    let mut long_farm = start_request(1, 1, 1, &[GroupBy::QueueId]);
    long_farm.farm_id = "f".repeat(3000);
    let mut many_bad_ids = start_request(1, 1, 1, &[GroupBy::QueueId]);
    many_bad_ids.resources = Some(pb::start_aggregation_request::Resources::QueueIds(pb::ResourceIds {
        ids: (0..100).map(|n| format!("{}{n}", "q".repeat(1500))).collect(),
    }));
    let long_id = get_request(&"a".repeat(100_000), 0, "", Duration::ZERO);
    let cases = [
        ("StartAggregation", hex(&long_farm), "INVALID_ARGUMENT"),
        ("StartAggregation", hex(&many_bad_ids), "INVALID_ARGUMENT"),
        ("GetAggregation", hex(&long_id), "NOT_FOUND"),
        ("StartAggregation", "ffffffff0f".to_owned(), "INVALID_ARGUMENT"),
    ];
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("grpcio_check.py");
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg(script)
        .arg(gw.addr.to_string())
        .env("PYTHONPATH", path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("python3 runs");
    let input: String = cases.iter().map(|(method, request, code)| format!("{method} {request} {code}\n")).collect();
    use tokio::io::AsyncWriteExt as _;
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(input.as_bytes()).await.expect("writes the cases");
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("finishes in time")
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "grpcio check failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn grpcio_follows_a_watch_to_the_terminal_state_and_an_ok_status() {
    let path = tokio::task::spawn_blocking(|| python_packages("pydeps-grpcio", &["grpcio"], "import grpc"))
        .await
        .expect("joins");
    let gw = gateway(Duration::from_millis(500), fast_config(Duration::from_secs(3600))).await;
    let mut client = gw.client().await;
    let started = client.start_aggregation(start_request(2, 1, 1, &[GroupBy::QueueId])).await.expect("start");
    let id = started.into_inner().aggregation.expect("aggregation").aggregation_id;
    let request = pb::WatchAggregationRequest { aggregation_id: id.clone() };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("grpcio_watch.py");
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .arg(gw.addr.to_string())
        .arg(hex(&request))
        .env("PYTHONPATH", path)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), out).await.expect("finishes in time").expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "grpcio watch failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let seen: Vec<pb::Aggregation> = stdout
        .lines()
        .map(|line| {
            let bytes: Vec<u8> =
                (0..line.len()).step_by(2).map(|i| u8::from_str_radix(&line[i..i + 2], 16).expect("hex")).collect();
            <pb::Aggregation as prost::Message>::decode(bytes.as_slice()).expect("an Aggregation")
        })
        .collect();
    assert!(seen.len() >= 2, "the state at once, then the changes: {seen:?}");
    assert!(seen.iter().all(|a| a.aggregation_id == id));
    assert_eq!(seen.last().map(pb::Aggregation::state), Some(pb::AggregationState::Completed), "{seen:?}");
}
