//! Each farm's observed run times, from which estimates predict (see `gateway::estimate`): a
//! moving average (exponentially weighted) of the seconds one unit of a request's size took,
//! from the upstream Start being accepted to the rows being stored. It lives in the store, so
//! every replica predicts from the same observations.

use crate::domain::AggregationRequest;
use std::time::Duration;

/// Weight of the newest observation in the moving average.
pub(crate) const SMOOTHING: f64 = 0.3;

/// What a request costs the upstream, in units of one bucket of one queue or fleet: its period
/// buckets times its queue or fleet ids.
pub(crate) fn size(request: &AggregationRequest) -> u64 {
    let period = request.period.unwrap_or(crate::gateway::key::DEFAULT_PERIOD);
    let timezone = request.timezone.unwrap_or(crate::domain::Timezone::UTC);
    let buckets = crate::domain::buckets::bucket_count(request.start_time, request.end_time, period, timezone);
    buckets.max(1).saturating_mul(request.resources.ids().len().max(1) as u64)
}

/// The observed run time of a farm's aggregations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunModel {
    /// Moving average of the seconds one unit of size took.
    pub seconds_per_unit: f64,
    /// How many runs it has seen.
    pub runs: u64,
}

impl RunModel {
    /// The seconds per unit of one run of `size` that took `took`.
    pub fn rate(size: u64, took: Duration) -> f64 {
        took.as_secs_f64() / size.max(1) as f64
    }

    /// The model after one more run of `size` that took `took`. The Redis store's
    /// `observe_run.lua` mirrors it.
    pub fn observe(previous: Option<Self>, size: u64, took: Duration) -> Self {
        let rate = Self::rate(size, took);
        match previous {
            None => Self { seconds_per_unit: rate, runs: 1 },
            Some(m) => Self {
                seconds_per_unit: m.seconds_per_unit + SMOOTHING * (rate - m.seconds_per_unit),
                runs: m.runs + 1,
            },
        }
    }

    /// How long an aggregation of `request` is expected to run.
    pub fn run_time(&self, request: &AggregationRequest) -> Duration {
        let seconds = self.seconds_per_unit * size(request) as f64;
        Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> AggregationRequest {
        crate::gateway::key::test_key(1, 1).request().clone()
    }

    #[test]
    fn the_moving_average_follows_the_runs() {
        let r = request();
        let units = size(&r);
        let first = RunModel::observe(None, units, Duration::from_secs(10));
        assert_eq!(first.run_time(&r).as_secs(), 10);
        let second = RunModel::observe(Some(first), units, Duration::from_secs(20));
        assert_eq!((second.run_time(&r).as_secs_f64() * 10.0).round(), 130.0, "10 + 0.3 × 10");
        assert_eq!(second.runs, 2);
    }

    #[test]
    fn predictions_improve_with_each_run_when_the_farm_slows_down() {
        let r = request();
        let units = size(&r);
        let mut model = RunModel::observe(None, units, Duration::from_secs(10));
        let error = |m: &RunModel| (m.run_time(&r).as_secs_f64() - 20.0).abs();
        let mut last = error(&model);
        for _ in 0..10 {
            model = RunModel::observe(Some(model), units, Duration::from_secs(20));
            let now = error(&model);
            assert!(now < last, "each run of 20 s brings the prediction closer: {now} after {last}");
            last = now;
        }
        assert!(last < 0.5, "within half a second after ten runs: {last}");
    }
}
