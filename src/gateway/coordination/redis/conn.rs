//! The connection every command goes through: the `redis` crate's connection manager, which
//! reconnects by itself after a connection drops, made to survive two more faults.
//!
//! - A command whose connection had dropped under it is sent once more (the manager
//!   reconnects meanwhile), so a restart or failover of Redis costs callers nothing. Every
//!   command and script of the gateway is safe to repeat: scripts are fenced and idempotent,
//!   and a repeated claim joins the aggregation the first one queued.
//! - A socket whose far end vanished without a word (a half-open connection: a failover behind
//!   a load balancer, a dropped NAT entry) never fails, it only times out, and the manager
//!   does not reconnect on timeouts. After a timeout a probe (`PING`) checks the connection;
//!   if the probe times out too, the manager is replaced by a new one. A command that was
//!   merely slow is not repeated: its caller decides.

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// A connection shared by clones.
#[derive(Clone)]
pub(crate) struct Conn {
    shared: Arc<Shared>,
}

struct Shared {
    current: Mutex<ConnectionManager>,
    client: redis::Client,
    config: ConnectionManagerConfig,
    /// A probe of the current connection is running.
    probing: AtomicBool,
}

impl Conn {
    pub(crate) async fn connect(client: &redis::Client, config: &ConnectionManagerConfig) -> redis::RedisResult<Self> {
        let manager = client.get_connection_manager_with_config(config.clone()).await?;
        Ok(Self {
            shared: Arc::new(Shared {
                current: Mutex::new(manager),
                client: client.clone(),
                config: config.clone(),
                probing: AtomicBool::new(false),
            }),
        })
    }

    fn current(&self) -> ConnectionManager {
        self.shared.current.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// After `e`: probes the connection if it timed out (once at a time), and replaces it when
    /// the probe times out too.
    fn after(&self, e: &redis::RedisError) {
        if !e.is_timeout() || self.shared.probing.swap(true, Ordering::SeqCst) {
            return;
        }
        let shared = self.shared.clone();
        let mut suspect = self.current();
        tokio::spawn(async move {
            let probe: redis::RedisResult<redis::Value> = redis::cmd("PING").query_async(&mut suspect).await;
            if probe.as_ref().is_err_and(redis::RedisError::is_timeout) {
                tracing::warn!("a Redis connection stopped answering; replacing it");
                match shared.client.get_connection_manager_with_config(shared.config.clone()).await {
                    Ok(fresh) => *shared.current.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = fresh,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot connect to Redis anew; trying again after the next timeout")
                    }
                }
            }
            shared.probing.store(false, Ordering::SeqCst);
        });
    }
}

fn dropped(e: &redis::RedisError) -> bool {
    e.is_connection_dropped() && !e.is_timeout()
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        Box::pin(async move {
            let answer = match self.current().req_packed_command(cmd).await {
                Err(e) if dropped(&e) => self.current().req_packed_command(cmd).await,
                answer => answer,
            };
            if let Err(e) = &answer {
                self.after(e);
            }
            answer
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        Box::pin(async move {
            let answer = match self.current().req_packed_commands(pipeline, offset, count).await {
                Err(e) if dropped(&e) => self.current().req_packed_commands(pipeline, offset, count).await,
                answer => answer,
            };
            if let Err(e) = &answer {
                self.after(e);
            }
            answer
        })
    }

    fn get_db(&self) -> i64 {
        self.current().get_db()
    }
}
