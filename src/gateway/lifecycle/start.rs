//! The upstream Start of an aggregation: waiting out throttling (another aggregation running on
//! the farm) and unavailability until the start deadline, or, once a Start's outcome is unknown
//! (a timeout, a 5xx, a lost response: it may have started an upstream aggregation), for as long
//! as such an orphan can keep the farm busy (the result validity).

use super::fenced::Driven;
use super::retry::{GaveUp, Retry};
use super::{Interrupt, OUTCOME_UNKNOWN_WAITING, START, Started, UpstreamRunner, failure};
use crate::gateway::record::{Failure, FailureCode, Offer, State};
use crate::telemetry::metrics::OutcomeLabels;
use crate::upstream::UpstreamError;
use tokio::time::Instant;

impl UpstreamRunner {
    /// Starts `agg` upstream and records its upstream id; `unknown`: an earlier holder's Start
    /// may have reached the upstream. The upstream id, and when it was started.
    pub(super) async fn start(&self, agg: &mut Driven<'_>, unknown: bool) -> Result<(String, Started), Interrupt> {
        let c = &self.config;
        let begin = Instant::now();
        let pacer = self.start_pacer(agg.record.farm_id());
        let mut retry = Retry::new(&pacer, &c.start_retry, begin + c.start_deadline);
        let mut unknown_since = None;
        if unknown {
            self.waiting_out_an_orphan(agg, &mut retry, &mut unknown_since).await?;
        }
        loop {
            retry.ready().await;
            if agg.record.state == State::Queued {
                agg.set(|r| {
                    r.state = State::Running;
                    r.running_since = Some(self.clock.now());
                })
                .await?;
                tracing::info!(aggregation = %agg.record.id, farm = %agg.record.farm_id(), "aggregation running");
                let waited = self.clock.now().duration_since(agg.record.create_time).unwrap_or_default();
                let class = crate::telemetry::metrics::ClassLabels { class: agg.record.class_name() };
                self.metrics.queue_wait.get_or_create(&class).observe(waited.as_secs_f64());
            }
            // An earlier holder's Start the upstream accepted after that holder lost the farm:
            // followed, not started again.
            if let Some(offer) = agg.adoptable(None).await {
                let started = Started::at(offer.started, self.clock.now());
                self.adopted(agg, &offer.upstream_id);
                return self.started(agg, offer.upstream_id, started, unknown_since.is_some()).await;
            }
            // Only the farm's one holder may Start: a holder paused past its lease (or
            // superseded) stops here, before the upstream sees a second Start.
            agg.confirm().await?;
            let started = Started::now(self.clock.now());
            let call = self.call(START, &agg.record, None, self.upstream.start(agg.record.key.request()));
            let err = match retry.attempt(call).await {
                Ok(Ok(id)) => return self.started(agg, id, started, unknown_since.is_some()).await,
                Ok(Err(err)) => err,
                Err(gave_up) => return Err(self.start_failed(gave_up, unknown_since.is_some())),
            };
            if matches!(err, UpstreamError::OutcomeUnknown { .. }) {
                self.metrics.start_outcome_unknown.inc();
                tracing::warn!(aggregation = %agg.record.id, farm = %agg.record.farm_id(), error = %err, "upstream Start's outcome unknown; an upstream aggregation may be running");
                self.waiting_out_an_orphan(agg, &mut retry, &mut unknown_since).await?;
            }
            tracing::debug!(aggregation = %agg.record.id, error = %err, "upstream Start refused; waiting");
            agg.unless_lost(retry.back_off(err))
                .await?
                .map_err(|gave_up| self.start_failed(gave_up, unknown_since.is_some()))?;
        }
    }

    /// From the first unknown outcome on: the farm is waited out as long as an orphan lives,
    /// and the aggregation says so.
    async fn waiting_out_an_orphan(
        &self,
        agg: &mut Driven<'_>,
        retry: &mut Retry<'_>,
        unknown_since: &mut Option<Instant>,
    ) -> Result<(), Interrupt> {
        if unknown_since.is_none() {
            let now = Instant::now();
            *unknown_since = Some(now);
            retry.extend_to(now + self.config.result_validity);
            agg.set(|r| r.status_message = OUTCOME_UNKNOWN_WAITING.to_owned()).await?;
        }
        Ok(())
    }

    /// Records the upstream id of an accepted Start, with the predicted completion.
    async fn started(
        &self,
        agg: &mut Driven<'_>,
        id: String,
        started: Started,
        waited: bool,
    ) -> Result<(String, Started), Interrupt> {
        let model = self.store.run_model(agg.record.farm_id()).await.ok().flatten();
        let predicted = model.and_then(|m| started.wall.checked_add(m.run_time(agg.record.key.request())));
        let recorded = agg
            .set(|r| {
                r.upstream_id = Some(id.clone());
                r.running_since = Some(started.wall);
                r.estimated_completion = predicted;
                if waited {
                    r.status_message.clear();
                }
            })
            .await;
        if let Err(stop) = recorded {
            self.offer(agg, Offer { part: None, upstream_id: id, started: started.wall }).await;
            return Err(stop.into());
        }
        tracing::Span::current().record("upstream.aggregation_id", id.as_str());
        Ok((id, started))
    }

    /// Leaves the upstream aggregation of an accepted Start that the record could not take
    /// under the lease (it ran out, or a newer holder took the farm, while the upstream
    /// answered) for the farm's next holder to adopt.
    pub(super) async fn offer(&self, agg: &Driven<'_>, offer: Offer) {
        tracing::warn!(aggregation = %agg.record.id, upstream = %offer.upstream_id, "the lease was lost while the upstream accepted a Start; leaving its aggregation for the farm's next holder");
        let outcome = if agg.offer(offer).await { "left" } else { "lost" };
        self.metrics.start_offers.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// Counts and logs the adoption of an earlier holder's upstream aggregation.
    pub(super) fn adopted(&self, agg: &Driven<'_>, upstream_id: &str) {
        tracing::info!(aggregation = %agg.record.id, upstream = upstream_id, "adopting the upstream aggregation an earlier holder started but could not record");
        self.metrics.start_offers.get_or_create(&OutcomeLabels { outcome: "adopted" }).inc();
    }

    /// Why the aggregation fails when its Start is given up.
    fn start_failed(&self, gave_up: GaveUp, outcome_was_unknown: bool) -> Interrupt {
        let c = &self.config;
        Interrupt::Fail(match gave_up {
            GaveUp::Refused(err) => failure("upstream Start failed", &err, FailureCode::NotFound),
            GaveUp::Deadline(err) if outcome_was_unknown => Failure {
                code: FailureCode::Unavailable,
                message: format!(
                    "an earlier upstream Start's outcome was unknown, so an aggregation of ours may have kept the \
                     farm busy; it stayed busy for as long as such an aggregation can live ({:?}); last error: {err}",
                    c.result_validity
                ),
            },
            GaveUp::Deadline(err) => Failure {
                code: FailureCode::Unavailable,
                message: format!("upstream kept refusing Start for {:?}: {err}", c.start_deadline),
            },
            GaveUp::Unanswered => Failure {
                code: FailureCode::Unavailable,
                message: format!("an upstream Start was still unanswered after {:?}", c.start_deadline),
            },
        })
    }
}
