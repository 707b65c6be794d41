//! One way to retry every upstream call: take a pacing token before each attempt, bound the
//! attempt by the deadline, and after a refusal worth retrying wait the backoff's next delay or
//! the upstream's `Retry-After`, whichever is longer, unless that passes the deadline.

use crate::gateway::backoff::{Backoff, BackoffPolicy};
use crate::gateway::coordination::pacing::Pacer;
use crate::upstream::UpstreamError;
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

/// Why retrying stopped.
#[derive(Debug)]
pub(super) enum GaveUp {
    /// The upstream refused in a way retrying cannot change.
    Refused(UpstreamError),
    /// The next attempt would start past the deadline; the last refusal.
    Deadline(UpstreamError),
    /// An attempt was still unanswered at the deadline.
    Unanswered,
}

/// The attempts at one upstream call.
pub(super) struct Retry<'a> {
    pacer: &'a Pacer,
    backoff: Backoff,
    deadline: Instant,
}

impl<'a> Retry<'a> {
    /// Attempts paced by `pacer`, backing off by `policy`, until `deadline`.
    pub(super) fn new(pacer: &'a Pacer, policy: &BackoffPolicy, deadline: Instant) -> Self {
        Self { pacer, backoff: policy.start(), deadline }
    }

    /// Waits for the pacing token of the next attempt.
    pub(super) async fn ready(&self) {
        self.pacer.ready().await;
    }

    /// Moves the deadline later (never earlier).
    pub(super) fn extend_to(&mut self, at: Instant) {
        self.deadline = self.deadline.max(at);
    }

    /// Runs one attempt, bounded by the deadline.
    pub(super) async fn attempt<T>(
        &self,
        call: impl Future<Output = Result<T, UpstreamError>>,
    ) -> Result<Result<T, UpstreamError>, GaveUp> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        tokio::time::timeout(left, call).await.map_err(|_| GaveUp::Unanswered)
    }

    /// How long to wait after `err` before the next attempt, or why not to.
    pub(super) fn delay_after(&mut self, err: UpstreamError) -> Result<Duration, GaveUp> {
        let Some(hint) = err.retryable() else { return Err(GaveUp::Refused(err)) };
        let delay = self.backoff.next_delay().max(hint.unwrap_or_default());
        if Instant::now() + delay > self.deadline {
            return Err(GaveUp::Deadline(err));
        }
        Ok(delay)
    }

    /// Waits after `err` before the next attempt, or says why not to.
    pub(super) async fn back_off(&mut self, err: UpstreamError) -> Result<(), GaveUp> {
        let delay = self.delay_after(err)?;
        tokio::time::sleep(delay).await;
        Ok(())
    }

    /// Calls `call` until it succeeds, as above.
    pub(super) async fn run<T, F, Fut>(mut self, mut call: F) -> Result<T, GaveUp>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, UpstreamError>>,
    {
        loop {
            self.ready().await;
            match self.attempt(call()).await? {
                Ok(value) => return Ok(value),
                Err(err) => self.back_off(err).await?,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::rate::Rate;

    const POLICY: BackoffPolicy =
        BackoffPolicy { initial: Duration::from_secs(1), max: Duration::from_secs(8), multiplier: 2.0 };

    fn throttled(retry_after: Option<Duration>) -> UpstreamError {
        UpstreamError::Throttled { message: "busy".into(), retry_after }
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_worth_retrying_are_retried_until_one_succeeds() {
        let pacer = Pacer::new(Rate { per_second: 0.0, burst: 1 });
        let retry = Retry::new(&pacer, &POLICY, Instant::now() + Duration::from_secs(60));
        let mut calls = 0;
        let begin = Instant::now();
        let answer = retry
            .run(|| {
                calls += 1;
                let n = calls;
                async move { if n < 3 { Err(throttled(None)) } else { Ok(n) } }
            })
            .await;
        assert!(matches!(answer, Ok(3)), "{answer:?}");
        assert!(begin.elapsed() >= Duration::from_secs(1), "it backed off between attempts");
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_honoured_and_a_refusal_not_worth_retrying_is_final() {
        let pacer = Pacer::new(Rate { per_second: 0.0, burst: 1 });
        let mut retry = Retry::new(&pacer, &POLICY, Instant::now() + Duration::from_secs(60));
        assert_eq!(retry.delay_after(throttled(Some(Duration::from_secs(20)))).ok(), Some(Duration::from_secs(20)));
        let denied = UpstreamError::AccessDenied { message: "no".into() };
        assert!(matches!(retry.delay_after(denied), Err(GaveUp::Refused(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn no_attempt_starts_past_the_deadline_and_none_runs_past_it() {
        let pacer = Pacer::new(Rate { per_second: 0.0, burst: 1 });
        let begin = Instant::now();
        let mut retry = Retry::new(&pacer, &POLICY, begin + Duration::from_secs(10));
        assert!(matches!(retry.delay_after(throttled(Some(Duration::from_secs(11)))), Err(GaveUp::Deadline(_))));
        retry.extend_to(Instant::now() + Duration::from_secs(30));
        assert!(retry.delay_after(throttled(Some(Duration::from_secs(11)))).is_ok(), "the deadline moved");
        let hung = retry.attempt(std::future::pending::<Result<(), UpstreamError>>()).await;
        assert!(matches!(hung, Err(GaveUp::Unanswered)));
        assert_eq!(begin.elapsed(), Duration::from_secs(30), "given up at the (extended) deadline");
    }
}
