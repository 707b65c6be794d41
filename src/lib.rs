//! deadline-stats-gateway: a gRPC gateway in front of AWS Deadline Cloud's sessions-statistics
//! aggregation API.
//!
//! - [`domain`]: the upstream's vocabulary (ids, the aggregation request and its validation,
//!   statistics rows); no transport.
//! - [`upstream`]: the [`upstream::Upstream`] trait (start, get a page) and its implementation
//!   over `aws-sdk-deadline`; SDK errors become [`upstream::UpstreamError`].
//! - [`emulator`]: a Deadline Cloud emulator served over HTTP, the upstream of every test, demo
//!   and benchmark.
//! - [`bench`]: the load generator, the bare-tonic baseline and the benchmark scenarios.
//! - [`cli`]: the command line; `main` parses it and calls [`cli::run`].
//!
//! Data flows caller → (gateway) → [`upstream::sdk::SdkUpstream`] → HTTP → Deadline Cloud or
//! the [`emulator`].
#![forbid(unsafe_code)]

pub mod bench;
pub mod cli;
pub mod domain;
pub mod emulator;
pub mod gateway;
pub mod grpc;
pub mod telemetry;
pub mod upstream;
