//! The outermost layer: turns a failure into the local reply the user
//! gets, and records every request once (retries included) in the
//! cluster's Prometheus metrics and its load-report counters.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service};

use crate::call::{Body, Call, Failure};
use crate::config::Upstream;

/// A reply made by the proxy itself, marked as such.
pub fn local_reply(status: StatusCode, message: &str) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(format!("{message}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response.headers_mut().insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    response.headers_mut().insert(
        HeaderName::from_static("x-ferry-proxy"),
        HeaderValue::from_static("local-reply"),
    );
    response
}

/// The reply for a request that got no response. It names the cluster
/// and the kind of failure, never the upstream's own error text.
pub fn failure_reply(upstream: &Upstream, failure: &Failure) -> Response<Body> {
    let (status, what) = match failure {
        Failure::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, failure.to_string()),
        Failure::NoEndpoint => (StatusCode::SERVICE_UNAVAILABLE, failure.to_string()),
        Failure::Connect(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "connection to the endpoint failed".to_owned(),
        ),
        Failure::Reset(_) | Failure::Refused(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the endpoint reset the exchange".to_owned(),
        ),
        Failure::ClientBody(_) => {
            return local_reply(
                StatusCode::BAD_REQUEST,
                "the request body could not be read (malformed or incomplete)",
            );
        }
    };
    local_reply(status, &format!("upstream {}: {what}", upstream.name))
}

/// Records a finished request of `upstream`.
pub fn record(upstream: &Upstream, status: StatusCode, started: Instant) {
    let counter = if status.is_server_error() {
        &upstream.load.errors
    } else {
        &upstream.load.successful
    };
    counter.fetch_add(1, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let slot = ferry_xds_core::latency::slot_of_ms(elapsed.as_secs_f64() * 1000.0);
    if let Some(bucket) = upstream.load.latency.get(slot) {
        bucket.fetch_add(1, Ordering::Relaxed);
    }
    let class = usize::from((status.as_u16() / 100).clamp(1, 5)) - 1;
    upstream.metrics.requests[class].increment(1);
    upstream.metrics.duration.record(elapsed.as_secs_f64());
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ObserveLayer;

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
}

impl<S> Service<Call> for Observe<S>
where
    S: Service<Call, Response = Response<Body>, Error = Failure>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            // The inner services are always ready; a failure here shows
            // up again on the call.
            Poll::Ready(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let started = Instant::now();
        let upstream = call.upstream.clone();
        let future = self.inner.call(call);
        Box::pin(async move {
            let response = match future.await {
                Ok(response) => response,
                Err(failure @ Failure::ClientBody(_)) => {
                    // The client's own failure: its own class, and not in
                    // the load reports (neither success nor error).
                    upstream.metrics.downstream_errors.increment(1);
                    tracing::debug!(cluster = %upstream.name, %failure, "the client's request body failed");
                    return Ok(failure_reply(&upstream, &failure));
                }
                Err(failure) => {
                    if matches!(
                        failure,
                        Failure::Connect(_) | Failure::Reset(_) | Failure::Refused(_)
                    ) {
                        upstream.metrics.upstream_errors.increment(1);
                    }
                    tracing::debug!(cluster = %upstream.name, %failure, "no upstream response");
                    failure_reply(&upstream, &failure)
                }
            };
            record(&upstream, response.status(), started);
            Ok(response)
        })
    }
}
