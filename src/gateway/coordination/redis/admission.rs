//! The bounds every replica shares (`--max-active-aggregations`, `--max-farms`) without a
//! script that spans hash slots. Each bucket counts its own live aggregations and farms with
//! work, atomically with the scripts that change them, and versions the counts with Redis's
//! clock; `{all}:admission` holds every bucket's latest counts and their sums.
//!
//! - On one Redis (standalone or behind Sentinel) the bucket's scripts declare the admission
//!   key too ([`Admission::Inline`]): they check the sums and tally their counts in the same
//!   step, so the bounds are exact, as ever.
//! - On a Redis Cluster the admission key lives in another slot. A claim that would queue a new
//!   aggregation first answers `admit` ([`Admission::Ask`]); the replica then, one admission at
//!   a time, reads the sums, claims again with them ([`Admission::Given`]) and tallies the
//!   bucket's new counts ([`RedisStore::tally`]). While R replicas admit at once each may read
//!   sums without the others' newest aggregation, so a bound may be exceeded by at most
//!   R − 1. A replica that dies between its claim and its tally, or a failover of the
//!   admission key's shard, leaves counts out until housekeeping tallies every bucket again
//!   (every second, on every replica: [`RedisStore::resync`]).

use super::RedisStore;
use super::client::store_error;
use super::scripts::TALLY;
use crate::gateway::coordination::{StoreError, Written};
use crate::gateway::ids::Bucket;

/// How a bucket's script learns the sums it checks the bounds against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Admission {
    /// From the admission key, which it declares (one Redis).
    Inline,
    /// It does not: it answers `admit` when it would queue a new aggregation.
    Ask,
    /// As the replica read them.
    Given(Totals),
}

impl Admission {
    /// What scripts call it.
    pub(super) fn mode(self) -> &'static str {
        match self {
            Self::Inline => "inline",
            Self::Ask => "ask",
            Self::Given(_) => "given",
        }
    }

    /// The script's last arguments: the mode, then the sums (zero unless given).
    pub(super) fn args(self, script: &mut redis::ScriptInvocation<'_>) {
        let totals = if let Self::Given(totals) = self { totals } else { Totals::default() };
        script.arg(self.mode()).arg(totals.live).arg(totals.farms);
    }
}

/// The sums of every bucket's counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Totals {
    pub(super) live: u64,
    pub(super) farms: u64,
}

/// One bucket's counts after a script changed them, and their version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Counts {
    pub(super) live: u64,
    pub(super) farms: u64,
    pub(super) version: u64,
}

impl Counts {
    /// The counts at `at` of a script's answer, if it carries them.
    pub(super) fn from_answer(answer: &[redis::Value], at: usize) -> Option<Self> {
        let n = |i: usize| answer.get(i).and_then(|v| redis::from_redis_value::<u64>(v.clone()).ok());
        Some(Self { live: n(at)?, farms: n(at + 1)?, version: n(at + 2)? })
    }
}

impl RedisStore {
    /// How this store's scripts admit: inline on one Redis, by asking on a cluster.
    pub(super) fn admission(&self) -> Admission {
        if self.redis.is_cluster() { Admission::Ask } else { Admission::Inline }
    }

    /// How scripts that only lower the counts (finish, discard) treat the sums: they tally
    /// inline on one Redis; on a cluster the replica tallies after them.
    pub(super) fn lowering(&self) -> Admission {
        if self.redis.is_cluster() { Admission::Given(Totals::default()) } else { Admission::Inline }
    }

    /// Runs `script`, a fenced write that takes an aggregation off its farm's queue in
    /// `bucket` (finish, discard), guarded at `fence`. It answers 1 (written), 0 (fenced) or
    /// -1 (moved: `None`, read again), then the bucket's counts, which are tallied.
    pub(super) async fn off_queue(
        &self,
        fence: &str,
        script: &redis::ScriptInvocation<'_>,
        bucket: Bucket,
    ) -> Result<Option<Written>, StoreError> {
        let answer: Vec<redis::Value> = self.redis.guarded(fence, script).await?;
        let done: i64 = answer.first().and_then(|v| redis::from_redis_value(v.clone()).ok()).unwrap_or_default();
        if done == -1 {
            return Ok(None);
        }
        if let Some(counts) = Counts::from_answer(&answer, 1) {
            self.tally(bucket, counts).await;
        }
        Ok(Some(if done == 1 { Written::Done } else { Written::Fenced }))
    }

    /// The sums as `{all}:admission` holds them now.
    pub(super) async fn totals(&self) -> Result<Totals, StoreError> {
        let (live, farms): (Option<i64>, Option<i64>) = redis::cmd("HMGET")
            .arg(self.keys().admission())
            .arg("live")
            .arg("farms")
            .query_async(&mut self.conn())
            .await
            .map_err(store_error)?;
        let count = |n: Option<i64>| u64::try_from(n.unwrap_or_default()).unwrap_or_default();
        Ok(Totals { live: count(live), farms: count(farms) })
    }

    /// Writes `bucket`'s `counts` into the sums (on a cluster, after the bucket's script); a
    /// failure is left to housekeeping's [`Self::resync`].
    pub(super) async fn tally(&self, bucket: Bucket, counts: Counts) {
        if !self.redis.is_cluster() {
            return;
        }
        let tallied: Result<i64, _> = TALLY
            .key(self.keys().admission())
            .arg(bucket.hex())
            .arg(counts.live)
            .arg(counts.farms)
            .arg(counts.version)
            .invoke_async(&mut self.conn())
            .await;
        if let Err(e) = tallied {
            tracing::debug!(error = %e, bucket = bucket.hex(), "cannot tally a bucket's counts; housekeeping will");
        }
    }

    /// The buckets that may have farms with work: on one Redis those whose tallied count says
    /// so (tallied in the same script that changed it: exact), so an idle gateway does not
    /// read 64 empty sets a second; on a cluster every bucket (a tally may lag).
    pub(super) async fn busy_buckets(&self) -> Result<Vec<Bucket>, StoreError> {
        if self.redis.is_cluster() {
            return Ok(Bucket::all().collect());
        }
        let fields: std::collections::HashMap<String, i64> = redis::cmd("HGETALL")
            .arg(self.keys().admission())
            .query_async(&mut self.conn())
            .await
            .map_err(store_error)?;
        Ok(Bucket::all().filter(|b| fields.get(&format!("f:{}", b.hex())).is_some_and(|n| *n > 0)).collect())
    }

    /// On a cluster, tallies every bucket's counts as they are (a tally lost with a replica or
    /// a failover); on one Redis the scripts tallied them already.
    pub(super) async fn resync(&self) {
        if !self.redis.is_cluster() {
            return;
        }
        let read = Bucket::all().map(|bucket| async move {
            let k = self.keys();
            let (live, farms, version): (Option<u64>, u64, Option<u64>) = redis::pipe()
                .cmd("GET")
                .arg(k.live(bucket))
                .cmd("SCARD")
                .arg(k.farms(bucket))
                .cmd("GET")
                .arg(k.version(bucket))
                .query_async(&mut self.conn())
                .await
                .map_err(store_error)?;
            // A bucket that never changed has nothing to tally.
            if let Some(version) = version {
                self.tally(bucket, Counts { live: live.unwrap_or_default(), farms, version }).await;
            }
            Ok::<_, StoreError>(())
        });
        if let Err(e) = futures::future::try_join_all(read).await {
            tracing::debug!(error = %e, "cannot read the buckets' counts");
        }
    }
}
