//! Token buckets (governor) per caller for Start and Get, rejecting with a retry delay; this
//! replica's own, or shared by every replica through the store. The gateway's own upstream
//! traffic waits on a [`super::coordination::pacing::Pacer`] instead.

use super::coordination::pacing::{CallerTokens, Taken};
use super::rate::Rate;
use dashmap::DashMap;
use governor::DefaultKeyedRateLimiter;
use governor::clock::{Clock, DefaultClock};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How much of a caller's rate a replica takes from a shared bucket at once.
const BATCH_OF: Duration = Duration::from_millis(100);
/// How long tokens taken from a shared bucket may be spent: a replica cannot hoard them.
const HELD_FOR: Duration = Duration::from_millis(250);

/// Per-caller buckets for one operation: this replica's own (`--caller-limits local`), or
/// buckets shared by every replica (`global`), from which this replica takes tokens in
/// batches of `BATCH_OF` (100 ms) worth of the rate, spent within `HELD_FOR` (250 ms); a caller's request
/// costs a round trip to the store only when this replica holds none of its tokens. While the
/// store cannot be reached, this replica lets each caller through at its share of the rate.
pub struct CallerBuckets {
    limiter: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
    shared: Option<Shared>,
}

struct Shared {
    tokens: Arc<dyn CallerTokens>,
    /// Tokens taken and not yet spent, by caller.
    held: DashMap<String, Held>,
    batch: u32,
    rate: Rate,
    /// While the shared buckets cannot be reached: buckets of this replica's share of the
    /// rate, for the replica count they were made for.
    fallback: std::sync::Mutex<Option<(usize, DefaultKeyedRateLimiter<String>)>>,
}

struct Held {
    tokens: u32,
    until: Instant,
}

/// Where a token a caller got came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granted {
    /// This replica's buckets (`--caller-limits local`).
    Local,
    /// The caller's bucket shared by every replica.
    Shared,
    /// This replica's buckets, standing in while the shared ones cannot be reached.
    Fallback,
}

impl CallerBuckets {
    /// `None` when `rate` is zero: no limit.
    pub fn new(rate: Rate) -> Option<Self> {
        let limiter = DefaultKeyedRateLimiter::keyed(rate.quota()?);
        Some(Self { limiter, clock: DefaultClock::default(), shared: None })
    }

    /// Buckets of `rate` shared through `tokens` (`None`: this replica's own); `None` when
    /// `rate` is zero.
    pub fn shared(rate: Rate, tokens: Option<Arc<dyn CallerTokens>>) -> Option<Self> {
        let mut buckets = Self::new(rate)?;
        buckets.shared = tokens.map(|tokens| {
            let batch = (rate.per_second * BATCH_OF.as_secs_f64()).ceil().clamp(1.0, f64::from(rate.burst.max(1)));
            Shared { tokens, held: DashMap::new(), batch: batch as u32, rate, fallback: std::sync::Mutex::default() }
        });
        Some(buckets)
    }

    /// Takes a token for `caller`, or says how long until one is available.
    pub async fn check(&self, caller: &str) -> Result<Granted, Duration> {
        let Some(shared) = &self.shared else { return self.check_local(caller).map(|()| Granted::Local) };
        let now = Instant::now();
        if let Some(mut held) = shared.held.get_mut(caller)
            && held.tokens > 0
            && held.until > now
        {
            held.tokens -= 1;
            return Ok(Granted::Shared);
        }
        match shared.tokens.take(caller, shared.batch).await {
            Ok(Taken::Tokens(taken)) => {
                if taken > 1 {
                    let until = now + HELD_FOR;
                    let mut held = shared.held.entry(caller.to_owned()).or_insert(Held { tokens: 0, until });
                    if held.until <= now {
                        held.tokens = 0;
                    }
                    held.tokens += taken - 1;
                    held.until = until;
                }
                Ok(Granted::Shared)
            }
            Ok(Taken::Wait(wait)) => Err(wait),
            Err(_) => self.check_share(shared, caller).map(|()| Granted::Fallback),
        }
    }

    /// `caller`'s token from this replica's share of its rate: the rate over the replicas
    /// sharing it (burst likewise, at least one).
    fn check_share(&self, shared: &Shared, caller: &str) -> Result<(), Duration> {
        let replicas = shared.tokens.replicas().max(1);
        let mut fallback = shared.fallback.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if fallback.as_ref().is_none_or(|(made_for, _)| *made_for != replicas) {
            let share = Rate {
                per_second: shared.rate.per_second / replicas as f64,
                burst: (shared.rate.burst / u32::try_from(replicas).unwrap_or(u32::MAX)).max(1),
            };
            let Some(quota) = share.quota() else { return Ok(()) };
            *fallback = Some((replicas, DefaultKeyedRateLimiter::keyed(quota)));
        }
        let Some((_, limiter)) = fallback.as_ref() else { return Ok(()) };
        limiter.check_key(&caller.to_owned()).map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    fn check_local(&self, caller: &str) -> Result<(), Duration> {
        let key = caller.to_owned();
        self.limiter.check_key(&key).map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Forgets callers whose buckets are full again (and tokens past their time), so the
    /// keyed state stays bounded by the callers active within one refill period.
    pub fn housekeeping(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        if let Some(shared) = &self.shared {
            let now = Instant::now();
            shared.held.retain(|_, held| held.tokens > 0 && held.until > now);
            if let Some((_, limiter)) = shared.fallback.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).as_ref()
            {
                limiter.retain_recent();
            }
        }
    }

    pub fn len(&self) -> usize {
        self.limiter.len() + self.shared.as_ref().map_or(0, |s| s.held.len())
    }

    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_caller_over_its_burst_is_told_when_to_retry_and_others_are_not_affected() {
        let buckets = CallerBuckets::new(Rate { per_second: 1.0, burst: 2 }).expect("limited");
        assert_eq!(buckets.check("a").await, Ok(Granted::Local));
        assert!(buckets.check("a").await.is_ok());
        let wait = buckets.check("a").await.expect_err("over the burst");
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
        assert!(buckets.check("b").await.is_ok());
        assert_eq!(buckets.len(), 2);
    }

    #[tokio::test]
    async fn idle_callers_are_forgotten() {
        let buckets = CallerBuckets::new(Rate { per_second: 1000.0, burst: 1 }).expect("limited");
        for n in 0..100 {
            assert!(buckets.check(&format!("caller-{n}")).await.is_ok());
        }
        assert_eq!(buckets.len(), 100);
        std::thread::sleep(Duration::from_millis(20));
        buckets.housekeeping();
        assert!(buckets.is_empty(), "full buckets hold no state");
    }

    #[test]
    fn zero_means_unlimited() {
        assert!(CallerBuckets::new(Rate { per_second: 0.0, burst: 1 }).is_none());
    }

    /// A shared bucket of `left` tokens in all, or an unreachable one, shared by 3 replicas.
    struct Counted {
        left: std::sync::Mutex<u32>,
        asked: std::sync::atomic::AtomicU32,
        down: bool,
    }

    #[async_trait::async_trait]
    impl CallerTokens for Counted {
        async fn take(&self, _caller: &str, want: u32) -> Result<Taken, crate::gateway::StoreError> {
            self.asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if self.down {
                return Err(crate::gateway::StoreError::Unavailable(Arc::new(std::io::Error::other("down"))));
            }
            let mut left = self.left.lock().expect("lock");
            let taken = want.min(*left);
            *left -= taken;
            Ok(if taken == 0 { Taken::Wait(Duration::from_millis(100)) } else { Taken::Tokens(taken) })
        }

        fn replicas(&self) -> usize {
            3
        }
    }

    fn counted(left: u32, down: bool) -> Arc<Counted> {
        Arc::new(Counted { left: std::sync::Mutex::new(left), asked: Default::default(), down })
    }

    #[tokio::test]
    async fn shared_tokens_are_taken_in_batches_spent_locally_and_never_more_than_the_shared_bucket_gives() {
        // 100/s: batches of 10 (100 ms of the rate); the shared bucket has 25 in all.
        let shared = counted(25, false);
        let rate = Rate { per_second: 100.0, burst: 100 };
        let buckets = CallerBuckets::shared(rate, Some(shared.clone() as Arc<dyn CallerTokens>)).expect("limited");
        let mut granted = 0;
        for _ in 0..40 {
            if buckets.check("a").await.is_ok() {
                granted += 1;
            }
        }
        assert_eq!(granted, 25, "exactly what the shared bucket gave");
        let asked = shared.asked.load(std::sync::atomic::Ordering::Relaxed);
        assert!(asked <= 3 + 15, "a round trip per batch while tokens last, then per refusal: {asked}");
        assert_eq!(buckets.check("a").await, Err(Duration::from_millis(100)), "told when the next is due");
    }

    #[tokio::test]
    async fn an_unreachable_shared_bucket_falls_back_to_this_replicas_share() {
        // 3 per second, burst 6, over 3 replicas: this replica's share is 1 per second, burst 2.
        let rate = Rate { per_second: 3.0, burst: 6 };
        let buckets = CallerBuckets::shared(rate, Some(counted(0, true) as Arc<dyn CallerTokens>)).expect("limited");
        assert_eq!(buckets.check("a").await, Ok(Granted::Fallback));
        assert_eq!(buckets.check("a").await, Ok(Granted::Fallback));
        let wait = buckets.check("a").await.expect_err("the share's burst is spent");
        assert!(wait > Duration::from_millis(500), "at a third of the rate: {wait:?}");
    }
}
