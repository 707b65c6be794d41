//! The server's request timeout, armed only when a request has to wait.
//!
//! tonic's own (`Server::timeout`) builds a Tokio sleep for every request as it arrives: a
//! clock reading and a handle on the timer for each call, although a cache hit is answered in
//! its first poll and never waits. This layer polls the request first and arms the timer only
//! when that poll is pending, so the deadline counts from the first time the request waits
//! (the first poll takes microseconds). Expiry fails the request with tonic's
//! [`tonic::TimeoutExpired`], which tonic's error recovery answers as CANCELLED, as before.
//! A caller's own `grpc-timeout` is still applied by tonic.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tower::{Layer, Service};

/// Fails a request that has not answered `timeout` after it first waited.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RequestTimeoutLayer(pub Duration);

impl<S> Layer<S> for RequestTimeoutLayer {
    type Service = RequestTimeout<S>;

    fn layer(&self, inner: S) -> RequestTimeout<S> {
        RequestTimeout { inner, timeout: self.0 }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct RequestTimeout<S> {
    inner: S,
    timeout: Duration,
}

impl<S, R> Service<R> for RequestTimeout<S>
where
    S: Service<R>,
    S::Error: Into<tower::BoxError>,
{
    type Response = S::Response;
    type Error = tower::BoxError;
    type Future = Answer<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: R) -> Self::Future {
        Answer { inner: self.inner.call(request), timeout: self.timeout, sleep: None }
    }
}

pin_project_lite::pin_project! {
    /// A request's answer, with its timer once it waited.
    pub(crate) struct Answer<F> {
        #[pin]
        inner: F,
        timeout: Duration,
        // Boxed: most answers never need it.
        sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl<F, T, E> Future for Answer<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<tower::BoxError>,
{
    type Output = Result<T, tower::BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(answer) = this.inner.poll(cx) {
            return Poll::Ready(answer.map_err(Into::into));
        }
        let timeout = *this.timeout;
        let sleep = this.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(tonic::TimeoutExpired(()).into())),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    /// Answers at once, or never.
    #[derive(Clone)]
    struct Answers(bool);

    impl Service<()> for Answers {
        type Response = &'static str;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<&'static str, Infallible>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, (): ()) -> Self::Future {
            if self.0 { Box::pin(async { Ok("answered") }) } else { Box::pin(std::future::pending()) }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_answered_at_once_never_arms_a_timer_and_one_that_hangs_times_out() {
        let mut quick = RequestTimeoutLayer(Duration::from_secs(90)).layer(Answers(true));
        let mut answer = std::pin::pin!(quick.call(()));
        let polled = std::future::poll_fn(|cx| Poll::Ready(answer.as_mut().poll(cx))).await;
        assert!(matches!(polled, Poll::Ready(Ok("answered"))));
        assert!(answer.sleep.is_none(), "no timer for an answer that did not wait");

        let mut hangs = RequestTimeoutLayer(Duration::from_secs(90)).layer(Answers(false));
        let begin = tokio::time::Instant::now();
        let err = hangs.call(()).await.expect_err("times out");
        assert!(err.is::<tonic::TimeoutExpired>(), "{err}");
        assert_eq!(begin.elapsed(), Duration::from_secs(90));
        let status = tonic::Status::from_error(err);
        assert_eq!(status.code(), tonic::Code::Cancelled);
    }
}
