//! The request path: accept HTTP/1.1 and HTTP/2 (h2c), route by authority
//! and path, pick a weighted cluster, rewrite the headers, and hand the
//! request to the upstream layer stack ([`crate::stack`]). Upgrades
//! (WebSocket) are spliced once both sides have switched.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::call::{Body, Call};
use crate::config::Routing;
use crate::forward::{Forward, PoolConfig};
use crate::observe::local_reply;
use crate::outlier::Clock;
use crate::pick;
use crate::stack::{self, Stack};

/// The proxy's shared state: the routing snapshot in use and the upstream
/// layer stack with its connection pools.
pub struct Proxy {
    pub routing: ArcSwap<Routing>,
    /// Set once the first config is in.
    pub configured: AtomicBool,
    /// Set by /drain or SIGTERM: stop taking new connections.
    pub draining: AtomicBool,
    pub clock: Clock,
    /// Client connections with no request for this long are closed.
    idle_timeout: Duration,
    stack: Stack,
    /// The stack's innermost layer, for health checks: one request to a
    /// given endpoint over the cluster's own protocol and TLS.
    pub forward: Forward,
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
    pub fn new(default_timeout: Duration, idle_timeout: Duration, pool: PoolConfig) -> Arc<Self> {
        let clock = Clock {
            epoch: Instant::now(),
        };
        let forward = Forward::new(pool);
        Arc::new(Self {
            routing: ArcSwap::from_pointee(Routing::default()),
            configured: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            clock,
            idle_timeout,
            stack: stack::build(forward.clone(), default_timeout, clock),
            forward,
        })
    }
}

impl Proxy {
    /// Calls `visit` with each cluster of the routing in use, every
    /// `period` until `shutdown`: the loop of the proxy's background work
    /// (health checks, TLS file reloads).
    pub async fn every_upstream(
        &self,
        period: Duration,
        shutdown: &CancellationToken,
        mut visit: impl FnMut(&Arc<crate::config::Upstream>),
    ) {
        let mut tick = tokio::time::interval(period.max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let routing = self.routing.load_full();
            for upstream in routing.upstreams.values() {
                visit(upstream);
            }
        }
    }
}

/// Headers that belong to one connection, not to the request. An upgrade
/// keeps `upgrade` and `connection: upgrade`.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| !(upgrade && *n == header::UPGRADE))
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
        if upgrade && (name == header::UPGRADE || name == header::CONNECTION) {
            continue;
        }
        headers.remove(name);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    // `te: trailers` is end to end (gRPC needs it); other values are not.
    if headers
        .get(header::TE)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(header::TE);
    }
}

/// All values of a header (as sent, whatever their bytes), joined as one
/// list with `last` appended.
fn appended(headers: &HeaderMap, name: &str, last: &str) -> Option<HeaderValue> {
    let mut list = Vec::new();
    for value in headers.get_all(name) {
        list.extend_from_slice(value.as_bytes());
        list.extend_from_slice(b", ");
    }
    list.extend_from_slice(last.as_bytes());
    HeaderValue::from_bytes(&list).ok()
}

/// Tells the service who asked: the peer's address appended to
/// `x-forwarded-for` and to `forwarded` (RFC 7239, with the scheme),
/// `x-forwarded-proto` set, and an `x-request-id` added when absent.
fn forwarding_headers(headers: &mut HeaderMap, peer: Peer) {
    let ip = peer.addr.ip();
    if let Some(v) = appended(headers, "x-forwarded-for", &ip.to_string()) {
        headers.insert(HeaderName::from_static("x-forwarded-for"), v);
    }
    let node = match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => format!("\"[{v6}]\""),
    };
    let element = format!("for={node};proto={}", peer.scheme);
    if let Some(v) = appended(headers, "forwarded", &element) {
        headers.insert(header::FORWARDED, v);
    }
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(peer.scheme),
    );
    if !headers.contains_key("x-request-id")
        && let Ok(v) = HeaderValue::from_str(&format!("{:032x}", rand::random::<u128>()))
    {
        headers.insert(HeaderName::from_static("x-request-id"), v);
    }
}

/// An HTTP/1.1 request asking to switch protocols (WebSocket).
fn wants_upgrade(request: &Request<Incoming>) -> bool {
    request.version() == http::Version::HTTP_11
        && request.headers().contains_key(header::UPGRADE)
        && request
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Joins the two upgraded connections once both sides have switched.
fn splice(downstream: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        let (down, up) = match tokio::try_join!(downstream, upstream) {
            Ok(both) => both,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        metrics::gauge!("ferry_proxy_upgraded_connections").increment(1.0);
        let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
        if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
            tracing::debug!(error = %e, "upgraded connection ended with an error");
        }
        metrics::gauge!("ferry_proxy_upgraded_connections").decrement(1.0);
    });
}

/// Where a request came from.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub addr: SocketAddr,
    /// `https` on a TLS listener.
    pub scheme: &'static str,
}

/// Routes and forwards one request.
pub async fn handle(
    proxy: Arc<Proxy>,
    mut request: Request<Incoming>,
    peer: Peer,
) -> Response<Body> {
    let routing = proxy.routing.load();
    let from_uri = request.uri().authority().is_some();
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
        return local_reply(
            StatusCode::NOT_FOUND,
            &format!("no route for host {:?}", authority.unwrap_or_default()),
        );
    };
    let path = request.uri().path();
    let Some(route) = host.routes.iter().find(|r| path.starts_with(&r.prefix)) else {
        metrics::counter!("ferry_proxy_local_replies_total", "reason" => "no_route").increment(1);
        return local_reply(StatusCode::NOT_FOUND, &format!("no route for path {path}"));
    };
    let key = route
        .hash_key
        .as_ref()
        .and_then(|k| k.value(request.headers()));
    let Some(target) = pick::cluster(&route.targets, key) else {
        return local_reply(StatusCode::SERVICE_UNAVAILABLE, "no cluster has weight");
    };
    let Some(upstream) = routing.upstreams.get(&target.cluster).cloned() else {
        metrics::counter!("ferry_proxy_local_replies_total", "reason" => "unknown_cluster")
            .increment(1);
        return local_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("cluster {} is not known (yet)", target.cluster),
        );
    };
    let (timeout, retry) = (route.timeout, route.retry.clone());
    drop(routing);

    let upgrade = wants_upgrade(&request);
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
    let headers = request.headers_mut();
    strip_hop_by_hop(headers, upgrade);
    // The host the request was routed by goes on as `host`; an HTTP/1.1
    // request in origin form has it there already.
    if from_uri
        && let Some(a) = authority
            .as_deref()
            .and_then(|a| HeaderValue::from_str(a).ok())
    {
        headers.insert(header::HOST, a);
    }
    forwarding_headers(headers, peer);
    let call = Call {
        request: request.map(|b| b.map_err(Into::into).boxed()),
        upstream,
        timeout,
        retry,
        endpoint: None,
        attempt: 0,
    };
    let Ok(mut response) = proxy.stack.clone().oneshot(call).await;
    let switched = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop(response.headers_mut(), switched && upgrade);
    if let (true, Some(downstream)) = (switched, downstream_upgrade) {
        splice(downstream, hyper::upgrade::on(&mut response));
    }
    response
}

/// A listener for user traffic: cleartext, or TLS terminated here.
pub struct Listener {
    pub tcp: TcpListener,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves user traffic on `listeners` until `shutdown`, then stops taking
/// connections and lets in-flight requests finish within `grace`.
pub async fn serve(
    listeners: Vec<Listener>,
    proxy: Arc<Proxy>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let connections = TaskTracker::new();
    let mut loops = tokio::task::JoinSet::new();
    for listener in listeners {
        loops.spawn(accept(
            listener,
            proxy.clone(),
            connections.clone(),
            shutdown.clone(),
        ));
    }
    // Each loop drops its listener when shutdown comes: new connections
    // are refused from then on, and each connection closes once its
    // requests are done (HTTP/2 peers get a GOAWAY).
    while loops.join_next().await.is_some() {}
    connections.close();
    proxy.draining.store(true, Ordering::SeqCst);
    tracing::info!(
        ?grace,
        connections = connections.len(),
        "draining: no new connections; finishing in-flight requests"
    );
    tokio::select! {
        _ = connections.wait() => tracing::info!("all connections finished"),
        _ = tokio::time::sleep(grace) => tracing::warn!(
            connections = connections.len(),
            "grace period over; closing the remaining connections"
        ),
    }
}

async fn accept(
    listener: Listener,
    proxy: Arc<Proxy>,
    connections: TaskTracker,
    shutdown: CancellationToken,
) {
    let scheme = if listener.tls.is_some() {
        "https"
    } else {
        "http"
    };
    loop {
        let (stream, addr) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.tcp.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let peer = Peer { addr, scheme };
        let drain = shutdown.clone();
        let tls = listener.tls.clone();
        connections.spawn(async move {
            metrics::gauge!("ferry_proxy_active_connections").increment(1.0);
            match tls {
                None => connection(TokioIo::new(stream), proxy, peer, drain).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            connection(TokioIo::new(stream), proxy, peer, drain).await
                        }
                        Ok(Err(e)) => {
                            metrics::counter!("ferry_proxy_tls_handshake_errors_total")
                                .increment(1);
                            tracing::debug!(error = %e, peer = %addr, "TLS handshake failed");
                        }
                        Err(_) => {
                            metrics::counter!("ferry_proxy_tls_handshake_errors_total")
                                .increment(1);
                            tracing::debug!(peer = %addr, "TLS handshake timed out");
                        }
                    }
                }
            }
            metrics::gauge!("ferry_proxy_active_connections").decrement(1.0);
        });
    }
}

/// What one client connection is doing: requests whose responses are not
/// finished, and when the last one finished.
#[derive(Debug)]
struct Activity {
    in_flight: AtomicUsize,
    /// Milliseconds since `since`.
    quiet_from_ms: AtomicU64,
    since: Instant,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            in_flight: AtomicUsize::new(0),
            quiet_from_ms: AtomicU64::new(0),
            since: Instant::now(),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// How long the connection has had no request in flight (zero while
    /// one is).
    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return Duration::ZERO;
        }
        let quiet_from = self.quiet_from_ms.load(Ordering::SeqCst);
        Duration::from_millis(self.now_ms().saturating_sub(quiet_from))
    }
}

/// Counts one request in flight on its connection until dropped, which
/// is when its response body ends (or the request is abandoned).
struct Busy(Arc<Activity>);

impl Busy {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::SeqCst);
        Self(activity.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0
            .quiet_from_ms
            .store(self.0.now_ms(), Ordering::SeqCst);
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serves one connection (HTTP/1.1 or HTTP/2, told apart by the preface)
/// until it ends, it has been idle for the idle timeout, or the drain
/// closes it; the last two close it gracefully, after the requests in
/// flight.
async fn connection<I>(io: I, proxy: Arc<Proxy>, peer: Peer, drain: CancellationToken)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let idle = proxy.idle_timeout;
    let activity = Activity::new();
    let busy = activity.clone();
    let service = hyper::service::service_fn(move |request| {
        let proxy = proxy.clone();
        let busy = Busy::new(&busy);
        async move {
            let response = handle(proxy, request, peer).await;
            Ok::<_, Infallible>(response.map(move |body| {
                body.map_frame(move |frame| {
                    let _held = &busy;
                    frame
                })
                .boxed()
            }))
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // HTTP/1.1: the wait for a request's head (on a kept-alive connection,
    // the idle time between requests) is bounded. HTTP/2: peers are pinged
    // and dropped when they stop answering.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(idle);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(idle / 2)
        .keep_alive_timeout(idle / 2);
    let connection = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(connection);
    // Idleness is checked a few times per idle timeout, so a connection
    // closes between 1 and 1.25 timeouts after its last response.
    let period = (idle / 4).max(Duration::from_millis(1));
    let mut check = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closing = false;
    loop {
        tokio::select! {
            ended = connection.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = drain.cancelled(), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = check.tick(), if !closing => {
                if activity.idle_for() >= idle {
                    metrics::counter!("ferry_proxy_idle_connections_closed_total").increment(1);
                    tracing::debug!(peer = %peer.addr, ?idle, "closing an idle client connection");
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_dropped() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "gzip"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-kept", "1"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);

        // `te: trailers` is end to end; an upgrade keeps its two headers.
        let mut h = headers(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("te", "trailers"),
        ]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn the_peer_is_appended_to_the_forwarding_headers() {
        let peer = Peer {
            addr: "10.1.2.3:5555".parse().unwrap(),
            scheme: "https",
        };
        let mut h = headers(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-for", "198.51.100.1"),
            ("forwarded", "for=203.0.113.9;proto=http"),
            ("x-forwarded-proto", "http"),
        ]);
        forwarding_headers(&mut h, peer);
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 198.51.100.1, 10.1.2.3");
        assert_eq!(
            h["forwarded"],
            "for=203.0.113.9;proto=http, for=10.1.2.3;proto=https"
        );
        assert_eq!(h["x-forwarded-proto"], "https");
        // Values that are not UTF-8 are kept as sent.
        let mut odd = HeaderMap::new();
        odd.insert(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"caf\xe9").unwrap(),
        );
        forwarding_headers(&mut odd, peer);
        assert_eq!(odd["x-forwarded-for"].as_bytes(), b"caf\xe9, 10.1.2.3");
        let id = h["x-request-id"].to_str().unwrap().to_owned();
        assert!(
            id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit()),
            "{id}"
        );
        // A request id the client sent is kept; IPv6 peers are quoted.
        let v6 = Peer {
            addr: "[2001:db8::1]:80".parse().unwrap(),
            scheme: "http",
        };
        let mut h = headers(&[("x-request-id", "abc")]);
        forwarding_headers(&mut h, v6);
        assert_eq!(h["x-request-id"], "abc");
        assert_eq!(h["forwarded"], "for=\"[2001:db8::1]\";proto=http");
        assert_eq!(h["x-forwarded-for"], "2001:db8::1");
    }
}
