//! Compiles `proto/` with protox (a pure-Rust protobuf compiler: no system `protoc`), generates
//! the tonic server and client, and writes the descriptor set that server reflection serves.
//!
//! The service and client use our codec (`grpc::codec`), which reserves a message's size
//! before writing it. `GetAggregationResponse` is the hand-written `grpc::wire` type (same wire
//! format, but able to send pre-encoded rows): an `extern_path` makes prost skip generating it
//! and refer to ours.

use prost::Message as _;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    build_commit();
    let fds = protox::compile(["deadline/stats/v1/aggregation.proto"], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("aggregation_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .extern_path(".google.rpc", "::tonic_types::pb")
        .extern_path(".deadline.stats.v1.GetAggregationResponse", "crate::grpc::wire::GetAggregationResponse")
        .codec_path("crate::grpc::codec::ExactCodec")
        .compile_fds(fds)?;
    Ok(())
}

/// The commit the binary is built from, for the console and `--version` readers:
/// `DSG_BUILD_COMMIT` when the build sets it (an image built without `.git`), else `git
/// rev-parse`, else "unknown".
fn build_commit() {
    println!("cargo:rerun-if-env-changed=DSG_BUILD_COMMIT");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    let commit = std::env::var("DSG_BUILD_COMMIT").ok().filter(|c| !c.is_empty()).or_else(|| {
        let out = std::process::Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    });
    println!("cargo:rustc-env=DSG_BUILD_COMMIT={}", commit.unwrap_or_else(|| "unknown".into()));
}
