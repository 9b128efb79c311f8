//! Timeouts as a layer: one instance bounds the whole request (retries
//! included) by the route's timeout or the proxy's default; another bounds
//! each attempt by the retry policy's per-try timeout. A timeout bounds
//! the wait for the response head; a body then streams for as long as it
//! flows (idle upstream connections are closed by the pool).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tower::{Layer, Service};

use crate::call::{Call, Failure, Outcome};

/// Which limit a [`Timeout`] enforces.
#[derive(Debug, Clone, Copy)]
pub enum Limit {
    /// The route's timeout, else this default.
    Request { default: Duration },
    /// The retry policy's per-try timeout, if any.
    PerTry,
}

impl Limit {
    fn of(&self, call: &Call) -> Option<Duration> {
        match self {
            Self::Request { default } => Some(call.timeout.unwrap_or(*default)),
            Self::PerTry => call.retry.as_ref().and_then(|r| r.per_try_timeout),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct TimeoutLayer(pub Limit);

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            limit: self.0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Timeout<S> {
    inner: S,
    limit: Limit,
}

impl<S> Service<Call> for Timeout<S>
where
    S: Service<Call, Response = http::Response<crate::call::Body>, Error = Failure>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = Failure;
    type Future = Pin<Box<dyn Future<Output = Outcome> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let limit = self.limit.of(&call);
        let per_try = matches!(self.limit, Limit::PerTry);
        let future = self.inner.call(call);
        Box::pin(async move {
            match limit {
                None => future.await,
                Some(limit) => match tokio::time::timeout(limit, future).await {
                    Ok(outcome) => outcome,
                    Err(_) => Err(Failure::Timeout { limit, per_try }),
                },
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use http_body_util::{BodyExt, Empty};

    use crate::config::Upstream;

    fn call(timeout: Option<Duration>) -> Call {
        Call {
            request: http::Request::new(Empty::new().map_err(|e| match e {}).boxed()),
            upstream: Arc::new(Upstream::for_tests("c", vec![])),
            timeout,
            retry: None,
            endpoint: None,
            attempt: 0,
            client_fault: Default::default(),
        }
    }

    /// An inner service that answers after `delay`.
    fn slow(
        delay: Duration,
    ) -> impl Service<
        Call,
        Response = http::Response<crate::call::Body>,
        Error = Failure,
        Future = Pin<Box<dyn Future<Output = Outcome> + Send>>,
    > + Clone {
        tower::service_fn(
            move |_call: Call| -> Pin<Box<dyn Future<Output = Outcome> + Send>> {
                Box::pin(async move {
                    tokio::time::sleep(delay).await;
                    Ok(http::Response::new(
                        Empty::new().map_err(|e| match e {}).boxed(),
                    ))
                })
            },
        )
    }

    #[tokio::test(start_paused = true)]
    async fn the_route_timeout_wins_over_the_default() {
        let limit = Limit::Request {
            default: Duration::from_secs(10),
        };
        let mut svc = TimeoutLayer(limit).layer(slow(Duration::from_secs(3)));
        let r = svc.call(call(Some(Duration::from_secs(1)))).await;
        assert!(matches!(
            r,
            Err(Failure::Timeout { per_try: false, limit }) if limit == Duration::from_secs(1)
        ));
        assert!(svc.call(call(None)).await.is_ok(), "3 s < the 10 s default");
    }

    #[tokio::test(start_paused = true)]
    async fn no_per_try_limit_without_a_retry_policy() {
        let mut svc = TimeoutLayer(Limit::PerTry).layer(slow(Duration::from_secs(100)));
        assert!(svc.call(call(None)).await.is_ok());
    }
}
