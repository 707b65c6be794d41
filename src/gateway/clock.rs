//! The gateway core's one wall clock. Durations and deadlines use `tokio::time` (so a test on
//! paused time moves them with `advance`); every wall-clock reading (expiry, freshness,
//! create and start times, refresh due dates) goes through the [`Clock`] the core is built
//! with: the system's in production, one that follows tokio's clock in tests.
//!
//! A reading is exact ([`Clock::now`]) or, where a few milliseconds do not matter, a cheaper
//! one that is never behind the exact time ([`Clock::now_or_later`]): the cache-hit path's
//! expiry check takes that one (issue 28).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime};

/// How a reading is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    Exact,
    /// Up to one kernel tick ahead of the exact time, not behind it.
    NotBehind,
}

/// Where the core reads the time of day.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn(Reading) -> SystemTime + Send + Sync>);

impl Clock {
    /// The system's wall clock.
    pub fn system() -> Self {
        Self(Arc::new(|reading| match reading {
            Reading::Exact => SystemTime::now(),
            Reading::NotBehind => coarse::not_behind(),
        }))
    }

    /// A wall clock that starts at the system's time and then moves only as tokio's clock does:
    /// with `tokio::time::pause()`, it stands still until `advance` moves it.
    pub fn tokio() -> Self {
        let (wall, mono) = (SystemTime::now(), tokio::time::Instant::now());
        Self(Arc::new(move |_| wall + mono.elapsed()))
    }

    /// A clock that always reads `at`.
    #[cfg(test)]
    fn fixed(at: SystemTime) -> Self {
        Self(Arc::new(move |_| at))
    }

    /// `base` corrected by an offset someone else keeps measuring (µs to add, may be
    /// negative): a shared store's clock as this replica reads it, so that every replica's
    /// expiry and freshness decisions agree with each other and with the store's key TTLs.
    pub fn corrected(base: Clock, offset_us: Arc<AtomicI64>) -> Self {
        Self(Arc::new(move |reading| {
            let offset = offset_us.load(Ordering::Relaxed);
            let magnitude = Duration::from_micros(offset.unsigned_abs());
            let now = (base.0)(reading);
            if offset >= 0 { now + magnitude } else { now.checked_sub(magnitude).unwrap_or(now) }
        }))
    }

    pub fn now(&self) -> SystemTime {
        (self.0)(Reading::Exact)
    }

    /// The time of day read cheaply (the kernel's coarse clock, no time counter read): one
    /// kernel tick (a few ms) ahead at most, and not behind unless the tick itself ran late.
    /// Deciding "expired" by it errs early rather than late.
    pub fn now_or_later(&self) -> SystemTime {
        (self.0)(Reading::NotBehind)
    }
}

/// The kernel's coarse wall clock (updated every tick, read without the time counter) plus its
/// resolution, so the reading is never behind the exact time.
mod coarse {
    use std::time::SystemTime;

    #[cfg(any(target_os = "linux", target_os = "android"))]
    pub(super) fn not_behind() -> SystemTime {
        use rustix::time::{ClockId, clock_getres, clock_gettime};
        use std::sync::LazyLock;
        use std::time::Duration;
        static RESOLUTION: LazyLock<Duration> = LazyLock::new(|| {
            let res = clock_getres(ClockId::RealtimeCoarse);
            Duration::new(u64::try_from(res.tv_sec).unwrap_or(0), u32::try_from(res.tv_nsec).unwrap_or(0))
        });
        let now = clock_gettime(ClockId::RealtimeCoarse);
        match (u64::try_from(now.tv_sec), u32::try_from(now.tv_nsec)) {
            (Ok(secs), Ok(nanos)) => SystemTime::UNIX_EPOCH + Duration::new(secs, nanos) + *RESOLUTION,
            _ => SystemTime::now(),
        }
    }

    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    pub(super) fn not_behind() -> SystemTime {
        SystemTime::now()
    }
}

/// How far `other` is ahead of `base` (negative: behind), in µs.
pub fn offset_us(base: SystemTime, other: SystemTime) -> i64 {
    match other.duration_since(base) {
        Ok(ahead) => i64::try_from(ahead.as_micros()).unwrap_or(i64::MAX),
        Err(behind) => -i64::try_from(behind.duration().as_micros()).unwrap_or(i64::MAX),
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_corrected_clock_follows_its_offset_both_ways() {
        let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let offset = Arc::new(AtomicI64::new(0));
        let clock = Clock::corrected(Clock::fixed(base), offset.clone());
        assert_eq!(clock.now(), base);
        offset.store(offset_us(base, base + Duration::from_secs(3600)), Ordering::Relaxed);
        assert_eq!(clock.now(), base + Duration::from_secs(3600));
        offset.store(offset_us(base, base - Duration::from_millis(1500)), Ordering::Relaxed);
        assert_eq!(clock.now(), base - Duration::from_millis(1500));
    }

    #[test]
    fn the_cheap_reading_is_the_time_of_day_to_a_few_milliseconds() {
        // Sanity of units and epoch only: how far ahead it is depends on when the kernel's
        // tick last ran, which a loaded machine delays.
        let clock = Clock::system();
        let apart = |a: SystemTime, b: SystemTime| a.duration_since(b).unwrap_or_else(|e| e.duration());
        for _ in 0..100 {
            let (exact, cheap) = (clock.now(), clock.now_or_later());
            assert!(apart(cheap, exact) < Duration::from_millis(100), "{cheap:?} vs {exact:?}");
        }
        let fixed = Clock::fixed(SystemTime::UNIX_EPOCH);
        assert_eq!(fixed.now_or_later(), SystemTime::UNIX_EPOCH);
    }

    #[tokio::test(start_paused = true)]
    async fn the_tokio_clock_moves_with_paused_time_only() {
        let clock = Clock::tokio();
        let before = clock.now();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(clock.now(), before, "real time passing does not move it");
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(clock.now(), before + Duration::from_secs(3600));
    }
}
