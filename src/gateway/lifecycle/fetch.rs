//! Following an upstream aggregation: polling its status with backoff until it is terminal,
//! then fetching every page at once (upstream results die an hour after the Start). Polls and
//! page fetches retry throttling and unavailability, honouring `Retry-After`, until the
//! upstream result itself expires: a completed result is not given up while the upstream
//! still holds it. Also fetching a completed result's rows again, when a shared store lost them.

use super::retry::{GaveUp, Retry};
use super::{GET, Outcome, Started, UpstreamRunner, failure};
use crate::domain::AggregationStatus;
use crate::gateway::record::{AggregationRecord, Failure, FailureCode, State};
use crate::gateway::rows::{RowBlock, RowBlockBuilder};
use crate::upstream::{UpstreamError, UpstreamPage};
use tokio::time::Instant;

/// The upstream's page size limit.
const UPSTREAM_PAGE_SIZE: u32 = 100;

impl UpstreamRunner {
    /// Polls until the upstream aggregation is terminal, then collects its rows.
    /// `agg` names the aggregation in spans; the upstream one may be one of its parts.
    pub(super) async fn follow(&self, agg: &AggregationRecord, upstream_id: &str, started: Started) -> Outcome {
        let expires = started.mono + self.config.result_validity;
        let first = match self.poll(agg, upstream_id, expires).await {
            Ok(page) => page,
            Err(failure) => return Outcome::Ended { state: State::Failed, failure },
        };
        if first.too_large() {
            let (state, code) = match first.status {
                AggregationStatus::Timeout => (State::TimedOut, FailureCode::DeadlineExceeded),
                _ => (State::Failed, FailureCode::FailedPrecondition),
            };
            let failure = ended(first.status_message, code, "the result is too large");
            return Outcome::TooLarge { state, failure };
        }
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
        let mut polls = self.config.poll.start();
        let pacer = self.get_pacer(agg.farm_id());
        let mut retry = Retry::new(&pacer, &self.config.start_retry, expires);
        let mut last_error: Option<String> = None;
        let mut delay = polls.next_delay();
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
            retry.ready().await;
            // A call (the SDK retries inside it) never runs past the results' expiry: the
            // aggregation ends then, well before its supervisor would end it.
            let page = self.upstream.get_page(agg.farm_id(), upstream_id, UPSTREAM_PAGE_SIZE, None);
            let answered = retry.attempt(self.call(GET, agg, Some(upstream_id), page)).await.unwrap_or_else(|_| {
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
                    delay = polls.next_delay();
                }
                Ok(page) => return Ok(page),
                Err(err) => {
                    let message = err.to_string();
                    delay = match retry.delay_after(err) {
                        Ok(delay) => delay,
                        Err(GaveUp::Refused(err)) => {
                            return Err(failure("upstream Get failed while polling", &err, FailureCode::Aborted));
                        }
                        // Past the expiry: the loop's check above says so with the last error.
                        Err(GaveUp::Deadline(_) | GaveUp::Unanswered) => {
                            expires.saturating_duration_since(Instant::now())
                        }
                    };
                    last_error = Some(message);
                }
            }
        }
    }

    /// Every row of a COMPLETED aggregation, fetched again from the upstream with its recorded
    /// upstream id (the store lost them), while its results are still valid there.
    pub(crate) async fn refetch(&self, agg: &AggregationRecord) -> Result<RowBlock, Failure> {
        let lost = |message: String| Failure { code: FailureCode::NotFound, message };
        // A split result: every part's upstream aggregation, in order; else the one.
        let upstream_ids: Vec<&str> = if agg.split.is_empty() {
            vec![agg.upstream_id.as_deref().ok_or_else(|| lost("no upstream id was recorded".to_owned()))?]
        } else {
            agg.split
                .iter()
                .map(|p| p.upstream.as_ref().map(|(id, _)| id.as_str()))
                .collect::<Option<_>>()
                .ok_or_else(|| lost("a part's upstream id was not recorded".to_owned()))?
        };
        let left = agg
            .expire_time
            .and_then(|at| at.duration_since(self.clock.now()).ok())
            .ok_or_else(|| lost("its results have expired upstream too".to_owned()))?;
        let expires = Instant::now() + left;
        let mut rows = RowBlockBuilder::new(self.encoder);
        for upstream_id in upstream_ids {
            let first = self.page(agg, upstream_id, None, expires).await?;
            if first.status != AggregationStatus::Completed {
                return Err(lost(format!("the upstream aggregation is {:?}, not COMPLETED", first.status)));
            }
            let (part, _) = self.fetch_rest(agg, upstream_id, first, expires).await?;
            rows.append(&part);
        }
        let rows = rows.finish();
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

    /// One page, retried until the upstream result expires.
    async fn page(
        &self,
        agg: &AggregationRecord,
        upstream_id: &str,
        token: Option<&str>,
        expires: Instant,
    ) -> Result<UpstreamPage, Failure> {
        let pacer = self.get_pacer(agg.farm_id());
        let retry = Retry::new(&pacer, &self.config.start_retry, expires);
        let fetched = retry
            .run(|| {
                let page = self.upstream.get_page(agg.farm_id(), upstream_id, UPSTREAM_PAGE_SIZE, token);
                self.call(GET, agg, Some(upstream_id), page)
            })
            .await;
        fetched.map_err(|gave_up| match gave_up {
            GaveUp::Refused(err) => failure("upstream Get failed while fetching results", &err, FailureCode::Aborted),
            GaveUp::Deadline(err) => Failure {
                code: FailureCode::Unavailable,
                message: format!("the upstream kept refusing result pages until the results expired: {err}"),
            },
            GaveUp::Unanswered => Failure {
                code: FailureCode::Unavailable,
                message: "a result page was still unanswered when the results would expire".to_owned(),
            },
        })
    }
}

fn ended(message: Option<String>, code: FailureCode, fallback: &str) -> Failure {
    Failure { code, message: message.filter(|m| !m.is_empty()).unwrap_or_else(|| fallback.to_owned()) }
}
