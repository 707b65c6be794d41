//! Token buckets (governor): per caller for Start and Get, rejecting with a retry delay; and for
//! the gateway's own upstream traffic, waiting instead of rejecting, on a bucket of this process
//! or one shared by every replica.

use super::error::StoreError;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

/// A rate in events per second and the burst allowed on top of it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: u32,
}

impl Rate {
    /// The pacing of upstream Starts: no burst, so Starts are spread evenly.
    pub fn upstream_start(per_second: f64) -> Self {
        Self { per_second, burst: 1 }
    }

    /// The pacing of upstream Gets: a burst of one second's worth (at least one), so a page
    /// fetch is not slowed while the bucket is full.
    pub fn upstream_get(per_second: f64) -> Self {
        let burst = if per_second.is_finite() && per_second > 1.0 { per_second.ceil() as u32 } else { 1 };
        Self { per_second, burst }
    }

    /// The time between two tokens, and how many may be taken at once; `None` when the rate
    /// is not a positive number.
    pub fn interval_and_burst(self) -> Option<(Duration, u32)> {
        let quota = self.quota()?;
        Some((quota.replenish_interval(), quota.burst_size().get()))
    }

    /// `None` when the rate is not a positive number.
    fn quota(self) -> Option<Quota> {
        if !(self.per_second.is_finite() && self.per_second > 0.0) {
            return None;
        }
        let period = Duration::from_secs_f64(1.0 / self.per_second).max(Duration::from_nanos(1));
        let burst = NonZeroU32::new(self.burst.max(1))?;
        Some(Quota::with_period(period)?.allow_burst(burst))
    }
}

/// Per-caller buckets for one operation.
pub struct CallerBuckets {
    limiter: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
}

impl CallerBuckets {
    /// `None` when `rate` is zero: no limit.
    pub fn new(rate: Rate) -> Option<Self> {
        Some(Self { limiter: DefaultKeyedRateLimiter::keyed(rate.quota()?), clock: DefaultClock::default() })
    }

    /// Takes a token for `caller`, or says how long until one is available.
    pub fn check(&self, caller: &str) -> Result<(), Duration> {
        let key = caller.to_owned();
        self.limiter.check_key(&key).map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Forgets callers whose buckets are full again, so the keyed state stays bounded by the
    /// callers active within one refill period.
    pub fn housekeeping(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }
}

/// Where a pacer's tokens come from: a bucket in this process ([`LocalRate`]), or one shared by
/// every replica (`gateway::redis::RedisRate`, a GCRA updated atomically in Redis), since the
/// upstream's quota is per account, not per pod.
#[async_trait::async_trait]
pub trait RateSource: Send + Sync + 'static {
    /// Takes a token now (`None`), or says how long until the next one is due.
    async fn try_take(&self) -> Result<Option<Duration>, StoreError>;
}

/// A token bucket of this process.
pub struct LocalRate {
    limiter: DefaultDirectRateLimiter,
    clock: DefaultClock,
}

impl LocalRate {
    /// `None` when `rate` is zero: nothing to pace.
    pub fn new(rate: Rate) -> Option<Self> {
        Some(Self { limiter: DefaultDirectRateLimiter::direct(rate.quota()?), clock: DefaultClock::default() })
    }
}

#[async_trait::async_trait]
impl RateSource for LocalRate {
    async fn try_take(&self) -> Result<Option<Duration>, StoreError> {
        Ok(self.limiter.check().err().map(|not_until| not_until.wait_time_from(self.clock.now())))
    }
}

/// What the gateway's own upstream calls wait on, served in arrival order.
///
/// Each farm's worker has at most one call waiting at a time, so first-come-first-served is
/// round-robin across farms: a farm with a long backlog gets one turn per round like any other.
pub struct Pacer {
    source: Option<Arc<dyn RateSource>>,
    /// The line: tokio's mutex hands itself to waiters in the order they asked.
    line: tokio::sync::Mutex<()>,
}

/// The longest pause between attempts when the rate source cannot be reached.
const UNREACHABLE_BACKOFF_MAX: Duration = Duration::from_secs(2);

impl Pacer {
    /// Paces at `rate` in this process; a zero rate does not pace.
    pub fn new(rate: Rate) -> Self {
        Self::with_source(LocalRate::new(rate).map(|r| Arc::new(r) as Arc<dyn RateSource>))
    }

    /// Paces on `source`; `None` does not pace.
    pub fn with_source(source: Option<Arc<dyn RateSource>>) -> Self {
        Self { source, line: tokio::sync::Mutex::new(()) }
    }

    /// Waits for a token, behind every caller of this process that asked before. While the
    /// source cannot be reached it keeps trying (a shared source's holder loses its farm lease
    /// meanwhile and is stopped by that, not by this).
    pub async fn ready(&self) {
        let Some(source) = &self.source else { return };
        let _turn = self.line.lock().await;
        let mut backoff = Duration::from_millis(50);
        loop {
            match source.try_take().await {
                Ok(None) => return,
                Ok(Some(wait)) => tokio::time::sleep(wait).await,
                Err(e) => {
                    tracing::warn!(error = %e, ?backoff, "no upstream pacing token: the rate source is unreachable");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(UNREACHABLE_BACKOFF_MAX);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_over_its_burst_is_told_when_to_retry_and_others_are_not_affected() {
        let buckets = CallerBuckets::new(Rate { per_second: 1.0, burst: 2 }).expect("limited");
        assert!(buckets.check("a").is_ok());
        assert!(buckets.check("a").is_ok());
        let wait = buckets.check("a").expect_err("over the burst");
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
        assert!(buckets.check("b").is_ok());
        assert_eq!(buckets.len(), 2);
    }

    #[test]
    fn idle_callers_are_forgotten() {
        let buckets = CallerBuckets::new(Rate { per_second: 1000.0, burst: 1 }).expect("limited");
        for n in 0..100 {
            assert!(buckets.check(&format!("caller-{n}")).is_ok());
        }
        assert_eq!(buckets.len(), 100);
        std::thread::sleep(Duration::from_millis(20));
        buckets.housekeeping();
        assert!(buckets.is_empty(), "full buckets hold no state");
    }

    #[tokio::test]
    async fn the_upstream_pacer_waits_instead_of_refusing() {
        let pacer = Pacer::new(Rate { per_second: 20.0, burst: 1 });
        let begin = std::time::Instant::now();
        for _ in 0..5 {
            pacer.ready().await;
        }
        assert!(begin.elapsed() >= Duration::from_millis(190), "five calls at 20/s need four gaps of 50 ms");
    }

    #[tokio::test]
    async fn the_upstream_pacer_serves_waiters_in_arrival_order() {
        let pacer = std::sync::Arc::new(Pacer::new(Rate { per_second: 50.0, burst: 1 }));
        pacer.ready().await;
        let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for farm in 0..8 {
            let (pacer, order) = (pacer.clone(), order.clone());
            waiters.push(tokio::spawn(async move {
                pacer.ready().await;
                order.lock().expect("lock").push(farm);
            }));
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for w in waiters {
            w.await.expect("waiter");
        }
        assert_eq!(*order.lock().expect("lock"), (0..8).collect::<Vec<_>>(), "first come, first served");
    }

    #[test]
    fn zero_means_unlimited() {
        assert!(CallerBuckets::new(Rate { per_second: 0.0, burst: 1 }).is_none());
    }
}
