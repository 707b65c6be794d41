//! The aggregation a holder drives, and its writes: each is the next state of its record,
//! fenced by the farm's lease, so the moment a newer holder exists this one stops.

use crate::gateway::coordination::{AggregationStore, Lease, StoreError, Written};
use crate::gateway::record::{AggregationRecord, Rows};

/// Why a holder stops driving an aggregation before it is terminal.
#[derive(Debug, thiserror::Error)]
pub(super) enum Stop {
    #[error("a newer holder of the farm's lease exists")]
    Fenced,
    #[error("the store could not take the write: {0}")]
    Store(StoreError),
}

/// The aggregation being driven: its record as last written, and the lease its writes carry.
pub(super) struct Driven<'a> {
    pub(super) store: &'a dyn AggregationStore,
    pub(super) lease: Lease,
    pub(super) record: AggregationRecord,
}

impl Driven<'_> {
    /// Changes the record and writes it, fenced.
    pub(super) async fn set(&mut self, change: impl FnOnce(&mut AggregationRecord)) -> Result<(), Stop> {
        change(&mut self.record);
        landed(self.store.update(&self.lease, self.record.clone()).await)
    }

    /// Writes the record, terminal now, with its rows, fenced.
    pub(super) async fn finish(&mut self, rows: Option<Rows>) -> Result<(), Stop> {
        landed(self.store.finish(&self.lease, self.record.clone(), rows).await)
    }
}

fn landed(written: Result<Written, StoreError>) -> Result<(), Stop> {
    match written {
        Ok(Written::Done) => Ok(()),
        Ok(Written::Fenced) => Err(Stop::Fenced),
        Err(e) => Err(Stop::Store(e)),
    }
}
