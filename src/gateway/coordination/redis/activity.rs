//! The activity log shared by every replica in Redis: an aggregation's timeline and its farm's
//! recent list live in the farm's bucket (one script call per aggregation of a batch), the
//! replicas' heartbeats in one hash.

use super::client::{RedisClient, store_error};
use super::scripts::ACTIVITY;
use crate::gateway::activity::{
    ActivityLog, Event, RECENT_PER_FARM, RECENT_TTL, REPLICA_SILENCE, Replica, TIMELINE_EVENTS, TIMELINE_TTL, What,
};
use crate::gateway::coordination::StoreError;
use std::collections::BTreeMap;

/// A replica silent for this long is taken out of the hash by the next reader.
const REPLICA_FORGOTTEN_MS: u64 = 3600 * 1000;

/// The activity log in Redis.
pub(crate) struct RedisActivity {
    client: RedisClient,
}

impl RedisActivity {
    pub(crate) fn new(client: RedisClient) -> Self {
        Self { client }
    }
}

fn parse<T: serde::de::DeserializeOwned>(json: &str, what: &str) -> Result<T, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::corrupt(what.to_owned(), e))
}

#[async_trait::async_trait]
impl ActivityLog for RedisActivity {
    async fn append(&self, events: &[Event]) -> Result<(), StoreError> {
        let keys = &self.client.keys;
        let mut by_id: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
        for event in events {
            by_id.entry(&event.aggregation).or_default().push(event);
        }
        for (id, events) in by_id {
            let (Some(timeline), Some(first)) = (keys.activity(id), events.first()) else { continue };
            let mut call = ACTIVITY.key(timeline);
            call.key(keys.recent(&first.farm))
                .arg(TIMELINE_EVENTS)
                .arg(TIMELINE_TTL.as_millis() as u64)
                .arg(RECENT_PER_FARM)
                .arg(RECENT_TTL.as_millis() as u64);
            for event in events {
                let json = serde_json::to_string(event).map_err(|e| StoreError::corrupt("an event", e))?;
                call.arg(json).arg(u8::from(matches!(event.what, What::Ended { .. })));
            }
            let _: i64 = call.invoke_async(&mut self.client.conn()).await.map_err(store_error)?;
        }
        Ok(())
    }

    async fn timeline(&self, id: &str) -> Result<Vec<Event>, StoreError> {
        let Some(key) = self.client.keys.activity(id) else { return Ok(Vec::new()) };
        let mut range = redis::cmd("LRANGE");
        range.arg(&key).arg(0).arg(-1);
        let items: Vec<String> = self.client.conn().at_key(&key, range).await.map_err(store_error)?;
        items.iter().map(|json| parse(json, "an activity event")).collect()
    }

    async fn recent(&self, farm: &str, count: usize) -> Result<Vec<Event>, StoreError> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let key = self.client.keys.recent(farm);
        let mut range = redis::cmd("LRANGE");
        range.arg(&key).arg(0).arg(count - 1);
        let items: Vec<String> = self.client.conn().at_key(&key, range).await.map_err(store_error)?;
        items.iter().map(|json| parse(json, "an activity event")).collect()
    }

    async fn heartbeat(&self, replica: &Replica) -> Result<(), StoreError> {
        let key = self.client.keys.replicas();
        let json = serde_json::to_string(replica).map_err(|e| StoreError::corrupt("a heartbeat", e))?;
        let mut set = redis::cmd("HSET");
        set.arg(&key).arg(&replica.id).arg(json);
        let _: i64 = self.client.conn().at_key(&key, set).await.map_err(store_error)?;
        Ok(())
    }

    async fn replicas(&self, now_ms: u64) -> Result<Vec<Replica>, StoreError> {
        let key = self.client.keys.replicas();
        let mut all = redis::cmd("HGETALL");
        all.arg(&key);
        let entries: Vec<(String, String)> = self.client.conn().at_key(&key, all).await.map_err(store_error)?;
        let silence = REPLICA_SILENCE.as_millis() as u64;
        let mut alive = Vec::new();
        let mut forgotten = Vec::new();
        for (field, json) in entries {
            match parse::<Replica>(&json, "a heartbeat") {
                Ok(r) if r.seen_ms + silence >= now_ms => alive.push(r),
                Ok(r) if r.seen_ms + REPLICA_FORGOTTEN_MS < now_ms => forgotten.push(field),
                Ok(_) => {}
                Err(_) => forgotten.push(field),
            }
        }
        if !forgotten.is_empty() {
            let mut del = redis::cmd("HDEL");
            del.arg(&key).arg(forgotten);
            let _: Result<i64, _> = self.client.conn().at_key(&key, del).await;
        }
        alive.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(alive)
    }
}
