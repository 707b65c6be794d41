//! Exponential backoff with full jitter, bounded below and above.

use rand::Rng;
use std::time::Duration;

/// Bounds of a backoff sequence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackoffPolicy {
    pub initial: Duration,
    pub max: Duration,
    pub multiplier: f64,
}

impl BackoffPolicy {
    pub fn start(&self) -> Backoff {
        Backoff { policy: *self, next: self.initial }
    }
}

/// One backoff sequence: each delay is drawn from `[current/2, current]`, and `current` grows by
/// the multiplier up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: BackoffPolicy,
    next: Duration,
}

impl Backoff {
    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let current = self.next;
        self.next = current.mul_f64(self.policy.multiplier).min(self.policy.max).max(self.policy.initial);
        let half = current / 2;
        half + rand::rng().random_range(Duration::ZERO..=current - half)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_within_bounds() {
        let policy =
            BackoffPolicy { initial: Duration::from_millis(100), max: Duration::from_secs(2), multiplier: 2.0 };
        let mut b = policy.start();
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(delays[9] >= Duration::from_secs(1), "reaches the cap: {delays:?}");
    }
}
