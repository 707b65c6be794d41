//! Answers derived from a completed result that contains the request (`crate::domain::derive`):
//! found through the store's index of results by family, cut out of its rows, and kept as a
//! new COMPLETED aggregation that expires with it, so identical Starts later are CACHED on it.
//!
//! An identical aggregation goes first: a Start its key answers (cached, queued or running) is
//! claimed, not derived. Deriving never waits on the upstream and never fails a Start: when no result contains the
//! request, its rows cannot be read, or the store refuses, the Start is claimed as any other.

use super::activity;
use super::coordination::{CachedResult, Disposition, Found, Freshness};
use super::error::{GatewayError, RecoveryError};
use super::key::CanonicalKey;
use super::record::{AggregationRecord, Priority, Rows, State};
use super::rows::RowBlockBuilder;
use super::{Gateway, Started, estimate};
use crate::domain::derive::Derivation;
use crate::telemetry::metrics::DispositionLabels;
use std::sync::Arc;

impl Gateway {
    /// A Start of `key` answered from a valid result that contains it, if there is one.
    pub(super) async fn derived(
        &self,
        caller: &str,
        key: &CanonicalKey,
        freshness: &Freshness,
        priority: Priority,
    ) -> Option<Started> {
        let source = match self.store.containing(key, freshness).await {
            Ok(found) => found?,
            Err(e) => {
                tracing::debug!(error = %e, "cannot look for a cached result that contains the request");
                return None;
            }
        };
        // The request's own result, or one of its own queued or running: the claim answers it.
        if source.key.request() == key.request() || self.store.answers(key, freshness).await.unwrap_or(true) {
            return None;
        }
        let rows = self.rows_derived(&source, key).await?;
        let record = AggregationRecord {
            state: State::Completed,
            status_message: format!(
                "answered from the rows of {}, the completed result of a request that contains this one",
                source.id
            ),
            expire_time: source.expire_time,
            data_time: source.data_time,
            row_count: rows.len() as u64,
            priority,
            derived_from: Some(source.id.clone()),
            ..AggregationRecord::queued(self.ids.mint(key.farm_id()), key.clone(), self.clock.now())
        };
        let result = match self.store.put_derived(record, rows).await {
            Ok(result) => result,
            Err(e) => {
                tracing::debug!(error = %e, "cannot keep a derived result; the Start is claimed instead");
                return None;
            }
        };
        self.metrics.cache_hits.inc();
        self.metrics.derived.inc();
        self.metrics.dispositions.get_or_create(&DispositionLabels { disposition: "derived" }).inc();
        let what = activity::What::Derived { caller: caller.to_owned(), from: source.id.to_string() };
        self.activity.record(&result.record, what);
        tracing::debug!(aggregation = %result.record.id, from = %source.id, "start answered from a containing result");
        Some(Started {
            record: result.record.clone(),
            queue_position: 0,
            disposition: Disposition::Derived,
            estimate: estimate::Estimate::default(),
        })
    }

    /// The rows of `key`, cut out of those of `source`, which contains it; `None` when they
    /// cannot be read.
    async fn rows_derived(&self, source: &AggregationRecord, key: &CanonicalKey) -> Option<Rows> {
        let rows = self.rows_of(source).await?;
        let derivation = Derivation::new(source.key.request(), key.request());
        let mut block = RowBlockBuilder::new(self.codec.encode);
        for row in rows.rows(self.codec.decode) {
            if let Some(row) = derivation.row(&row?) {
                block.push(&row);
            }
        }
        Some(Arc::new(block.finish()))
    }

    /// The rows of the COMPLETED result `source`: from this replica's results cache, else the
    /// store; `None` when they are gone, or larger than this replica's results cache may hold
    /// (reading them whole to cut them would take the memory its budget forbids).
    async fn rows_of(&self, source: &AggregationRecord) -> Option<Rows> {
        if let Some(result) = self.results.get(&source.id) {
            return result.rows.clone();
        }
        match self.store.read(&source.id).await.ok()? {
            Found::Terminal(result) => result.rows.clone(),
            _ => None,
        }
    }

    /// The rows of a derived result that the shared store lost, cut again from the result they
    /// came from, and put back.
    pub(super) async fn recover_derived(
        &self,
        record: Arc<AggregationRecord>,
        source_id: &str,
    ) -> Result<Arc<CachedResult>, GatewayError> {
        let lost = |cause| GatewayError::ResultsLost { id: record.id.to_string(), cause };
        let source = match self.store.read(source_id).await {
            Ok(Found::Terminal(result)) => Some(result.record.clone()),
            _ => None,
        };
        let rows = match &source {
            Some(source) => self.rows_derived(source, &record.key).await,
            None => None,
        };
        let Some(rows) = rows else { return Err(lost(RecoveryError::SourceGone(source_id.to_owned()))) };
        self.store.restore_rows(record.clone(), rows).await.map_err(|e| lost(RecoveryError::Store(e)))
    }
}
