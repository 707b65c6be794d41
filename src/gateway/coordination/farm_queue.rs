//! One farm's queue as the memory store keeps it: its ids, the head first, each with its place
//! in the fair order and the caller whose Start queued it, and the turns of fair queueing (each
//! class's virtual time, each caller's next turn). The rules are [`super::policy`]'s; the Redis
//! scripts keep the same in a hash beside the farm's list (`{b}:{farm}:fair`).

use super::policy::{self, Limits, Place, REFRESH_CLASS};
use crate::gateway::record::{AggregationId, Priority};
use std::collections::{HashMap, VecDeque};

#[derive(Debug)]
struct Entry {
    id: AggregationId,
    place: Place,
    /// The caller whose Start queued it (`None`: refresh-ahead): what its share counts.
    owner: Option<String>,
}

#[derive(Debug, Default)]
pub(crate) struct FarmQueue {
    entries: VecDeque<Entry>,
    /// Each caller class's virtual time: the turn of its last aggregation to reach the head.
    virtual_time: [u64; REFRESH_CLASS as usize],
    /// Each caller's next turn, by class.
    next: HashMap<(u8, String), u64>,
}

impl FarmQueue {
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub(crate) fn head(&self) -> Option<&AggregationId> {
        self.entries.front().map(|e| &e.id)
    }

    /// The ids, the head first.
    pub(crate) fn ids(&self) -> impl Iterator<Item = &AggregationId> {
        self.entries.iter().map(|e| &e.id)
    }

    pub(crate) fn position(&self, id: &str) -> Option<usize> {
        self.entries.iter().position(|e| &*e.id == id)
    }

    /// Aggregations `caller`'s Starts have waiting behind the head.
    pub(crate) fn waiting_of(&self, caller: &str) -> usize {
        self.entries.iter().skip(1).filter(|e| e.owner.as_deref() == Some(caller)).count()
    }

    /// Where `caller`'s aggregation of `priority` would wait, and the caller's next turn after
    /// it ([`policy::place`]).
    pub(crate) fn place_for(&self, limits: &Limits, priority: Priority, caller: &str) -> (Place, u64) {
        let class = policy::class(priority);
        let virtual_time = self.virtual_time[usize::from(class)];
        let next = self.next.get(&(class, caller.to_owned())).copied().unwrap_or_default();
        policy::place(limits, priority, virtual_time, next)
    }

    /// Sets `caller`'s next turn in `place`'s class.
    pub(crate) fn charge(&mut self, place: Place, caller: &str, next: u64) {
        if place.class < REFRESH_CLASS && next > 0 {
            self.next.insert((place.class, caller.to_owned()), next);
        }
    }

    /// Queues `id` at `place` ([`policy::slot`]); its index.
    pub(crate) fn insert(&mut self, id: AggregationId, place: Place, owner: Option<&str>) -> usize {
        let at = policy::slot(self.entries.len(), self.entries.iter().skip(1).map(|e| e.place), place);
        self.entries.insert(at, Entry { id, place, owner: owner.map(str::to_owned) });
        if at == 0 {
            self.reached_head();
        }
        at
    }

    /// The place of waiting `id` (`None`: the head, or not queued).
    pub(crate) fn waiting_place(&self, id: &str) -> Option<Place> {
        self.entries.iter().skip(1).find(|e| &*e.id == id).map(|e| e.place)
    }

    /// Moves waiting `id` to `place` (nothing when it is not waiting).
    pub(crate) fn move_to(&mut self, id: &str, place: Place) {
        let Some(from) = self.entries.iter().skip(1).position(|e| &*e.id == id) else { return };
        if let Some(entry) = self.entries.remove(from + 1) {
            self.insert(entry.id, place, entry.owner.as_deref());
        }
    }

    /// Takes `id` off the queue; whether it was in it. The next head, if `id` was the head,
    /// moves its class's virtual time; an emptied queue forgets its turns.
    pub(crate) fn remove(&mut self, id: &str) -> bool {
        let Some(at) = self.position(id) else { return false };
        self.entries.remove(at);
        if self.entries.is_empty() {
            self.virtual_time = Default::default();
            self.next.clear();
        } else if at == 0 {
            self.reached_head();
        }
        true
    }

    fn reached_head(&mut self) {
        let Some(head) = self.entries.front() else { return };
        let class = usize::from(head.place.class);
        if let Some(time) = self.virtual_time.get(class).and_then(|vt| policy::reached_head(*vt, head.place)) {
            self.virtual_time[class] = time;
            // Turns no later than the virtual time are as good as none.
            self.next.retain(|(c, _), next| usize::from(*c) != class || *next > time);
        }
    }
}
