//! The request path: accept HTTP/1.1 and HTTP/2 (h2c), route by authority
//! and path, pick a weighted cluster and an endpoint, forward with pooled
//! upstream connections, stream bodies both ways.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Endpoint, Routing};
use crate::pick;

pub type Body = BoxBody<Bytes, hyper::Error>;

/// The proxy's shared state: the routing snapshot in use and the upstream
/// connection pool.
pub struct Proxy {
    pub routing: ArcSwap<Routing>,
    /// Set once the first config is in.
    pub configured: AtomicBool,
    /// Set by /drain or SIGTERM: stop taking new connections.
    pub draining: AtomicBool,
    client: Client<HttpConnector, Body>,
    default_timeout: Duration,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("configured", &self.configured)
            .field("draining", &self.draining)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    pub fn new(default_timeout: Duration) -> Arc<Self> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(1)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Arc::new(Self {
            routing: ArcSwap::from_pointee(Routing::default()),
            configured: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            client,
            default_timeout,
        })
    }
}

fn text(status: StatusCode, message: &str) -> Response<Body> {
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
        HeaderName::from_static("x-ferry-proxy"),
        HeaderValue::from_static("local-reply"),
    );
    response
}

/// Headers that belong to one connection, not to the request.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    // `te: trailers` is end to end (gRPC needs it); other values are not.
    if headers
        .get(header::TE)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(header::TE);
    }
}

/// Decrements an endpoint's in-flight count however the request ends.
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

fn class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Routes and forwards one request.
pub async fn handle(
    proxy: Arc<Proxy>,
    mut request: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let started = Instant::now();
    let routing = proxy.routing.load_full();
    let authority = request
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            request
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        });
    let Some(host) = authority.as_deref().and_then(|a| routing.virtual_host(a)) else {
        metrics::counter!("ferry_proxy_local_replies_total", "reason" => "no_route").increment(1);
        return text(
            StatusCode::NOT_FOUND,
            &format!("no route for host {:?}", authority.unwrap_or_default()),
        );
    };
    let path = request.uri().path().to_owned();
    let Some(route) = host.routes.iter().find(|r| path.starts_with(&r.prefix)) else {
        metrics::counter!("ferry_proxy_local_replies_total", "reason" => "no_route").increment(1);
        return text(StatusCode::NOT_FOUND, &format!("no route for path {path}"));
    };
    let key = route
        .hash_header
        .as_ref()
        .and_then(|h| request.headers().get(h))
        .map(|v| v.as_bytes().to_vec());
    let Some(target) = pick::cluster(&route.targets, key.as_deref()) else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "no cluster has weight");
    };
    let Some(upstream) = routing.upstreams.get(&target.cluster).cloned() else {
        metrics::counter!("ferry_proxy_local_replies_total", "reason" => "unknown_cluster")
            .increment(1);
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("cluster {} is not known (yet)", target.cluster),
        );
    };
    let Some(endpoint) = pick::endpoint(&upstream) else {
        metrics::counter!("ferry_proxy_local_replies_total", "reason" => "no_endpoint")
            .increment(1);
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("cluster {} has no healthy endpoint", target.cluster),
        );
    };

    // Rewrite for the upstream.
    let path_and_query = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".to_owned());
    let Ok(uri) = format!("http://{}{}", endpoint.addr, path_and_query).parse::<Uri>() else {
        return text(StatusCode::BAD_REQUEST, "malformed request target");
    };
    *request.uri_mut() = uri;
    *request.version_mut() = http::Version::HTTP_11;
    let headers = request.headers_mut();
    strip_hop_by_hop(headers);
    if let Some(a) = authority
        .as_deref()
        .and_then(|a| HeaderValue::from_str(a).ok())
    {
        headers.insert(header::HOST, a);
    }
    let forwarded_for = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prior) => format!("{prior}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&forwarded_for) {
        headers.insert(HeaderName::from_static("x-forwarded-for"), v);
    }
    if !headers.contains_key("x-request-id")
        && let Ok(v) = HeaderValue::from_str(&format!("{:032x}", rand::random::<u128>()))
    {
        headers.insert(HeaderName::from_static("x-request-id"), v);
    }
    let request = request.map(|b| b.boxed());

    let in_flight = InFlight::new(endpoint);
    let timeout = route.timeout.unwrap_or(proxy.default_timeout);
    let outcome = tokio::time::timeout(timeout, proxy.client.request(request)).await;
    let response = match outcome {
        Ok(Ok(response)) => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            // The endpoint's in-flight count ends when the body does.
            let guard = in_flight;
            let body = body
                .map_frame(move |frame| {
                    let _held = &guard;
                    frame
                })
                .boxed();
            Response::from_parts(parts, body)
        }
        Ok(Err(e)) => {
            metrics::counter!("ferry_proxy_upstream_errors_total", "service" => upstream.service.clone(), "cluster" => upstream.kube_cluster.clone())
                .increment(1);
            tracing::debug!(error = %e, cluster = %upstream.name, "upstream request failed");
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("upstream {} failed: {e}", upstream.name),
            )
        }
        Err(_) => text(
            StatusCode::GATEWAY_TIMEOUT,
            &format!(
                "upstream {} did not answer within {timeout:?}",
                upstream.name
            ),
        ),
    };
    finish(response, started, &upstream)
}

fn finish(
    response: Response<Body>,
    started: Instant,
    upstream: &crate::config::Upstream,
) -> Response<Body> {
    let status = response.status();
    let counter = if status.is_server_error() {
        &upstream.load.errors
    } else {
        &upstream.load.successful
    };
    counter.fetch_add(1, Ordering::Relaxed);
    let (service, cluster) = (upstream.service.as_str(), upstream.kube_cluster.as_str());
    metrics::counter!("ferry_proxy_requests_total", "service" => service.to_owned(), "cluster" => cluster.to_owned(), "class" => class(status))
        .increment(1);
    metrics::histogram!("ferry_proxy_request_duration_seconds", "service" => service.to_owned(), "cluster" => cluster.to_owned())
        .record(started.elapsed().as_secs_f64());
    response
}

/// Serves user traffic on `listener` until `shutdown`, then stops taking
/// connections and lets in-flight requests finish within `grace`.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        metrics::gauge!("ferry_proxy_active_connections").increment(1.0);
        let proxy = proxy.clone();
        let service = hyper::service::service_fn(move |request| {
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(handle(proxy, request, peer).await) }
        });
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
        let connection = graceful.watch(connection.into_owned());
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            metrics::gauge!("ferry_proxy_active_connections").decrement(1.0);
        });
    }
    proxy.draining.store(true, Ordering::SeqCst);
    // New connections are refused from here on.
    drop(listener);
    tracing::info!(
        ?grace,
        "draining: no new connections; finishing in-flight requests"
    );
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections finished"),
        _ = tokio::time::sleep(grace) => tracing::warn!("grace period over; closing the remaining connections"),
    }
}
