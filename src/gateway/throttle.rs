//! Token buckets (governor): rates, and per caller for Start and Get, rejecting with a retry
//! delay. The gateway's own upstream traffic waits on a [`super::coordination::pacing::Pacer`]
//! instead.

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use std::num::NonZeroU32;
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
    pub(crate) fn quota(self) -> Option<Quota> {
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

    #[test]
    fn zero_means_unlimited() {
        assert!(CallerBuckets::new(Rate { per_second: 0.0, burst: 1 }).is_none());
    }
}
