//! Driving one aggregation upstream: Start (waiting out throttling), poll with backoff until
//! terminal, then fetch every page at once (upstream results die an hour after the Start) and
//! hand the terminal record and its rows to the store.
//!
//! Every write is the next state of the aggregation's record, fenced by the farm's lease: the
//! moment a newer holder exists, this one stops. A record found RUNNING is resumed where the
//! last holder left it: polling its upstream id, or, without one, as a Start whose outcome is
//! unknown.
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

use super::backoff::BackoffPolicy;
use super::coordination::Lease;
use super::coordination::StoreError;
use super::coordination::pacing::Pacer;
use super::coordination::{AggregationStore, Found, Written};
use super::record::{AggregationRecord, Failure, FailureCode, State};
use super::rows::{RowBlock, RowBlockBuilder, RowEncoder};
use super::scheduler::{Abandoned, BoxFuture, Runner};
use super::spans::Spans;
use crate::domain::{AggregationRequest, AggregationStatus};
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
    /// When the upstream says a result is too large: run the request as at most this many
    /// parts and merge their rows; 0 or 1 never splits.
    pub split_max_parts: u32,
}

/// What a Start waiting on a farm that may be busy with its own orphan says.
pub const OUTCOME_UNKNOWN_WAITING: &str = "previous Start's outcome unknown; waiting for the farm to be free";

/// A terminal outcome, before it is written to the aggregation.
enum Outcome {
    Completed { rows: RowBlock, message: Option<String>, parts: u32 },
    Ended { state: State, failure: Failure },
}

/// When the upstream aggregation was started, in both clocks.
#[derive(Clone, Copy)]
struct Started {
    wall: SystemTime,
    mono: Instant,
}

impl Started {
    fn now() -> Self {
        Self { wall: SystemTime::now(), mono: Instant::now() }
    }

    /// A start recorded by wall clock (perhaps by another replica).
    fn at(wall: SystemTime) -> Self {
        let ago = SystemTime::now().duration_since(wall).unwrap_or_default();
        Self { wall, mono: Instant::now().checked_sub(ago).unwrap_or_else(Instant::now) }
    }
}

/// Why a holder stops driving an aggregation before it is terminal.
#[derive(Debug, thiserror::Error)]
enum Stop {
    #[error("a newer holder of the farm's lease exists")]
    Fenced,
    #[error("the store could not take the write: {0}")]
    Store(StoreError),
}

/// The aggregation being driven: its record as last written, and the lease its writes carry.
struct Driven<'a> {
    store: &'a dyn AggregationStore,
    lease: Lease,
    record: AggregationRecord,
}

impl Driven<'_> {
    /// Changes the record and writes it, fenced.
    async fn set(&mut self, change: impl FnOnce(&mut AggregationRecord)) -> Result<(), Stop> {
        change(&mut self.record);
        match self.store.update(&self.lease, self.record.clone()).await {
            Ok(Written::Done) => Ok(()),
            Ok(Written::Fenced) => Err(Stop::Fenced),
            Err(e) => Err(Stop::Store(e)),
        }
    }
}

/// Runs aggregations against an [`Upstream`]; farm workers call it.
pub struct UpstreamRunner {
    pub(crate) upstream: Arc<dyn Upstream>,
    pub(crate) store: Arc<dyn AggregationStore>,
    pub(crate) start_pacer: Pacer,
    pub(crate) get_pacer: Pacer,
    pub(crate) config: LifecycleConfig,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) encoder: RowEncoder,
    pub(crate) spans: Arc<Spans>,
}

impl Runner for UpstreamRunner {
    fn run(self: Arc<Self>, record: Arc<AggregationRecord>, lease: Lease) -> BoxFuture {
        let span = self.spans.of(&record);
        Box::pin(
            async move {
                let id = record.id.clone();
                let mut agg = Driven { store: self.store.as_ref(), lease, record: (*record).clone() };
                if let Err(stop) = self.drive(&mut agg).await {
                    tracing::warn!(aggregation = %id, reason = %stop, "stopped driving the aggregation; another holder takes over");
                }
            }
            .instrument(span),
        )
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
            self.metrics.abandoned.get_or_create(&crate::telemetry::metrics::ReasonLabels { reason }).inc();
            let mut agg = Driven { store: self.store.as_ref(), lease, record: (*record).clone() };
            if let Err(stop) = self.record(&mut agg, Outcome::Ended { state: State::Failed, failure }, None).await {
                tracing::warn!(aggregation = %id, reason = %stop, "could not record the abandoned aggregation");
            }
        })
    }
}

impl UpstreamRunner {
    async fn drive(&self, agg: &mut Driven<'_>) -> Result<(), Stop> {
        let resumed = match (agg.record.state, agg.record.upstream_id.clone(), agg.record.running_since) {
            (State::Running, Some(upstream_id), Some(since)) => Some((upstream_id, Started::at(since))),
            _ => None,
        };
        // RUNNING without an upstream id: an earlier holder's Start may have reached the upstream.
        let unknown = agg.record.state == State::Running && resumed.is_none();
        let (outcome, started) = match resumed {
            Some((upstream_id, started)) => {
                tracing::info!(aggregation = %agg.record.id, upstream = %upstream_id, "resuming an aggregation an earlier holder started");
                (self.follow(&agg.record, &upstream_id, started).await, Some(started))
            }
            None => match self.start(agg, unknown).await? {
                Ok((upstream_id, started)) => (self.follow(&agg.record, &upstream_id, started).await, Some(started)),
                Err(failure) => (Outcome::Ended { state: State::Failed, failure }, None),
            },
        };
        // Too large upstream: run it as parts. A holder that takes over mid-split polls the
        // whole's upstream id again, finds it too large again, and splits afresh: parts are
        // never recorded as the whole's upstream aggregation.
        let (outcome, started) = match outcome {
            Outcome::Ended { state, failure }
                if self.config.split_max_parts > 1 && agg.record.key.may_split() && too_large(state, &failure) =>
            {
                self.run_split(agg, failure).await?
            }
            other => (other, started),
        };
        self.record(agg, outcome, started).await
    }

    /// Writes the terminal state, with the rows, and closes the lifecycle span.
    async fn record(&self, agg: &mut Driven<'_>, outcome: Outcome, started: Option<Started>) -> Result<(), Stop> {
        let c = &self.config;
        let now = SystemTime::now();
        let r = &mut agg.record;
        let (state, failed, rows) = match outcome {
            Outcome::Completed { rows, message, parts } => {
                let started = started.unwrap_or_else(Started::now);
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
                // the rows in hand (pacing, polls and pages included).
                let took = now.duration_since(started.wall).unwrap_or_default();
                let size = super::coordination::run_model::size(r.key.request());
                if let Err(e) = agg.store.observe_run(r.farm_id(), size, took).await {
                    tracing::debug!(error = %e, "cannot record the run time");
                }
                ("COMPLETED", false, Some(Arc::new(rows)))
            }
            Outcome::Ended { state, failure } => {
                tracing::warn!(aggregation = %r.id, ?state, code = ?failure.code, message = %failure.message, "aggregation ended without results");
                r.state = state;
                r.status_message.clone_from(&failure.message);
                r.error = Some(failure);
                r.expire_time = Some(now + c.failed_ttl);
                r.data_time = Some(now);
                (if state == State::TimedOut { "TIMED_OUT" } else { "FAILED" }, true, None)
            }
        };
        let written = agg.store.finish(&agg.lease, agg.record.clone(), rows).await;
        match written {
            Ok(Written::Done) => {
                self.metrics.finished.get_or_create(&StateLabels { state }).inc();
                if agg.record.refresh {
                    let outcome = if failed { "failed" } else { "completed" };
                    self.metrics.refreshes.get_or_create(&crate::telemetry::metrics::OutcomeLabels { outcome }).inc();
                }
                self.spans.end(&agg.record.id, state, failed);
                Ok(())
            }
            Ok(Written::Fenced) => Err(Stop::Fenced),
            Err(e) => Err(Stop::Store(e)),
        }
    }

    /// Runs the aggregation's request as parts (halves, halved again while a part is still too
    /// large, up to `split_max_parts`), one after another on this farm, and merges their rows
    /// in order. Before each part's Start a fenced write says which part runs, so a replaced
    /// holder stops before starting anything upstream. The outcome and the earliest part's
    /// start (the merged result expires with it).
    async fn run_split(&self, agg: &mut Driven<'_>, whole: Failure) -> Result<(Outcome, Option<Started>), Stop> {
        let max = self.config.split_max_parts;
        let unsplittable = |what: &AggregationRequest, why: &str| Outcome::Ended {
            state: State::Failed,
            failure: Failure {
                code: FailureCode::FailedPrecondition,
                message: format!(
                    "the upstream's result was too large ({}); the part {} {why} and cannot be split further \
                     without cutting a period bucket or a group; narrow the request",
                    whole.message,
                    describe(what),
                ),
            },
        };
        let Some((_, halves)) = super::split::halve(agg.record.key.request()) else {
            return Ok((unsplittable(agg.record.key.request(), "is one part already"), None));
        };
        tracing::info!(aggregation = %agg.record.id, reason = %whole.message, "the upstream's result is too large; splitting");
        let mut todo: std::collections::VecDeque<AggregationRequest> = halves.into_iter().collect();
        let (mut planned, mut done) = (2u32, 0u32);
        let mut rows = RowBlockBuilder::new(self.encoder);
        let mut earliest: Option<Started> = None;
        while let Some(part) = todo.pop_front() {
            let note =
                format!("the upstream's result was too large; split into {planned} parts, running part {}", done + 1);
            agg.set(|r| r.status_message = note).await?;
            let span = tracing::info_span!("part", part.index = done + 1, part.window = %describe(&part));
            let ran = async {
                let (upstream_id, started) = self.start_part(&agg.record, &part).await?;
                Ok::<_, Failure>((self.follow(&agg.record, &upstream_id, started).await, started))
            }
            .instrument(span)
            .await;
            let (outcome, started) = match ran {
                Ok(ran) => ran,
                Err(failure) => return Ok((Outcome::Ended { state: State::Failed, failure }, None)),
            };
            match outcome {
                Outcome::Completed { rows: block, .. } => {
                    rows.append(&block);
                    done += 1;
                    self.metrics.split_parts.inc();
                    earliest =
                        Some(earliest.map_or(started, |e: Started| if started.wall < e.wall { started } else { e }));
                }
                Outcome::Ended { state, failure } if too_large(state, &failure) => match super::split::halve(&part) {
                    Some((_, [a, b])) if planned < max => {
                        planned += 1;
                        todo.push_front(b);
                        todo.push_front(a);
                    }
                    Some(_) => return Ok((unsplittable(&part, &format!("reaches the limit of {max} parts")), None)),
                    None => return Ok((unsplittable(&part, "is a single bucket"), None)),
                },
                ended => return Ok((ended, None)),
            }
        }
        let message = format!("the upstream's result was too large; answered by {done} upstream aggregations, merged");
        Ok((Outcome::Completed { rows: rows.finish(), message: Some(message), parts: done }, earliest))
    }

    /// Starts one part upstream, waiting out throttling (the farm is busy, or an earlier
    /// part's Start of unknown outcome runs) until the start deadline, or the result validity
    /// after an unknown outcome. Writes nothing: the part is not the aggregation.
    async fn start_part(
        &self,
        agg: &AggregationRecord,
        part: &AggregationRequest,
    ) -> Result<(String, Started), Failure> {
        let c = &self.config;
        let begin = Instant::now();
        let mut deadline = begin + c.start_deadline;
        let mut backoff = c.start_retry.start();
        loop {
            self.start_pacer.ready().await;
            let started = Started::now();
            let err = match self.call(START, agg, None, self.upstream.start(part)).await {
                Ok(id) => return Ok((id, started)),
                Err(e) => e,
            };
            let Some(hint) = err.retryable() else {
                return Err(failure("upstream Start of a part failed", &err, FailureCode::NotFound));
            };
            if matches!(err, UpstreamError::OutcomeUnknown { .. }) {
                self.metrics.start_outcome_unknown.inc();
                deadline = deadline.max(Instant::now() + c.result_validity);
            }
            let delay = backoff.next_delay().max(hint.unwrap_or_default());
            if Instant::now() + delay > deadline {
                return Err(Failure {
                    code: FailureCode::Unavailable,
                    message: format!("upstream kept refusing the Start of a part: {err}"),
                });
            }
            tokio::time::sleep(delay).await;
        }
    }

    /// One upstream call as a client span with its outcome, timed into the metrics.
    async fn call<T>(
        &self,
        operation: &'static str,
        agg: &AggregationRecord,
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
    /// unknown (`unknown` from the start: an earlier holder's), for as long as the orphan it may
    /// have started can keep the farm busy.
    async fn start(&self, agg: &mut Driven<'_>, unknown: bool) -> Result<Result<(String, Started), Failure>, Stop> {
        let c = &self.config;
        let begin = Instant::now();
        let mut backoff = c.start_retry.start();
        let mut unknown_since: Option<Instant> = None;
        if unknown {
            unknown_since = Some(begin);
            agg.set(|r| r.status_message = OUTCOME_UNKNOWN_WAITING.to_owned()).await?;
        }
        loop {
            self.start_pacer.ready().await;
            if agg.record.state == State::Queued {
                agg.set(|r| {
                    r.state = State::Running;
                    r.running_since = Some(SystemTime::now());
                })
                .await?;
                tracing::info!(aggregation = %agg.record.id, farm = %agg.record.farm_id(), "aggregation running");
            }
            let started = Started::now();
            let err = match self.call(START, &agg.record, None, self.upstream.start(agg.record.key.request())).await {
                Ok(id) => {
                    let waited = unknown_since.is_some();
                    let model = self.store.run_model(agg.record.farm_id()).await.ok().flatten();
                    let predicted = model.and_then(|m| started.wall.checked_add(m.run_time(agg.record.key.request())));
                    agg.set(|r| {
                        r.upstream_id = Some(id.clone());
                        r.running_since = Some(started.wall);
                        r.estimated_completion = predicted;
                        if waited {
                            r.status_message.clear();
                        }
                    })
                    .await?;
                    tracing::Span::current().record("upstream.aggregation_id", id.as_str());
                    return Ok(Ok((id, started)));
                }
                Err(e) => e,
            };
            let Some(hint) = err.retryable() else {
                return Ok(Err(failure("upstream Start failed", &err, FailureCode::NotFound)));
            };
            if matches!(err, UpstreamError::OutcomeUnknown { .. }) {
                self.metrics.start_outcome_unknown.inc();
                tracing::warn!(aggregation = %agg.record.id, farm = %agg.record.farm_id(), error = %err, "upstream Start's outcome unknown; an upstream aggregation may be running");
                if unknown_since.is_none() {
                    unknown_since = Some(Instant::now());
                    agg.set(|r| r.status_message = OUTCOME_UNKNOWN_WAITING.to_owned()).await?;
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
                return Ok(Err(Failure { code: FailureCode::Unavailable, message }));
            }
            tracing::debug!(aggregation = %agg.record.id, error = %err, ?delay, "upstream Start refused; waiting");
            tokio::time::sleep(delay).await;
        }
    }

    /// Polls until the upstream aggregation is terminal, then collects its rows.
    /// `agg` names the aggregation in spans; the upstream one may be one of its parts.
    async fn follow(&self, agg: &AggregationRecord, upstream_id: &str, started: Started) -> Outcome {
        let expires = started.mono + self.config.result_validity;
        let first = match self.poll(agg, upstream_id, expires).await {
            Ok(page) => page,
            Err(failure) => {
                return Outcome::Ended { state: State::Failed, failure };
            }
        };
        match first.status {
            AggregationStatus::Completed => match self.fetch_rest(agg, upstream_id, first, expires).await {
                Ok((rows, message)) => Outcome::Completed { rows, message, parts: 1 },
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
    async fn poll(
        &self,
        agg: &AggregationRecord,
        upstream_id: &str,
        expires: Instant,
    ) -> Result<UpstreamPage, Failure> {
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
            // A call (the SDK retries inside it) never runs past the results' expiry: the
            // aggregation ends then, well before its supervisor would end it.
            let left = expires.saturating_duration_since(Instant::now());
            let answered = tokio::time::timeout(left, self.call(GET, agg, Some(upstream_id), page)).await;
            let answered = answered.unwrap_or_else(|_| {
                Err(UpstreamError::OutcomeUnknown {
                    message: format!(
                        "a status poll was still unanswered when the results would expire{}",
                        last_error.as_ref().map(|e| format!(" (the one before: {e})")).unwrap_or_default()
                    ),
                    retry_after: None,
                })
            });
            match answered {
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

    /// Every row of a COMPLETED aggregation, fetched again from the upstream with its recorded
    /// upstream id (the store lost them), while its results are still valid there.
    pub(crate) async fn refetch(&self, agg: &AggregationRecord) -> Result<RowBlock, Failure> {
        let lost = |message: String| Failure { code: FailureCode::NotFound, message };
        let upstream_id = agg.upstream_id.as_deref().ok_or_else(|| lost("no upstream id was recorded".to_owned()))?;
        let left = agg
            .expire_time
            .and_then(|at| at.duration_since(SystemTime::now()).ok())
            .ok_or_else(|| lost("its results have expired upstream too".to_owned()))?;
        let expires = Instant::now() + left;
        let first = self.page(agg, upstream_id, None, expires).await?;
        if first.status != AggregationStatus::Completed {
            return Err(lost(format!("the upstream aggregation is {:?}, not COMPLETED", first.status)));
        }
        let (rows, _) = self.fetch_rest(agg, upstream_id, first, expires).await?;
        if rows.len() as u64 != agg.row_count {
            return Err(lost(format!("the upstream returned {} rows, not the {} recorded", rows.len(), agg.row_count)));
        }
        Ok(rows)
    }

    /// Every row, starting from the first page already in hand, encoded as it arrives.
    async fn fetch_rest(
        &self,
        agg: &AggregationRecord,
        upstream_id: &str,
        first: UpstreamPage,
        expires: Instant,
    ) -> Result<(RowBlock, Option<String>), Failure> {
        let mut rows = RowBlockBuilder::new(self.encoder);
        first.rows.iter().for_each(|r| rows.push(r));
        let mut token = first.next_token;
        while let Some(t) = token.take() {
            let page = self.page(agg, upstream_id, Some(&t), expires).await?;
            page.rows.iter().for_each(|r| rows.push(r));
            token = page.next_token;
        }
        Ok((rows.finish(), first.status_message))
    }

    /// One page, retried (honouring `Retry-After`) until the upstream result expires.
    async fn page(
        &self,
        agg: &AggregationRecord,
        upstream_id: &str,
        token: Option<&str>,
        expires: Instant,
    ) -> Result<UpstreamPage, Failure> {
        let mut backoff = self.config.start_retry.start();
        loop {
            self.get_pacer.ready().await;
            let page = self.upstream.get_page(agg.farm_id(), upstream_id, UPSTREAM_PAGE_SIZE, token);
            let left = expires.saturating_duration_since(Instant::now());
            let err = match tokio::time::timeout(left, self.call(GET, agg, Some(upstream_id), page)).await {
                Ok(Ok(page)) => return Ok(page),
                Ok(Err(e)) => e,
                Err(_) => {
                    return Err(Failure {
                        code: FailureCode::Unavailable,
                        message: "a result page was still unanswered when the results would expire".to_owned(),
                    });
                }
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

/// Whether the upstream ended an aggregation (FAILED or TIMEOUT) because its result is too
/// large, as its status message says. A TIMEOUT that does not say why is not split: it may be
/// the upstream's own trouble, and splitting would multiply it.
fn too_large(state: State, failure: &Failure) -> bool {
    let upstream_ended = matches!(
        (state, failure.code),
        (State::Failed, FailureCode::FailedPrecondition) | (State::TimedOut, FailureCode::DeadlineExceeded)
    );
    let m = failure.message.to_ascii_lowercase();
    upstream_ended && ["too large", "too many", "exceed", "reduce the"].iter().any(|w| m.contains(w))
}

/// A request's window and resources, for messages and spans.
fn describe(r: &AggregationRequest) -> String {
    format!(
        "{} to {}, {} {}",
        r.start_time.to_rfc3339(),
        r.end_time.to_rfc3339(),
        r.resources.ids().len(),
        match r.resources {
            crate::domain::Resources::Queues(_) => "queues",
            crate::domain::Resources::Fleets(_) => "fleets",
        }
    )
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
