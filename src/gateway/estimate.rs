//! Predicted times: when a queued aggregation starts upstream and when it completes, from what
//! the gateway has observed on its farm, never from a guess.
//!
//! - A request's **size** is its period buckets times its queue or fleet ids: what the upstream
//!   has to aggregate.
//! - Each farm keeps a **run model**: a moving average (exponentially weighted) of the seconds
//!   one unit of size took, from the upstream Start being accepted to the rows being stored,
//!   which includes the upstream's own pacing, the status polls and the page fetches. It lives
//!   in the coordination store, so every replica predicts from the same observations.
//! - A RUNNING aggregation's completion is predicted once, when its upstream Start is accepted,
//!   and kept in its record: one estimate per aggregation whichever replica is asked, and the
//!   one its error is measured against.
//! - A QUEUED aggregation starts when everything ahead of it on its farm has completed: the
//!   head's predicted completion, then each one's predicted run in turn.

use super::error::StoreError;
use super::record::{AggregationRecord, State};
use super::store::AggregationStore;
use crate::domain::AggregationRequest;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Weight of the newest observation in the moving average.
pub const SMOOTHING: f64 = 0.3;

/// What a request costs the upstream, in units of one bucket of one queue or fleet.
pub fn size(request: &AggregationRequest) -> u64 {
    let period = request.period.unwrap_or(super::key::DEFAULT_PERIOD);
    let timezone = request.timezone.unwrap_or(crate::domain::Timezone::UTC);
    let buckets = crate::domain::buckets::buckets(request.start_time, request.end_time, period, timezone).count();
    (buckets.max(1) as u64).saturating_mul(request.resources.ids().len().max(1) as u64)
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
    /// The model after one more run of `size` that took `took`.
    pub fn observe(previous: Option<Self>, size: u64, took: Duration) -> Self {
        let rate = took.as_secs_f64() / size.max(1) as f64;
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

/// The predicted times of one aggregation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Estimate {
    /// QUEUED: when it starts upstream.
    pub start: Option<SystemTime>,
    /// QUEUED and RUNNING: when it completes.
    pub completion: Option<SystemTime>,
}

/// The estimate of the active aggregation `record`, `queue_position` places from its farm's
/// head, reading from `store` only what that takes: nothing when it runs (its prediction is in
/// its record), else the farm's model and its queue up to it.
pub async fn of(
    store: &dyn AggregationStore,
    record: &AggregationRecord,
    queue_position: u32,
    start_gap: Duration,
) -> Result<Estimate, StoreError> {
    if record.state != State::Queued {
        return Ok(estimate(record, &[], None, SystemTime::now(), start_gap));
    }
    let farm = record.farm_id();
    // Its position may only have moved forward since it was read.
    let through = usize::try_from(queue_position).unwrap_or(usize::MAX).saturating_add(1);
    let (queue, model) = tokio::try_join!(store.queue(farm, through), store.run_model(farm))?;
    Ok(estimate(record, &queue, model, SystemTime::now(), start_gap))
}

/// The estimate of `target` on a farm whose queue is `queue` (its head first), with the farm's
/// `model`, at `now`, when the gateway's own upstream pacing lets one Start through every
/// `start_gap` at best. Nothing when nothing has been observed, or when `target` is not queued
/// or running.
pub fn estimate(
    target: &AggregationRecord,
    queue: &[Arc<AggregationRecord>],
    model: Option<RunModel>,
    now: SystemTime,
    start_gap: Duration,
) -> Estimate {
    match target.state {
        State::Running => return Estimate { start: None, completion: target.estimated_completion },
        State::Queued => {}
        _ => return Estimate::default(),
    }
    let Some(model) = model else { return Estimate::default() };
    let mut free_at = now;
    let mut last_start: Option<SystemTime> = None;
    for record in queue {
        // Queued ones start when the farm is free and the pacing lets their Start through.
        let start = last_start.and_then(|s| s.checked_add(start_gap)).map_or(free_at, |paced| paced.max(free_at));
        if record.id == target.id {
            return Estimate {
                start: Some(start),
                completion: start.checked_add(model.run_time(record.key.request())),
            };
        }
        free_at = match (record.state, record.estimated_completion) {
            // One that runs late is expected to end any moment now.
            (State::Running, Some(at)) => at.max(free_at),
            // Running without a prediction of its own (started before anything was observed).
            (State::Running, None) => {
                let since = record.running_since.unwrap_or(now);
                since.checked_add(model.run_time(record.key.request())).unwrap_or(now).max(free_at)
            }
            _ => {
                last_start = Some(start);
                start.checked_add(model.run_time(record.key.request())).unwrap_or(start)
            }
        };
        if record.state == State::Running {
            last_start = record.running_since;
        }
    }
    // Not in the queue read (it moved meanwhile): no estimate rather than a wrong one.
    Estimate::default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u64, state: State) -> Arc<AggregationRecord> {
        let mut r = AggregationRecord::queued(format!("agg-{n}").into(), crate::gateway::key::test_key(1, n));
        r.state = state;
        Arc::new(r)
    }

    #[test]
    fn the_moving_average_follows_the_runs() {
        let r = record(1, State::Queued);
        let units = size(r.key.request());
        let first = RunModel::observe(None, units, Duration::from_secs(10));
        assert_eq!(first.run_time(r.key.request()).as_secs(), 10);
        let second = RunModel::observe(Some(first), units, Duration::from_secs(20));
        assert_eq!((second.run_time(r.key.request()).as_secs_f64() * 10.0).round(), 130.0, "10 + 0.3 × 10");
        assert_eq!(second.runs, 2);
    }

    #[test]
    fn predictions_improve_with_each_run_when_the_farm_slows_down() {
        let r = record(1, State::Queued);
        let units = size(r.key.request());
        let mut model = RunModel::observe(None, units, Duration::from_secs(10));
        let error = |m: &RunModel| (m.run_time(r.key.request()).as_secs_f64() - 20.0).abs();
        let mut last = error(&model);
        for _ in 0..10 {
            model = RunModel::observe(Some(model), units, Duration::from_secs(20));
            let now = error(&model);
            assert!(now < last, "each run of 20 s brings the prediction closer: {now} after {last}");
            last = now;
        }
        assert!(last < 0.5, "within half a second after ten runs: {last}");
    }

    #[test]
    fn a_queued_aggregation_starts_when_those_ahead_complete() {
        let now = SystemTime::now();
        let mut head = (*record(1, State::Running)).clone();
        head.estimated_completion = Some(now + Duration::from_secs(30));
        let (middle, target) = (record(2, State::Queued), record(3, State::Queued));
        let queue = vec![Arc::new(head.clone()), middle.clone(), target.clone()];
        assert_eq!(
            estimate(&target, &queue, None, now, Duration::ZERO),
            Estimate::default(),
            "nothing observed, nothing said"
        );
        let model = RunModel::observe(None, size(middle.key.request()), Duration::from_secs(60));
        let per_run = |r: &AggregationRecord| model.run_time(r.key.request());
        let e = estimate(&target, &queue, Some(model), now, Duration::ZERO);
        let start = now + Duration::from_secs(30) + per_run(&middle);
        assert_eq!(e, Estimate { start: Some(start), completion: Some(start + per_run(&target)) });
        assert_eq!(estimate(&head, &queue, Some(model), now, Duration::ZERO).completion, head.estimated_completion);
        head.estimated_completion = Some(now - Duration::from_secs(5));
        let late = vec![Arc::new(head), middle.clone(), target.clone()];
        assert_eq!(
            estimate(&middle, &late, Some(model), now, Duration::ZERO).start,
            Some(now),
            "a late head ends any moment"
        );
        let quick = RunModel { seconds_per_unit: 0.001, runs: 1 };
        let gap = Duration::from_secs(10);
        let (first, second) = (
            estimate(&middle, &late, Some(quick), now, gap).start.expect("a start"),
            estimate(&target, &late, Some(quick), now, gap).start.expect("a start"),
        );
        assert!(second >= first + gap, "the upstream pacing holds the next Start back: {first:?} {second:?}");
    }
}
