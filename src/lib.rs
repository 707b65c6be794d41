//! deadline-stats-gateway: a gRPC gateway in front of AWS Deadline Cloud's sessions-statistics
//! aggregation API.
//!
//! # Modules
//! - [`domain`]: the upstream's vocabulary: ids, the aggregation request and its validation,
//!   statistics rows, quoting of caller values. No transport.
//! - [`grpc`]: the transport. The listener (bounded connections, TLS with reloading files,
//!   handshake timeouts), caller identity and per-farm authorization, generated types,
//!   proto ⇄ domain conversion, the one mapping of refusals to `Status`, the service, the route
//!   that reads both unary methods and sends cached rows without copying, and the server with
//!   health and reflection.
//! - [`gateway`]: the core, free of tonic and the SDK. Coalescing on a canonical key, the
//!   coordination store of owned records (in memory; shared pieces in Redis), the results
//!   cache, farm workers under leases with fencing tokens, the lifecycle that drives one
//!   aggregation upstream, caller and upstream throttling, long-polls.
//! - [`upstream`]: the [`upstream::Upstream`] trait (start, get a page) and its implementation
//!   over `aws-sdk-deadline`; SDK errors become [`upstream::UpstreamError`].
//! - [`emulator`]: a Deadline Cloud emulator served over HTTP, the upstream of every test, demo
//!   and benchmark.
//! - [`telemetry`]: logs, OpenTelemetry traces, metrics, and the admin HTTP listener.
//! - [`bench`]: the load generator, the bare-tonic baseline and the benchmark scenarios.
//! - [`cli`]: the command line; `main` parses it and calls [`cli::run`].
//!
//! # Data flow
//! ```text
//! caller ──TCP/TLS──▶ grpc::listener (bounds, handshake; the peer's certificate identity)
//!                   │
//!                   ▼
//!                 grpc (identity, authorization of the farm, decode, validate into domain)
//!                   │
//!                   ▼
//!                 gateway ── throttle ── results cache (a terminal result: answered here)
//!                   │
//!                   ▼
//!                 store: claim a key (start / join / cached), read an id, farm queues,
//!                   │    records written only by the farm's lease holder (fenced)
//!                   ▼
//!                 scheduler: a worker per farm, on the replica holding the farm's lease
//!                   │
//!                   ▼
//!                 lifecycle ── pacer ──▶ upstream::SdkUpstream ──HTTP──▶ Deadline Cloud
//!                   │                                                   (or the emulator)
//!                   ▼
//!                 store (terminal record, rows) ──▶ wake-ups: long-polls re-read
//! ```
//! Telemetry observes every step; nothing flows back from it.
#![forbid(unsafe_code)]
#![warn(unreachable_pub)]

pub mod app;
pub mod bench;
pub mod cli;
pub mod domain;
pub mod emulator;
pub mod gateway;
pub mod grpc;
pub mod telemetry;
pub mod upstream;
