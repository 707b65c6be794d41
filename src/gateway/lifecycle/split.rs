//! Running an aggregation whose result the upstream finds too large as parts: halves (see
//! [`crate::domain::split`]), halved again while a part is still too large, up to
//! `split_max_parts`, one after another on the farm, their rows merged in order.

use super::fenced::{Driven, Stop};
use super::retry::{GaveUp, Retry};
use super::{Interrupt, Outcome, START, Started, UpstreamRunner, failure};
use crate::domain::AggregationRequest;
use crate::domain::split::halve;
use crate::gateway::record::{Failure, FailureCode, Offer, SplitPart, State};
use crate::gateway::rows::RowBlockBuilder;
use crate::upstream::UpstreamError;
use tokio::time::Instant;
use tracing::Instrument as _;

impl UpstreamRunner {
    /// Runs the aggregation's request as parts and merges their rows. The parts are recorded
    /// in the aggregation (`split`) before any starts, each part's upstream aggregation as soon
    /// as it is accepted and each part once its rows are in hand, every write fenced: a holder
    /// that takes over resumes here, fetching the rows of finished parts again by their
    /// upstream ids and following a started part, never starting a part twice. `whole`: why
    /// the whole was refused. The outcome and the earliest part's start (the merged result
    /// expires with it).
    pub(super) async fn run_split(
        &self,
        agg: &mut Driven<'_>,
        whole: &str,
    ) -> Result<(Outcome, Option<Started>), Stop> {
        let max = self.config.split_max_parts;
        let request = agg.record.key.request().clone();
        let unsplittable = |what: &AggregationRequest, why: &str| Outcome::Ended {
            state: State::Failed,
            failure: Failure {
                code: FailureCode::FailedPrecondition,
                message: format!(
                    "the upstream's result was too large ({whole}); the part {} {why} and cannot be split further \
                     without cutting a period bucket or a group; narrow the request",
                    describe(what),
                ),
            },
        };
        if agg.record.split.is_empty() {
            let Some((_, halves)) = halve(&request) else {
                return Ok((unsplittable(&request, "is one part already"), None));
            };
            tracing::info!(aggregation = %agg.record.id, reason = %whole, "the upstream's result is too large; splitting");
            agg.set(|r| r.split = halves.iter().map(|h| SplitPart::of(h, &request)).collect()).await?;
        } else {
            let done = agg.record.split.iter().filter(|p| p.done).count();
            tracing::info!(aggregation = %agg.record.id, parts = agg.record.split.len(), done, "resuming a split aggregation where an earlier holder left it");
        }
        let mut rows = RowBlockBuilder::new(self.encoder);
        let mut earliest: Option<Started> = None;
        let mut i = 0;
        while let Some(part) = agg.record.split.get(i).cloned() {
            let planned = agg.record.split.len();
            let part_request = part.request(&request);
            if !part.done {
                let note =
                    format!("the upstream's result was too large; split into {planned} parts, running part {}", i + 1);
                agg.set(|r| r.status_message = note).await?;
            }
            let span = tracing::info_span!("part", part.index = i + 1, part.window = %describe(&part_request));
            let ran = async {
                let (upstream_id, started) = match &part.upstream {
                    Some((id, at)) => (id.clone(), Started::at(*at, self.clock.now())),
                    None => {
                        let (id, started) = self.start_part(agg, i, &part_request).await?;
                        if let Err(stop) = agg.set(|r| r.split[i].upstream = Some((id.clone(), started.wall))).await {
                            let offer = Offer { part: Some((i, part.clone())), upstream_id: id, started: started.wall };
                            self.offer(agg, offer).await;
                            return Err(stop.into());
                        }
                        (id, started)
                    }
                };
                let outcome = agg.unless_lost(self.follow(&agg.record, &upstream_id, started)).await?;
                Ok::<_, Interrupt>((outcome, started))
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
                    if !part.done {
                        self.metrics.split_parts.inc();
                        agg.set(|r| r.split[i].done = true).await?;
                    }
                    earliest =
                        Some(earliest.map_or(started, |e: Started| if started.wall < e.wall { started } else { e }));
                    i += 1;
                }
                Outcome::TooLarge { .. } => match halve(&part_request) {
                    Some((_, halves)) if (planned as u32) < max => {
                        let parts: Vec<SplitPart> = halves.iter().map(|h| SplitPart::of(h, &request)).collect();
                        agg.set(|r| {
                            r.split.splice(i..=i, parts);
                        })
                        .await?;
                    }
                    Some(_) => {
                        return Ok((unsplittable(&part_request, &format!("reaches the limit of {max} parts")), None));
                    }
                    None => return Ok((unsplittable(&part_request, "is a single bucket"), None)),
                },
                ended @ Outcome::Ended { .. } => return Ok((ended, None)),
            }
        }
        let done = agg.record.split.len() as u32;
        let message = format!("the upstream's result was too large; answered by {done} upstream aggregations, merged");
        Ok((Outcome::Completed { rows: rows.finish(), message: Some(message), parts: done }, earliest))
    }

    /// Starts one part upstream, waiting out throttling (the farm is busy, or an earlier
    /// part's Start of unknown outcome runs) until the start deadline, or the result validity
    /// after an unknown outcome. Writes nothing: the part is not the aggregation; but each
    /// attempt is made under a lease confirmed current, as the whole's Start is, and adopts
    /// the part's upstream aggregation instead when an earlier holder left one.
    async fn start_part(
        &self,
        driven: &Driven<'_>,
        index: usize,
        part: &AggregationRequest,
    ) -> Result<(String, Started), Interrupt> {
        let agg = &driven.record;
        let c = &self.config;
        let pacer = self.start_pacer(agg.farm_id());
        let mut retry = Retry::new(&pacer, &c.start_retry, Instant::now() + c.start_deadline);
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
            if let Some(offer) = driven.adoptable(Some(index)).await {
                self.adopted(driven, &offer.upstream_id);
                return Ok((offer.upstream_id, Started::at(offer.started, self.clock.now())));
            }
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
            driven.unless_lost(retry.back_off(err)).await?.map_err(|e| Interrupt::Fail(gave_up(e)))?;
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
