//! The request path: accept HTTP/1.1 and HTTP/2 (h2c), route by authority
//! and path, pick a weighted cluster, rewrite the headers, and hand the
//! request to the upstream layer stack ([`crate::stack`]). Upgrades
//! (WebSocket) are spliced once both sides have switched.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::call::{Body, Call};
use crate::client_body::{self, ClientFault};
use crate::config::Routing;
use crate::connection::{self, ClientLimits};
use crate::forward::{Forward, PoolConfig};
use crate::observe::local_reply;
use crate::outlier::Clock;
use crate::pick;
use crate::stack::{self, Stack};
use crate::{headers, tunnel};

/// The proxy's shared state: the routing snapshot in use and the upstream
/// layer stack with its connection pools.
pub struct Proxy {
    pub routing: ArcSwap<Routing>,
    /// Set once the first config is in.
    pub configured: AtomicBool,
    /// Set by /drain or SIGTERM: stop taking new connections.
    pub draining: AtomicBool,
    pub clock: Clock,
    /// What a client connection may take; its idle timeout also closes
    /// upgraded connections with no byte either way.
    pub limits: ClientLimits,
    /// Upgraded connections, which outlive the HTTP connections they
    /// came from; the drain waits for them within its grace period, then
    /// closes them (`tunnels_close`).
    tunnels: TaskTracker,
    tunnels_close: CancellationToken,
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
    pub fn new(default_timeout: Duration, limits: ClientLimits, pool: PoolConfig) -> Arc<Self> {
        let clock = Clock {
            epoch: Instant::now(),
        };
        let forward = Forward::new(pool);
        Arc::new(Self {
            routing: ArcSwap::from_pointee(Routing::default()),
            configured: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            clock,
            limits,
            tunnels: TaskTracker::new(),
            tunnels_close: CancellationToken::new(),
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

/// Where a request came from.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// What the forwarding headers say of it (and the scheme: `https` on
    /// a TLS listener), made once per connection.
    pub forwarding: headers::Forwarding,
}

impl Peer {
    pub fn new(addr: SocketAddr, scheme: &'static str) -> Self {
        Self {
            addr,
            forwarding: headers::Forwarding::new(addr, scheme),
        }
    }
}

/// Where a routed request goes, and how.
struct Routed {
    upstream: Arc<crate::config::Upstream>,
    timeout: Option<Duration>,
    retry: Option<Arc<crate::retry::RetryConfig>>,
    /// Whether the request's upgrade is tunnelled.
    upgrade: bool,
    /// The `host` to set: the authority the request was routed by, when
    /// it came in the URI (HTTP/2, or an HTTP/1.1 absolute form).
    host: Option<HeaderValue>,
}

/// Routes a request by its authority and path, or says why not.
/// A refusal is a local reply, boxed: the routed path stays small.
fn route(proxy: &Proxy, request: &Request<Incoming>) -> Result<Routed, Box<Response<Body>>> {
    let authority = match headers::authority(request.version(), request.uri(), request.headers()) {
        Ok(a) => a,
        Err(bad @ headers::BadHead::NoAuthority) => {
            metrics::counter!("ferry_proxy_local_replies_total", "reason" => "no_route")
                .increment(1);
            return Err(Box::new(local_reply(
                StatusCode::NOT_FOUND,
                &bad.to_string(),
            )));
        }
        Err(bad) => {
            metrics::counter!("ferry_proxy_local_replies_total", "reason" => bad.reason())
                .increment(1);
            return Err(Box::new(local_reply(
                StatusCode::BAD_REQUEST,
                &bad.to_string(),
            )));
        }
    };
    let routing = proxy.routing.load();
    let Some(host) = routing.virtual_host(authority) else {
        metrics::counter!("ferry_proxy_local_replies_total", "reason" => "no_route").increment(1);
        return Err(Box::new(local_reply(
            StatusCode::NOT_FOUND,
            &format!("no route for host {authority:?}"),
        )));
    };
    let path = request.uri().path();
    let Some(route) = host.routes.iter().find(|r| path.starts_with(&r.prefix)) else {
        metrics::counter!("ferry_proxy_local_replies_total", "reason" => "no_route").increment(1);
        return Err(Box::new(local_reply(
            StatusCode::NOT_FOUND,
            &format!("no route for path {path:?}"),
        )));
    };
    let key = route
        .hash_key
        .as_ref()
        .and_then(|k| k.value(request.headers()));
    let Some(target) = pick::cluster(&route.targets, key) else {
        return Err(Box::new(local_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "no cluster has weight",
        )));
    };
    let Some(upstream) = routing.upstreams.get(&target.cluster).cloned() else {
        metrics::counter!("ferry_proxy_local_replies_total", "reason" => "unknown_cluster")
            .increment(1);
        return Err(Box::new(local_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("cluster {} is not known (yet)", target.cluster),
        )));
    };
    // An upgrade the route allows is tunnelled; any other (h2c always) is
    // dropped and the request goes on as a plain one.
    let upgrade = match headers::upgrade_request(request.version(), request.headers()) {
        Some(asked) if headers::upgrade_allowed(&asked, &route.upgrades) => true,
        Some(_) => {
            metrics::counter!("ferry_proxy_upgrades_refused_total").increment(1);
            false
        }
        None => false,
    };
    // An HTTP/1.1 request in origin form has its host in `host` already.
    let host = request
        .uri()
        .authority()
        .and_then(|_| HeaderValue::from_str(authority).ok());
    Ok(Routed {
        upstream,
        timeout: route.timeout,
        retry: route.retry.clone(),
        upgrade,
        host,
    })
}

/// Routes and forwards one request.
pub async fn handle(
    proxy: Arc<Proxy>,
    mut request: Request<Incoming>,
    peer: &Peer,
) -> Response<Body> {
    let routed = match route(&proxy, &request) {
        Ok(routed) => routed,
        Err(reply) => return *reply,
    };
    let upgrade = routed.upgrade;
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
    let headers = request.headers_mut();
    headers::strip_hop_by_hop(headers, upgrade);
    // The host the request was routed by goes on as `host`.
    if let Some(host) = routed.host {
        headers.insert(header::HOST, host);
    }
    headers::forwarding_headers(headers, &peer.forwarding);
    let client_fault = ClientFault::default();
    let call = Call {
        request: request.map(|b| client_body::watched(b, client_fault.clone())),
        upstream: routed.upstream,
        timeout: routed.timeout,
        retry: routed.retry,
        endpoint: None,
        attempt: 0,
        client_fault,
    };
    let Ok(mut response) = proxy.stack.clone().oneshot(call).await;
    let switched = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    if switched && !upgrade {
        // Nothing asked to switch: a 101 would hand the client's
        // connection to the upstream unrouted.
        metrics::counter!("ferry_proxy_local_replies_total", "reason" => "unasked_upgrade")
            .increment(1);
        return local_reply(
            StatusCode::BAD_GATEWAY,
            "the upstream switched protocols without being asked",
        );
    }
    if headers::drop_conflicting_length(response.headers_mut()) {
        metrics::counter!("ferry_proxy_upstream_framing_fixed_total").increment(1);
    }
    headers::strip_hop_by_hop(response.headers_mut(), switched);
    if let (true, Some(downstream)) = (switched, downstream_upgrade) {
        proxy.tunnels.spawn(tunnel::splice(
            downstream,
            hyper::upgrade::on(&mut response),
            proxy.limits.idle_timeout,
            proxy.tunnels_close.clone(),
        ));
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
    proxy.tunnels.close();
    tokio::select! {
        _ = async { tokio::join!(connections.wait(), proxy.tunnels.wait()) } => {
            tracing::info!("all connections finished")
        }
        _ = tokio::time::sleep(grace) => tracing::warn!(
            connections = connections.len(),
            tunnels = proxy.tunnels.len(),
            "grace period over; closing the remaining connections"
        ),
    }
    proxy.tunnels_close.cancel();
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
        let peer = Peer::new(addr, scheme);
        let drain = shutdown.clone();
        let tls = listener.tls.clone();
        connections.spawn(async move {
            metrics::gauge!("ferry_proxy_active_connections").increment(1.0);
            match tls {
                None => connection::serve(stream, proxy, peer, drain).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => connection::serve(stream, proxy, peer, drain).await,
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
