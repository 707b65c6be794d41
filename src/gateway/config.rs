//! Every setting of the gateway's core, its default (one constant each, which the command
//! line's defaults are made of too, so they cannot disagree), and [`GatewayConfig::validate`],
//! which holds every check across settings. The command line and the config file only map their
//! names onto these fields; they check nothing of their own.

use super::backoff::BackoffPolicy;
use super::clock::Clock;
use super::coordination::CoordinationSettings;
use super::lifecycle::LifecycleConfig;
use super::rate::{CallerLimits, Rate};
use super::refresh;
use std::time::Duration;

/// Everything the gateway core can be tuned by.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Aggregations that may wait per farm behind the running one.
    pub farm_queue_capacity: usize,
    /// The fraction of the farm queue's capacity one caller may have waiting on one farm.
    pub farm_queue_caller_share: f64,
    /// Fair queueing on each farm (`coordination::policy::place`); `false`: arrival order.
    pub fair_queueing: bool,
    /// Answers derived from a cached result that contains the request (`crate::domain::derive`);
    /// `false`: every distinct request runs upstream.
    pub derive: bool,
    /// Memory budget of the results cache, in bytes.
    pub cache_max_bytes: u64,
    /// How long a finished result is held whatever the cache's budget: its own long-polls and
    /// first pages are served before it can be evicted.
    pub result_grace: Duration,
    /// A COMPLETED result answers a Start as CACHED only with at least this much validity left.
    pub min_remaining_validity: Duration,
    /// Queued and running aggregations across all farms.
    pub max_active_aggregations: usize,
    /// Farms with queued or running work at once.
    pub max_farms: usize,
    /// Longest one aggregation may run before the farm's supervisor ends it; `None`: the
    /// result validity.
    pub run_limit: Option<Duration>,
    pub lifecycle: LifecycleConfig,
    pub caller_start: Rate,
    pub caller_get: Rate,
    /// Whether callers' limits hold across replicas.
    pub caller_limits: CallerLimits,
    pub upstream_start: Rate,
    pub upstream_get: Rate,
    /// The longest long-poll.
    pub max_wait: Duration,
    /// How often expired entries and idle caller buckets are dropped.
    pub housekeeping_interval: Duration,
    /// This replica's name (the pod's), as farm lease holder.
    pub instance_id: String,
    /// How long a farm lease lasts unless renewed: a dead worker's farm is taken over after it.
    pub lease_ttl: Duration,
    /// Refresh-ahead of popular results.
    pub refresh: refresh::RefreshConfig,
    /// Where the core reads the time of day (the system's; tokio's in tests on paused time).
    pub clock: Clock,
}

/// The default of every gateway setting. [`GatewayConfig::default`] and the command line's
/// defaults are both made of these, so they cannot disagree.
pub mod defaults {
    use std::time::Duration;

    pub const FARM_QUEUE_CAPACITY: usize = 100;
    pub const FARM_QUEUE_CALLER_SHARE: f64 = 0.5;
    pub const CACHE_MAX_BYTES: u64 = 512 * 1024 * 1024;
    pub const RESULT_GRACE: Duration = Duration::from_secs(30);
    pub const MIN_REMAINING_VALIDITY: Duration = Duration::from_secs(120);
    pub const MAX_ACTIVE_AGGREGATIONS: usize = 10_000;
    pub const MAX_FARMS: usize = 1_000;
    pub const RESULT_VALIDITY: Duration = Duration::from_secs(3600);
    pub const SPLIT_MAX_PARTS: u32 = 16;
    pub const VALIDITY_MARGIN: Duration = Duration::from_secs(30);
    pub const FAILED_RESULT_TTL: Duration = Duration::from_secs(60);
    pub const POLL_INITIAL_INTERVAL: Duration = Duration::from_millis(500);
    pub const POLL_MAX_INTERVAL: Duration = Duration::from_secs(10);
    pub const POLL_MULTIPLIER: f64 = 1.5;
    pub const START_RETRY_INITIAL: Duration = Duration::from_secs(1);
    pub const START_RETRY_MAX: Duration = Duration::from_secs(30);
    pub const START_RETRY_MULTIPLIER: f64 = 2.0;
    pub const START_DEADLINE: Duration = Duration::from_secs(600);
    pub const CALLER_START_RATE: f64 = 10.0;
    pub const CALLER_START_BURST: u32 = 20;
    pub const CALLER_GET_RATE: f64 = 100.0;
    pub const CALLER_GET_BURST: u32 = 200;
    pub const UPSTREAM_START_RATE: f64 = 5.0;
    pub const UPSTREAM_GET_RATE: f64 = 25.0;
    pub const MAX_WAIT: Duration = Duration::from_secs(60);
    pub const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);
    pub const LEASE_TTL: Duration = Duration::from_secs(15);
    pub const REFRESH_AHEAD: Duration = Duration::from_secs(600);
    pub const REFRESH_MIN_HITS: u32 = 3;

    /// The host name (in Kubernetes, the pod's name), else `gateway`.
    pub fn instance_id() -> String {
        std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "gateway".to_owned())
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        use defaults as d;
        Self {
            farm_queue_capacity: d::FARM_QUEUE_CAPACITY,
            farm_queue_caller_share: d::FARM_QUEUE_CALLER_SHARE,
            fair_queueing: true,
            derive: true,
            cache_max_bytes: d::CACHE_MAX_BYTES,
            result_grace: d::RESULT_GRACE,
            min_remaining_validity: d::MIN_REMAINING_VALIDITY,
            max_active_aggregations: d::MAX_ACTIVE_AGGREGATIONS,
            max_farms: d::MAX_FARMS,
            run_limit: None,
            lifecycle: LifecycleConfig {
                result_validity: d::RESULT_VALIDITY,
                validity_margin: d::VALIDITY_MARGIN,
                failed_ttl: d::FAILED_RESULT_TTL,
                poll: BackoffPolicy {
                    initial: d::POLL_INITIAL_INTERVAL,
                    max: d::POLL_MAX_INTERVAL,
                    multiplier: d::POLL_MULTIPLIER,
                },
                start_retry: BackoffPolicy {
                    initial: d::START_RETRY_INITIAL,
                    max: d::START_RETRY_MAX,
                    multiplier: d::START_RETRY_MULTIPLIER,
                },
                start_deadline: d::START_DEADLINE,
                split_max_parts: d::SPLIT_MAX_PARTS,
            },
            caller_start: Rate { per_second: d::CALLER_START_RATE, burst: d::CALLER_START_BURST },
            caller_get: Rate { per_second: d::CALLER_GET_RATE, burst: d::CALLER_GET_BURST },
            caller_limits: CallerLimits::default(),
            upstream_start: Rate::upstream_start(d::UPSTREAM_START_RATE),
            upstream_get: Rate::upstream_get(d::UPSTREAM_GET_RATE),
            max_wait: d::MAX_WAIT,
            housekeeping_interval: d::HOUSEKEEPING_INTERVAL,
            instance_id: d::instance_id(),
            lease_ttl: d::LEASE_TTL,
            refresh: refresh::RefreshConfig { ahead: d::REFRESH_AHEAD, min_hits: d::REFRESH_MIN_HITS },
            clock: Clock::system(),
        }
    }
}

/// The shortest farm lease: a holder renews at a third of it.
pub(crate) const MIN_LEASE_TTL: Duration = Duration::from_millis(300);

/// How many of the store's response timeouts a lease must last at least.
pub(crate) const LEASE_TIMEOUTS: u32 = 3;

/// A setting, or a combination of settings, that cannot work. Settings are named as the command
/// line and the config file name them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("--{setting} must be at least 1")]
    Zero { setting: &'static str },
    #[error("--{setting} must be positive")]
    NotPositive { setting: &'static str },
    #[error("--lease-ttl ({}) must be at least {}", human(*.ttl), human(*.least))]
    LeaseTooShort { ttl: Duration, least: Duration },
    #[error(
        "--lease-ttl ({}) must be at least {LEASE_TIMEOUTS} × --{setting} ({}) = {}: a lease holder retries a write \
         that timed out while its lease lasts",
        human(*.ttl), human(*.timeout), human(*.least)
    )]
    LeaseShorterThanStore { ttl: Duration, setting: &'static str, timeout: Duration, least: Duration },
    #[error("--{shorter} ({}) must be shorter than --{longer} ({})", human(*.short), human(*.long))]
    NotShorter { shorter: &'static str, short: Duration, longer: &'static str, long: Duration },
    #[error("--{initial} must be positive and at most --{max}")]
    BadBackoff { initial: &'static str, max: &'static str },
    #[error(
        "--refresh-ahead ({}) must be shorter than --result-validity ({}), or 0 to turn it off",
        human(*.ahead),
        human(*.validity)
    )]
    RefreshAhead { ahead: Duration, validity: Duration },
    /// A check of the settings around the core (the server's, the store's).
    #[error("{0}")]
    Other(String),
}

/// A duration as the command line writes it (`1h`, `300ms`).
fn human(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(d)
}

impl GatewayConfig {
    /// What a coordination backend is built with.
    pub fn coordination(&self) -> CoordinationSettings {
        CoordinationSettings {
            cache_max_bytes: self.cache_max_bytes,
            result_grace: self.result_grace,
            upstream_start: self.upstream_start,
            upstream_get: self.upstream_get,
            caller_start: self.caller_start,
            caller_get: self.caller_get,
            caller_limits: self.caller_limits,
            clock: self.clock.clone(),
        }
    }

    /// Every check across the core's settings: the first that fails.
    /// The lease must outlast a few of the store's response timeouts, so a holder can retry a
    /// write that timed out before its lease runs out.
    pub fn fits_store_timeout(&self, timeout: Duration, setting: &'static str) -> Result<(), ConfigError> {
        let least = timeout * LEASE_TIMEOUTS;
        if self.lease_ttl < least {
            return Err(ConfigError::LeaseShorterThanStore { ttl: self.lease_ttl, setting, timeout, least });
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let counts = [
            ("farm-queue-capacity", self.farm_queue_capacity),
            ("max-active-aggregations", self.max_active_aggregations),
            ("max-farms", self.max_farms),
        ];
        if let Some((setting, _)) = counts.iter().find(|(_, n)| *n == 0) {
            return Err(ConfigError::Zero { setting });
        }
        let share = self.farm_queue_caller_share;
        if !(share > 0.0 && share <= 1.0) {
            return Err(ConfigError::Other(format!(
                "--farm-queue-caller-share ({share}) must be more than 0 and at most 1 (1: no share)"
            )));
        }
        if self.lease_ttl < MIN_LEASE_TTL {
            return Err(ConfigError::LeaseTooShort { ttl: self.lease_ttl, least: MIN_LEASE_TTL });
        }
        if self.run_limit.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::NotPositive { setting: "aggregation-run-limit" });
        }
        let l = &self.lifecycle;
        if l.validity_margin >= l.result_validity {
            return Err(ConfigError::NotShorter {
                shorter: "validity-margin",
                short: l.validity_margin,
                longer: "result-validity",
                long: l.result_validity,
            });
        }
        let backoffs = [
            (&l.poll, "poll-initial-interval", "poll-max-interval"),
            (&l.start_retry, "start-retry-initial", "start-retry-max"),
        ];
        if let Some((_, initial, max)) = backoffs.iter().find(|(b, _, _)| b.initial.is_zero() || b.initial > b.max) {
            return Err(ConfigError::BadBackoff { initial, max });
        }
        if self.refresh.enabled() && self.refresh.ahead >= l.result_validity {
            return Err(ConfigError::RefreshAhead { ahead: self.refresh.ahead, validity: l.result_validity });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid() {
        assert_eq!(GatewayConfig::default().validate(), Ok(()));
    }

    #[test]
    fn each_check_names_its_settings() {
        let bad = |change: fn(&mut GatewayConfig)| {
            let mut c = GatewayConfig::default();
            change(&mut c);
            c.validate().expect_err("refused").to_string()
        };
        assert_eq!(bad(|c| c.max_farms = 0), "--max-farms must be at least 1");
        assert!(bad(|c| c.lease_ttl = Duration::from_millis(100)).starts_with("--lease-ttl (100ms)"));
        assert!(bad(|c| c.lifecycle.validity_margin = Duration::from_secs(4000)).contains("--validity-margin"));
        assert_eq!(
            bad(|c| c.lifecycle.poll.initial = Duration::ZERO),
            "--poll-initial-interval must be positive and at most --poll-max-interval"
        );
        assert!(bad(|c| c.refresh.ahead = Duration::from_secs(3600)).starts_with("--refresh-ahead"));
        assert_eq!(bad(|c| c.run_limit = Some(Duration::ZERO)), "--aggregation-run-limit must be positive");
        for share in [0.0, -0.5, 1.5, f64::NAN] {
            let c = GatewayConfig { farm_queue_caller_share: share, ..GatewayConfig::default() };
            let err = c.validate().expect_err("refused").to_string();
            assert!(err.starts_with("--farm-queue-caller-share"), "{share}: {err}");
        }
    }
}
