//! The name of every key and channel the gateway uses in Redis, under its prefix (`dsg:` by
//! default). Every key one script touches carries the same hash tag, the farm's bucket
//! ([`Bucket`], `{07}`), so it lives in one slot of a Redis Cluster:
//! - `{b}:agg:{id}`: a hash of the record (`json`, and `state`, `farm`, `expire_ms`,
//!   `data_ms`, `rows`, `index`, `hits`, `seen:{caller}`, `offer` for the scripts), kept until
//!   the result's expiry plus an hour (the id names its bucket, so a Get finds it directly);
//! - `{b}:rows:{id}`: the encoded rows of a COMPLETED result, expiring with it;
//! - `{b}:key:{canonical request}`: the id answering a key;
//! - `{b}:{farm}:queue`: the farm's ids, its head first;
//! - `{b}:{farm}:lease` (`token:holder`, expiring with the lease) and `{b}:{farm}:fence` (the
//!   newest token, expiring a day after the farm's last lease: tokens come from Redis's clock,
//!   so a farm's next token is larger without it);
//! - `{b}:{farm}:model`: the farm's run model;
//! - `{b}:family:{family}` and `{b}:family-expiry:{family}`: the COMPLETED results of one
//!   family (farm, kind, timezone, period, groups; `derive::family`) not derived from another,
//!   as `start:end:expire:id` (ms), scored by start and by expiry: where a Start looks for a
//!   result that contains it;
//! - refresh-ahead: `{b}:due` (the bucket's COMPLETED ids by expiry), `{b}:refresh:{canonical
//!   request}` (the refresh of a key no caller has joined yet), `{b}:{farm}:refreshes` (the
//!   farm's such refreshes);
//! - the bucket's counts: `{b}:farms` (its farms with work), `{b}:live` (its queued plus
//!   running aggregations), `{b}:version` (when they last changed, µs of Redis's clock);
//! - `{b}:epoch`: the generation of the bucket's state, and `{b}:server`: the `run_id` of the
//!   server it was made on (a restart or failover may have lost writes: a new epoch begins);
//! - `{all}:admission`: every bucket's counts and their sums, which the bounds
//!   (`--max-active-aggregations`, `--max-farms`) are checked against;
//! - the operator console's history: `{b}:activity:{id}` (an aggregation's timeline, kept three
//!   hours after its last event), `{b}:{farm}:recent` (the farm's last terminal aggregations),
//!   and `{all}:replicas` (each replica's last heartbeat);
//! - `rate:{name}`: a shared rate's theoretical arrival time;
//! - `caller:{operation}:{caller}`: a caller's shared bucket for an operation (`--caller-limits
//!   global`), its theoretical arrival time, expiring once the bucket is full again;
//! - channels: `changes`, on which changed ids and farm topics are published; on a cluster
//!   with sharded pub/sub, `{b}:changes` per bucket instead (`SPUBLISH`, served by the shard
//!   that holds the bucket).

use super::wire::canonical;
use crate::gateway::ids::Bucket;
use crate::gateway::key::CanonicalKey;

/// Key names under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    /// Changes are published per bucket (`SPUBLISH`), not on one channel.
    sharded: bool,
}

/// The hash tag of ids that name no bucket (minted before buckets): nothing is ever stored
/// under it.
const NO_BUCKET: &str = "{-}";

impl Keys {
    pub fn new(prefix: &str, sharded: bool) -> Self {
        Self { prefix: prefix.to_owned(), sharded }
    }

    /// `{prefix}{b}:` and `rest`.
    fn in_bucket(&self, bucket: Bucket, rest: &[&str]) -> String {
        let mut key = format!("{}{{{}}}:", self.prefix, bucket.hex());
        rest.iter().for_each(|p| key.push_str(p));
        key
    }

    /// Where the record of `id` lives, and its rows.
    fn of_id(&self, what: &str, id: &str) -> String {
        match Bucket::of_id(id) {
            Some(bucket) => self.in_bucket(bucket, &[what, id]),
            None => format!("{}{NO_BUCKET}:{what}{id}", self.prefix),
        }
    }

    pub fn record(&self, id: &str) -> String {
        self.of_id("agg:", id)
    }

    pub fn rows(&self, id: &str) -> String {
        self.of_id("rows:", id)
    }

    /// The timeline of `id` (`None`: an id that names no bucket).
    pub fn activity(&self, id: &str) -> Option<String> {
        Bucket::of_id(id).map(|bucket| self.in_bucket(bucket, &["activity:", id]))
    }

    /// `farm`'s last terminal aggregations.
    pub fn recent(&self, farm: &str) -> String {
        self.farm(farm, "recent")
    }

    /// Every replica's last heartbeat.
    pub fn replicas(&self) -> String {
        format!("{}{{all}}:replicas", self.prefix)
    }

    /// The id answering `key`.
    /// The COMPLETED results (not derived) of `key`'s family (`derive::family`), by start.
    pub fn family(&self, key: &CanonicalKey) -> String {
        let family = crate::domain::derive::family(key.request());
        self.in_bucket(Bucket::of_farm(key.farm_id()), &["family:", &family])
    }

    /// [`Keys::family`]'s members by expiry, for pruning.
    pub fn family_expiry(&self, key: &CanonicalKey) -> String {
        let family = crate::domain::derive::family(key.request());
        self.in_bucket(Bucket::of_farm(key.farm_id()), &["family-expiry:", &family])
    }

    pub fn index(&self, key: &CanonicalKey) -> String {
        self.in_bucket(Bucket::of_farm(key.farm_id()), &["key:", &canonical(key)])
    }

    /// The refresh of `key` no caller has joined yet.
    pub fn marker(&self, key: &CanonicalKey) -> String {
        self.in_bucket(Bucket::of_farm(key.farm_id()), &["refresh:", &canonical(key)])
    }

    fn farm(&self, farm: &str, what: &str) -> String {
        self.in_bucket(Bucket::of_farm(farm), &[farm, ":", what])
    }

    pub fn queue(&self, farm: &str) -> String {
        self.farm(farm, "queue")
    }

    /// The farm's refreshes no caller has joined yet.
    pub fn refreshes(&self, farm: &str) -> String {
        self.farm(farm, "refreshes")
    }

    /// The fair order of the farm's queue: places, owners and turns (`scripts/lib.lua`).
    pub fn fair(&self, farm: &str) -> String {
        self.farm(farm, "fair")
    }

    pub fn fence(&self, farm: &str) -> String {
        self.farm(farm, "fence")
    }

    pub fn lease(&self, farm: &str) -> String {
        self.farm(farm, "lease")
    }

    pub fn model(&self, farm: &str) -> String {
        self.farm(farm, "model")
    }

    /// The bucket's farms with work.
    pub fn farms(&self, bucket: Bucket) -> String {
        self.in_bucket(bucket, &["farms"])
    }

    /// The bucket's queued plus running aggregations.
    pub fn live(&self, bucket: Bucket) -> String {
        self.in_bucket(bucket, &["live"])
    }

    /// When the bucket's counts last changed.
    pub fn version(&self, bucket: Bucket) -> String {
        self.in_bucket(bucket, &["version"])
    }

    pub fn due(&self, bucket: Bucket) -> String {
        self.in_bucket(bucket, &["due"])
    }

    pub fn epoch(&self, bucket: Bucket) -> String {
        self.in_bucket(bucket, &["epoch"])
    }

    /// The `run_id` of the server the bucket's epoch was made on.
    pub fn server(&self, bucket: Bucket) -> String {
        self.in_bucket(bucket, &["server"])
    }

    /// Every bucket's counts and their sums.
    pub fn admission(&self) -> String {
        format!("{}{{all}}:admission", self.prefix)
    }

    pub fn rate(&self, name: &str) -> String {
        format!("{}rate:{name}", self.prefix)
    }

    /// The prefix of callers' shared buckets for `operation` (the caller's identity follows).
    pub fn caller(&self, operation: &str) -> String {
        format!("{}caller:{operation}:", self.prefix)
    }

    /// Whether changes are published per bucket, with `SPUBLISH`.
    pub fn sharded(&self) -> bool {
        self.sharded
    }

    /// The channel changes of `bucket` are published on.
    pub fn changes(&self, bucket: Bucket) -> String {
        if self.sharded { self.in_bucket(bucket, &["changes"]) } else { format!("{}changes", self.prefix) }
    }

    /// What a script publishes changes with.
    pub fn publish(&self) -> &'static str {
        if self.sharded { "SPUBLISH" } else { "PUBLISH" }
    }

    /// Every channel to subscribe to, each once.
    pub fn channels(&self) -> Vec<String> {
        if self.sharded {
            Bucket::all().map(|b| self.changes(b)).collect()
        } else {
            vec![self.changes(Bucket::default())]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_a_farm_and_its_ids_shares_the_farms_bucket_tag() {
        let keys = Keys::new("dsg:", true);
        let farm = "farm-0123456789abcdef0123456789abcdef";
        let id = crate::gateway::ids::IdMinter::new().mint(farm);
        let tag = format!("{{{}}}", Bucket::of_farm(farm).hex());
        let bucket = Bucket::of_farm(farm);
        for key in [
            keys.record(&id),
            keys.rows(&id),
            keys.queue(farm),
            keys.lease(farm),
            keys.fence(farm),
            keys.model(farm),
            keys.refreshes(farm),
            keys.recent(farm),
            keys.activity(&id).expect("a bucketed id"),
            keys.farms(bucket),
            keys.live(bucket),
            keys.due(bucket),
            keys.epoch(bucket),
            keys.changes(bucket),
        ] {
            assert!(key.starts_with(&format!("dsg:{tag}:")), "{key}");
        }
        assert_eq!(keys.record("agg-old"), "dsg:{-}:agg:agg-old");
    }
}
