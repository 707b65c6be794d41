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

use super::coordination::{AggregationStore, Limits};
use super::ids::IdMinter;
use super::scheduler::FarmDispatcher;
use crate::telemetry::Metrics;
use crate::telemetry::metrics::OutcomeLabels;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
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
    pub limits: Limits,
    pub config: RefreshConfig,
    pub every: Duration,
    /// Set once the gateway drains or stops: no refresh is queued after it.
    pub stop: CancellationToken,
}

impl Refresher {
    /// Queues the due refreshes every tick until stopped.
    pub async fn run(self) {
        if !self.config.enabled() {
            return;
        }
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.stop.cancelled() => return,
            }
            self.once().await;
        }
    }

    /// Queues the refreshes due now.
    pub async fn once(&self) {
        let due_by = SystemTime::now() + self.config.ahead;
        let ids = self.ids.clone();
        let mint = move || ids.mint();
        match self.store.start_refreshes(due_by, self.config.min_hits, &self.limits, &mint).await {
            Ok(queued) => {
                for refresh in queued {
                    tracing::info!(aggregation = %refresh.id, farm = %refresh.farm_id(), "refreshing a popular result before it expires");
                    self.metrics.refreshes.get_or_create(&OutcomeLabels { outcome: "queued" }).inc();
                    self.dispatcher.kick(refresh.farm_id());
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot look for results to refresh"),
        }
    }
}
