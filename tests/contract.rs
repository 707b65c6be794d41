//! The proto as a contract for callers. `buf` (the binary the npm package `@bufbuild/buf`
//! ships, downloaded from the npm registry into `target/` when missing) lints `proto/` with the STANDARD rules (exceptions listed and
//! justified in `proto/buf.yaml`) and checks it against the image of the last released API
//! (`proto/released.binpb`): a wire-breaking change fails, as a renumbered field in a copy
//! shows. And a Python client generated from `proto/` alone by grpcio-tools starts, watches and
//! reads an aggregation: the published proto is all a caller in another language needs.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The version of `buf` the tests use.
const BUF_VERSION: &str = "1.75.0";

/// Downloads the npm package of `buf`'s binary for this machine (`@bufbuild/buf-linux-x64`,
/// the package `@bufbuild/buf` depends on) from the npm registry and unpacks it into `dir`;
/// with Python's standard library, so the machine needs no Node.js.
const FETCH_BUF: &str = r#"
import io, sys, tarfile, urllib.request
package, version, dir = sys.argv[1:4]
url = f"https://registry.npmjs.org/@bufbuild/{package}/-/{package}-{version}.tgz"
with urllib.request.urlopen(url, timeout=120) as answer:
    tarfile.open(fileobj=io.BytesIO(answer.read()), mode="r:gz").extractall(dir)
"#;

/// `buf`, from the npm package `@bufbuild/buf`, unpacked under `target/` on first use.
fn buf() -> PathBuf {
    static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = INSTALLING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join(format!("tools-buf-{BUF_VERSION}"));
    let bin = dir.join("package").join("bin").join("buf");
    let works = |bin: &Path| Command::new(bin).arg("--version").output().is_ok_and(|o| o.status.success());
    if !works(&bin) {
        let arch = match std::env::consts::ARCH {
            "aarch64" => "arm64",
            _ => "x64",
        };
        let package = format!("buf-{}-{arch}", std::env::consts::OS);
        let fetched = Command::new("python3")
            .args(["-c", FETCH_BUF, &package, BUF_VERSION])
            .arg(&dir)
            .status()
            .expect("python3 runs");
        assert!(fetched.success(), "could not download @bufbuild/{package} {BUF_VERSION} from the npm registry");
        assert!(works(&bin), "buf unpacked but does not run");
    }
    bin
}

/// `buf args…` in `dir`: whether it passed, and what it said.
fn run_buf(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(buf()).args(args).current_dir(dir).output().expect("buf runs");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), said)
}

fn proto_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("proto")
}

/// Copies the directory `from` into `to`, recursively.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("a directory");
    for entry in std::fs::read_dir(from).expect("readable").flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copies");
        }
    }
}

#[test]
fn the_proto_passes_buf_lint_and_has_no_breaking_change_against_the_released_api() {
    let (linted, said) = run_buf(&proto_dir(), &["lint"]);
    assert!(linted, "buf lint: {said}");
    let (compatible, said) = run_buf(&proto_dir(), &["breaking", "--against", "released.binpb"]);
    assert!(compatible, "buf breaking against the released API: {said}");
}

#[test]
fn a_renumbered_field_is_caught_as_a_breaking_change() {
    let dir = test_dir("proto-breaking");
    copy_dir(&proto_dir(), &dir);
    let file = dir.join("deadline/stats/v1/aggregation.proto");
    let text = std::fs::read_to_string(&file).expect("the proto");
    let renumbered = text.replacen("string aggregation_id = 1;", "string aggregation_id = 99;", 1);
    assert_ne!(renumbered, text, "the field to renumber is in the proto");
    std::fs::write(&file, renumbered).expect("writes");
    let (compatible, said) = run_buf(&dir, &["breaking", "--against", "released.binpb"]);
    assert!(!compatible, "a renumbered field passed the breaking check: {said}");
    assert!(said.contains("aggregation_id") || said.contains("WatchAggregationRequest"), "{said}");
}

#[tokio::test]
async fn a_python_client_generated_from_the_proto_alone_starts_watches_and_reads_an_aggregation() {
    let deps = tokio::task::spawn_blocking(|| {
        python_packages("pydeps-grpcio-tools", &["grpcio-tools"], "import grpc, grpc_tools.protoc")
    })
    .await
    .expect("joins");
    let out = test_dir("python-client");
    let generated = Command::new("python3")
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(proto_dir())
        .arg(format!("--python_out={}", out.display()))
        .arg(format!("--grpc_python_out={}", out.display()))
        .args(["deadline/stats/v1/aggregation.proto", "google/rpc/status.proto"])
        .env("PYTHONPATH", &deps)
        .status()
        .expect("grpc_tools.protoc runs");
    assert!(generated.success(), "grpcio-tools could not generate a client from proto/");
    let gw = gateway(Duration::from_millis(100), fast_config(Duration::from_secs(3600))).await;
    let request = start_request(490, 1, 1, &[deadline_stats_gateway::grpc::pb::GroupBy::QueueId]);
    let queue = match request.resources {
        Some(deadline_stats_gateway::grpc::pb::start_aggregation_request::Resources::QueueIds(ids)) => {
            ids.ids[0].clone()
        }
        _ => unreachable!("start_request names queues"),
    };
    let times = (request.start_time.map(|t| t.seconds), request.end_time.map(|t| t.seconds));
    let (Some(start), Some(end)) = times else { unreachable!("start_request has times") };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("contract_client.py");
    let client = tokio::process::Command::new("python3")
        .arg(script)
        .arg(gw.addr.to_string())
        .arg(&request.farm_id)
        .arg(&queue)
        .arg(start.to_string())
        .arg(end.to_string())
        .env("PYTHONPATH", format!("{}:{}", out.display(), deps.display()))
        .output()
        .await
        .expect("python3 runs");
    let said = String::from_utf8_lossy(&client.stdout);
    assert!(client.status.success(), "{said}{}", String::from_utf8_lossy(&client.stderr));
    let seen: serde_json::Value = serde_json::from_str(said.trim()).expect("JSON");
    assert_eq!(seen["disposition"], "DISPOSITION_STARTED", "{seen}");
    let watched = seen["watched"].as_array().expect("states");
    assert_eq!(watched.last().and_then(|s| s.as_str()), Some("AGGREGATION_STATE_COMPLETED"), "{seen}");
    assert_eq!((seen["rows"].as_u64(), seen["row_count"].as_u64()), (Some(24), Some(24)), "{seen}");
    assert_eq!(seen["first_queue"], queue.as_str(), "{seen}");
}
