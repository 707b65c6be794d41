//! The last five minutes of a few counters (upstream calls by outcome, cache hits), sampled
//! every ten seconds, for the overview: totals since start say little of what happens now.

use crate::telemetry::Metrics;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The window the overview reports.
pub(super) const WINDOW: Duration = Duration::from_secs(300);
const EVERY: Duration = Duration::from_secs(10);

use crate::upstream::{GET_OPERATION as GET, START_OPERATION as START};

/// Counter totals at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Sample {
    /// Upstream Starts and Gets: answered, throttled, failed otherwise.
    pub start: (u64, u64, u64),
    pub get: (u64, u64, u64),
    pub cache_hits: u64,
    pub cache_misses: u64,
}

impl Sample {
    fn now(metrics: &Metrics) -> Self {
        Self {
            start: metrics.upstream_totals(START),
            get: metrics.upstream_totals(GET),
            cache_hits: metrics.cache_hits.get(),
            cache_misses: metrics.cache_misses.get(),
        }
    }

    /// What was counted between `earlier` and this one.
    fn since(&self, earlier: &Self) -> Self {
        let d = |a: (u64, u64, u64), b: (u64, u64, u64)| {
            (a.0.saturating_sub(b.0), a.1.saturating_sub(b.1), a.2.saturating_sub(b.2))
        };
        Self {
            start: d(self.start, earlier.start),
            get: d(self.get, earlier.get),
            cache_hits: self.cache_hits.saturating_sub(earlier.cache_hits),
            cache_misses: self.cache_misses.saturating_sub(earlier.cache_misses),
        }
    }
}

/// Samples kept for [`WINDOW`].
pub(super) struct Window {
    metrics: Arc<Metrics>,
    samples: Mutex<VecDeque<(Instant, Sample)>>,
}

impl Window {
    /// Samples `metrics` every ten seconds until `stop`.
    pub(super) fn start(metrics: Arc<Metrics>, stop: CancellationToken) -> Arc<Self> {
        let window = Arc::new(Self { metrics, samples: Mutex::default() });
        let sampling = window.clone();
        tokio::spawn(async move {
            let mut every = crate::every::Every::new(EVERY, stop);
            while every.tick().await {
                sampling.sample();
            }
        });
        window
    }

    fn sample(&self) {
        let now = Instant::now();
        let mut samples = self.samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        samples.push_back((now, Sample::now(&self.metrics)));
        while samples.front().is_some_and(|(at, _)| now.duration_since(*at) > WINDOW) {
            samples.pop_front();
        }
    }

    /// What was counted over the window (or since start, when that is shorter), and over how
    /// long.
    pub(super) fn recent(&self) -> (Sample, Duration) {
        let samples = self.samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let current = Sample::now(&self.metrics);
        match samples.front() {
            Some((at, first)) => (current.since(first), at.elapsed()),
            None => (current, Duration::ZERO),
        }
    }
}
