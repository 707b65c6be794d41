//! What the gateway holds, read for the operator console: farms with work, a farm's queue with
//! each aggregation's predicted times and callers, an aggregation with its timeline and first
//! rows. Read-only, bounded by what is asked (a page of farms, a page of a queue), and apart
//! from the request path: nothing here takes a caller's token or wakes a worker.

use super::activity::{Event, Replica, What};
use super::coordination::{FarmLoad, Found, StoreError, StoreStats};
use super::estimate::{self, Estimate};
use super::record::{AggregationRecord, Rows};
use super::{Gateway, Topology};
use futures::StreamExt as _;
use std::sync::Arc;

/// The most farms, queue entries or recent aggregations one view holds.
pub const MAX_PAGE: usize = 500;
/// Store reads a view makes at once (a shared store's connection pipelines them).
const CONCURRENT_READS: usize = 64;
/// Rows shown of a completed result.
pub const PREVIEW_ROWS: usize = 20;

/// How a page of farms is ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FarmOrder {
    /// By farm id.
    #[default]
    Farm,
    /// The longest queue first.
    Queued,
}

/// One farm with work.
#[derive(Debug, Clone)]
pub struct FarmSummary {
    pub farm: String,
    pub load: FarmLoad,
    /// The head of its queue (running, or next to run), if the store could say.
    pub head: Option<Arc<AggregationRecord>>,
    /// The aggregation waiting longest behind the head.
    pub oldest_waiting: Option<Arc<AggregationRecord>>,
    /// The replica holding the farm's lease (driving its head).
    pub holder: Option<String>,
    /// The route that serves it (`None`: no route does now).
    pub route: Option<String>,
}

/// A page of farms with work.
#[derive(Debug, Clone)]
pub struct FarmPage {
    /// Farms with work in all (as the last housekeeping counted).
    pub total: usize,
    pub farms: Vec<FarmSummary>,
}

/// One aggregation of a farm's queue.
#[derive(Debug, Clone)]
pub struct Queued {
    /// 0 for the head.
    pub position: usize,
    pub record: Arc<AggregationRecord>,
    pub estimate: Estimate,
    /// The callers that started and joined it, first first (as far as the timeline kept).
    pub callers: Vec<String>,
}

/// A farm's queue and what it finished lately.
#[derive(Debug, Clone)]
pub struct FarmView {
    pub farm: String,
    /// How many wait in all (the head included), as the store holds them now.
    pub length: usize,
    /// The replica holding the farm's lease (driving its head).
    pub holder: Option<String>,
    /// The route that serves it (`None`: no route does now).
    pub route: Option<String>,
    pub queue: Vec<Queued>,
    /// Its last terminal aggregations, newest first.
    pub recent: Vec<Event>,
}

/// An aggregation as the console shows it.
#[derive(Debug, Clone)]
pub struct AggregationView {
    pub record: Arc<AggregationRecord>,
    /// While QUEUED: how many run before it.
    pub queue_position: Option<u32>,
    pub estimate: Estimate,
    pub timeline: Vec<Event>,
    /// COMPLETED and held: its rows, of which the first [`PREVIEW_ROWS`] are shown.
    pub rows: Option<Rows>,
    /// Why the record's rows are not shown (expired, evicted, lost, too large).
    pub note: Option<&'static str>,
}

/// The callers named by a timeline's Queued and Joined events.
pub fn callers(timeline: &[Event]) -> Vec<String> {
    timeline
        .iter()
        .filter_map(|e| match &e.what {
            What::Queued { caller, .. } => caller.clone().or_else(|| Some("refresh-ahead".into())),
            What::Joined { caller, .. } | What::Derived { caller, .. } => Some(caller.clone()),
            _ => None,
        })
        .collect()
}

impl Gateway {
    /// The time of day, by the clock every replica on the store reads.
    pub fn now(&self) -> std::time::SystemTime {
        self.clock.now()
    }

    /// What the store held at its last housekeeping.
    pub fn store_stats(&self) -> StoreStats {
        self.store.stats()
    }

    /// Whether replicas share the store.
    pub fn shared(&self) -> bool {
        self.store.topology() == Topology::Shared
    }

    /// The replicas heard from lately (with a store of this process alone, this one).
    pub async fn replicas(&self) -> Result<Vec<Replica>, StoreError> {
        self.activity.log().replicas(super::activity::millis(self.clock.now())).await
    }

    /// Events the console's history dropped (the writer fell behind) or could not write.
    pub fn activity_losses(&self) -> (u64, u64) {
        self.activity.losses()
    }

    /// The gateway-wide bounds: the farm queue capacity, active aggregations and farms.
    pub fn bounds(&self) -> (usize, usize, usize) {
        (self.limits.queue_capacity, self.limits.max_live, self.limits.max_farms)
    }

    /// The results cache's budget in bytes.
    pub fn cache_budget(&self) -> u64 {
        self.results.max_bytes()
    }

    /// A page of the farms with work (as the last housekeeping counted them): `limit` from
    /// `offset` in `order`, each with its head and the aggregation waiting longest.
    pub async fn farms_page(&self, order: FarmOrder, offset: usize, limit: usize) -> FarmPage {
        let mut farms: Vec<(String, FarmLoad)> = self.store.stats().farms.into_iter().collect();
        match order {
            FarmOrder::Farm => farms.sort_by(|a, b| a.0.cmp(&b.0)),
            FarmOrder::Queued => farms.sort_by(|a, b| {
                (b.1.queued + b.1.running).cmp(&(a.1.queued + a.1.running)).then_with(|| a.0.cmp(&b.0))
            }),
        }
        let total = farms.len();
        let page: Vec<(String, FarmLoad)> = farms.into_iter().skip(offset).take(limit.min(MAX_PAGE)).collect();
        let store = self.store.as_ref();
        let farms = futures::stream::iter(page)
            .map(|(farm, load)| async move {
                let (queue, holder) = tokio::join!(store.queue(&farm, 2), store.leases().holder(&farm));
                let mut queue = queue.unwrap_or_default().into_iter();
                let head = queue.next();
                let route = self.route_of(&farm);
                FarmSummary { farm, load, head, oldest_waiting: queue.next(), holder: holder.ok().flatten(), route }
            })
            .buffered(CONCURRENT_READS)
            .collect()
            .await;
        FarmPage { total, farms }
    }

    /// The heads of the farms that run one (as the last housekeeping counted them).
    pub async fn running_heads(&self) -> Vec<Arc<AggregationRecord>> {
        let running: Vec<String> =
            self.store.stats().farms.into_iter().filter(|(_, load)| load.running > 0).map(|(farm, _)| farm).collect();
        let store = self.store.as_ref();
        futures::stream::iter(running)
            .map(|farm| async move { store.queue(&farm, 1).await.ok().and_then(|q| q.into_iter().next()) })
            .buffer_unordered(CONCURRENT_READS)
            .filter_map(|head| async move { head })
            .collect()
            .await
    }

    /// `farm`'s queue, `limit` entries from `offset`, with predicted times and callers, and its
    /// last `recent` terminal aggregations.
    pub async fn farm_view(
        &self,
        farm: &str,
        offset: usize,
        limit: usize,
        recent: usize,
    ) -> Result<FarmView, StoreError> {
        let through = offset.saturating_add(limit.min(MAX_PAGE));
        let (queue, model, holder) = tokio::try_join!(
            self.store.queue(farm, through),
            self.store.run_model(farm),
            self.store.leases().holder(farm)
        )?;
        let now = self.clock.now();
        let log = self.activity.log();
        let page: Vec<(usize, Arc<AggregationRecord>)> = queue.iter().cloned().enumerate().skip(offset).collect();
        let queue_ref = &queue;
        let entries = futures::stream::iter(page)
            .map(|(position, record)| async move {
                let estimate = estimate::estimate(&record, &queue_ref[..=position], model, now, self.start_gap);
                let callers = log.timeline(&record.id).await.map(|t| callers(&t)).unwrap_or_default();
                Queued { position, record, estimate, callers }
            })
            .buffered(CONCURRENT_READS)
            .collect()
            .await;
        let recent = log.recent(farm, recent.min(MAX_PAGE)).await.unwrap_or_default();
        let length = self.store.stats().farms.get(farm).map_or(queue.len(), |l| l.queued + l.running).max(queue.len());
        let route = self.route_of(farm);
        Ok(FarmView { farm: farm.to_owned(), length, holder, route, queue: entries, recent })
    }

    /// The route that serves `farm` now, by its name.
    pub fn route_of(&self, farm: &str) -> Option<String> {
        self.runner.upstream.route(farm).ok().map(|r| r.to_string())
    }

    /// The timeline of `id`, kept for a while after its record is gone.
    pub async fn timeline(&self, id: &str) -> Result<Vec<Event>, StoreError> {
        self.activity.log().timeline(id).await
    }

    /// Aggregation `id` with its timeline, predicted times and rows; `None` when the store no
    /// longer holds (or never held) its record.
    pub async fn aggregation_view(&self, id: &str) -> Result<Option<AggregationView>, StoreError> {
        let cached = self.results.get(id);
        let (timeline, found) = match &cached {
            Some(_) => (self.activity.log().timeline(id).await, Ok(Found::Unknown)),
            None => tokio::join!(self.activity.log().timeline(id), self.store.read(id)),
        };
        let timeline = timeline.unwrap_or_default();
        let view = |record, note| AggregationView {
            record,
            queue_position: None,
            estimate: Estimate::default(),
            timeline: timeline.clone(),
            rows: None,
            note,
        };
        if let Some(result) = cached {
            return Ok(Some(AggregationView { rows: result.rows.clone(), ..view(result.record.clone(), None) }));
        }
        Ok(match found? {
            Found::Active { record, queue_position } => {
                let estimate = self.estimate_of(&record, queue_position).await;
                let position = (record.state == super::State::Queued).then_some(queue_position);
                Some(AggregationView { queue_position: position, estimate, ..view(record, None) })
            }
            Found::Terminal(result) => {
                Some(AggregationView { rows: result.rows.clone(), ..view(result.record.clone(), None) })
            }
            Found::RowsLost(record) => {
                Some(view(record, Some("the shared store lost its rows; a Get fetches them again")))
            }
            Found::Large(record) => Some(view(record, Some("too large for this replica's cache: read it with Get"))),
            Found::Expired(_) | Found::Evicted | Found::Unknown => None,
        })
    }
}
