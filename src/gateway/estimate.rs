//! Predicted times: when a queued aggregation starts upstream and when it completes, from what
//! the gateway has observed on its farm, never from a guess.
//!
//! - Each farm keeps a **run model** in the coordination store
//!   ([`super::coordination::run_model`]): a moving average of the seconds one unit of a
//!   request's size (period buckets times queue or fleet ids) took, from the upstream Start
//!   being accepted to the rows being stored (the upstream's own pacing, the status polls and
//!   the page fetches included).
//! - A RUNNING aggregation's completion is predicted once, when its upstream Start is accepted,
//!   and kept in its record: one estimate per aggregation whichever replica is asked, and the
//!   one its error is measured against.
//! - A QUEUED aggregation starts when everything ahead of it on its farm has completed: the
//!   head's predicted completion, then each one's predicted run in turn.

use super::coordination::{AggregationStore, RunModel, StoreError};
use super::record::{AggregationRecord, State};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The predicted times of one aggregation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Estimate {
    /// QUEUED: when it starts upstream.
    pub start: Option<SystemTime>,
    /// QUEUED and RUNNING: when it completes.
    pub completion: Option<SystemTime>,
}

/// How many places back an aggregation may have moved between its read and its estimate's
/// read of its farm's queue, and still be estimated.
const MOVED_BACK: usize = 8;

/// The estimate at `now` of the active aggregation `record`, `queue_position` places from its
/// farm's head, reading from `store` only what that takes: nothing when it runs (its prediction is in
/// its record), else the farm's model and its queue up to it.
pub(crate) async fn of(
    store: &dyn AggregationStore,
    record: &AggregationRecord,
    queue_position: u32,
    start_gap: Duration,
    now: SystemTime,
) -> Result<Estimate, StoreError> {
    if record.state != State::Queued {
        return Ok(estimate(record, &[], None, now, start_gap));
    }
    let farm = record.farm_id();
    // Its position may have moved since it was read: forward as those ahead complete, back
    // as fair queueing puts other work ahead of it. A few places more are read.
    let through = usize::try_from(queue_position).unwrap_or(usize::MAX).saturating_add(1 + MOVED_BACK);
    let (queue, model) = tokio::try_join!(store.queue(farm, through), store.run_model(farm))?;
    Ok(estimate(record, &queue, model, now, start_gap))
}

/// The estimate of `target` on a farm whose queue is `queue` (its head first), with the farm's
/// `model`, at `now`, when the gateway's own upstream pacing lets one Start through every
/// `start_gap` at best. Nothing when nothing has been observed, or when `target` is not queued
/// or running.
pub(crate) fn estimate(
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
        let mut r = AggregationRecord::queued(
            format!("agg-{n}").into(),
            crate::gateway::key::test_key(1, n),
            SystemTime::now(),
        );
        r.state = state;
        Arc::new(r)
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
        let model = RunModel::observe(
            None,
            crate::gateway::coordination::run_model::size(middle.key.request()),
            Duration::from_secs(60),
        );
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
