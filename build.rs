//! Compiles `proto/` with protox (a pure-Rust protobuf compiler: no system `protoc`), generates
//! the tonic server and client, and writes the descriptor set that server reflection serves.
//!
//! The service and client use our codec (`grpc::codec`), which reserves a message's size
//! before writing it. `GetAggregationResponse` is then swapped for the hand-written
//! `grpc::wire` type (same wire format, but able to send pre-encoded rows): prost offers no way
//! to skip one message.

use prost::Message as _;
use std::path::PathBuf;

const GENERATED: &str = "deadline.stats.v1.rs";
const REPLACED: &str = "pub struct GetAggregationResponse {";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["deadline/stats/v1/aggregation.proto"], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("aggregation_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .extern_path(".google.rpc", "::tonic_types::pb")
        .codec_path("crate::grpc::codec::ExactCodec")
        .compile_fds(fds)?;
    let path = out.join(GENERATED);
    let code = std::fs::read_to_string(&path)?;
    std::fs::write(&path, swap_response(&code)?)?;
    Ok(())
}

/// Removes the generated `GetAggregationResponse` (its attributes and body) and re-exports the
/// hand-written one in its place.
fn swap_response(code: &str) -> Result<String, String> {
    let lines: Vec<&str> = code.lines().collect();
    let at = lines.iter().position(|l| *l == REPLACED).ok_or("the generated code has no GetAggregationResponse")?;
    let mut start = at;
    while start > 0 && (lines[start - 1].starts_with("#[") || lines[start - 1].starts_with("///")) {
        start -= 1;
    }
    let end = at + lines[at..].iter().position(|l| *l == "}").ok_or("GetAggregationResponse is not closed")?;
    let mut out: Vec<&str> = lines[..start].to_vec();
    out.push("pub use crate::grpc::wire::GetAggregationResponse;");
    out.extend(&lines[end + 1..]);
    Ok(out.join("\n") + "\n")
}
