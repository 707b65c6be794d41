//! Pacing of the gateway's own upstream traffic: a [`Pacer`] waits (never refuses) for tokens
//! from a [`RateSource`]: a bucket of this process ([`LocalRate`]) or one shared by every
//! replica ([`super::redis::RedisRate`], a GCRA updated atomically in Redis), since the
//! upstream's quota is per account, not per pod.

use super::StoreError;
use crate::gateway::rate::Rate;
use crate::upstream::RouteName;
use crate::upstream::routes::DEFAULT_ROUTE;
use governor::DefaultDirectRateLimiter;
use governor::clock::{Clock, DefaultClock};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Where a pacer's tokens come from.
#[async_trait::async_trait]
pub trait RateSource: Send + Sync + 'static {
    /// Takes a token now (`None`), or says how long until the next one is due.
    async fn try_take(&self) -> Result<Option<Duration>, StoreError>;
}

/// Where the upstream pacing's buckets are: in this process, or shared by every replica.
pub trait UpstreamRates: Send + Sync + 'static {
    /// The bucket called `name`, at `rate`; `None` when `rate` does not pace.
    fn source(&self, name: &str, rate: Rate) -> Option<Arc<dyn RateSource>>;
}

/// Buckets of this process.
pub struct LocalRates;

impl UpstreamRates for LocalRates {
    fn source(&self, _name: &str, rate: Rate) -> Option<Arc<dyn RateSource>> {
        LocalRate::new(rate).map(|r| Arc::new(r) as Arc<dyn RateSource>)
    }
}

/// The upstream Start and Get pacers of each route: the upstream's quotas are per account and
/// region, so a route throttled (or busy) never slows another's calls. The default route's
/// buckets keep the names they had before routes (`upstream-start`, `upstream-get`).
pub struct RoutePacers {
    rates: Arc<dyn UpstreamRates>,
    start: Rate,
    get: Rate,
    by_route: Mutex<HashMap<RouteName, StartAndGet>>,
}

/// A route's Start pacer and Get pacer.
type StartAndGet = (Arc<Pacer>, Arc<Pacer>);

impl RoutePacers {
    pub fn new(rates: Arc<dyn UpstreamRates>, start: Rate, get: Rate) -> Self {
        Self { rates, start, get, by_route: Mutex::new(HashMap::new()) }
    }

    /// What `route`'s upstream Starts wait on.
    pub fn start(&self, route: &RouteName) -> Arc<Pacer> {
        self.pair(route).0
    }

    /// What `route`'s upstream Gets wait on.
    pub fn get(&self, route: &RouteName) -> Arc<Pacer> {
        self.pair(route).1
    }

    fn pair(&self, route: &RouteName) -> StartAndGet {
        let mut by_route = self.by_route.lock().unwrap_or_else(|p| p.into_inner());
        let (start, get) = by_route.entry(route.clone()).or_insert_with(|| {
            let pacer = |operation: &str, rate: Rate| {
                let name = if &**route == DEFAULT_ROUTE {
                    format!("upstream-{operation}")
                } else {
                    format!("upstream-{operation}:{route}")
                };
                Arc::new(Pacer::with_source(self.rates.source(&name, rate), rate))
            };
            (pacer("start", self.start), pacer("get", self.get))
        });
        (start.clone(), get.clone())
    }
}

/// How many of a caller's tokens a replica took from a bucket shared by every replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// This many (at least one).
    Tokens(u32),
    /// None: the next is due after this long.
    Wait(Duration),
}

/// Callers' token buckets shared by every replica, for one operation: a caller's limit holds
/// across replicas. Replicas take tokens in batches, so most requests cost no round trip.
#[async_trait::async_trait]
pub trait CallerTokens: Send + Sync + 'static {
    /// Takes up to `want` of `caller`'s tokens that are due now.
    async fn take(&self, caller: &str, want: u32) -> Result<Taken, StoreError>;

    /// How many replicas share the buckets, as last counted (at least 1): while the store
    /// cannot be reached, each replica lets a caller through at its share of the rate.
    fn replicas(&self) -> usize {
        1
    }
}

/// A token bucket of this process.
pub struct LocalRate {
    limiter: DefaultDirectRateLimiter,
    clock: DefaultClock,
}

impl LocalRate {
    /// `None` when `rate` is zero: nothing to pace.
    pub fn new(rate: Rate) -> Option<Self> {
        Some(Self { limiter: DefaultDirectRateLimiter::direct(rate.quota()?), clock: DefaultClock::default() })
    }
}

#[async_trait::async_trait]
impl RateSource for LocalRate {
    async fn try_take(&self) -> Result<Option<Duration>, StoreError> {
        Ok(self.try_take_now())
    }
}

/// What the gateway's own upstream calls wait on, served in arrival order.
///
/// Each farm's worker has at most one call waiting at a time, so first-come-first-served is
/// round-robin across farms: a farm with a long backlog gets one turn per round like any other.
pub struct Pacer {
    source: Option<Arc<dyn RateSource>>,
    /// Where tokens come from while a shared source cannot be reached.
    fallback: Option<LocalRate>,
    /// The line: tokio's mutex hands itself to waiters in the order they asked.
    line: tokio::sync::Mutex<()>,
}

impl Pacer {
    /// Paces at `rate` in this process; a zero rate does not pace.
    pub fn new(rate: Rate) -> Self {
        let source = LocalRate::new(rate).map(|r| Arc::new(r) as Arc<dyn RateSource>);
        Self { source, fallback: None, line: tokio::sync::Mutex::new(()) }
    }

    /// Paces on `source`, or at `rate` in this process while `source` cannot be reached;
    /// `None` does not pace.
    pub fn with_source(source: Option<Arc<dyn RateSource>>, rate: Rate) -> Self {
        Self { fallback: source.as_ref().and_then(|_| LocalRate::new(rate)), source, line: tokio::sync::Mutex::new(()) }
    }

    /// Waits for a token, behind every caller of this process that asked before. While a
    /// shared source cannot be reached (or Redis is full) it paces at the same rate in this
    /// process instead: the upstream's own throttling guards the rest, and no call waits on
    /// the store for ever.
    pub async fn ready(&self) {
        let Some(source) = &self.source else { return };
        let _turn = self.line.lock().await;
        loop {
            let wait = match source.try_take().await {
                Ok(None) => return,
                Ok(Some(wait)) => wait,
                Err(e) => {
                    tracing::warn!(error = %e, "the shared upstream pacing cannot be reached; pacing in this replica");
                    match self.fallback.as_ref().map(LocalRate::try_take_now) {
                        Some(Some(wait)) => wait,
                        Some(None) | None => return,
                    }
                }
            };
            tokio::time::sleep(wait).await;
        }
    }
}

impl LocalRate {
    /// Takes a token now (`None`), or says how long until the next one is due.
    fn try_take_now(&self) -> Option<Duration> {
        self.limiter.check().err().map(|not_until| not_until.wait_time_from(self.clock.now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_upstream_pacer_waits_instead_of_refusing() {
        let pacer = Pacer::new(Rate { per_second: 20.0, burst: 1 });
        let begin = std::time::Instant::now();
        for _ in 0..5 {
            pacer.ready().await;
        }
        assert!(begin.elapsed() >= Duration::from_millis(190), "five calls at 20/s need four gaps of 50 ms");
    }

    #[tokio::test]
    async fn the_upstream_pacer_serves_waiters_in_arrival_order() {
        let pacer = std::sync::Arc::new(Pacer::new(Rate { per_second: 50.0, burst: 1 }));
        pacer.ready().await;
        let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for farm in 0..8 {
            let (pacer, order) = (pacer.clone(), order.clone());
            waiters.push(tokio::spawn(async move {
                pacer.ready().await;
                order.lock().expect("lock").push(farm);
            }));
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for w in waiters {
            w.await.expect("waiter");
        }
        assert_eq!(*order.lock().expect("lock"), (0..8).collect::<Vec<_>>(), "first come, first served");
    }
}

#[cfg(test)]
mod routes {
    use super::*;

    /// Records the names of the buckets asked for.
    #[derive(Default)]
    struct Named(Mutex<Vec<String>>);

    impl UpstreamRates for Named {
        fn source(&self, name: &str, rate: Rate) -> Option<Arc<dyn RateSource>> {
            self.0.lock().expect("lock").push(name.to_owned());
            LocalRates.source(name, rate)
        }
    }

    #[tokio::test]
    async fn each_route_waits_on_buckets_of_its_own() {
        let named = Arc::new(Named::default());
        let slow = Rate { per_second: 0.01, burst: 1 };
        let pacers = RoutePacers::new(named.clone(), slow, slow);
        let (paris, default): (RouteName, RouteName) = ("paris".into(), DEFAULT_ROUTE.into());
        pacers.start(&paris).ready().await;
        assert!(Arc::ptr_eq(&pacers.start(&paris), &pacers.start(&paris)), "one pacer a route");
        // Paris's bucket is empty for 100 s; the default route's is full.
        tokio::time::timeout(Duration::from_secs(5), pacers.start(&default).ready())
            .await
            .expect("another route's token is not taken by paris");
        tokio::time::timeout(Duration::from_millis(50), pacers.start(&paris).ready())
            .await
            .expect_err("paris waits for its own next token");
        let names = named.0.lock().expect("lock").clone();
        assert_eq!(names, ["upstream-start:paris", "upstream-get:paris", "upstream-start", "upstream-get"]);
    }
}

#[cfg(test)]
mod fallback {
    use super::*;

    /// A shared source that cannot be reached.
    struct Down;

    #[async_trait::async_trait]
    impl RateSource for Down {
        async fn try_take(&self) -> Result<Option<Duration>, StoreError> {
            Err(StoreError::Unavailable(Arc::new(std::io::Error::other("down"))))
        }
    }

    #[tokio::test]
    async fn while_the_shared_source_is_down_tokens_come_from_this_process_at_the_same_rate() {
        let pacer = Pacer::with_source(Some(Arc::new(Down)), Rate { per_second: 10.0, burst: 1 });
        let begin = std::time::Instant::now();
        for _ in 0..3 {
            pacer.ready().await;
        }
        assert!(begin.elapsed() >= Duration::from_millis(190), "paced at 10/s in this replica");
    }
}
