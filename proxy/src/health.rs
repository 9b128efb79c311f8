//! Active health checking, for clusters whose xDS `health_checks` hold an
//! HTTP check: every endpoint is probed with a GET of the check's path
//! each interval; `unhealthy_threshold` failed probes in a row (no 2xx
//! within the timeout) take it out of balancing, `healthy_threshold`
//! passed ones bring it back. Probes go the way requests do: the
//! cluster's protocol (HTTP/2 for gRPC) and TLS. Endpoints start healthy,
//! so adding checks never blacks a cluster out. The state lives in each endpoint and
//! survives config swaps.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::call::Call;
use crate::config::{Endpoint, Upstream};
use crate::forward::Forward;
use crate::server::Proxy;

/// A cluster's HTTP health check.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheckConfig {
    pub path: String,
    /// The `host` header of probes; the cluster's service when empty.
    pub host: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
}

/// One endpoint's probe record.
#[derive(Debug)]
pub struct Probe {
    healthy: AtomicBool,
    passes: AtomicU32,
    failures: AtomicU32,
    /// When the next probe is due, in ms of the proxy's clock.
    due_ms: AtomicU64,
    in_flight: AtomicBool,
}

impl Default for Probe {
    fn default() -> Self {
        Self {
            healthy: AtomicBool::new(true),
            passes: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            due_ms: AtomicU64::new(0),
            in_flight: AtomicBool::new(false),
        }
    }
}

impl Probe {
    /// Whether the endpoint passes its health checks (always, unchecked).
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Records one probe; returns the new state when it changed.
    pub fn record(&self, passed: bool, config: &HealthCheckConfig) -> Option<bool> {
        if passed {
            self.failures.store(0, Ordering::Relaxed);
            let passes = self.passes.fetch_add(1, Ordering::Relaxed) + 1;
            (!self.healthy() && passes >= config.healthy_threshold)
                .then(|| self.healthy.store(true, Ordering::Relaxed))
                .map(|()| true)
        } else {
            self.passes.store(0, Ordering::Relaxed);
            let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
            (self.healthy() && failures >= config.unhealthy_threshold)
                .then(|| self.healthy.store(false, Ordering::Relaxed))
                .map(|()| false)
        }
    }
}

/// Probes every checked endpoint of the routing in use until `shutdown`,
/// over the cluster's own protocol and TLS (as Envoy does when its
/// `codec_client_type` matches the cluster's, which Ferry's control plane
/// ensures).
pub async fn run(proxy: Arc<Proxy>, shutdown: CancellationToken) {
    let forward = proxy.forward.clone();
    let clock = proxy.clock;
    proxy
        .every_upstream(Duration::from_millis(100), &shutdown, |upstream| {
            let Some(check) = &upstream.health_check else {
                return;
            };
            let now_ms = clock.ms(Instant::now());
            for endpoint in &upstream.endpoints {
                let probe = &endpoint.probe;
                if now_ms < probe.due_ms.load(Ordering::Relaxed)
                    || probe.in_flight.swap(true, Ordering::Relaxed)
                {
                    continue;
                }
                let interval = u64::try_from(check.interval.as_millis()).unwrap_or(u64::MAX);
                probe
                    .due_ms
                    .store(now_ms.saturating_add(interval), Ordering::Relaxed);
                tokio::spawn(probe_once(
                    forward.clone(),
                    upstream.clone(),
                    endpoint.clone(),
                    check.clone(),
                ));
            }
        })
        .await;
}

async fn probe_once(
    forward: Forward,
    upstream: Arc<Upstream>,
    endpoint: Arc<Endpoint>,
    check: HealthCheckConfig,
) {
    let host = if check.host.is_empty() {
        upstream.service.as_str()
    } else {
        check.host.as_str()
    };
    let request = http::Request::get(check.path.as_str())
        .header(http::header::HOST, host)
        .header(http::header::USER_AGENT, "ferry-proxy-health-check")
        .body(Empty::new().map_err(|e| match e {}).boxed());
    let passed = match request {
        Ok(request) => {
            let call = Call {
                request,
                upstream: upstream.clone(),
                timeout: None,
                retry: None,
                endpoint: Some(endpoint.clone()),
                attempt: 0,
                client_fault: Default::default(),
            };
            // The answer is read whole, so its connection can be reused.
            let answer = async {
                let response = forward.oneshot(call).await.ok()?;
                let passed = response.status().is_success();
                response.into_body().collect().await.ok()?;
                Some(passed)
            };
            matches!(
                tokio::time::timeout(check.timeout, answer).await,
                Ok(Some(true))
            )
        }
        Err(_) => false,
    };
    let result = if passed { "pass" } else { "fail" };
    metrics::counter!("ferry_proxy_health_checks_total", "cluster" => upstream.name.clone(), "result" => result)
        .increment(1);
    match endpoint.probe.record(passed, &check) {
        Some(true) => {
            tracing::info!(cluster = %upstream.name, endpoint = %endpoint.addr, "health check: endpoint healthy again")
        }
        Some(false) => {
            tracing::warn!(cluster = %upstream.name, endpoint = %endpoint.addr, path = %check.path, "health check: endpoint unhealthy")
        }
        None => {}
    }
    endpoint.probe.in_flight.store(false, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> HealthCheckConfig {
        HealthCheckConfig {
            path: "/healthz".into(),
            host: String::new(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            unhealthy_threshold: 3,
            healthy_threshold: 2,
        }
    }

    #[test]
    fn thresholds_flip_the_state_and_streaks_restart() {
        let (probe, c) = (Probe::default(), config());
        assert!(probe.healthy());
        assert_eq!(probe.record(false, &c), None);
        assert_eq!(probe.record(false, &c), None);
        assert_eq!(probe.record(true, &c), None, "a pass restarts the count");
        assert_eq!(probe.record(false, &c), None);
        assert_eq!(probe.record(false, &c), None);
        assert_eq!(probe.record(false, &c), Some(false));
        assert!(!probe.healthy());
        assert_eq!(probe.record(true, &c), None);
        assert_eq!(probe.record(true, &c), Some(true));
        assert!(probe.healthy());
    }
}
