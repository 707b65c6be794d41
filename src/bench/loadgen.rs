//! The load generator: closed loop (N workers over M connections, each sending its next request
//! when the previous answers) and open loop (a fixed rate, latency measured from each request's
//! intended send time, so a slow server cannot hide its queueing: no coordinated omission).

use hdrhistogram::Histogram;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// Latencies are recorded in microseconds, up to a minute, with 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant, valid histogram bounds")
}

/// What one run measured.
#[derive(Debug, Clone)]
pub(crate) struct LoadReport {
    pub requests: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub latency_us: Histogram<u64>,
    /// Open loop only: how late the load generator sent each request after its intended time.
    /// A tail here is the load generator's own (or the machine's), not the server's.
    pub send_lag_us: Histogram<u64>,
}

impl LoadReport {
    pub(crate) fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// An empty report, to [`LoadReport::merge`] phases into.
    pub(crate) fn empty() -> Self {
        Self { requests: 0, errors: 0, elapsed: Duration::ZERO, latency_us: histogram(), send_lag_us: histogram() }
    }

    /// Adds another phase's requests, errors, time and latencies to this one.
    pub(crate) fn merge(&mut self, other: &LoadReport) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.elapsed += other.elapsed;
        let _ = self.latency_us.add(&other.latency_us);
        let _ = self.send_lag_us.add(&other.send_lag_us);
    }

    pub(crate) fn percentile_us(&self, q: f64) -> u64 {
        self.latency_us.value_at_quantile(q)
    }

    /// throughput, p50/p90/p99/p99.9 and errors, as JSON; in the open loop also the p99 and
    /// p99.9 of the send lag.
    pub(crate) fn json(&self) -> serde_json::Value {
        let mut out = serde_json::json!({
            "requests": self.requests,
            "errors": self.errors,
            "rps": self.rps().round(),
            "p50_us": self.percentile_us(0.5),
            "p90_us": self.percentile_us(0.9),
            "p99_us": self.percentile_us(0.99),
            "p999_us": self.percentile_us(0.999),
        });
        if !self.send_lag_us.is_empty() {
            out["send_lag_p99_us"] = self.send_lag_us.value_at_quantile(0.99).into();
            out["send_lag_p999_us"] = self.send_lag_us.value_at_quantile(0.999).into();
        }
        out
    }
}

/// `workers` concurrent loops calling `call` with clients taken round-robin from `clients`,
/// for `duration`.
pub(crate) async fn closed_loop<C, F, Fut>(clients: &[C], workers: usize, duration: Duration, call: F) -> LoadReport
where
    C: Clone + Send + 'static,
    F: Fn(C) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    let begin = Instant::now();
    let deadline = begin + duration;
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let (client, call) = (clients[w % clients.len()].clone(), call.clone());
            tokio::spawn(async move {
                let (mut hist, mut errors) = (histogram(), 0u64);
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    if !call(client.clone()).await {
                        errors += 1;
                    }
                    let _ = hist.record(sent.elapsed().as_micros().max(1) as u64);
                }
                (hist, errors)
            })
        })
        .collect();
    let (mut latency_us, mut errors) = (histogram(), 0);
    for task in tasks {
        if let Ok((hist, e)) = task.await {
            let _ = latency_us.add(&hist);
            errors += e;
        }
    }
    LoadReport { requests: latency_us.len(), errors, elapsed: begin.elapsed(), latency_us, send_lag_us: histogram() }
}

/// Requests at `rate` per second for `duration`; each latency counts from the request's
/// intended send time. At most `max_in_flight` wait at once; beyond that requests count as
/// errors rather than being delayed.
pub(crate) async fn open_loop<C, F, Fut>(
    clients: &[C],
    rate: f64,
    duration: Duration,
    max_in_flight: usize,
    call: F,
) -> LoadReport
where
    C: Clone + Send + 'static,
    F: Fn(C) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    let total = (rate * duration.as_secs_f64()).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / rate.max(1e-9));
    let shared = Arc::new(Mutex::new((histogram(), 0u64)));
    let mut send_lag_us = histogram();
    let permits = Arc::new(tokio::sync::Semaphore::new(max_in_flight));
    let begin = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..total {
        let intended = begin + interval.mul_f64(i as f64);
        pace_until(intended).await;
        let _ = send_lag_us.record(intended.elapsed().as_micros().max(1) as u64);
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            shared.lock().unwrap_or_else(|p| p.into_inner()).1 += 1;
            continue;
        };
        let (client, call, shared) = (clients[i as usize % clients.len()].clone(), call.clone(), shared.clone());
        tasks.push(tokio::spawn(async move {
            let ok = call(client).await;
            let latency = intended.elapsed().as_micros().max(1) as u64;
            let mut s = shared.lock().unwrap_or_else(|p| p.into_inner());
            let _ = s.0.record(latency);
            if !ok {
                s.1 += 1;
            }
            drop(permit);
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let elapsed = begin.elapsed();
    let (latency_us, errors) = shared.lock().unwrap_or_else(|p| p.into_inner()).clone();
    LoadReport { requests: latency_us.len(), errors, elapsed, latency_us, send_lag_us }
}

/// Waits until `at` to within microseconds. Tokio's timer has millisecond granularity, so
/// sleeping alone would send requests in bursts once a millisecond or two and measure the
/// bursts' queueing; the timer covers the bulk of the wait, yielding to the other tasks the
/// last stretch.
async fn pace_until(at: Instant) {
    if let Some(early) = at.checked_sub(Duration::from_millis(2))
        && Instant::now() < early
    {
        tokio::time::sleep_until(early).await;
    }
    while Instant::now() < at {
        tokio::task::yield_now().await;
    }
}
