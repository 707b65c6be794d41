//! The gateway core's one wall clock. Durations and deadlines use `tokio::time` (so a test on
//! paused time moves them with `advance`); every wall-clock reading (expiry, freshness,
//! create and start times, refresh due dates) goes through the [`Clock`] the core is built
//! with: the system's in production, one that follows tokio's clock in tests.

use std::sync::Arc;
use std::time::SystemTime;

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

    pub fn now(&self) -> SystemTime {
        (self.0)()
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
    use std::time::Duration;

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
