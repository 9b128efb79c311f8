//! The proxy's admin endpoint: `/ready`, `/config_dump`, `/metrics` and
//! `/drain`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::server::Proxy;

/// Renders the process's Prometheus metrics.
pub type RenderMetrics = Arc<dyn Fn() -> String + Send + Sync>;

#[derive(Clone)]
struct AdminState {
    proxy: Arc<Proxy>,
    metrics: RenderMetrics,
    drain: CancellationToken,
}

/// Serves the admin endpoint until `shutdown`; `/drain` cancels `drain`.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    metrics: RenderMetrics,
    drain: CancellationToken,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let state = AdminState {
        proxy,
        metrics,
        drain,
    };
    let app = Router::new()
        .route("/ready", get(ready))
        .route("/config_dump", get(config_dump))
        .route("/metrics", get(metrics_page))
        // GET too: a Kubernetes preStop hook can only GET.
        .route("/drain", post(drain_now).get(drain_now))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// 200 once the config is whole (routes and the clusters they name) and
/// the proxy is not draining.
async fn ready(State(s): State<AdminState>) -> impl IntoResponse {
    if s.proxy.draining.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else if s.proxy.configured.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no config yet\n")
    }
}

async fn metrics_page(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        (s.metrics)(),
    )
}

async fn drain_now(State(s): State<AdminState>) -> impl IntoResponse {
    s.drain.cancel();
    (StatusCode::OK, "draining\n")
}

#[derive(Serialize)]
struct Dump {
    route_config: String,
    versions: BTreeMap<&'static str, BTreeMap<String, String>>,
    upstreams: BTreeMap<String, Vec<UpstreamEndpoint>>,
}

#[derive(Serialize)]
struct UpstreamEndpoint {
    address: String,
    outstanding: u32,
    /// Ejected by outlier detection right now.
    ejected: bool,
    /// Ejections in a row (the backoff's exponent).
    ejections: u32,
    /// The balancer's peak-EWMA latency estimate.
    latency_ms: f64,
    /// Passes its active health checks (always, when unchecked).
    healthy: bool,
}

/// The config in use, with the version of every resource it came from.
async fn config_dump(State(s): State<AdminState>) -> impl IntoResponse {
    let routing = s.proxy.routing.load_full();
    let now = std::time::Instant::now();
    let now_ms = s.proxy.clock.ms(now);
    let upstreams = routing
        .upstreams
        .iter()
        .map(|(name, u)| {
            let endpoints = u
                .endpoints
                .iter()
                .map(|e| UpstreamEndpoint {
                    address: e.addr.to_string(),
                    outstanding: e.outstanding.load(Ordering::Relaxed),
                    ejected: e.health.ejected(now_ms),
                    ejections: e.health.ejections(),
                    latency_ms: (e.ewma.estimate(now) / 1e4).round() / 100.0,
                    healthy: e.probe.healthy(),
                })
                .collect();
            (name.clone(), endpoints)
        })
        .collect();
    axum::Json(Dump {
        route_config: routing.route_config.clone(),
        versions: routing.versions.clone(),
        upstreams,
    })
}
