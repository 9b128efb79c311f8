//! Retries: the route's `retry_policy` says how many and on what; the
//! cluster's budget says whether one more is affordable now.
//!
//! - A connect failure is retried for any method: nothing was sent.
//! - A reset, a 5xx answer or a per-try timeout is retried only for
//!   idempotent methods (RFC 9110: GET, HEAD, OPTIONS, TRACE, PUT, DELETE).
//! - Never once any of the request body has gone upstream: the body is
//!   handed to one attempt at a time, and an attempt that has started
//!   reading it cannot be repeated. Bodies are never buffered for replay.
//! - Each retry waits a jittered backoff (25 ms base, doubling, ≤ 250 ms,
//!   as Envoy's default) and draws from the cluster's budget (20 % of its
//!   requests plus 10 per second); over budget, the failure stands.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use ferry_proto::envoy::config::route::v3::RetryPolicy;
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tower::retry::budget::Budget;

use crate::call::{Body, BoxError, Call, Failure, Tried};

/// A route's retry policy, from its xDS `retry_policy`.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    /// Retries after the first attempt.
    pub attempts: u32,
    pub connect_failure: bool,
    pub reset: bool,
    /// Any 5xx, and per-try timeouts.
    pub server_error: bool,
    /// 502, 503, 504.
    pub gateway_error: bool,
    pub per_try_timeout: Option<Duration>,
}

impl RetryConfig {
    /// Reads Envoy's `retry_on` conditions Ferry's proxy knows; unknown
    /// ones are refused, so a config is never half understood.
    pub fn from_xds(policy: &RetryPolicy) -> Result<Self, String> {
        let mut config = Self {
            attempts: policy.num_retries.as_ref().map(|n| n.value).unwrap_or(1),
            connect_failure: false,
            reset: false,
            server_error: false,
            gateway_error: false,
            per_try_timeout: policy
                .per_try_timeout
                .as_ref()
                .map(|d| {
                    Duration::new(
                        u64::try_from(d.seconds).unwrap_or(0),
                        u32::try_from(d.nanos).unwrap_or(0),
                    )
                })
                .filter(|d| !d.is_zero()),
        };
        for condition in policy
            .retry_on
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
        {
            match condition {
                "connect-failure" => config.connect_failure = true,
                "reset" | "reset-before-request" | "refused-stream" => config.reset = true,
                "5xx" => config.server_error = true,
                "gateway-error" => config.gateway_error = true,
                other => return Err(format!("retry_on: {other:?} is not supported")),
            }
        }
        Ok(config)
    }
}

/// Whether a request may be sent twice.
pub fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Why an attempt's result is worth retrying, if it is.
fn retriable(
    config: &RetryConfig,
    method: &Method,
    result: &Result<Response<Body>, Failure>,
) -> bool {
    match result {
        Err(Failure::Connect(_)) => config.connect_failure,
        Err(Failure::NoEndpoint | Failure::ClientBody(_)) => false,
        // A whole-request timeout ends the request; only a per-try one
        // leaves time for another attempt.
        Err(Failure::Timeout { per_try, .. }) => {
            *per_try && config.server_error && idempotent(method)
        }
        Err(Failure::Reset(_)) => config.reset && idempotent(method),
        // Nothing was processed: as safe as a connect failure.
        Err(Failure::Refused(_)) => config.reset || config.connect_failure,
        Ok(response) => {
            let status = response.status().as_u16();
            idempotent(method)
                && ((config.server_error && status >= 500)
                    || (config.gateway_error && matches!(status, 502..=504)))
        }
    }
}

/// A request body that goes to one attempt at a time: an attempt takes it
/// when it first reads it. Until then another attempt can still take it.
#[derive(Debug, Clone)]
pub struct Handoff {
    slot: Arc<Mutex<Slot>>,
}

#[derive(Debug)]
enum Slot {
    Waiting(Body),
    Taken,
}

impl Handoff {
    pub fn new(body: Body) -> Self {
        Self {
            slot: Arc::new(Mutex::new(Slot::Waiting(body))),
        }
    }

    /// Whether an attempt has started reading the body.
    pub fn taken(&self) -> bool {
        !matches!(self.slot.lock().as_deref(), Ok(Slot::Waiting(_)))
    }

    /// The body for one attempt.
    pub fn body(&self) -> Body {
        HandoffBody {
            slot: self.slot.clone(),
            body: None,
            end_stream: self.end_stream(),
        }
        .boxed()
    }

    fn end_stream(&self) -> bool {
        match self.slot.lock().as_deref() {
            Ok(Slot::Waiting(b)) => b.is_end_stream(),
            _ => false,
        }
    }
}

struct HandoffBody {
    slot: Arc<Mutex<Slot>>,
    body: Option<Body>,
    end_stream: bool,
}

impl HttpBody for HandoffBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.body.is_none() {
            let taken = match self.slot.lock() {
                Ok(mut slot) => std::mem::replace(&mut *slot, Slot::Taken),
                Err(_) => Slot::Taken,
            };
            match taken {
                Slot::Waiting(body) => self.body = Some(body),
                Slot::Taken => {
                    return Poll::Ready(Some(Err(
                        "the request body went to another attempt".into()
                    )));
                }
            }
        }
        match self.body.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.body {
            Some(b) => b.is_end_stream(),
            None => self.end_stream,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.body {
            Some(b) => b.size_hint(),
            None => match self.slot.lock().as_deref() {
                Ok(Slot::Waiting(b)) => b.size_hint(),
                _ => SizeHint::default(),
            },
        }
    }
}

/// A copy of `request` for another attempt, its body handed off.
fn copy(request: &Request<Body>, handoff: &Handoff) -> Request<Body> {
    let mut copy = Request::new(handoff.body());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    copy
}

/// Carried in a retriable request's extensions: the body's handoff.
#[derive(Debug, Clone)]
struct Replay(Handoff);

/// Prepares a call for retries: its body goes through a [`Handoff`].
pub fn prepare(mut call: Call) -> Call {
    if call.retry.as_ref().is_some_and(|r| r.attempts > 0) {
        let (mut parts, body) = call.request.into_parts();
        let handoff = Handoff::new(body);
        parts.extensions.insert(Replay(handoff.clone()));
        parts.extensions.insert(Tried::default());
        call.request = Request::from_parts(parts, handoff.body());
    }
    call
}

/// The tower retry policy.
#[derive(Debug, Clone, Default)]
pub struct Policy;

pub type Backoff = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The wait before retry `n` (1 for the first): 25 ms doubling, at most
/// 250 ms, fully jittered.
pub fn backoff(n: u32) -> Duration {
    let ceiling = Duration::from_millis(25)
        .saturating_mul(1u32 << n.saturating_sub(1).min(8))
        .min(Duration::from_millis(250));
    ceiling.mul_f64(rand::random::<f64>())
}

impl tower::retry::Policy<Call, Response<Body>, Failure> for Policy {
    type Future = Backoff;

    fn retry(
        &mut self,
        call: &mut Call,
        result: &mut Result<Response<Body>, Failure>,
    ) -> Option<Backoff> {
        let config = call.retry.clone()?;
        let Replay(handoff) = call.request.extensions().get::<Replay>()?.clone();
        if call.attempt >= config.attempts
            || handoff.taken()
            || !retriable(&config, call.request.method(), result)
        {
            return None;
        }
        let metrics = &call.upstream.metrics;
        if !call.upstream.budget.withdraw() {
            metrics.retries_refused.increment(1);
            tracing::debug!(cluster = %call.upstream.name, "retry refused: over budget");
            return None;
        }
        metrics.retries.increment(1);
        call.attempt += 1;
        tracing::debug!(cluster = %call.upstream.name, attempt = call.attempt, "retrying");
        Some(Box::pin(tokio::time::sleep(backoff(call.attempt))))
    }

    fn clone_request(&mut self, call: &Call) -> Option<Call> {
        let Replay(handoff) = call.request.extensions().get::<Replay>()?;
        if call.attempt == 0 {
            call.upstream.budget.deposit();
        }
        let mut request = copy(&call.request, handoff);
        request.extensions_mut().insert(Replay(handoff.clone()));
        if let Some(tried) = call.request.extensions().get::<Tried>() {
            request.extensions_mut().insert(tried.clone());
        }
        Some(Call {
            request,
            upstream: call.upstream.clone(),
            timeout: call.timeout,
            retry: call.retry.clone(),
            endpoint: None,
            attempt: call.attempt,
            client_fault: call.client_fault.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Empty, Full};

    fn config(retry_on: &str) -> RetryConfig {
        RetryConfig::from_xds(&RetryPolicy {
            retry_on: retry_on.to_owned(),
            num_retries: Some(ferry_proto::google::protobuf::UInt32Value { value: 2 }),
            ..Default::default()
        })
        .unwrap()
    }

    fn status(code: u16) -> Result<Response<Body>, Failure> {
        let mut r = Response::new(Empty::new().map_err(|e| match e {}).boxed());
        *r.status_mut() = http::StatusCode::from_u16(code).unwrap();
        Ok(r)
    }

    #[test]
    fn conditions_follow_envoy_names_and_unknown_ones_are_refused() {
        let c = config("5xx, connect-failure");
        assert!(c.server_error && c.connect_failure && !c.reset && !c.gateway_error);
        assert_eq!(c.attempts, 2);
        let e = RetryConfig::from_xds(&RetryPolicy {
            retry_on: "5xx,teapot".into(),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.contains("teapot"), "{e}");
    }

    #[test]
    fn only_idempotent_methods_retry_answers_and_resets() {
        let c = config("5xx,reset,connect-failure");
        assert!(retriable(&c, &Method::GET, &status(503)));
        assert!(retriable(&c, &Method::PUT, &status(500)));
        assert!(!retriable(&c, &Method::POST, &status(503)));
        assert!(!retriable(&c, &Method::GET, &status(404)));
        assert!(!retriable(
            &c,
            &Method::POST,
            &Err(Failure::Reset("x".into()))
        ));
        assert!(retriable(
            &c,
            &Method::POST,
            &Err(Failure::Connect("x".into()))
        ));
        // A refused stream was not processed: any method may go again.
        let refused = Err(Failure::Refused("x".into()));
        assert!(retriable(
            &config("refused-stream"),
            &Method::POST,
            &refused
        ));
        assert!(retriable(
            &config("connect-failure"),
            &Method::POST,
            &refused
        ));
        assert!(!retriable(&config("5xx"), &Method::GET, &refused));
        let gateway = config("gateway-error");
        assert!(retriable(&gateway, &Method::GET, &status(502)));
        assert!(!retriable(&gateway, &Method::GET, &status(500)));
        let whole = Err(Failure::Timeout {
            limit: Duration::from_secs(1),
            per_try: false,
        });
        assert!(!retriable(&c, &Method::GET, &whole));
    }

    #[tokio::test]
    async fn a_body_goes_to_one_attempt_and_a_read_body_cannot_be_replayed() {
        let handoff = Handoff::new(
            Full::new(Bytes::from_static(b"payload"))
                .map_err(|e| match e {})
                .boxed(),
        );
        let first = handoff.body();
        let second = handoff.body();
        assert!(!handoff.taken(), "nothing read yet: still replayable");
        let bytes = second.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"payload");
        assert!(handoff.taken());
        assert!(first.collect().await.is_err(), "the body is gone");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        for n in 1..12 {
            let d = backoff(n);
            assert!(d <= Duration::from_millis(250), "{n}: {d:?}");
        }
        assert!(backoff(1) <= Duration::from_millis(25));
    }
}
