//! Shared pieces of the integration tests, one file per concern: the upstream (emulator, SDK,
//! faults), the in-process gateway and its requests, the binary as a process, HTTP and metric
//! scrapes, Python tools, a real redis-server (and a proxy that breaks its connections) and gateway processes sharing it. `use common::*` brings them all.
#![allow(dead_code, unused_imports)]

mod apt;
mod certs;
mod fleet;
mod gateway;
mod http;
mod process;
mod proxy;
mod python;
mod redis;
mod replicas;
mod upstream;

pub use apt::*;
pub use certs::*;
pub use fleet::*;
pub use gateway::*;
pub use http::*;
pub use process::*;
pub use proxy::*;
pub use python::*;
pub use redis::*;
pub use replicas::*;
pub use upstream::*;

use std::time::Duration;

/// Polls `check` every 20 ms until it returns `Some`, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "condition not reached within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
