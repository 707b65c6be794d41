//! Benchmarks: a load generator (closed and open loop, HDR histograms), a bare-tonic baseline
//! server that answers `GetAggregation` with pre-encoded bytes (the physical limit of our stack
//! here), helpers that pin processes to cores and read their CPU time and RSS from `/proc`, and
//! the scenarios `bench` runs (`scenarios` for speed and memory, `abuse` for hostile input
//! and caller churn, [`transport`] for abuse of HTTP/2 and TCP, `replicas` for several gateways
//! sharing Redis, `chaos` for them under Redis and process faults, `console` for the cache-hit
//! path while the operator console is read, `fairness` for a farm shared by a backfill and a
//! dashboard, `derive` for a dashboard mix answered from a cached superset); [`paired`] turns
//! alternating rounds into a median ratio with a confidence interval.
//!
//! Benchmarks measure; they never assert. Targets are judged by reading their reports.

pub(crate) mod abuse;
pub mod baseline;
pub mod certs;
pub(crate) mod chaos;
pub(crate) mod console;
pub(crate) mod derive;
pub(crate) mod fairness;
pub(crate) mod loadgen;
pub mod paired;
pub mod process;
pub(crate) mod profile;
pub(crate) mod replicas;
pub mod requests;
pub(crate) mod scenarios;
pub(crate) mod tls;
pub mod transport;
pub(crate) mod watchers;
