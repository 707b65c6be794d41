//! Driving one aggregation upstream: Start (waiting out throttling), poll with backoff until
//! terminal, then fetch every page at once (upstream results die an hour after the Start) and
//! hand the aggregation to the store's results cache.
//!
//! A Start whose outcome is unknown (a timeout, a 5xx, a lost response) may have started an
//! upstream aggregation: the farm is then waited out for as long as such an orphan can live
//! (the result validity). Polls and page fetches retry throttling and unavailability, honouring
//! `Retry-After`, until the upstream result itself expires: a completed result is not given up
//! while the upstream still holds it.
//!
//! Never surfaces upstream errors to callers directly: they end up in the aggregation's state
//! and error. Every upstream call is a child span of the aggregation's lifecycle span, carrying
//! the farm, both aggregation ids and the outcome, and is counted in the metrics.

use super::aggregation::{Aggregation, Failure, FailureCode, State};
use super::backoff::BackoffPolicy;
use super::rows::{RowBlock, RowBlockBuilder, RowEncoder};
use super::scheduler::{BoxFuture, Runner};
use super::store::CoordinationStore;
use super::throttle::Pacer;
use crate::domain::AggregationStatus;
use crate::telemetry::Metrics;
use crate::telemetry::metrics::StateLabels;
use crate::upstream::{Upstream, UpstreamError, UpstreamPage};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tracing::Instrument as _;

/// The upstream's page size limit.
const UPSTREAM_PAGE_SIZE: u32 = 100;
const START: &str = "StartSessionsStatisticsAggregation";
const GET: &str = "GetSessionsStatisticsAggregation";

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
}

/// What a Start waiting on a farm that may be busy with its own orphan says.
pub const OUTCOME_UNKNOWN_WAITING: &str = "previous Start's outcome unknown; waiting for the farm to be free";

/// Why the farm's supervisor ended an aggregation its runner did not.
#[derive(Debug, Clone)]
pub enum Abandoned {
    /// The task driving it panicked (or ended without a terminal state).
    Crashed(String),
    /// It ran longer than the run limit.
    Overran(Duration),
}

/// A terminal outcome, before it is written to the aggregation.
enum Outcome {
    Completed { rows: RowBlock, message: Option<String> },
    Ended { state: State, failure: Failure },
}

/// When the upstream aggregation was started, in both clocks.
#[derive(Clone, Copy)]
struct Started {
    wall: SystemTime,
    mono: Instant,
}

/// Runs aggregations against an [`Upstream`]; the farm scheduler calls it.
pub struct UpstreamRunner {
    pub(crate) upstream: Arc<dyn Upstream>,
    pub(crate) store: Arc<dyn CoordinationStore>,
    pub(crate) start_pacer: Pacer,
    pub(crate) get_pacer: Pacer,
    pub(crate) config: LifecycleConfig,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) encoder: RowEncoder,
}

impl Runner for UpstreamRunner {
    fn run(self: Arc<Self>, aggregation: Arc<Aggregation>) -> BoxFuture {
        let span = aggregation.span();
        Box::pin(async move { self.drive(aggregation).await }.instrument(span))
    }

    fn abandon(&self, agg: &Arc<Aggregation>, why: Abandoned) {
        if agg.with_snapshot(|s| s.state.is_terminal()) {
            self.store.finish(agg);
            return;
        }
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
        tracing::error!(aggregation = %agg.id, farm = %agg.farm_id(), reason, message = %failure.message, "aggregation abandoned; the farm moves on");
        self.metrics.abandoned.get_or_create(&crate::telemetry::metrics::ReasonLabels { reason }).inc();
        self.record(agg, Outcome::Ended { state: State::Failed, failure }, None);
        self.store.finish(agg);
    }
}

impl UpstreamRunner {
    async fn drive(&self, agg: Arc<Aggregation>) {
        // At the head of the queue, but QUEUED until the Start is actually sent.
        agg.update(|s| s.queue_position = 0);
        let (outcome, started) = match self.start(&agg).await {
            Ok((id, started)) => (self.follow(&agg, &id, started).await, Some(started)),
            Err(failure) => (Outcome::Ended { state: State::Failed, failure }, None),
        };
        self.record(&agg, outcome, started);
        self.store.finish(&agg);
    }

    fn record(&self, agg: &Aggregation, outcome: Outcome, started: Option<Started>) {
        let c = &self.config;
        let (state, failed) = match outcome {
            Outcome::Completed { rows, message } => {
                let started = started.unwrap_or(Started { wall: SystemTime::now(), mono: Instant::now() });
                let life = c.result_validity.saturating_sub(c.validity_margin);
                tracing::info!(aggregation = %agg.id, rows = rows.len(), "aggregation completed");
                agg.update(|s| {
                    s.state = State::Completed;
                    s.status_message = message.unwrap_or_default();
                    s.rows = Some(Arc::new(rows));
                    s.expire_time = Some(started.wall + life);
                    s.expire_at = Some(started.mono + life);
                    s.data_at = Some(started.mono);
                });
                self.metrics.time_to_complete.observe(agg.created.elapsed().as_secs_f64());
                ("COMPLETED", false)
            }
            Outcome::Ended { state, failure } => {
                tracing::warn!(aggregation = %agg.id, ?state, code = ?failure.code, message = %failure.message, "aggregation ended without results");
                agg.update(|s| {
                    s.state = state;
                    s.status_message.clone_from(&failure.message);
                    s.error = Some(failure);
                    s.expire_time = Some(SystemTime::now() + c.failed_ttl);
                    s.expire_at = Some(Instant::now() + c.failed_ttl);
                    s.data_at = Some(Instant::now());
                });
                (if state == State::TimedOut { "TIMED_OUT" } else { "FAILED" }, true)
            }
        };
        self.metrics.finished.get_or_create(&StateLabels { state }).inc();
        agg.end_span(state, failed);
    }

    /// One upstream call as a client span with its outcome, timed into the metrics.
    async fn call<T>(
        &self,
        operation: &'static str,
        agg: &Aggregation,
        upstream_id: Option<&str>,
        call: impl Future<Output = Result<T, UpstreamError>>,
    ) -> Result<T, UpstreamError> {
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
            Err(UpstreamError::Other { .. }) => "other",
        };
        span.record("outcome", outcome);
        if result.is_err() {
            span.record("otel.status_code", "ERROR");
        }
        self.metrics.upstream(operation, outcome, begin.elapsed());
        result
    }

    /// Starts the upstream aggregation, waiting out throttling (another aggregation running on
    /// the farm) and unavailability until the start deadline, or, once a Start's outcome is
    /// unknown, for as long as the orphan it may have started can keep the farm busy.
    async fn start(&self, agg: &Aggregation) -> Result<(String, Started), Failure> {
        let c = &self.config;
        let begin = Instant::now();
        let mut backoff = c.start_retry.start();
        let mut unknown_since: Option<Instant> = None;
        loop {
            self.start_pacer.ready().await;
            if agg.with_snapshot(|s| s.state == State::Queued) {
                agg.update(|s| {
                    s.state = State::Running;
                    s.running_since = Some(Instant::now());
                });
                tracing::info!(aggregation = %agg.id, farm = %agg.farm_id(), "aggregation running");
            }
            let started = Started { wall: SystemTime::now(), mono: Instant::now() };
            let err = match self.call(START, agg, None, self.upstream.start(agg.key.request())).await {
                Ok(id) => {
                    agg.update(|s| {
                        s.upstream_id = Some(id.clone());
                        s.running_since = Some(Instant::now());
                        if unknown_since.is_some() {
                            s.status_message.clear();
                        }
                    });
                    agg.span().record("upstream.aggregation_id", id.as_str());
                    return Ok((id, started));
                }
                Err(e) => e,
            };
            let Some(hint) = err.retryable() else {
                return Err(failure("upstream Start failed", &err, FailureCode::NotFound));
            };
            if matches!(err, UpstreamError::OutcomeUnknown { .. }) {
                self.metrics.start_outcome_unknown.inc();
                tracing::warn!(aggregation = %agg.id, farm = %agg.farm_id(), error = %err, "upstream Start's outcome unknown; an upstream aggregation may be running");
                if unknown_since.is_none() {
                    unknown_since = Some(Instant::now());
                    agg.update(|s| s.status_message = OUTCOME_UNKNOWN_WAITING.to_owned());
                }
            }
            let deadline = match unknown_since {
                Some(at) => (begin + c.start_deadline).max(at + c.result_validity),
                None => begin + c.start_deadline,
            };
            let delay = backoff.next_delay().max(hint.unwrap_or_default());
            if Instant::now() + delay > deadline {
                let message = match unknown_since {
                    Some(_) => format!(
                        "an earlier upstream Start's outcome was unknown, so an aggregation of ours may have kept the \
                         farm busy; it stayed busy for as long as such an aggregation can live ({:?}); last error: {err}",
                        c.result_validity
                    ),
                    None => format!("upstream kept refusing Start for {:?}: {err}", c.start_deadline),
                };
                return Err(Failure { code: FailureCode::Unavailable, message });
            }
            tracing::debug!(aggregation = %agg.id, error = %err, ?delay, "upstream Start refused; waiting");
            tokio::time::sleep(delay).await;
        }
    }

    /// Polls until the upstream aggregation is terminal, then collects its rows.
    async fn follow(&self, agg: &Aggregation, upstream_id: &str, started: Started) -> Outcome {
        let expires = started.mono + self.config.result_validity;
        let first = match self.poll(agg, upstream_id, expires).await {
            Ok(page) => page,
            Err(failure) => {
                return Outcome::Ended { state: State::Failed, failure };
            }
        };
        match first.status {
            AggregationStatus::Completed => match self.fetch_rest(agg, upstream_id, first, expires).await {
                Ok((rows, message)) => Outcome::Completed { rows, message },
                Err(failure) => Outcome::Ended { state: State::Failed, failure },
            },
            AggregationStatus::Timeout => Outcome::Ended {
                state: State::TimedOut,
                failure: ended(
                    first.status_message,
                    FailureCode::DeadlineExceeded,
                    "the upstream aggregation timed out",
                ),
            },
            AggregationStatus::Failed | AggregationStatus::InProgress => Outcome::Ended {
                state: State::Failed,
                failure: ended(
                    first.status_message,
                    FailureCode::FailedPrecondition,
                    "the upstream aggregation failed",
                ),
            },
        }
    }

    /// Polls until the upstream aggregation leaves IN_PROGRESS or its results would expire.
    async fn poll(&self, agg: &Aggregation, upstream_id: &str, expires: Instant) -> Result<UpstreamPage, Failure> {
        let mut backoff = self.config.poll.start();
        let mut retry = self.config.start_retry.start();
        let mut last_error: Option<UpstreamError> = None;
        let mut delay = backoff.next_delay();
        loop {
            tokio::time::sleep(delay.min(expires.saturating_duration_since(Instant::now()))).await;
            if Instant::now() >= expires {
                return Err(match last_error {
                    Some(e) => Failure {
                        code: FailureCode::Unavailable,
                        message: format!("the upstream could not be polled before the results would expire: {e}"),
                    },
                    None => Failure {
                        code: FailureCode::DeadlineExceeded,
                        message: "the upstream aggregation did not finish while its results would have been valid"
                            .to_owned(),
                    },
                });
            }
            self.get_pacer.ready().await;
            let page = self.upstream.get_page(agg.farm_id(), upstream_id, UPSTREAM_PAGE_SIZE, None);
            match self.call(GET, agg, Some(upstream_id), page).await {
                Ok(page) if page.status == AggregationStatus::InProgress => {
                    last_error = None;
                    delay = backoff.next_delay();
                }
                Ok(page) => return Ok(page),
                Err(e) => match e.retryable() {
                    Some(hint) => {
                        delay = retry.next_delay().max(hint.unwrap_or_default());
                        last_error = Some(e);
                    }
                    None => return Err(failure("upstream Get failed while polling", &e, FailureCode::Aborted)),
                },
            }
        }
    }

    /// Every row, starting from the first page already in hand, encoded as it arrives.
    async fn fetch_rest(
        &self,
        agg: &Aggregation,
        upstream_id: &str,
        first: UpstreamPage,
        expires: Instant,
    ) -> Result<(RowBlock, Option<String>), Failure> {
        let mut rows = RowBlockBuilder::new(self.encoder);
        first.rows.iter().for_each(|r| rows.push(r));
        let mut token = first.next_token;
        while let Some(t) = token.take() {
            let page = self.page(agg, upstream_id, &t, expires).await?;
            page.rows.iter().for_each(|r| rows.push(r));
            token = page.next_token;
        }
        Ok((rows.finish(), first.status_message))
    }

    /// One page, retried (honouring `Retry-After`) until the upstream result expires.
    async fn page(
        &self,
        agg: &Aggregation,
        upstream_id: &str,
        token: &str,
        expires: Instant,
    ) -> Result<UpstreamPage, Failure> {
        let mut backoff = self.config.start_retry.start();
        loop {
            self.get_pacer.ready().await;
            let page = self.upstream.get_page(agg.farm_id(), upstream_id, UPSTREAM_PAGE_SIZE, Some(token));
            let err = match self.call(GET, agg, Some(upstream_id), page).await {
                Ok(page) => return Ok(page),
                Err(e) => e,
            };
            let Some(hint) = err.retryable() else {
                return Err(failure("upstream Get failed while fetching results", &err, FailureCode::Aborted));
            };
            let delay = backoff.next_delay().max(hint.unwrap_or_default());
            if Instant::now() + delay >= expires {
                return Err(Failure {
                    code: FailureCode::Unavailable,
                    message: format!("the upstream kept refusing result pages until the results expired: {err}"),
                });
            }
            tokio::time::sleep(delay).await;
        }
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
        UpstreamError::Other { .. } => FailureCode::Internal,
    };
    Failure { code, message: format!("{context}: {err}") }
}

fn ended(message: Option<String>, code: FailureCode, fallback: &str) -> Failure {
    Failure { code, message: message.filter(|m| !m.is_empty()).unwrap_or_else(|| fallback.to_owned()) }
}
