//! The gateway core's one wall clock. Durations and deadlines use `tokio::time` (so a test on
//! paused time moves them with `advance`); every wall-clock reading (expiry, freshness,
//! create and start times, refresh due dates) goes through the [`Clock`] the core is built
//! with: the system's in production, one that follows tokio's clock in tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime};

/// Where the core reads the time of day.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> SystemTime + Send + Sync>);

impl Clock {
    /// The system's wall clock.
    pub fn system() -> Self {
        Self(Arc::new(SystemTime::now))
    }

    /// A wall clock that starts at the system's time and then moves only as tokio's clock does:
    /// with `tokio::time::pause()`, it stands still until `advance` moves it.
    pub fn tokio() -> Self {
        let (wall, mono) = (SystemTime::now(), tokio::time::Instant::now());
        Self(Arc::new(move || wall + mono.elapsed()))
    }

    /// `base` corrected by an offset someone else keeps measuring (µs to add, may be
    /// negative): a shared store's clock as this replica reads it, so that every replica's
    /// expiry and freshness decisions agree with each other and with the store's key TTLs.
    pub fn corrected(base: Clock, offset_us: Arc<AtomicI64>) -> Self {
        Self(Arc::new(move || {
            let offset = offset_us.load(Ordering::Relaxed);
            let magnitude = Duration::from_micros(offset.unsigned_abs());
            let now = base.now();
            if offset >= 0 { now + magnitude } else { now.checked_sub(magnitude).unwrap_or(now) }
        }))
    }

    pub fn now(&self) -> SystemTime {
        (self.0)()
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
        let clock = Clock::corrected(Clock(Arc::new(move || base)), offset.clone());
        assert_eq!(clock.now(), base);
        offset.store(offset_us(base, base + Duration::from_secs(3600)), Ordering::Relaxed);
        assert_eq!(clock.now(), base + Duration::from_secs(3600));
        offset.store(offset_us(base, base - Duration::from_millis(1500)), Ordering::Relaxed);
        assert_eq!(clock.now(), base - Duration::from_millis(1500));
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
