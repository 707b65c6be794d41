//! Farm leases: which replica drives a farm's queue. One holder at a time, for a time-to-live
//! the holder keeps renewing; every new holder gets a larger fencing token, and every write a
//! holder makes is checked against the farm's newest token, so a holder that paused past its
//! lease (and was replaced) can no longer change anything.
//!
//! [`MemoryLeases`] serves one process; [`super::redis::RedisClient`] shares leases
//! between replicas. Both pass the same conformance suite (`tests/coordination.rs`).

use super::StoreError;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A held lease on one farm.
///
/// Besides what the store knows of it, a lease carries its holder's own deadline: when it was
/// asked for (or last renewed) plus its TTL, less a margin for the clocks' drift. The store's
/// expiry can only be later, so while the local deadline has not passed no other holder can
/// exist (unless the store lost the lease: the fence catches that). Clones share the deadline,
/// so a renewal is seen by everything acting under the lease.
#[derive(Debug, Clone)]
pub struct Lease {
    pub farm: String,
    /// The replica holding it (its instance id).
    pub holder: String,
    /// Larger than the token of every earlier holder of this farm.
    pub token: u64,
    deadline: Arc<Mutex<Instant>>,
    /// Fired when the holder learns the lease is gone before its deadline.
    revoked: CancellationToken,
}

impl PartialEq for Lease {
    fn eq(&self, other: &Self) -> bool {
        (&self.farm, &self.holder, self.token) == (&other.farm, &other.holder, other.token)
    }
}

impl Eq for Lease {}

/// How much of a lease's TTL its holder does not count on: the clocks of the holder and the
/// store may run at slightly different rates.
fn margin(ttl: Duration) -> Duration {
    ttl / 10
}

impl Lease {
    /// A lease the store granted for `ttl`, asked for at `asked`.
    pub fn granted(farm: &str, holder: &str, token: u64, asked: Instant, ttl: Duration) -> Self {
        let deadline = Arc::new(Mutex::new(asked + ttl - margin(ttl)));
        Self { farm: farm.to_owned(), holder: holder.to_owned(), token, deadline, revoked: CancellationToken::new() }
    }

    /// The holder learned the lease is gone (the store says another holds it, or the worker
    /// gives it up): it is no longer valid, and [`Self::lost`] resolves.
    pub fn revoke(&self) {
        *self.deadline.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Instant::now();
        self.revoked.cancel();
    }

    /// Resolves once this holder may no longer act under the lease: it ran out by this
    /// holder's clock, or was revoked.
    pub async fn lost(&self) {
        loop {
            let left = self.remaining();
            if left.is_zero() {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(left) => {}
                () = self.revoked.cancelled() => return,
            }
        }
    }

    /// The store renewed it for `ttl`, asked at `asked`.
    pub fn renewed(&self, asked: Instant, ttl: Duration) {
        let mut deadline = self.deadline.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !self.revoked.is_cancelled() {
            *deadline = (*deadline).max(asked + ttl - margin(ttl));
        }
    }

    /// How long this holder may still act under it by its own clock (zero once it ran out).
    pub fn remaining(&self) -> Duration {
        let deadline = *self.deadline.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        deadline.saturating_duration_since(Instant::now())
    }

    /// Whether this holder may still act under it by its own clock.
    pub fn is_valid(&self) -> bool {
        !self.remaining().is_zero()
    }
}

/// Leases on farms, with fencing tokens.
#[async_trait::async_trait]
pub trait FarmLeases: Send + Sync + 'static {
    /// Takes `farm`'s lease for `holder` for `ttl`, unless someone holds it.
    async fn acquire(&self, farm: &str, holder: &str, ttl: Duration) -> Result<Option<Lease>, StoreError>;

    /// Extends the lease by `ttl` from now; `false` when it is no longer held under this token
    /// (it expired, and perhaps another holder took it): the holder must stop at once.
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, StoreError>;

    /// Gives the lease up, if it is still held under this token.
    async fn release(&self, lease: &Lease) -> Result<(), StoreError>;

    /// Whether no newer holder exists: the check every fenced write makes.
    async fn is_current(&self, lease: &Lease) -> Result<bool, StoreError>;

    /// Who holds `farm`'s lease now, if anyone (for the operator console; nothing decides on it).
    async fn holder(&self, farm: &str) -> Result<Option<String>, StoreError>;
}

#[derive(Debug, Default)]
struct Farm {
    /// The newest token handed out for the farm.
    fence: u64,
    held: Option<(String, u64, Instant)>,
}

/// Leases of one process.
#[derive(Debug, Default)]
pub struct MemoryLeases {
    farms: Mutex<HashMap<String, Farm>>,
}

impl MemoryLeases {
    /// The newest token handed out for `farm` (0 before the first).
    pub fn newest_token(&self, farm: &str) -> u64 {
        self.lock().get(farm).map_or(0, |state| state.fence)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Farm>> {
        self.farms.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Farm {
    /// The holder's name and token while the lease is live at `now`.
    fn live(&self, now: Instant) -> Option<(&str, u64)> {
        self.held.as_ref().filter(|(_, _, until)| *until > now).map(|(holder, token, _)| (holder.as_str(), *token))
    }
}

#[async_trait::async_trait]
impl FarmLeases for MemoryLeases {
    async fn acquire(&self, farm: &str, holder: &str, ttl: Duration) -> Result<Option<Lease>, StoreError> {
        let now = Instant::now();
        let mut farms = self.lock();
        let state = farms.entry(farm.to_owned()).or_default();
        if state.live(now).is_some() {
            return Ok(None);
        }
        state.fence += 1;
        state.held = Some((holder.to_owned(), state.fence, now + ttl));
        Ok(Some(Lease::granted(farm, holder, state.fence, now, ttl)))
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut farms = self.lock();
        let Some(state) = farms.get_mut(&lease.farm) else { return Ok(false) };
        if state.live(now) != Some((lease.holder.as_str(), lease.token)) {
            return Ok(false);
        }
        state.held = Some((lease.holder.clone(), lease.token, now + ttl));
        Ok(true)
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        let mut farms = self.lock();
        if let Some(state) = farms.get_mut(&lease.farm)
            && state.held.as_ref().is_some_and(|(h, t, _)| *h == lease.holder && *t == lease.token)
        {
            state.held = None;
        }
        Ok(())
    }

    async fn is_current(&self, lease: &Lease) -> Result<bool, StoreError> {
        Ok(self.lock().get(&lease.farm).is_some_and(|state| state.fence == lease.token))
    }

    async fn holder(&self, farm: &str) -> Result<Option<String>, StoreError> {
        let now = Instant::now();
        Ok(self.lock().get(farm).and_then(|state| state.live(now)).map(|(holder, _)| holder.to_owned()))
    }
}
