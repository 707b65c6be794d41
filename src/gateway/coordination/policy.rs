//! The rules every store follows, each written once: when a terminal result may answer a Start
//! ([`Freshness::accepts`]), which bound a new aggregation would break ([`admit`]), where a
//! caller's aggregation goes in its farm's queue ([`caller_slot`]), and whether a due result is
//! refreshed ahead ([`refresh_verdict`]). The run-time moving average is
//! [`super::run_model::RunModel::observe`].
//!
//! The memory store calls these functions; the Redis scripts mirror them line for line (each
//! script names the rule it mirrors), and the conformance suite checks each rule on both stores.
//! Nothing here reads a clock or a store: callers pass what they observed.

use super::{Bound, ClaimError};
use crate::gateway::record::{AggregationRecord, State};
use std::time::{Duration, SystemTime};

/// What a caller accepts as a cached answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Freshness {
    /// A COMPLETED result is only answered when it stays valid at least this long: time for
    /// the caller to read its pages.
    pub min_remaining: Duration,
    /// A result whose data is older than this is not answered; `None` accepts any valid one.
    pub max_staleness: Option<Duration>,
}

impl Freshness {
    /// Whether the terminal aggregation `r` may answer a Start at `now`, its rows (when
    /// COMPLETED) being at hand or not.
    pub fn accepts(&self, r: &AggregationRecord, has_rows: bool, now: SystemTime) -> bool {
        let remaining = r.remaining(now);
        let needed = if r.state == State::Completed { self.min_remaining } else { Duration::ZERO };
        let fresh = match (self.max_staleness, r.data_time) {
            (Some(max), Some(at)) => now.duration_since(at).unwrap_or_default() <= max,
            (Some(_), None) => false,
            (None, _) => true,
        };
        let rows = r.state != State::Completed || has_rows;
        !remaining.is_zero() && remaining >= needed && fresh && rows
    }
}

/// The bounds a claim must respect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Aggregations that may wait per farm behind the one at its head.
    pub queue_capacity: usize,
    /// Queued and running aggregations across all farms.
    pub max_live: usize,
    /// Farms with work at once.
    pub max_farms: usize,
}

/// What a store holds when a claim would queue a new aggregation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Occupancy {
    /// Queued and running aggregations across all farms.
    pub live: usize,
    /// Farms with work.
    pub farms: usize,
    /// The length of the claimed farm's queue, its head included.
    pub queued: usize,
}

/// Whether a new aggregation fits within `limits`: the first bound it would break, checked in
/// this order: live aggregations, farms, the farm's queue.
pub(crate) fn admit(at: Occupancy, limits: &Limits, farm: &str) -> Result<(), ClaimError> {
    if at.live >= limits.max_live {
        return Err(ClaimError::Busy { bound: Bound::ActiveAggregations, limit: limits.max_live });
    }
    if at.queued == 0 && at.farms >= limits.max_farms {
        return Err(ClaimError::Busy { bound: Bound::Farms, limit: limits.max_farms });
    }
    // The head does not wait: a queue of `queued` has `queued - 1` waiting.
    if at.queued > limits.queue_capacity {
        return Err(ClaimError::QueueFull { farm_id: farm.to_owned(), capacity: limits.queue_capacity });
    }
    Ok(())
}

/// Where a caller's new aggregation goes in a farm's queue whose entries are `pending_refresh`
/// (a refresh no caller has joined) or not, its head first: before the first refresh waiting,
/// never before the head (which may be running), else at the back.
pub(crate) fn caller_slot(pending_refresh: impl IntoIterator<Item = bool>) -> usize {
    let mut len = 0;
    for (i, refresh) in pending_refresh.into_iter().enumerate() {
        if i > 0 && refresh {
            return i;
        }
        len = i + 1;
    }
    len
}

/// What refresh-ahead does with one due result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RefreshVerdict {
    /// A refresh was queued.
    Queued,
    /// It can never be refreshed (expired, no longer answering its key, or refreshed already):
    /// it leaves the due set.
    Gone,
    /// Not asked for often enough (yet).
    Cold,
    /// Callers' work waits on its farm: it waits for a later scan.
    Backlog,
    /// Its farm has no work and the gateway serves as many farms as it may.
    Farms,
    /// The gateway holds as many live aggregations as it may: the scan stops.
    Live,
    /// The shared store's state is of a newer epoch than the refresh's id: the scan stops.
    Epoch,
}

/// A caller's Starts of one result count as one hit for refresh-ahead per this window: a
/// caller retrying, polling by Start, or looping cannot make a result look popular.
pub(crate) const HIT_WINDOW: Duration = Duration::from_secs(60);

/// Whether a caller's Start at `now` counts as a hit, its last counted one of the same result
/// having been at `last`.
pub(crate) fn counts_as_hit(last: Option<SystemTime>, now: SystemTime) -> bool {
    last.is_none_or(|last| now.duration_since(last).unwrap_or_default() >= HIT_WINDOW)
}

/// What is known of a due result and its farm when refresh-ahead looks at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Candidate {
    /// COMPLETED, still valid, answering its key, and with no refresh of its key under way.
    pub answering: bool,
    /// Starts it answered.
    pub hits: u32,
    /// Its farm's queue holds callers' aggregations (anything but refreshes no caller joined).
    pub caller_backlog: bool,
    /// Its farm has work at all.
    pub farm_has_work: bool,
    /// Farms with work.
    pub farms: usize,
    /// Queued and running aggregations.
    pub live: usize,
}

/// Whether the due result `c` is refreshed now, checked in this order.
pub(crate) fn refresh_verdict(c: Candidate, min_hits: u32, limits: &Limits) -> RefreshVerdict {
    if !c.answering {
        RefreshVerdict::Gone
    } else if c.hits < min_hits {
        RefreshVerdict::Cold
    } else if c.caller_backlog {
        RefreshVerdict::Backlog
    } else if !c.farm_has_work && c.farms >= limits.max_farms {
        RefreshVerdict::Farms
    } else if c.live >= limits.max_live {
        RefreshVerdict::Live
    } else {
        RefreshVerdict::Queued
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { queue_capacity: 2, max_live: 10, max_farms: 3 };

    #[test]
    fn bounds_are_checked_live_first_then_farms_then_the_queue() {
        let fits = Occupancy { live: 0, farms: 0, queued: 0 };
        assert!(admit(fits, &LIMITS, "f").is_ok());
        let all = Occupancy { live: 10, farms: 3, queued: 3 };
        assert!(matches!(admit(all, &LIMITS, "f"), Err(ClaimError::Busy { bound: Bound::ActiveAggregations, .. })));
        let farms = Occupancy { live: 1, farms: 3, queued: 0 };
        assert!(matches!(admit(farms, &LIMITS, "f"), Err(ClaimError::Busy { bound: Bound::Farms, .. })));
        let own_farm = Occupancy { live: 1, farms: 3, queued: 1 };
        assert!(admit(own_farm, &LIMITS, "f").is_ok(), "a farm with work is already counted");
        let full = Occupancy { live: 3, farms: 1, queued: 3 };
        assert!(matches!(admit(full, &LIMITS, "f"), Err(ClaimError::QueueFull { capacity: 2, .. })));
    }

    #[test]
    fn a_caller_goes_before_waiting_refreshes_never_before_the_head() {
        assert_eq!(caller_slot([]), 0);
        assert_eq!(caller_slot([true]), 1, "a refresh at the head may run");
        assert_eq!(caller_slot([false, false]), 2);
        assert_eq!(caller_slot([false, false, true, true]), 2);
        assert_eq!(caller_slot([true, true]), 1);
    }

    #[test]
    fn a_due_result_is_refreshed_only_when_every_check_passes() {
        let ok = Candidate { answering: true, hits: 3, caller_backlog: false, farm_has_work: false, farms: 0, live: 0 };
        assert_eq!(refresh_verdict(ok, 3, &LIMITS), RefreshVerdict::Queued);
        assert_eq!(refresh_verdict(Candidate { answering: false, ..ok }, 3, &LIMITS), RefreshVerdict::Gone);
        assert_eq!(refresh_verdict(Candidate { hits: 2, ..ok }, 3, &LIMITS), RefreshVerdict::Cold);
        assert_eq!(refresh_verdict(Candidate { caller_backlog: true, ..ok }, 3, &LIMITS), RefreshVerdict::Backlog);
        assert_eq!(refresh_verdict(Candidate { farms: 3, ..ok }, 3, &LIMITS), RefreshVerdict::Farms);
        let busy_farm = Candidate { farms: 3, farm_has_work: true, ..ok };
        assert_eq!(refresh_verdict(busy_farm, 3, &LIMITS), RefreshVerdict::Queued, "its farm is counted already");
        assert_eq!(refresh_verdict(Candidate { live: 10, ..ok }, 3, &LIMITS), RefreshVerdict::Live);
    }

    #[test]
    fn a_caller_counts_once_a_hit_window() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert!(counts_as_hit(None, t), "a caller's first Start counts");
        assert!(
            !counts_as_hit(Some(t), t + HIT_WINDOW - Duration::from_millis(1)),
            "its retries within the window do not"
        );
        assert!(counts_as_hit(Some(t), t + HIT_WINDOW), "a Start a window later counts again");
        assert!(!counts_as_hit(Some(t + HIT_WINDOW), t), "nor does one from a clock that went back");
    }
}
