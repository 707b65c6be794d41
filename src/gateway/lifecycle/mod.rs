//! Driving one aggregation upstream to a terminal state: Start ([`start`]), follow the
//! upstream aggregation ([`fetch`]), run it as parts when its result is too large ([`split`]),
//! and hand the terminal record and its rows to the store. Every upstream call is retried one
//! way ([`retry`]).
//!
//! Every write is the next state of the aggregation's record, fenced by the farm's lease
//! ([`fenced`]): the moment a newer holder exists, this one stops. A record found RUNNING is
//! resumed where the last holder left it: polling its upstream id, or, without one, as a Start
//! whose outcome is unknown.
//!
//! Never surfaces upstream errors to callers directly: they end up in the aggregation's state
//! and error. Every upstream call is a child span of the aggregation's lifecycle span, carrying
//! the farm, both aggregation ids and the outcome, and is counted in the metrics.

mod fenced;
mod fetch;
mod retry;
mod split;
mod start;

use super::activity::{Activity, What};
use super::backoff::BackoffPolicy;
use super::clock::Clock;
use super::coordination::pacing::RoutePacers;
use super::coordination::{AggregationStore, Found, Lease, QueueFault};
use super::record::{AggregationRecord, Failure, FailureCode, State};
use super::rows::{RowBlock, RowEncoder};
use super::scheduler::{Abandoned, BoxFuture, Ran, Runner};
use super::spans::Spans;
use crate::telemetry::Metrics;
use crate::telemetry::metrics::{OutcomeLabels, ReasonLabels, StateLabels};
use crate::upstream::{Upstream, UpstreamError};
use fenced::{Driven, Stop};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::upstream::{GET_OPERATION as GET, START_OPERATION as START};

/// Timing of the lifecycle.
#[derive(Debug, Clone)]
pub struct LifecycleConfig {
    /// How long upstream results live after the Start call.
    pub result_validity: Duration,
    /// Taken off the validity so the gateway never serves what the upstream has dropped.
    pub validity_margin: Duration,
    /// How long FAILED / TIMED_OUT aggregations are kept so callers can see why.
    pub failed_ttl: Duration,
    /// Delays between status polls.
    pub poll: BackoffPolicy,
    /// Delays between Start attempts refused as throttled or unavailable.
    pub start_retry: BackoffPolicy,
    /// How long a throttled or unavailable Start is retried before the aggregation fails
    /// (longer, up to the result validity, after a Start whose outcome is unknown).
    pub start_deadline: Duration,
    /// When the upstream says a result is too large: run the request as at most this many
    /// parts and merge their rows; 0 or 1 never splits.
    pub split_max_parts: u32,
}

/// What a Start waiting on a farm that may be busy with its own orphan says.
pub(crate) const OUTCOME_UNKNOWN_WAITING: &str = "previous Start's outcome unknown; waiting for the farm to be free";

/// A terminal outcome, before it is written to the aggregation.
enum Outcome {
    Completed {
        rows: RowBlock,
        message: Option<String>,
        parts: u32,
    },
    /// The upstream ended it because its result is too large ([`crate::upstream::UpstreamPage::too_large`]).
    TooLarge {
        state: State,
        failure: Failure,
    },
    Ended {
        state: State,
        failure: Failure,
    },
}

/// Why driving an aggregation did not go on as planned.
enum Interrupt {
    /// The holder must stop: another takes over.
    Stop(Stop),
    /// The aggregation ends with this failure.
    Fail(Failure),
}

impl From<Stop> for Interrupt {
    fn from(stop: Stop) -> Self {
        Self::Stop(stop)
    }
}

/// When the upstream aggregation was started, in both clocks.
#[derive(Clone, Copy)]
struct Started {
    wall: SystemTime,
    mono: Instant,
}

impl Started {
    /// Now, `wall` being the time of day.
    fn now(wall: SystemTime) -> Self {
        Self { wall, mono: Instant::now() }
    }

    /// A start recorded by wall clock (perhaps by another replica), seen at `now`.
    fn at(wall: SystemTime, now: SystemTime) -> Self {
        let ago = now.duration_since(wall).unwrap_or_default();
        Self { wall, mono: Instant::now().checked_sub(ago).unwrap_or_else(Instant::now) }
    }
}

/// Runs aggregations against an [`Upstream`]; farm workers call it.
pub(crate) struct UpstreamRunner {
    pub(crate) upstream: Arc<dyn Upstream>,
    pub(crate) activity: Arc<Activity>,
    pub(crate) store: Arc<dyn AggregationStore>,
    /// The upstream pacing of each route.
    pub(crate) pacers: RoutePacers,
    pub(crate) config: LifecycleConfig,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) encoder: RowEncoder,
    pub(crate) spans: Arc<Spans>,
    pub(crate) clock: Clock,
}

impl Runner for UpstreamRunner {
    fn run(self: Arc<Self>, record: Arc<AggregationRecord>, lease: Lease) -> BoxFuture<Ran> {
        let span = self.spans.of(&record);
        Box::pin(
            async move {
                let id = record.id.clone();
                let (holder, trace_id) = (lease.holder.clone(), self.spans.trace_id(&record));
                self.activity.record(&record, What::Driving { holder, trace_id });
                let mut agg = Driven {
                    store: self.store.as_ref(),
                    activity: &self.activity,
                    lease,
                    record: (*record).clone(),
                };
                match self.drive(&mut agg).await {
                    Ok(()) => Ran::Ended,
                    Err(stop) => {
                        tracing::warn!(aggregation = %id, reason = %stop, "stopped driving the aggregation; the farm's next holder resumes it");
                        Ran::Stopped
                    }
                }
            }
            .instrument(span),
        )
    }

    fn discard(self: Arc<Self>, id: String, fault: QueueFault, lease: Lease) -> BoxFuture<bool> {
        Box::pin(async move { self.discard_broken(&id, &fault, &lease).await })
    }

    fn abandon(self: Arc<Self>, id: Arc<str>, lease: Lease, why: Abandoned) -> BoxFuture {
        Box::pin(async move {
            let record = match self.store.read(&id).await {
                Ok(Found::Active { record, .. }) => record,
                _ => return,
            };
            let (reason, failure) = match why {
                Abandoned::Crashed(cause) => (
                    "crashed",
                    Failure {
                        code: FailureCode::Internal,
                        message: format!("the gateway task driving this aggregation failed ({cause}); start it again"),
                    },
                ),
                Abandoned::Overran(limit) => (
                    "overran",
                    Failure {
                        code: FailureCode::DeadlineExceeded,
                        message: format!("the aggregation ran longer than the gateway's run limit ({limit:?})"),
                    },
                ),
            };
            tracing::error!(aggregation = %id, farm = %record.farm_id(), reason, message = %failure.message, "aggregation abandoned; the farm moves on");
            self.metrics.abandoned.get_or_create(&ReasonLabels { reason }).inc();
            let mut agg =
                Driven { store: self.store.as_ref(), activity: &self.activity, lease, record: (*record).clone() };
            if let Err(stop) = self.record(&mut agg, Outcome::Ended { state: State::Failed, failure }, None).await {
                tracing::warn!(aggregation = %id, reason = %stop, "could not record the abandoned aggregation");
            }
        })
    }
}

impl UpstreamRunner {
    /// A broken queue entry, logged, counted and taken off its farm's queue.
    async fn discard_broken(&self, id: &str, fault: &QueueFault, lease: &Lease) -> bool {
        tracing::error!(aggregation = id, farm = %lease.farm, fault = %fault, "an id in the farm's queue has no readable record; taking it off the queue so the farm moves on");
        self.metrics.store_corrupt.get_or_create(&ReasonLabels { reason: fault.name() }).inc();
        match fenced::discard(self.store.as_ref(), lease, id).await {
            Ok(()) => {
                self.activity.record_of(id, &lease.farm, What::Discarded { fault: fault.to_string() });
                true
            }
            Err(stop) => {
                tracing::warn!(aggregation = id, reason = %stop, "could not take the broken id off the farm's queue");
                false
            }
        }
    }

    /// The state machine: resume or start, follow, split when too large, record the end.
    async fn drive(&self, agg: &mut Driven<'_>) -> Result<(), Stop> {
        if !agg.record.split.is_empty() {
            // An earlier holder was running it as parts: go on where it left off.
            let (outcome, started) = self.run_split(agg, "recorded by an earlier holder").await?;
            return self.record(agg, outcome, started).await;
        }
        let resumed = match (agg.record.state, agg.record.upstream_id.clone(), agg.record.running_since) {
            (State::Running, Some(upstream_id), Some(since)) => {
                Some((upstream_id, Started::at(since, self.clock.now())))
            }
            _ => None,
        };
        // RUNNING without an upstream id: an earlier holder's Start may have reached the upstream.
        let unknown = agg.record.state == State::Running && resumed.is_none();
        let (outcome, started) = match resumed {
            Some((upstream_id, started)) => {
                tracing::info!(aggregation = %agg.record.id, upstream = %upstream_id, "resuming an aggregation an earlier holder started");
                (agg.unless_lost(self.follow(&agg.record, &upstream_id, started)).await?, Some(started))
            }
            None => match self.start(agg, unknown).await {
                Ok((upstream_id, started)) => {
                    (agg.unless_lost(self.follow(&agg.record, &upstream_id, started)).await?, Some(started))
                }
                Err(Interrupt::Fail(failure)) => (Outcome::Ended { state: State::Failed, failure }, None),
                Err(Interrupt::Stop(stop)) => return Err(stop),
            },
        };
        // Too large upstream: run it as parts, recorded in the aggregation (a holder that takes
        // over mid-split resumes them, above).
        let (outcome, started) = match outcome {
            Outcome::TooLarge { failure, .. } if self.config.split_max_parts > 1 && agg.record.key.may_split() => {
                self.run_split(agg, &failure.message).await?
            }
            Outcome::TooLarge { state, failure } => (Outcome::Ended { state, failure }, started),
            other => (other, started),
        };
        self.record(agg, outcome, started).await
    }

    /// Writes the terminal state, with the rows, and closes the lifecycle span.
    async fn record(&self, agg: &mut Driven<'_>, outcome: Outcome, started: Option<Started>) -> Result<(), Stop> {
        let c = &self.config;
        let now = self.clock.now();
        let r = &mut agg.record;
        let mut observed = None;
        let (state, failed, rows) = match outcome {
            Outcome::Completed { rows, message, parts } => {
                let started = started.unwrap_or_else(|| Started::now(now));
                r.parts = parts;
                let life = c.result_validity.saturating_sub(c.validity_margin);
                tracing::info!(aggregation = %r.id, rows = rows.len(), "aggregation completed");
                r.state = State::Completed;
                r.status_message = message.unwrap_or_default();
                r.row_count = rows.len() as u64;
                r.expire_time = Some(started.wall + life);
                r.data_time = Some(started.wall);
                let elapsed = now.duration_since(r.create_time).unwrap_or_default();
                self.metrics.time_to_complete.observe(elapsed.as_secs_f64());
                if let Some(predicted) = r.estimated_completion {
                    let error = now.duration_since(predicted).unwrap_or_else(|e| e.duration());
                    self.metrics.estimate_error.observe(error.as_secs_f64());
                }
                // What the farm's estimates learn from: the upstream Start's acceptance to
                // the rows in hand (pacing, polls and pages included); recorded once the
                // fenced finish landed, so a holder that paused past its lease (whose time
                // includes the pause) teaches nothing.
                let took = now.duration_since(started.wall).unwrap_or_default();
                observed = Some((super::coordination::run_model::size(r.key.request()), took));
                ("COMPLETED", false, Some(Arc::new(rows)))
            }
            Outcome::Ended { state, failure } | Outcome::TooLarge { state, failure } => {
                tracing::warn!(aggregation = %r.id, ?state, code = ?failure.code, message = %failure.message, "aggregation ended without results");
                r.state = state;
                r.status_message.clone_from(&failure.message);
                r.error = Some(failure);
                r.expire_time = Some(now + c.failed_ttl);
                r.data_time = Some(now);
                (if state == State::TimedOut { "TIMED_OUT" } else { "FAILED" }, true, None)
            }
        };
        agg.finish(rows).await?;
        if let Some((size, took)) = observed
            && let Err(e) = agg.store.observe_run(agg.record.farm_id(), size, took).await
        {
            tracing::debug!(error = %e, "cannot record the run time");
        }
        self.metrics.finished.get_or_create(&StateLabels { state }).inc();
        if agg.record.refresh {
            let outcome = if failed { "failed" } else { "completed" };
            self.metrics.refreshes.get_or_create(&OutcomeLabels { outcome }).inc();
        }
        self.spans.end(&agg.record.id, state, failed);
        Ok(())
    }

    /// One upstream call as a client span with its outcome, timed into the metrics.
    async fn call<T>(
        &self,
        operation: &'static str,
        agg: &AggregationRecord,
        upstream_id: Option<&str>,
        call: impl Future<Output = Result<T, UpstreamError>>,
    ) -> Result<T, UpstreamError> {
        let route = self.route_of(agg.farm_id());
        self.spans.of(agg).record("upstream.route", &*route);
        let span = tracing::info_span!(
            "upstream",
            otel.name = operation,
            otel.kind = "client",
            rpc.system = "aws-api",
            rpc.service = "deadline",
            rpc.method = operation,
            farm.id = %agg.farm_id(),
            aggregation.id = %agg.id,
            upstream.aggregation_id = upstream_id.unwrap_or_default(),
            upstream.route = %route,
            outcome = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let begin = Instant::now();
        let result = call.instrument(span.clone()).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(UpstreamError::Throttled { .. }) => "throttled",
            Err(UpstreamError::Invalid { .. }) => "invalid",
            Err(UpstreamError::NotFound { .. }) => "not_found",
            Err(UpstreamError::AccessDenied { .. }) => "access_denied",
            Err(UpstreamError::Transient { .. }) => "transient",
            Err(UpstreamError::OutcomeUnknown { .. }) => "outcome_unknown",
            Err(UpstreamError::NotRouted { .. }) => "not_routed",
            Err(UpstreamError::Other { .. }) => "other",
        };
        span.record("outcome", outcome);
        if result.is_err() {
            span.record("otel.status_code", "ERROR");
        }
        self.metrics.upstream(operation, outcome, &route, begin.elapsed());
        result
    }

    /// The route that serves `farm_id` now (the default one's name for a farm no longer
    /// routed: its calls fail as not routed).
    fn route_of(&self, farm_id: &str) -> crate::upstream::RouteName {
        self.upstream.route(farm_id).unwrap_or_else(|_| crate::upstream::default_route())
    }

    /// What `farm_id`'s upstream Starts wait on.
    fn start_pacer(&self, farm_id: &str) -> Arc<super::coordination::pacing::Pacer> {
        self.pacers.start(&self.route_of(farm_id))
    }

    /// What `farm_id`'s upstream Gets wait on.
    fn get_pacer(&self, farm_id: &str) -> Arc<super::coordination::pacing::Pacer> {
        self.pacers.get(&self.route_of(farm_id))
    }
}

/// The failure for an upstream error; `not_found` is the code a NotFound stands for here.
fn failure(context: &str, err: &UpstreamError, not_found: FailureCode) -> Failure {
    let code = match err {
        UpstreamError::Invalid { .. } => FailureCode::InvalidArgument,
        UpstreamError::NotFound { .. } => not_found,
        UpstreamError::AccessDenied { .. } => FailureCode::PermissionDenied,
        UpstreamError::Throttled { .. } | UpstreamError::Transient { .. } | UpstreamError::OutcomeUnknown { .. } => {
            FailureCode::Unavailable
        }
        UpstreamError::NotRouted { .. } => FailureCode::FailedPrecondition,
        UpstreamError::Other { .. } => FailureCode::Internal,
    };
    Failure { code, message: format!("{context}: {err}") }
}
