//! The rules every store follows, each written once: when a terminal result may answer a Start
//! ([`Freshness::accepts`]), which bound a new aggregation would break ([`admit`]), the order
//! of a farm's queue ([`place`], [`slot`], [`joined_place`], [`reached_head`]), and whether a
//! due result is refreshed ahead ([`refresh_verdict`]). The run-time moving average is
//! [`super::run_model::RunModel::observe`].
//!
//! The memory store calls these functions; the Redis scripts mirror them line for line (each
//! script names the rule it mirrors), and the conformance suite checks each rule on both stores.
//! Nothing here reads a clock or a store: callers pass what they observed.

use super::{Bound, ClaimError};
use crate::gateway::record::{AggregationRecord, Priority, State};
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
    /// Aggregations one caller's Starts may have waiting on one farm (its share of the queue).
    pub caller_capacity: usize,
    /// Fair queueing ([`place`]); `false`: arrival order, callers before refreshes.
    pub fair: bool,
}

impl Limits {
    /// What one caller may have waiting on a farm: `share` of `queue_capacity`, at least one.
    pub fn caller_capacity(queue_capacity: usize, share: f64) -> usize {
        // The share is checked to be in (0, 1] where it is read; the product fits.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
        let capacity = (queue_capacity as f64 * share).floor() as usize;
        capacity.max(1)
    }
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
    /// Aggregations the caller's Starts have waiting (behind the head) on the farm.
    pub caller_waiting: usize,
}

/// Whether a new aggregation fits within `limits`: the first bound it would break, checked in
/// this order: live aggregations, farms, the farm's queue, the caller's share of it (so one
/// caller's backlog never refuses another caller while the farm has room).
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
    // Nothing waits while the farm is idle: the first aggregation goes to the head.
    if at.queued > 0 && at.caller_waiting >= limits.caller_capacity {
        return Err(ClaimError::CallerQueueFull { farm_id: farm.to_owned(), capacity: limits.caller_capacity });
    }
    Ok(())
}

/// The class of refresh-ahead's aggregations: after every caller's.
pub(crate) const REFRESH_CLASS: u8 = 2;

/// Where an aggregation waits in its farm's queue: by class (interactive 0, batch 1, refresh
/// [`REFRESH_CLASS`]), then by turn; arrival breaks ties. Start-time fair queueing within a
/// class: a caller's aggregation takes the later of the class's virtual time (the turn of the
/// class's last aggregation to reach the head) and the caller's own next turn, and moves the
/// caller's next turn one past it; so callers take turns, round-robin, whatever they queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Place {
    pub(crate) class: u8,
    pub(crate) turn: u64,
}

impl Place {
    /// A refresh's: after every caller's, in arrival order.
    pub(crate) const REFRESH: Self = Self { class: REFRESH_CLASS, turn: 0 };
    /// A caller's when queueing is not fair: arrival order.
    pub(crate) const ARRIVAL: Self = Self { class: 0, turn: 0 };
}

/// The class a priority waits in.
pub(crate) fn class(priority: Priority) -> u8 {
    match priority {
        Priority::Interactive => 0,
        Priority::Batch => 1,
    }
}

/// The priority a caller's class stands for (the inverse of [`class`]; refresh-ahead's waits
/// as batch).
pub(crate) fn priority_of(class: u8) -> Priority {
    if class == 0 { Priority::Interactive } else { Priority::Batch }
}

/// The place of a caller's aggregation of `priority` on a farm whose class has `virtual_time`
/// and where the caller's next turn is `caller_next` (0: none yet), and the caller's next turn
/// after it.
pub(crate) fn place(limits: &Limits, priority: Priority, virtual_time: u64, caller_next: u64) -> (Place, u64) {
    if !limits.fair {
        return (Place::ARRIVAL, caller_next);
    }
    let turn = virtual_time.max(caller_next);
    (Place { class: class(priority), turn }, turn.saturating_add(1))
}

/// Where an aggregation of `place` goes in a farm's queue of `len` whose waiting entries (all
/// but the head) are at `waiting`, in order: after every one not later than it, never before
/// the head (which its holder may be running). An index into the queue.
pub(crate) fn slot(len: usize, waiting: impl IntoIterator<Item = Place>, place: Place) -> usize {
    if len == 0 {
        return 0;
    }
    waiting.into_iter().position(|p| p > place).map_or(len, |i| i + 1)
}

/// A waiting aggregation at `current` that a caller joins, whose own aggregation would be at
/// `joiner`: it moves up to the joiner's place if that is earlier (a popular request is never
/// behind where any of its callers would have put it). `None`: it stays.
pub(crate) fn joined_place(current: Place, joiner: Place) -> Option<Place> {
    (joiner < current).then_some(joiner)
}

/// The class's new virtual time when an aggregation at `place` reaches the head of its farm
/// (`None`: a refresh's, which keeps no turns).
pub(crate) fn reached_head(virtual_time: u64, place: Place) -> Option<u64> {
    (place.class < REFRESH_CLASS).then(|| virtual_time.max(place.turn))
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

/// How many completed results of a request's family are looked at for one that contains it:
/// those that start nearest before the request's start (at or before it). The work of a Start
/// stays bounded however many results a farm holds.
pub(crate) const CONTAINING_LOOKED_AT: usize = 64;

/// Whether a result's window `r` covers a request's `q` (`(start, end)` in ms): the first,
/// cheap test of containment, which the shared store's index applies itself.
pub(crate) fn covers(r: (i64, i64), q: (i64, i64)) -> bool {
    r.0 <= q.0 && q.1 <= r.1
}

/// Whether a derived result expiring at `expire` becomes what its key answers, the key
/// answering an active aggregation (`active`) or a result expiring at `answering` (`None`:
/// nothing, or nothing readable): not over an active one, nor over one valid as long.
pub(crate) fn derived_takes_key(active: bool, answering: Option<SystemTime>, expire: SystemTime) -> bool {
    !active && answering.is_none_or(|at| at < expire)
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

    const LIMITS: Limits = Limits { queue_capacity: 2, max_live: 10, max_farms: 3, caller_capacity: 1, fair: true };

    fn at(live: usize, farms: usize, queued: usize) -> Occupancy {
        Occupancy { live, farms, queued, caller_waiting: 0 }
    }

    #[test]
    fn bounds_are_checked_live_first_then_farms_then_the_queue() {
        let fits = at(0, 0, 0);
        assert!(admit(fits, &LIMITS, "f").is_ok());
        let all = at(10, 3, 3);
        assert!(matches!(admit(all, &LIMITS, "f"), Err(ClaimError::Busy { bound: Bound::ActiveAggregations, .. })));
        let farms = at(1, 3, 0);
        assert!(matches!(admit(farms, &LIMITS, "f"), Err(ClaimError::Busy { bound: Bound::Farms, .. })));
        let own_farm = at(1, 3, 1);
        assert!(admit(own_farm, &LIMITS, "f").is_ok(), "a farm with work is already counted");
        let full = at(3, 1, 3);
        assert!(matches!(admit(full, &LIMITS, "f"), Err(ClaimError::QueueFull { capacity: 2, .. })));
        let share = Occupancy { caller_waiting: 1, ..at(3, 1, 2) };
        assert!(matches!(admit(share, &LIMITS, "f"), Err(ClaimError::CallerQueueFull { capacity: 1, .. })));
        assert!(admit(Occupancy { caller_waiting: 1, ..at(3, 1, 0) }, &LIMITS, "f").is_ok(), "an idle farm has room");
    }

    #[test]
    fn an_aggregation_waits_after_every_place_not_later_than_its_own_never_before_the_head() {
        let p = |class, turn| Place { class, turn };
        assert_eq!(slot(0, [], p(1, 9)), 0, "an idle farm: the head");
        assert_eq!(slot(1, [], p(0, 0)), 1, "never before the head");
        let waiting = [p(0, 1), p(0, 2), p(1, 0), Place::REFRESH];
        assert_eq!(slot(5, waiting, p(0, 1)), 2, "after its equal (arrival breaks ties)");
        assert_eq!(slot(5, waiting, p(0, 0)), 1);
        assert_eq!(slot(5, waiting, p(1, 5)), 4, "batch after batch, before refreshes");
        assert_eq!(slot(5, waiting, Place::REFRESH), 5, "a refresh at the back");
        let fifo = [Place::ARRIVAL, Place::ARRIVAL, Place::REFRESH];
        assert_eq!(slot(4, fifo, Place::ARRIVAL), 3, "not fair: callers in arrival order, before refreshes");
    }

    #[test]
    fn callers_take_turns_and_a_join_moves_an_aggregation_up() {
        // A caller's place: the later of the class's virtual time and its own next turn.
        assert_eq!(place(&LIMITS, Priority::Interactive, 4, 0), (Place { class: 0, turn: 4 }, 5));
        assert_eq!(place(&LIMITS, Priority::Batch, 4, 7), (Place { class: 1, turn: 7 }, 8));
        let fifo = Limits { fair: false, ..LIMITS };
        assert_eq!(place(&fifo, Priority::Batch, 4, 7), (Place::ARRIVAL, 7), "not fair: arrival order");
        let (waiting, joiner) = (Place { class: 1, turn: 3 }, Place { class: 0, turn: 9 });
        assert_eq!(joined_place(waiting, joiner), Some(joiner), "an interactive joiner raises it");
        assert_eq!(joined_place(joiner, waiting), None, "a later joiner leaves it");
        assert_eq!(reached_head(4, Place { class: 0, turn: 6 }), Some(6));
        assert_eq!(reached_head(4, Place { class: 0, turn: 2 }), Some(4), "virtual time never goes back");
        assert_eq!(reached_head(4, Place::REFRESH), None);
        assert_eq!(Limits::caller_capacity(100, 0.5), 50);
        assert_eq!(Limits::caller_capacity(3, 0.1), 1, "at least one");
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
