//! The tick of a background task that runs every so often until it is stopped: the first tick
//! at once, a late one delayed (never a burst of missed ones), none after the stop.

use std::time::Duration;
use tokio::time::{Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// Ticks every `period` until `stop` fires.
pub(crate) struct Every {
    interval: Interval,
    stop: CancellationToken,
}

impl Every {
    pub(crate) fn new(period: Duration, stop: CancellationToken) -> Self {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self { interval, stop }
    }

    /// Waits for the next tick: `false` once stopped.
    pub(crate) async fn tick(&mut self) -> bool {
        tokio::select! {
            _ = self.interval.tick() => !self.stop.is_cancelled(),
            () = self.stop.cancelled() => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn it_ticks_at_once_then_every_period_until_stopped() {
        let stop = CancellationToken::new();
        let mut every = Every::new(Duration::from_secs(10), stop.clone());
        let begin = tokio::time::Instant::now();
        assert!(every.tick().await);
        assert_eq!(begin.elapsed(), Duration::ZERO, "the first at once");
        assert!(every.tick().await);
        assert_eq!(begin.elapsed(), Duration::from_secs(10));
        stop.cancel();
        assert!(!every.tick().await, "none after the stop");
    }
}
