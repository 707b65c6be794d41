//! The name of every key and channel the gateway uses in Redis, under its prefix (`dsg:` by
//! default). A farm's keys carry the farm as a hash tag (`{farm-…}`), so they stay in one slot
//! of a cluster:
//! - `agg:{id}`: a hash of the record (`json`, and `state`, `farm`, `expire_ms`, `data_ms`,
//!   `rows`, `index`, `hits`, `seen:{caller}`, `offer` for the scripts), kept until the result's expiry plus a day;
//! - `rows:{id}`: the encoded rows of a COMPLETED result, expiring with it;
//! - `key:{canonical request}`: the id answering a key;
//! - `{farm}:queue`: the farm's ids, its head first; `farms`: farms with work; `live`: queued
//!   plus running aggregations;
//! - `{farm}:lease` (`token:holder`, expiring with the lease) and `{farm}:fence` (the newest
//!   token, expiring a day after the farm's last lease: tokens come from Redis's clock, so a
//!   farm's next token is larger without it);
//! - refresh-ahead: `due` (COMPLETED ids by expiry), `refresh:{canonical request}` (the refresh
//!   of a key no caller has joined yet), `{farm}:refreshes` (the farm's such refreshes);
//! - `{farm}:model`: the farm's run model;
//! - `rate:{name}`: a shared rate's theoretical arrival time;
//! - `caller:{operation}:{caller}`: a caller's shared bucket for an operation (`--caller-limits
//!   global`), its theoretical arrival time, expiring once the bucket is full again;
//! - `epoch`: the generation of this state, and `server`: the `run_id` of the server it was made
//!   on (a restart or failover may have lost writes: it begins a new epoch);
//! - `changes`: the channel on which changed ids and farm topics are published.

use super::wire::canonical;
use crate::gateway::key::CanonicalKey;

/// Key names under one prefix.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str) -> Self {
        Self { prefix: prefix.to_owned() }
    }

    fn named(&self, parts: &[&str]) -> String {
        let mut key = self.prefix.clone();
        parts.iter().for_each(|p| key.push_str(p));
        key
    }

    /// What record keys start with: scripts add the id.
    pub(crate) fn record_prefix(&self) -> String {
        self.named(&["agg:"])
    }

    pub(crate) fn record(&self, id: &str) -> String {
        self.named(&["agg:", id])
    }

    /// What rows keys start with.
    pub(crate) fn rows_prefix(&self) -> String {
        self.named(&["rows:"])
    }

    pub(crate) fn rows(&self, id: &str) -> String {
        self.named(&["rows:", id])
    }

    /// The id answering `key`.
    pub(crate) fn index(&self, key: &CanonicalKey) -> String {
        self.named(&["key:", &canonical(key)])
    }

    /// The refresh of `key` no caller has joined yet.
    pub(crate) fn marker(&self, key: &CanonicalKey) -> String {
        self.named(&["refresh:", &canonical(key)])
    }

    pub(crate) fn farm(&self, farm: &str, what: &str) -> String {
        format!("{}{{{farm}}}:{what}", self.prefix)
    }

    pub(crate) fn queue(&self, farm: &str) -> String {
        self.farm(farm, "queue")
    }

    /// The farm's refreshes no caller has joined yet.
    pub(crate) fn refreshes(&self, farm: &str) -> String {
        self.farm(farm, "refreshes")
    }

    pub(crate) fn fence(&self, farm: &str) -> String {
        self.farm(farm, "fence")
    }

    pub(crate) fn lease(&self, farm: &str) -> String {
        self.farm(farm, "lease")
    }

    pub(crate) fn model(&self, farm: &str) -> String {
        self.farm(farm, "model")
    }

    pub(crate) fn farms(&self) -> String {
        self.named(&["farms"])
    }

    pub(crate) fn live(&self) -> String {
        self.named(&["live"])
    }

    pub(crate) fn due(&self) -> String {
        self.named(&["due"])
    }

    pub(crate) fn epoch(&self) -> String {
        self.named(&["epoch"])
    }

    /// The `run_id` of the server the epoch was made on.
    pub(crate) fn server(&self) -> String {
        self.named(&["server"])
    }

    pub(crate) fn rate(&self, name: &str) -> String {
        self.named(&["rate:", name])
    }

    /// The prefix of callers' shared buckets for `operation` (the caller's identity follows).
    pub(crate) fn caller(&self, operation: &str) -> String {
        self.named(&["caller:", operation, ":"])
    }

    pub(crate) fn changes(&self) -> String {
        self.named(&["changes"])
    }

    /// The prefix itself, for scripts that name a farm's keys from its id.
    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }
}
