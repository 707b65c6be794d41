//! deadline-stats-gateway: a gRPC gateway in front of AWS Deadline Cloud's sessions-statistics
//! aggregation API.
//!
//! # Modules
//! - [`app`]: the composition root. Builds a gateway from an [`app::AppConfig`] (upstream,
//!   coordination store, TLS and access policy, core, listeners) and serves it until shutdown,
//!   draining on the way out; `serve` and the integration tests both run it.
//! - [`domain`]: the upstream's vocabulary: ids, the aggregation request and its validation,
//!   period buckets, statistics rows, quoting of caller values, halving a request. No transport.
//! - [`grpc`]: the transport. The listener (bounded connections, TLS with reloading files,
//!   handshake timeouts), caller identity and per-farm authorization, the service's methods,
//!   generated types, proto ⇄ domain conversion, the one mapping of refusals to `Status`, the
//!   service, the route that reads both unary methods and sends cached rows without copying,
//!   and the server with health and reflection.
//! - [`gateway`]: the core, free of tonic and the SDK.
//!   - `config`: every setting, its default, and the one `validate()` of them all; `clock`:
//!     the one injected wall clock.
//!   - `coordination`: the store contract and its two backends (memory; Redis, with its Lua
//!     scripts in `coordination/redis/scripts/`), the rules they share (`policy`), farm leases
//!     with fencing tokens, the results cache, wake-ups, upstream pacing, run models.
//!   - `scheduler`: a supervised worker per farm, on the replica holding its lease;
//!     `lifecycle`: driving one aggregation upstream (start, follow, split, one retry loop,
//!     fenced writes).
//!   - coalescing (`key`, `ids`, `record`), caller throttling (`throttle`), long-polls and
//!     watches (`watch`), refresh-ahead (`refresh`), predicted times (`estimate`).
//! - [`upstream`]: the [`upstream::Upstream`] trait (start, get a page) and its implementation
//!   over `aws-sdk-deadline`; SDK errors become [`upstream::UpstreamError`]; a result "too
//!   large" is recognised here.
//! - [`emulator`]: a Deadline Cloud emulator served over HTTP, the upstream of every test, demo
//!   and benchmark.
//! - [`telemetry`]: logs, OpenTelemetry traces, metrics, and the admin HTTP listener.
//! - [`console`]: the operator console on the admin listener (a page and a JSON API over the
//!   gateway's read-only views; a bearer token when reachable from elsewhere).
//! - `every`: the tick of a background task (housekeeping, refresh, the farm scan, file reloads).
//! - [`bench`](mod@bench): the load generator, the bare-tonic baseline and the benchmark scenarios.
//! - [`cli`]: the command line; it maps flags onto [`app::AppConfig`] and checks nothing of
//!   its own. `main` parses it and calls [`cli::run`].
//!
//! # Where a change goes
//! A new setting: `gateway::config` (and its flag in `cli::serve`). A rule about when a result
//! answers, which bound a claim meets, or the order of a farm's queue:
//! `gateway::coordination::policy`, mirrored by the script that names it, with a property in
//! `tests/store_conformance.rs`. Something the upstream answers: `upstream` (and the emulator).
//! A refusal callers see: `gateway::error` and its one mapping in `grpc::status`.
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
//!                 coordination store: claim a key (start / join / cached), read an id, farm
//!                   │    queues, records written only by the farm's lease holder (fenced)
//!                   ▼
//!                 scheduler: a worker per farm, on the replica holding the farm's lease
//!                   │
//!                   ▼
//!                 lifecycle ── pacing ──▶ upstream::SdkUpstream ──HTTP──▶ Deadline Cloud
//!                   │                                                   (or the emulator)
//!                   ▼
//!                 store (terminal record, rows) ──▶ wake-ups: long-polls and watches re-read
//! ```
//! Telemetry observes every step; nothing flows back from it.
#![forbid(unsafe_code)]
#![warn(unreachable_pub)]

pub mod app;
pub mod bench;
pub mod cli;
pub mod console;
pub mod domain;
pub mod emulator;
pub(crate) mod every;
pub mod gateway;
pub mod grpc;
pub mod telemetry;
pub mod upstream;
