//! Driving one aggregation upstream: Start (waiting out throttling), poll with backoff until
//! terminal, then fetch every page at once (upstream results die an hour after the Start) and
//! hand the aggregation to the store's results cache.
//!
//! Never surfaces upstream errors to callers directly: they end up in the aggregation's state
//! and error. Every upstream call is a child span of the aggregation's lifecycle span, carrying
//! the farm, both aggregation ids and the outcome, and is counted in the metrics.

use super::aggregation::{Aggregation, Failure, FailureCode, State};
use super::backoff::BackoffPolicy;
use super::rows::{RowBlock, RowBlockBuilder, RowEncoder};
use super::scheduler::Runner;
use super::store::CoordinationStore;
use super::throttle::Pacer;
use crate::domain::AggregationStatus;
use crate::telemetry::Metrics;
use crate::telemetry::metrics::StateLabels;
use crate::upstream::{Upstream, UpstreamError, UpstreamPage};
use std::future::Future;
use std::pin::Pin;
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
    /// How long a throttled or unavailable Start is retried before the aggregation fails.
    pub start_deadline: Duration,
    /// Further attempts at one page after a transient failure (beyond the SDK's own retries).
    pub page_retries: u32,
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
    fn run(&self, aggregation: Arc<Aggregation>) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        let span = aggregation.span();
        Box::pin(self.drive(aggregation).instrument(span))
    }
}

impl UpstreamRunner {
    async fn drive(&self, agg: Arc<Aggregation>) {
        agg.update(|s| {
            s.state = State::Running;
            s.queue_position = 0;
        });
        tracing::info!(aggregation = %agg.id, farm = %agg.farm_id(), "aggregation running");
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
    /// the farm) and unavailability until the start deadline.
    async fn start(&self, agg: &Aggregation) -> Result<(String, Started), Failure> {
        let deadline = Instant::now() + self.config.start_deadline;
        let mut backoff = self.config.start_retry.start();
        loop {
            self.start_pacer.ready().await;
            let started = Started { wall: SystemTime::now(), mono: Instant::now() };
            let err = match self.call(START, agg, None, self.upstream.start(agg.key.request())).await {
                Ok(id) => {
                    agg.update(|s| s.upstream_id = Some(id.clone()));
                    agg.span().record("upstream.aggregation_id", id.as_str());
                    return Ok((id, started));
                }
                Err(e) => e,
            };
            let hint = match &err {
                UpstreamError::Throttled { retry_after, .. } | UpstreamError::Transient { retry_after, .. } => {
                    *retry_after
                }
                _ => {
                    return Err(failure("upstream Start failed", &err, FailureCode::NotFound));
                }
            };
            let delay = backoff.next_delay().max(hint.unwrap_or_default());
            if Instant::now() + delay > deadline {
                let message = format!("upstream kept refusing Start for {:?}: {err}", self.config.start_deadline);
                return Err(Failure { code: FailureCode::Unavailable, message });
            }
            tracing::debug!(aggregation = %agg.id, error = %err, ?delay, "upstream Start refused; waiting");
            tokio::time::sleep(delay).await;
        }
    }

    /// Polls until the upstream aggregation is terminal, then collects its rows.
    async fn follow(&self, agg: &Aggregation, upstream_id: &str, started: Started) -> Outcome {
        let first = match self.poll(agg, upstream_id, started).await {
            Ok(page) => page,
            Err(failure) => {
                return Outcome::Ended { state: State::Failed, failure };
            }
        };
        match first.status {
            AggregationStatus::Completed => match self.fetch_rest(agg, upstream_id, first).await {
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

    async fn poll(&self, agg: &Aggregation, upstream_id: &str, started: Started) -> Result<UpstreamPage, Failure> {
        let deadline = started.mono + self.config.result_validity;
        let mut backoff = self.config.poll.start();
        loop {
            tokio::time::sleep(backoff.next_delay()).await;
            if Instant::now() >= deadline {
                let message =
                    "the upstream aggregation did not finish while its results would have been valid".to_owned();
                return Err(Failure { code: FailureCode::DeadlineExceeded, message });
            }
            self.get_pacer.ready().await;
            let page = self.upstream.get_page(agg.farm_id(), upstream_id, UPSTREAM_PAGE_SIZE, None);
            match self.call(GET, agg, Some(upstream_id), page).await {
                Ok(page) if page.status == AggregationStatus::InProgress => {}
                Ok(page) => return Ok(page),
                Err(UpstreamError::Throttled { .. } | UpstreamError::Transient { .. }) => {}
                Err(e) => {
                    return Err(failure("upstream Get failed while polling", &e, FailureCode::Aborted));
                }
            }
        }
    }

    /// Every row, starting from the first page already in hand, encoded as it arrives.
    async fn fetch_rest(
        &self,
        agg: &Aggregation,
        upstream_id: &str,
        first: UpstreamPage,
    ) -> Result<(RowBlock, Option<String>), Failure> {
        let mut rows = RowBlockBuilder::new(self.encoder);
        first.rows.iter().for_each(|r| rows.push(r));
        let mut token = first.next_token;
        while let Some(t) = token.take() {
            let page = self.page(agg, upstream_id, &t).await?;
            page.rows.iter().for_each(|r| rows.push(r));
            token = page.next_token;
        }
        Ok((rows.finish(), first.status_message))
    }

    async fn page(&self, agg: &Aggregation, upstream_id: &str, token: &str) -> Result<UpstreamPage, Failure> {
        let mut backoff = self.config.start_retry.start();
        let mut attempts_left = self.config.page_retries;
        loop {
            self.get_pacer.ready().await;
            let page = self.upstream.get_page(agg.farm_id(), upstream_id, UPSTREAM_PAGE_SIZE, Some(token));
            match self.call(GET, agg, Some(upstream_id), page).await {
                Ok(page) => return Ok(page),
                Err(UpstreamError::Throttled { .. } | UpstreamError::Transient { .. }) if attempts_left > 0 => {
                    attempts_left -= 1;
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(e) => {
                    return Err(failure("upstream Get failed while fetching results", &e, FailureCode::Aborted));
                }
            }
        }
    }
}

/// The failure for an upstream error; `not_found` is the code a NotFound stands for here.
fn failure(context: &str, err: &UpstreamError, not_found: FailureCode) -> Failure {
    let code = match err {
        UpstreamError::Invalid { .. } => FailureCode::InvalidArgument,
        UpstreamError::NotFound { .. } => not_found,
        UpstreamError::AccessDenied { .. } => FailureCode::PermissionDenied,
        UpstreamError::Throttled { .. } | UpstreamError::Transient { .. } => FailureCode::Unavailable,
        UpstreamError::Other { .. } => FailureCode::Internal,
    };
    Failure { code, message: format!("{context}: {err}") }
}

fn ended(message: Option<String>, code: FailureCode, fallback: &str) -> Failure {
    Failure { code, message: message.filter(|m| !m.is_empty()).unwrap_or_else(|| fallback.to_owned()) }
}
