//! Paired comparisons of two servers measured in alternating rounds (A/B/A/B…): each round
//! gives one ratio, and the report is the median ratio with a bootstrap confidence interval, so
//! a reader can tell a 3 % change from the noise of a shared machine.
//!
//! The ratio of a round compares the two servers over the same second or so, so load from
//! elsewhere that lasts seconds falls on both; what is left varies from round to round, and
//! the interval says how much the median of those ratios can be trusted.

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::{Value, json};

/// Resamples of the bootstrap: enough for the 2.5th and 97.5th percentiles to settle.
const RESAMPLES: usize = 2_000;

/// Seed of the bootstrap's generator: the same rounds give the same interval.
const SEED: u64 = 0x5EED_DA7A;

/// The interval's half-width, relative to the median, above which a report says it cannot tell
/// a 2 % change.
pub const PRECISE_ENOUGH: f64 = 0.02;

/// The median of the per-round ratios and its 95 % bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MedianRatio {
    pub median: f64,
    pub low: f64,
    pub high: f64,
    pub rounds: usize,
}

impl MedianRatio {
    /// Of `ratios` (one a round); `None` without any.
    pub fn of(ratios: &[f64]) -> Option<Self> {
        let finite: Vec<f64> = ratios.iter().copied().filter(|r| r.is_finite()).collect();
        if finite.is_empty() {
            return None;
        }
        let middle = median(&mut finite.clone());
        let mut rng = StdRng::seed_from_u64(SEED);
        let mut sample = vec![0.0; finite.len()];
        let mut medians: Vec<f64> = (0..RESAMPLES)
            .map(|_| {
                for s in sample.iter_mut() {
                    *s = finite[rng.random_range(0..finite.len())];
                }
                median(&mut sample)
            })
            .collect();
        medians.sort_by(f64::total_cmp);
        let at = |q: f64| medians[((medians.len() - 1) as f64 * q).round() as usize];
        Some(Self { median: middle, low: at(0.025), high: at(0.975), rounds: finite.len() })
    }

    /// The interval's half-width relative to the median.
    pub fn half_width(&self) -> f64 {
        (self.high - self.low) / 2.0 / self.median.abs().max(1e-9)
    }

    /// Whether the interval is within ±[`PRECISE_ENOUGH`] of the median.
    pub fn precise_enough(&self) -> bool {
        self.half_width() <= PRECISE_ENOUGH
    }

    pub fn json(&self) -> Value {
        let r = |x: f64| (x * 1000.0).round() / 1000.0;
        json!({
            "median": r(self.median),
            "ci95": [r(self.low), r(self.high)],
            "half_width": (self.half_width() * 10_000.0).round() / 10_000.0,
            "rounds": self.rounds,
            "precise_enough": self.precise_enough(),
        })
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_that_agree_give_a_tight_interval_and_noisy_ones_a_wide_one() {
        let same = MedianRatio::of(&[0.98; 40]).expect("rounds");
        assert_eq!((same.median, same.low, same.high), (0.98, 0.98, 0.98));
        assert!(same.precise_enough());

        // Ratios spread ±20 % around 1.0: 40 rounds cannot pin the median to 2 %.
        let noisy: Vec<f64> = (0..40).map(|i| 0.8 + 0.4 * f64::from(i % 10) / 9.0).collect();
        let wide = MedianRatio::of(&noisy).expect("rounds");
        assert!(wide.low < wide.median && wide.median < wide.high, "{wide:?}");
        assert!(!wide.precise_enough(), "{wide:?}");

        // Paying for more rounds narrows it.
        let more: Vec<f64> = (0..4000).map(|i| 0.8 + 0.4 * f64::from(i % 10) / 9.0).collect();
        let narrow = MedianRatio::of(&more).expect("rounds");
        assert!(narrow.half_width() < wide.half_width() / 3.0, "{narrow:?} against {wide:?}");
    }

    #[test]
    fn the_median_is_the_middle_round_and_the_same_rounds_give_the_same_interval() {
        let ratios = [1.10, 0.90, 1.00, 1.05, 0.95];
        let a = MedianRatio::of(&ratios).expect("rounds");
        assert_eq!(a.median, 1.0);
        assert_eq!(MedianRatio::of(&ratios), Some(a), "seeded");
        assert_eq!(MedianRatio::of(&[1.0, 2.0]).map(|m| m.median), Some(1.5));
        assert_eq!(MedianRatio::of(&[]), None);
        assert_eq!(MedianRatio::of(&[f64::NAN]), None, "a round without requests does not count");
    }
}
