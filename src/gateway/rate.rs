//! Rates: events per second with a burst on top, as callers' limits and the gateway's own
//! upstream pacing are configured, and where callers' limits hold. Below both the caller
//! buckets (`throttle`) and the stores' shared rates (`coordination`).

use governor::Quota;
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

    /// The rate as a GCRA keeps it in a shared store: the emission interval, and the
    /// tolerance (interval × (burst − 1)), in µs; `None` when the rate is not a positive number.
    pub(crate) fn gcra_us(self) -> Option<(u64, u64)> {
        let (interval, burst) = self.interval_and_burst()?;
        let interval_us = u64::try_from(interval.as_micros()).unwrap_or(u64::MAX).max(1);
        Some((interval_us, interval_us.saturating_mul(u64::from(burst.saturating_sub(1)))))
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

/// Where callers' limits hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CallerLimits {
    /// Across every replica sharing the store (a replica's own buckets on a store of one
    /// process).
    #[default]
    Global,
    /// In each replica: a caller spread over N replicas gets N times its rate.
    Local,
}
