//! Choosing an endpoint within a cluster: power of two choices over
//! peak-EWMA cost (as Finagle and linkerd2-proxy do). Each endpoint keeps
//! a latency estimate that jumps up to any slower observation at once and
//! decays toward faster ones over `DECAY`; idle time decays it toward zero,
//! so a slow endpoint is tried again after a while. The cost of sending
//! one more request is `estimate × (in flight + 1)`; of two endpoints drawn
//! at random the cheaper wins. Endpoints ejected by outlier detection or
//! failing active health checks are skipped.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use tower::{Layer, Service};

use crate::call::{Body, Call, Failure, Outcome, Tried};
use crate::config::{Endpoint, Upstream};
use crate::outlier::{self, Clock};

/// How fast the estimate forgets (linkerd's default).
pub const DECAY: Duration = Duration::from_secs(10);

/// The estimate of an endpoint nothing is known about yet.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);

/// A peak-sensitive, exponentially weighted moving average of latency.
#[derive(Debug)]
pub struct PeakEwma {
    state: Mutex<Estimate>,
}

#[derive(Debug, Clone, Copy)]
struct Estimate {
    nanos: f64,
    at: Instant,
}

impl Default for PeakEwma {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

impl PeakEwma {
    pub fn new(now: Instant) -> Self {
        Self {
            state: Mutex::new(Estimate {
                nanos: DEFAULT_RTT.as_nanos() as f64,
                at: now,
            }),
        }
    }

    fn decayed(e: Estimate, now: Instant, toward: f64) -> f64 {
        let elapsed = now.saturating_duration_since(e.at).as_secs_f64();
        let w = (-elapsed / DECAY.as_secs_f64()).exp();
        e.nanos * w + toward * (1.0 - w)
    }

    /// Takes in one response time.
    pub fn observe(&self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        let Ok(mut e) = self.state.lock() else {
            return;
        };
        e.nanos = if rtt > e.nanos {
            rtt
        } else {
            Self::decayed(*e, now, rtt)
        };
        e.at = now;
    }

    /// The estimate at `now`, in nanoseconds.
    pub fn estimate(&self, now: Instant) -> f64 {
        match self.state.lock() {
            Ok(e) => Self::decayed(*e, now, 0.0),
            Err(_) => DEFAULT_RTT.as_nanos() as f64,
        }
    }
}

/// What one more request to `endpoint` would cost.
pub fn cost(endpoint: &Endpoint, now: Instant) -> f64 {
    let pending = endpoint.outstanding.load(Ordering::Relaxed) as f64;
    endpoint.ewma.estimate(now).max(1.0) * (pending + 1.0)
}

/// Picks an endpoint of `upstream`: the cheaper of two drawn at random
/// among those not ejected and not `tried` by an earlier attempt of the
/// same request; failing that among those not ejected; failing that
/// among all.
pub fn pick(
    upstream: &Upstream,
    now: Instant,
    now_ms: u64,
    tried: Option<&Tried>,
) -> Option<Arc<Endpoint>> {
    let all = &upstream.endpoints;
    let usable = |e: &Endpoint| !e.health.ejected(now_ms) && e.probe.healthy();
    if tried.is_none() && all.iter().all(|e| usable(e)) {
        return p2c(all, now, rand::random());
    }
    let live: Vec<Arc<Endpoint>> = all.iter().filter(|e| usable(e)).cloned().collect();
    if let Some(tried) = tried {
        let fresh: Vec<Arc<Endpoint>> = live
            .iter()
            .filter(|e| !tried.contains(e.addr))
            .cloned()
            .collect();
        if !fresh.is_empty() {
            return p2c(&fresh, now, rand::random());
        }
    }
    if live.is_empty() {
        return p2c(all, now, rand::random());
    }
    p2c(&live, now, rand::random())
}

/// Power of two choices from the random `draw`.
pub fn p2c(endpoints: &[Arc<Endpoint>], now: Instant, draw: u64) -> Option<Arc<Endpoint>> {
    let n = endpoints.len();
    match n {
        0 => None,
        1 => endpoints.first().cloned(),
        _ => {
            let a = (draw % n as u64) as usize;
            let mut b = ((draw >> 32) % (n as u64 - 1)) as usize;
            if b >= a {
                b += 1;
            }
            let (ea, eb) = (&endpoints[a], &endpoints[b]);
            let pick = if cost(eb, now) < cost(ea, now) {
                eb
            } else {
                ea
            };
            Some(pick.clone())
        }
    }
}

/// Counts a request in flight at an endpoint until dropped: the count
/// ends with the response body, however it ends.
struct InFlight(Arc<Endpoint>);

impl InFlight {
    fn new(endpoint: Arc<Endpoint>) -> Self {
        endpoint.outstanding.fetch_add(1, Ordering::Relaxed);
        Self(endpoint)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The balancing layer: picks each attempt's endpoint, counts it in
/// flight, and feeds the answer's latency to the endpoint's estimate and
/// its outcome to outlier detection.
#[derive(Debug, Clone, Copy)]
pub struct BalanceLayer {
    pub clock: Clock,
}

impl<S> Layer<S> for BalanceLayer {
    type Service = Balance<S>;

    fn layer(&self, inner: S) -> Balance<S> {
        Balance {
            inner,
            clock: self.clock,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Balance<S> {
    inner: S,
    clock: Clock,
}

impl<S> Service<Call> for Balance<S>
where
    S: Service<Call, Response = http::Response<Body>, Error = Failure>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Failure;
    type Future = Pin<Box<dyn Future<Output = Outcome> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut call: Call) -> Self::Future {
        let started = Instant::now();
        let clock = self.clock;
        let tried = call.request.extensions().get::<Tried>();
        let Some(endpoint) = pick(&call.upstream, started, clock.ms(started), tried) else {
            return Box::pin(std::future::ready(Err(Failure::NoEndpoint)));
        };
        if let Some(tried) = tried {
            tried.add(endpoint.addr);
        }
        call.endpoint = Some(endpoint.clone());
        let upstream = call.upstream.clone();
        let in_flight = InFlight::new(endpoint.clone());
        let future = self.inner.call(call);
        Box::pin(async move {
            let result = future.await;
            let done = Instant::now();
            let outcome = match &result {
                Ok(response) => {
                    endpoint.ewma.observe(done - started, done);
                    if response.status().is_server_error() {
                        Some(outlier::Outcome::Failure)
                    } else {
                        Some(outlier::Outcome::Success)
                    }
                }
                // The client's broken body says nothing of the endpoint.
                Err(Failure::ClientBody(_)) => None,
                Err(_) => Some(outlier::Outcome::Failure),
            };
            if let Some(config) = &upstream.outlier
                && let Some(outcome) = outcome
                && let Some(time) = outlier::record(
                    config,
                    &upstream.endpoints,
                    &endpoint,
                    outcome,
                    clock.ms(done),
                )
            {
                upstream.metrics.ejections.increment(1);
                tracing::warn!(cluster = %upstream.name, endpoint = %endpoint.addr, ?time, "endpoint ejected: consecutive failures");
            }
            result.map(|response| {
                response.map(move |body| {
                    body.map_frame(move |frame| {
                        let _held = &in_flight;
                        frame
                    })
                    .boxed()
                })
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(n: u16) -> Vec<Arc<Endpoint>> {
        Endpoint::loopback(n)
    }

    #[test]
    fn the_estimate_jumps_to_a_peak_and_decays_back() {
        let t0 = Instant::now();
        let e = PeakEwma::new(t0);
        e.observe(Duration::from_millis(200), t0);
        assert!((e.estimate(t0) - 200e6).abs() < 1.0);
        // Fast answers pull it down over the decay time.
        let later = t0 + DECAY;
        e.observe(Duration::from_millis(10), later);
        let v = e.estimate(later);
        assert!(v < 200e6 && v > 10e6, "{v}");
        // Idle for long: toward zero.
        assert!(e.estimate(later + DECAY * 20) < 1e3);
    }

    #[test]
    fn the_cheaper_of_two_wins() {
        let now = Instant::now();
        let e = endpoints(2);
        e[0].ewma.observe(Duration::from_millis(100), now);
        e[1].ewma.observe(Duration::from_millis(1), now);
        for draw in 0..64u64 {
            let picked = p2c(&e, now, draw | (draw << 32)).map(|p| p.addr);
            assert_eq!(picked, Some(e[1].addr));
        }
        // Many requests in flight outweigh the better latency.
        e[1].outstanding.store(1_000, Ordering::Relaxed);
        assert_eq!(p2c(&e, now, 0).map(|p| p.addr), Some(e[0].addr));
    }

    #[test]
    fn ejected_endpoints_are_skipped_unless_all_are() {
        let now = Instant::now();
        let mut upstream = Upstream::for_tests("c", endpoints(3));
        let config = crate::outlier::OutlierConfig {
            consecutive_5xx: 1,
            max_ejection_percent: 100,
            ..Default::default()
        };
        let eps = upstream.endpoints.clone();
        for e in &eps[..2] {
            crate::outlier::record(&config, &eps, e, crate::outlier::Outcome::Failure, 0);
        }
        for _ in 0..100 {
            assert_eq!(
                pick(&upstream, now, 1, None).map(|e| e.addr),
                Some(eps[2].addr)
            );
        }
        crate::outlier::record(&config, &eps, &eps[2], crate::outlier::Outcome::Failure, 0);
        assert!(
            pick(&upstream, now, 1, None).is_some(),
            "all ejected: use them all"
        );
        upstream.endpoints.clear();
        assert!(pick(&upstream, now, 1, None).is_none());
    }

    #[test]
    fn a_retry_goes_to_an_endpoint_not_tried_yet() {
        let now = Instant::now();
        let upstream = Upstream::for_tests("c", endpoints(3));
        let eps = upstream.endpoints.clone();
        // The cheapest endpoint would win every draw it is in.
        eps[0].ewma.observe(Duration::from_micros(1), now);
        let tried = Tried::default();
        tried.add(eps[0].addr);
        for _ in 0..100 {
            let e = pick(&upstream, now, 0, Some(&tried)).map(|e| e.addr);
            assert_ne!(e, Some(eps[0].addr));
        }
        tried.add(eps[1].addr);
        tried.add(eps[2].addr);
        assert!(
            pick(&upstream, now, 0, Some(&tried)).is_some(),
            "all tried: any will do"
        );
    }
}
