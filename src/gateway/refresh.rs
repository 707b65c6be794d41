//! Refresh-ahead: a result that callers keep asking for is re-run in the background before it
//! expires, so the next Start after its expiry is answered at once (like HTTP's
//! `stale-while-revalidate`).
//!
//! The store counts the Starts each aggregation answers. Every tick, each replica asks the
//! store to queue a refresh of every COMPLETED result that expires within [`RefreshConfig::ahead`]
//! and answered at least [`RefreshConfig::min_hits`] Starts; the store claims each due result
//! once across replicas, only on a farm without callers' work waiting, and within the
//! gateway-wide bounds. A refresh is an ordinary aggregation of the same key run by the farm's
//! worker behind callers' aggregations; the old result keeps answering Starts until it
//! completes, then the key answers the new one. Ids already handed out keep working until
//! their own expiry.

use super::clock::Clock;
use super::coordination::{AggregationStore, Limits};
use super::ids::IdMinter;
use super::scheduler::FarmDispatcher;
use crate::telemetry::Metrics;
use crate::telemetry::metrics::OutcomeLabels;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// When results are refreshed ahead of their expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefreshConfig {
    /// A popular result is refreshed when less than this much validity is left; zero turns
    /// refresh-ahead off.
    pub ahead: Duration,
    /// Starts a result must have answered (the one that started it included) to be popular.
    pub min_hits: u32,
}

impl RefreshConfig {
    pub fn enabled(&self) -> bool {
        !self.ahead.is_zero()
    }
}

/// What the refresher works with.
pub(crate) struct Refresher {
    pub store: Arc<dyn AggregationStore>,
    pub ids: Arc<IdMinter>,
    pub dispatcher: FarmDispatcher,
    pub metrics: Arc<Metrics>,
    pub activity: Arc<super::activity::Activity>,
    pub limits: Limits,
    pub config: RefreshConfig,
    pub every: Duration,
    pub clock: Clock,
    /// Set once the gateway drains or stops: no refresh is queued after it.
    pub stop: CancellationToken,
}

impl Refresher {
    /// Queues the due refreshes every tick until stopped.
    pub(crate) async fn run(self) {
        if !self.config.enabled() {
            return;
        }
        let mut every = crate::every::Every::new(self.every, self.stop.clone());
        while every.tick().await {
            self.once().await;
        }
    }

    /// Queues the refreshes due now.
    pub(crate) async fn once(&self) {
        let due_by = self.clock.now() + self.config.ahead;
        let ids = self.ids.clone();
        let mint = move |farm: &str| ids.mint(farm);
        match self.store.start_refreshes(due_by, self.config.min_hits, &self.limits, &mint).await {
            Ok(queued) => {
                for refresh in queued {
                    tracing::info!(aggregation = %refresh.id, farm = %refresh.farm_id(), "refreshing a popular result before it expires");
                    self.metrics.refreshes.get_or_create(&OutcomeLabels { outcome: "queued" }).inc();
                    self.dispatcher.kick(refresh.farm_id());
                    let queued = super::activity::What::Queued { caller: None, trace_id: None };
                    self.activity.record(&refresh, queued);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot look for results to refresh"),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::domain::{AggregationRequest, AggregationStatus, StatisticsRow};
    use crate::gateway::clock::Clock;
    use crate::gateway::rate::Rate;
    use crate::gateway::{Disposition, Gateway, GatewayConfig};
    use crate::upstream::{Upstream, UpstreamError, UpstreamPage};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    /// An upstream whose aggregations complete at once with one row.
    #[derive(Default)]
    struct AtOnce {
        starts: AtomicU32,
    }

    #[async_trait::async_trait]
    impl Upstream for AtOnce {
        async fn start(&self, _: &AggregationRequest) -> Result<String, UpstreamError> {
            Ok(format!("up-{}", self.starts.fetch_add(1, Ordering::Relaxed)))
        }

        async fn get_page(&self, _: &str, _: &str, _: u32, _: Option<&str>) -> Result<UpstreamPage, UpstreamError> {
            let rows = vec![StatisticsRow::default()];
            Ok(UpstreamPage { status: AggregationStatus::Completed, status_message: None, rows, next_token: None })
        }
    }

    /// An hour of a result's life on paused time: the core's clock is tokio's, so its expiry,
    /// the refresh's due date and the farm's lease all move with `sleep`, at no real cost.
    #[tokio::test(start_paused = true)]
    async fn a_popular_result_is_refreshed_before_it_expires_and_its_key_then_answers_the_new_one() {
        let config = GatewayConfig {
            clock: Clock::tokio(),
            caller_start: Rate { per_second: 0.0, burst: 1 },
            upstream_start: Rate { per_second: 0.0, burst: 1 },
            upstream_get: Rate { per_second: 0.0, burst: 1 },
            ..GatewayConfig::default()
        };
        let upstream = Arc::new(AtOnce::default());
        let metrics = Arc::new(crate::telemetry::Metrics::new());
        let gateway = Gateway::new(config, upstream.clone(), metrics, crate::grpc::convert::ROW_CODEC);
        let request = crate::gateway::key::test_key(1, 1).request().clone();
        let first = gateway.start("caller", &request, Default::default()).await.expect("started");
        assert_eq!(first.disposition, Disposition::Started);
        tokio::time::sleep(Duration::from_secs(5)).await;
        for other in ["caller-b", "caller-c"] {
            let again = gateway.start(other, &request, Default::default()).await.expect("answered");
            assert_eq!((again.disposition, &again.record.id), (Disposition::Cached, &first.record.id));
        }
        // Valid for 59:30; due for a refresh 10 minutes before.
        tokio::time::sleep(Duration::from_secs(48 * 60)).await;
        assert_eq!(upstream.starts.load(Ordering::Relaxed), 1, "not due yet");
        tokio::time::sleep(Duration::from_secs(3 * 60)).await;
        assert_eq!(upstream.starts.load(Ordering::Relaxed), 2, "refreshed once, before the expiry");
        let renewed = gateway.start("caller", &request, Default::default()).await.expect("answered");
        assert_eq!(renewed.disposition, Disposition::Cached, "no wait");
        assert_ne!(renewed.record.id, first.record.id, "the key answers the refresh");
        tokio::time::sleep(Duration::from_secs(10 * 60)).await;
        let expired = gateway.get("caller", &first.record.id, 0, "", Duration::ZERO, &|_| Ok(())).await;
        assert!(matches!(expired, Err(crate::gateway::GatewayError::Expired { .. })), "{expired:?}");
    }
}
