//! Running an aggregation whose result the upstream finds too large as parts: halves (see
//! [`crate::domain::split`]), halved again while a part is still too large, up to
//! `split_max_parts`, one after another on the farm, their rows merged in order.

use super::fenced::{Driven, Stop};
use super::retry::{GaveUp, Retry};
use super::{Interrupt, Outcome, START, Started, UpstreamRunner, failure};
use crate::domain::AggregationRequest;
use crate::domain::split::halve;
use crate::gateway::record::{Failure, FailureCode, State};
use crate::gateway::rows::RowBlockBuilder;
use crate::upstream::UpstreamError;
use std::collections::VecDeque;
use tokio::time::Instant;
use tracing::Instrument as _;

impl UpstreamRunner {
    /// Runs the aggregation's request as parts and merges their rows. Before each part's Start
    /// a fenced write says which part runs, so a replaced holder stops before starting anything
    /// upstream. The outcome and the earliest part's start (the merged result expires with it).
    pub(super) async fn run_split(
        &self,
        agg: &mut Driven<'_>,
        whole: Failure,
    ) -> Result<(Outcome, Option<Started>), Stop> {
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
        let Some((_, halves)) = halve(agg.record.key.request()) else {
            return Ok((unsplittable(agg.record.key.request(), "is one part already"), None));
        };
        tracing::info!(aggregation = %agg.record.id, reason = %whole.message, "the upstream's result is too large; splitting");
        let mut todo: VecDeque<AggregationRequest> = halves.into_iter().collect();
        let (mut planned, mut done) = (2u32, 0u32);
        let mut rows = RowBlockBuilder::new(self.encoder);
        let mut earliest: Option<Started> = None;
        while let Some(part) = todo.pop_front() {
            let note =
                format!("the upstream's result was too large; split into {planned} parts, running part {}", done + 1);
            agg.set(|r| r.status_message = note).await?;
            let span = tracing::info_span!("part", part.index = done + 1, part.window = %describe(&part));
            let ran = async {
                let (upstream_id, started) = self.start_part(agg, &part).await?;
                Ok::<_, Interrupt>((self.follow(&agg.record, &upstream_id, started).await, started))
            }
            .instrument(span)
            .await;
            let (outcome, started) = match ran {
                Ok(ran) => ran,
                Err(Interrupt::Fail(failure)) => return Ok((Outcome::Ended { state: State::Failed, failure }, None)),
                Err(Interrupt::Stop(stop)) => return Err(stop),
            };
            match outcome {
                Outcome::Completed { rows: block, .. } => {
                    rows.append(&block);
                    done += 1;
                    self.metrics.split_parts.inc();
                    earliest =
                        Some(earliest.map_or(started, |e: Started| if started.wall < e.wall { started } else { e }));
                }
                Outcome::TooLarge { .. } => match halve(&part) {
                    Some((_, [a, b])) if planned < max => {
                        planned += 1;
                        todo.push_front(b);
                        todo.push_front(a);
                    }
                    Some(_) => return Ok((unsplittable(&part, &format!("reaches the limit of {max} parts")), None)),
                    None => return Ok((unsplittable(&part, "is a single bucket"), None)),
                },
                ended @ Outcome::Ended { .. } => return Ok((ended, None)),
            }
        }
        let message = format!("the upstream's result was too large; answered by {done} upstream aggregations, merged");
        Ok((Outcome::Completed { rows: rows.finish(), message: Some(message), parts: done }, earliest))
    }

    /// Starts one part upstream, waiting out throttling (the farm is busy, or an earlier
    /// part's Start of unknown outcome runs) until the start deadline, or the result validity
    /// after an unknown outcome. Writes nothing: the part is not the aggregation; but each
    /// attempt is made under a lease confirmed current, as the whole's Start is.
    async fn start_part(&self, driven: &Driven<'_>, part: &AggregationRequest) -> Result<(String, Started), Interrupt> {
        let agg = &driven.record;
        let c = &self.config;
        let mut retry = Retry::new(&self.start_pacer, &c.start_retry, Instant::now() + c.start_deadline);
        let gave_up = |gave_up| match gave_up {
            GaveUp::Refused(err) => failure("upstream Start of a part failed", &err, FailureCode::NotFound),
            GaveUp::Deadline(err) => Failure {
                code: FailureCode::Unavailable,
                message: format!("upstream kept refusing the Start of a part: {err}"),
            },
            GaveUp::Unanswered => Failure {
                code: FailureCode::Unavailable,
                message: "the upstream Start of a part was still unanswered at its deadline".to_owned(),
            },
        };
        loop {
            retry.ready().await;
            driven.confirm().await?;
            let started = Started::now(self.clock.now());
            let err = match retry.attempt(self.call(START, agg, None, self.upstream.start(part))).await {
                Ok(Ok(id)) => return Ok((id, started)),
                Ok(Err(err)) => err,
                Err(e) => return Err(Interrupt::Fail(gave_up(e))),
            };
            if matches!(err, UpstreamError::OutcomeUnknown { .. }) {
                self.metrics.start_outcome_unknown.inc();
                retry.extend_to(Instant::now() + c.result_validity);
            }
            retry.back_off(err).await.map_err(|e| Interrupt::Fail(gave_up(e)))?;
        }
    }
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
