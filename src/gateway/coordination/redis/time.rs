//! Redis's clock as a replica reads it: the one clock every replica on the store agrees on.
//! Each replica measures how far Redis's `TIME` is from its own clock (halfway through the
//! round trip, the best of a few samples) at connect and every [`MEASURE_EVERY`] after, and
//! reads the time of day as its own clock corrected by that offset. Expiry, freshness, create
//! and start times, refresh due dates and the rows' key TTLs (set from the same times) are then
//! decided by one clock, whichever replica decides, within a round trip.

use super::client::{RedisClient, store_error};
use crate::gateway::clock::{Clock, offset_us};
use crate::gateway::coordination::StoreError;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, UNIX_EPOCH};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often the offset is measured again (clocks drift; a failover moves to another host).
const MEASURE_EVERY: Duration = Duration::from_secs(30);
/// Samples per measurement; the one with the shortest round trip counts.
const SAMPLES: usize = 3;

/// This replica's reading of Redis's clock.
#[derive(Clone)]
pub(crate) struct RedisTime {
    local: Clock,
    /// How far Redis's clock is ahead of `local`, in µs.
    offset_us: Arc<AtomicI64>,
}

impl RedisTime {
    /// Measures Redis's clock against `local`.
    pub(crate) async fn measure(redis: &RedisClient, local: Clock) -> Result<Self, StoreError> {
        let offset = offset(redis, &local).await?;
        Ok(Self { local, offset_us: Arc::new(AtomicI64::new(offset)) })
    }

    /// The time of day by Redis's clock.
    pub(crate) fn clock(&self) -> Clock {
        Clock::corrected(self.local.clone(), self.offset_us.clone())
    }

    /// Measures again every so often until `stop` fires; a measurement that fails keeps the
    /// last offset.
    pub(crate) async fn keep_measuring(self, redis: RedisClient, stop: CancellationToken) {
        let mut every = crate::every::Every::new(MEASURE_EVERY, stop);
        while every.tick().await {
            match offset(&redis, &self.local).await {
                Ok(offset) => self.offset_us.store(offset, Ordering::Relaxed),
                Err(e) => tracing::debug!(error = %e, "cannot read Redis's clock; keeping the last offset"),
            }
        }
    }
}

/// How far Redis's `TIME` is ahead of `local`, in µs.
async fn offset(redis: &RedisClient, local: &Clock) -> Result<i64, StoreError> {
    let mut best: Option<(Duration, i64)> = None;
    for _ in 0..SAMPLES {
        let conn = redis.conn();
        let (sent, sent_at) = (Instant::now(), local.now());
        // One clock for every replica: on a cluster, the shard holding the first bucket's.
        let at = redis.keys.epoch(crate::gateway::ids::Bucket::default());
        let (secs, micros): (u64, u64) = conn.at_key(&at, redis::cmd("TIME")).await.map_err(store_error)?;
        let round_trip = sent.elapsed();
        let theirs = UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros);
        let sample = offset_us(sent_at + round_trip / 2, theirs);
        if best.is_none_or(|(shortest, _)| round_trip < shortest) {
            best = Some((round_trip, sample));
        }
    }
    Ok(best.map_or(0, |(_, offset)| offset))
}
