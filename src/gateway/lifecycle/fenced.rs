//! The aggregation a holder drives, and its writes: each is the next state of its record,
//! fenced by the farm's lease, so the moment a newer holder exists this one stops.
//!
//! A write the store cannot take (it timed out, the connection dropped, memory is full) is
//! tried again while the lease lasts by this replica's clock: a store fault never ends an
//! aggregation. Once the lease runs out the holder stops, and whichever replica holds the farm
//! next resumes the aggregation from its record.

use crate::gateway::activity::{self, Activity};
use crate::gateway::backoff::BackoffPolicy;
use crate::gateway::coordination::{AggregationStore, Found, Head, Lease, StoreError, Written};
use crate::gateway::record::{AggregationRecord, Offer, Rows};
use std::future::Future;
use std::time::Duration;

/// Delays between attempts at a write the store could not take.
const WRITE_RETRY: BackoffPolicy =
    BackoffPolicy { initial: Duration::from_millis(100), max: Duration::from_secs(2), multiplier: 2.0 };

/// The shortest delay between attempts at a write, however little of the lease is left.
const MIN_RETRY_DELAY: Duration = Duration::from_millis(10);

/// How long a holder that lost its lease with a Start answered keeps trying to leave the
/// upstream aggregation for the next holder.
const OFFER_PATIENCE: Duration = Duration::from_secs(60);

/// Why a holder stops driving an aggregation before it is terminal.
#[derive(Debug, thiserror::Error)]
pub(super) enum Stop {
    #[error("a newer holder of the farm's lease exists")]
    Fenced,
    #[error("the farm's lease ran out while the store could not be written: {0}")]
    LeaseRanOut(StoreError),
    #[error("the farm's lease ran out by this replica's clock")]
    LeaseExpired,
    #[error("the store cannot take the write: {0}")]
    Store(StoreError),
}

/// The aggregation being driven: its record as last written, and the lease its writes carry.
pub(super) struct Driven<'a> {
    pub(super) store: &'a dyn AggregationStore,
    /// Where each landed write's news is told (the operator console's timeline).
    pub(super) activity: &'a Activity,
    pub(super) lease: Lease,
    pub(super) record: AggregationRecord,
}

impl Driven<'_> {
    /// Changes the record and writes it, fenced.
    pub(super) async fn set(&mut self, change: impl FnOnce(&mut AggregationRecord)) -> Result<(), Stop> {
        let before = self.record.clone();
        change(&mut self.record);
        let (store, lease, record) = (self.store, &self.lease, &self.record);
        persist(lease, || store.update(lease, record.clone())).await?;
        self.told(&before);
        Ok(())
    }

    /// Tells what the landed write of the record over `before` changed.
    fn told(&self, before: &AggregationRecord) {
        for what in activity::transition(before, &self.record) {
            self.activity.record(&self.record, what);
        }
    }

    /// Writes the record, terminal now, with its rows, fenced.
    pub(super) async fn finish(&mut self, rows: Option<Rows>) -> Result<(), Stop> {
        let (store, lease, record) = (self.store, &self.lease, &self.record);
        let landed = match persist(lease, || store.finish(lease, record.clone(), rows.clone())).await {
            Ok(()) => Ok(()),
            // An attempt the store took without answering, then fenced by its own effect: the
            // record is terminal already, and off its farm's queue (read from the store, not a
            // cache: after a failover a connection may still reach the primary left behind,
            // whose queue has it; carrying on would drive it again at once).
            Err(Stop::Fenced) if self.finished_already().await => Ok(()),
            Err(stop) => Err(stop),
        };
        if landed.is_ok() {
            self.activity.record(&self.record, activity::ended(&self.record));
        }
        landed
    }

    /// Whether the record is terminal in the store and no longer the head of its farm's queue.
    async fn finished_already(&self) -> bool {
        let id = &self.record.id;
        let terminal = matches!(self.store.read(id).await, Ok(found) if !is_active(&found));
        let off_queue = match self.store.head(self.record.farm_id()).await {
            Ok(Head::Ready(head)) => head.id != *id,
            Ok(Head::Broken { id: head, .. }) => head != **id,
            Ok(Head::Empty) => true,
            Err(_) => false,
        };
        terminal && off_queue
    }

    /// `work`, unless the lease is lost first: for what may stop at any point (a wait, a poll),
    /// never an upstream Start, whose answer must be recorded or offered.
    pub(super) async fn unless_lost<T>(&self, work: impl Future<Output = T>) -> Result<T, Stop> {
        tokio::select! {
            done = work => Ok(done),
            () = self.lease.lost() => Err(Stop::LeaseExpired),
        }
    }

    /// Before an act that only the farm's one holder may take (an upstream Start): the lease
    /// is still valid by this replica's clock, and still the farm's newest in the store.
    pub(super) async fn confirm(&self) -> Result<(), Stop> {
        let lease = &self.lease;
        if !lease.is_valid() {
            return Err(Stop::LeaseExpired);
        }
        let current = persist(lease, || async {
            let current = self.store.leases().is_current(lease).await?;
            Ok(if current { Written::Done } else { Written::Fenced })
        });
        current.await?;
        if lease.is_valid() { Ok(()) } else { Err(Stop::LeaseExpired) }
    }
}

impl Driven<'_> {
    /// The one write after the lease is lost: the upstream aggregation a Start created,
    /// which the record could not take under the lease, left with the aggregation (unfenced)
    /// for the farm's next holder to adopt ([`Offer`]). Tried while the store cannot take it,
    /// for a while. Whether it was left.
    pub(super) async fn offer(&self, offer: Offer) -> bool {
        let deadline = tokio::time::Instant::now() + OFFER_PATIENCE;
        let mut backoff = WRITE_RETRY.start();
        loop {
            match self.store.offer(&self.record.id, &offer).await {
                Ok(()) => return true,
                Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(e) => {
                    tracing::error!(aggregation = %self.record.id, upstream = %offer.upstream_id, error = %e, "cannot leave the upstream aggregation this holder started for the next one; it will start the aggregation again");
                    return false;
                }
            }
        }
    }

    /// An upstream aggregation a holder that lost its lease left for the Start of `part`
    /// (`None`: the whole) that this holder is about to send. A store that cannot say is
    /// taken as none: the Start goes on, under a confirmed lease.
    pub(super) async fn adoptable(&self, part: Option<usize>) -> Option<Offer> {
        match self.store.offered(&self.record.id).await {
            Ok(offer) => offer.filter(|o| o.fits(&self.record, part)),
            Err(e) => {
                tracing::debug!(aggregation = %self.record.id, error = %e, "cannot read offers; none taken");
                None
            }
        }
    }
}

/// Takes a broken id off `lease`'s farm's queue, fenced, retried as a write is.
pub(super) async fn discard(store: &dyn AggregationStore, lease: &Lease, id: &str) -> Result<(), Stop> {
    persist(lease, || store.discard(lease, id)).await
}

fn is_active(found: &Found) -> bool {
    matches!(found, Found::Active { .. })
}

/// Makes `attempt` until the store takes it, or the lease runs out.
async fn persist<F, Fut>(lease: &Lease, mut attempt: F) -> Result<(), Stop>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Written, StoreError>>,
{
    let mut backoff = WRITE_RETRY.start();
    loop {
        match attempt().await {
            Ok(Written::Done) => return Ok(()),
            Ok(Written::Fenced) => return Err(Stop::Fenced),
            Err(e) if e.is_transient() => {
                // While renewals keep the lease, it lasts: the backoff never outruns it (a
                // delay longer than what is left would give up a lease that is renewed).
                let left = lease.remaining();
                if left.is_zero() {
                    return Err(Stop::LeaseRanOut(e));
                }
                let delay = backoff.next_delay().min(left / 2).max(MIN_RETRY_DELAY);
                tracing::warn!(farm = %lease.farm, error = %e, ?delay, "the store cannot take a write; trying again while the lease lasts");
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(Stop::Store(e)),
        }
    }
}
