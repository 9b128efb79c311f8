//! HTTP/1.1 connections to endpoints, kept alive between requests.
//!
//! A request takes an idle connection of its endpoint (the most recently
//! used first) or, when there is none, makes a new one; the connection
//! goes back once its response has been read to a clean end. A response
//! that failed, was dropped before its end, or switched protocols leaves
//! its connection out, and hyper closes it. Each endpoint keeps at most
//! `max_idle_per_endpoint` idle connections; one idle for the pool's idle
//! timeout is closed, even in a pool nobody calls any more.
//!
//! Each connection is driven by one task of its own, spawned when it is
//! made; a request's exchange runs in the request's own task (hyper-util's
//! pool spawns a task per request to wait for the connection to be ready
//! again). The pool is keyed by the endpoint the balancer chose, so a
//! request keeps the `Host` the client sent.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{Builder, Connection, SendRequest};
use tower::{Service, ServiceExt};

use crate::call::{Body, BoxError, Failure};
use crate::forward::{MAX_RESPONSE_HEAD, PoolConfig, chain};

/// Numbers connections, so a driver can find its own among the idle.
static NEXT_CONN: AtomicU64 = AtomicU64::new(0);

/// What a pool counts of the connections it makes for one cluster.
#[derive(Debug, Clone)]
pub struct Connects {
    pub ok: metrics::Counter,
    pub error: metrics::Counter,
}

impl Connects {
    /// Counters that count nowhere.
    pub fn noop() -> Self {
        Self {
            ok: metrics::Counter::noop(),
            error: metrics::Counter::noop(),
        }
    }
}

/// A connection waiting for its next request.
struct Parked {
    id: u64,
    sender: SendRequest<Body>,
    since: Instant,
}

/// The idle connections of every endpoint. The lock is never held across
/// an await.
struct Idle {
    by_endpoint: Mutex<HashMap<SocketAddr, Vec<Parked>>>,
    max_per_endpoint: usize,
    timeout: Duration,
}

impl Idle {
    /// An idle connection of `endpoint` that may still be open, the most
    /// recently parked first; those idle too long are let go on the way.
    fn take(&self, endpoint: SocketAddr) -> Option<(u64, SendRequest<Body>)> {
        let mut map = self.by_endpoint.lock().ok()?;
        let parked = map.get_mut(&endpoint)?;
        while let Some(p) = parked.pop() {
            if !p.sender.is_closed() && p.since.elapsed() < self.timeout {
                return Some((p.id, p.sender));
            }
        }
        None
    }

    /// Parks a connection whose last exchange ended cleanly, unless the
    /// endpoint has as many idle as it may keep (then it closes).
    fn park(&self, endpoint: SocketAddr, id: u64, sender: SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let Ok(mut map) = self.by_endpoint.lock() else {
            return;
        };
        let parked = map.entry(endpoint).or_default();
        if parked.len() >= self.max_per_endpoint {
            parked.retain(|p| !p.sender.is_closed());
        }
        if parked.len() >= self.max_per_endpoint {
            return;
        }
        parked.push(Parked {
            id,
            sender,
            since: Instant::now(),
        });
    }

    /// Takes connection `id` out if it has been idle for the timeout (or
    /// at once with `always`, when it has ended); whether it did. Lists
    /// left empty go, so an endpoint long gone leaves nothing behind once
    /// its last connection ended.
    fn expire(&self, endpoint: SocketAddr, id: u64, always: bool) -> bool {
        let Ok(mut map) = self.by_endpoint.lock() else {
            return false;
        };
        let Some(parked) = map.get_mut(&endpoint) else {
            return false;
        };
        let at = parked
            .iter()
            .position(|p| p.id == id && (always || p.since.elapsed() >= self.timeout));
        if let Some(at) = at {
            parked.remove(at);
        }
        if parked.is_empty() {
            map.remove(&endpoint);
        }
        at.is_some()
    }

    fn count(&self) -> usize {
        self.by_endpoint
            .lock()
            .map(|m| m.values().map(Vec::len).sum())
            .unwrap_or(0)
    }
}

/// HTTP/1.1 connections made with the connector `C` (plain TCP, or TLS).
pub struct H1Pool<C> {
    connector: C,
    /// `http`, or `https` through a TLS connector.
    scheme: http::uri::Scheme,
    builder: Builder,
    connect_timeout: Duration,
    idle: Arc<Idle>,
}

impl<C> std::fmt::Debug for H1Pool<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Pool")
            .field("idle", &self.idle.count())
            .finish_non_exhaustive()
    }
}

impl<C> H1Pool<C>
where
    C: Service<Uri> + Clone + Send + Sync + 'static,
    C::Response: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    pub fn new(connector: C, scheme: http::uri::Scheme, config: PoolConfig) -> Self {
        let mut builder = Builder::new();
        // Responses are streamed through: the read buffer per connection
        // stays at hyper's initial 8 KiB unless a large response head
        // needs more (up to MAX_RESPONSE_HEAD, not hyper's 400 KiB).
        builder.max_buf_size(MAX_RESPONSE_HEAD);
        Self {
            connector,
            scheme,
            builder,
            connect_timeout: config.connect_timeout,
            idle: Arc::new(Idle {
                by_endpoint: Mutex::new(HashMap::new()),
                max_per_endpoint: config.max_idle_per_endpoint,
                timeout: config.idle_timeout,
            }),
        }
    }

    /// Idle connections held now, over all endpoints.
    pub fn idle(&self) -> usize {
        self.idle.count()
    }

    /// Sends `request` (in origin form, with its `Host`) to `endpoint`,
    /// counting any connection made in `connects`. A request that an idle
    /// connection could not take (it closed meanwhile) goes to the next,
    /// or to a new one.
    pub async fn send(
        &self,
        endpoint: SocketAddr,
        connects: &Connects,
        mut request: Request<Body>,
    ) -> Result<Response<Body>, Failure> {
        let bodiless = request.body().is_end_stream();
        while let Some((id, mut sender)) = self.idle.take(endpoint) {
            // Ready at once, but for the moment between a response's end
            // and its connection asking for the next request.
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let lease = self.lease(endpoint, id, sender, bodiless);
                    return Ok(answered(lease, response));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) => request = unsent,
                    None => return Err(Failure::Reset(chain(e.error()))),
                },
            }
        }
        let (id, mut sender) = self.connect(endpoint, connects).await?;
        match sender.send_request(request).await {
            Ok(response) => Ok(answered(
                self.lease(endpoint, id, sender, bodiless),
                response,
            )),
            Err(e) => Err(Failure::Reset(chain(&e))),
        }
    }

    fn lease(
        &self,
        endpoint: SocketAddr,
        id: u64,
        sender: SendRequest<Body>,
        bodiless: bool,
    ) -> Lease {
        Lease {
            idle: self.idle.clone(),
            endpoint,
            id,
            sender,
            bodiless,
        }
    }

    /// Makes a connection to `endpoint` and spawns its driver.
    async fn connect(
        &self,
        endpoint: SocketAddr,
        connects: &Connects,
    ) -> Result<(u64, SendRequest<Body>), Failure> {
        let made = tokio::time::timeout(self.connect_timeout, self.handshake(endpoint))
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "{endpoint}: no connection within {:?}",
                    self.connect_timeout
                ))
            });
        let (sender, connection) = match made {
            Ok(made) => {
                connects.ok.increment(1);
                made
            }
            Err(e) => {
                connects.error.increment(1);
                return Err(Failure::Connect(e));
            }
        };
        let id = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(drive(
            connection,
            Arc::downgrade(&self.idle),
            endpoint,
            id,
            self.idle.timeout,
        ));
        Ok((id, sender))
    }

    async fn handshake(
        &self,
        endpoint: SocketAddr,
    ) -> Result<(SendRequest<Body>, Connection<C::Response, Body>), String> {
        let target = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(endpoint.to_string())
            .path_and_query("/")
            .build()
            .map_err(|e| format!("{endpoint}: {e}"))?;
        let io = self.connector.clone().oneshot(target).await.map_err(|e| {
            let e: BoxError = e.into();
            format!("{endpoint}: {}", chain(e.as_ref()))
        })?;
        self.builder
            .handshake(io)
            .await
            .map_err(|e| format!("{endpoint}: HTTP/1.1 handshake: {}", chain(&e)))
    }
}

/// The response, whose connection goes back to the pool when its body
/// ends cleanly.
fn answered(lease: Lease, response: Response<Incoming>) -> Response<Body> {
    // A switched connection belongs to the upgrade now.
    if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        return response.map(|body| body.map_err(Into::into).boxed());
    }
    if response.body().is_end_stream() {
        lease.give_back();
        return response.map(|body| body.map_err(Into::into).boxed());
    }
    response.map(|body| Leased::new(body, lease).boxed())
}

/// Drives one connection until it ends: the peer closed it, it failed,
/// it was let go (no sender left), or it sat idle in the pool for the
/// idle timeout.
async fn drive<T>(
    connection: Connection<T, Body>,
    idle: Weak<Idle>,
    endpoint: SocketAddr,
    id: u64,
    timeout: Duration,
) where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let connection = connection.with_upgrades();
    tokio::pin!(connection);
    let period = (timeout / 2).max(Duration::from_millis(5));
    let mut check = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ended = &mut connection => {
                if let Err(e) = ended {
                    tracing::debug!(%endpoint, error = %chain(&e), "upstream HTTP/1.1 connection ended");
                }
                if let Some(idle) = idle.upgrade() {
                    idle.expire(endpoint, id, true);
                }
                return;
            }
            _ = check.tick() => {
                let Some(idle) = idle.upgrade() else {
                    // The pool is gone: with its senders, and this one
                    // ends once its exchange in flight, if any, is done.
                    continue;
                };
                if idle.expire(endpoint, id, false) {
                    tracing::debug!(%endpoint, "idle upstream HTTP/1.1 connection closed");
                    return;
                }
            }
        }
    }
}

/// A connection lent to one exchange.
struct Lease {
    idle: Arc<Idle>,
    endpoint: SocketAddr,
    id: u64,
    sender: SendRequest<Body>,
    /// The request had no body: once the response ended, the connection
    /// is about to take the next request. With a body, it may still be
    /// sending it (an early answer), and goes back only if already ready.
    bodiless: bool,
}

impl Lease {
    fn give_back(self) {
        if self.bodiless || self.sender.is_ready() {
            self.idle.park(self.endpoint, self.id, self.sender);
        }
    }
}

/// A response body that gives its connection back when it ends cleanly:
/// read to its end, or known to be whole (hyper's server drops a body
/// once it says so, without reading its end). Dropped before that, or
/// failed, it takes the connection with it.
struct Leased {
    body: Incoming,
    lease: Option<Lease>,
    whole: AtomicBool,
}

impl Leased {
    fn new(body: Incoming, lease: Lease) -> Self {
        Self {
            body,
            lease: Some(lease),
            whole: AtomicBool::new(false),
        }
    }
}

impl HttpBody for Leased {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => {
                if let Some(lease) = self.lease.take() {
                    lease.give_back();
                }
            }
            Poll::Ready(Some(Err(_))) => self.lease = None,
            _ => {}
        }
        polled.map(|frame| frame.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        let end = self.body.is_end_stream();
        if end {
            self.whole.store(true, Ordering::Relaxed);
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Leased {
    fn drop(&mut self) {
        if self.whole.load(Ordering::Relaxed)
            && let Some(lease) = self.lease.take()
        {
            lease.give_back();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::uri::Scheme;
    use http_body_util::{Empty, Full};
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioIo;
    use std::convert::Infallible;
    use std::sync::atomic::AtomicUsize;

    /// Connections a test server saw opened and closed.
    #[derive(Default)]
    struct Seen {
        opened: AtomicUsize,
        closed: AtomicUsize,
        changed: tokio::sync::Notify,
    }

    /// An HTTP/1.1 server on loopback: `/close` answers with
    /// `connection: close`, `/big` with a body of 64 KiB, anything else
    /// with the Host it got.
    async fn server() -> (SocketAddr, Arc<Seen>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let counted = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.opened.fetch_add(1, Ordering::SeqCst);
                counted.changed.notify_waiters();
                let counted = counted.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let mut response = match req.uri().path() {
                            "/big" => Response::new(Full::new(Bytes::from(vec![b'x'; 64 * 1024]))),
                            path => {
                                let host = req.headers().get("host").cloned();
                                let text = host.map(|h| h.as_bytes().to_vec()).unwrap_or_default();
                                let mut r = Response::new(Full::new(Bytes::from(text)));
                                if path == "/close" {
                                    r.headers_mut()
                                        .insert("connection", "close".parse().unwrap());
                                }
                                r
                            }
                        };
                        *response.status_mut() = http::StatusCode::OK;
                        Ok::<_, Infallible>(response)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                    counted.closed.fetch_add(1, Ordering::SeqCst);
                    counted.changed.notify_waiters();
                });
            }
        });
        (addr, seen)
    }

    impl Seen {
        /// Waits until `closed` connections have closed.
        async fn closed(&self, closed: usize) {
            loop {
                let changed = self.changed.notified();
                if self.closed.load(Ordering::SeqCst) >= closed {
                    return;
                }
                changed.await;
            }
        }
    }

    fn request(path: &str, host: &str) -> Request<Body> {
        Request::builder()
            .uri(path)
            .header("host", host)
            .body(Empty::new().map_err(|e| match e {}).boxed())
            .unwrap()
    }

    fn pool(config: PoolConfig) -> H1Pool<HttpConnector> {
        H1Pool::new(HttpConnector::new(), Scheme::HTTP, config)
    }

    async fn read_all(response: Response<Body>) -> Bytes {
        response.into_body().collect().await.unwrap().to_bytes()
    }

    /// Waits until the pool holds `n` idle connections.
    async fn idle(pool: &H1Pool<HttpConnector>, n: usize) {
        while pool.idle() != n {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_response_was_read() {
        let (addr, seen) = server().await;
        let pool = pool(PoolConfig::default());
        let connects = Connects::noop();
        for host in ["a.shop", "b.shop", "c.shop"] {
            let response = pool
                .send(addr, &connects, request("/", host))
                .await
                .unwrap();
            assert_eq!(
                read_all(response).await,
                host.as_bytes(),
                "the client's Host goes on"
            );
            assert_eq!(pool.idle(), 1);
        }
        let response = pool
            .send(addr, &connects, request("/big", "a.shop"))
            .await
            .unwrap();
        assert_eq!(read_all(response).await.len(), 64 * 1024);
        assert_eq!(seen.opened.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle(), 1);
    }

    #[tokio::test]
    async fn a_body_known_whole_gives_its_connection_back_when_dropped() {
        // As hyper's server does: it stops reading once the body says it
        // has ended, and drops it.
        let (addr, seen) = server().await;
        let pool = pool(PoolConfig::default());
        let connects = Connects::noop();
        let response = pool
            .send(addr, &connects, request("/big", "a.shop"))
            .await
            .unwrap();
        let mut body = response.into_body();
        let mut read = 0;
        while !body.is_end_stream() {
            let frame = body.frame().await.unwrap().unwrap();
            read += frame.into_data().map(|d| d.len()).unwrap_or(0);
        }
        assert_eq!(read, 64 * 1024);
        assert_eq!(pool.idle(), 0, "not back while the body is held");
        drop(body);
        assert_eq!(pool.idle(), 1);
        let response = pool
            .send(addr, &connects, request("/", "a.shop"))
            .await
            .unwrap();
        read_all(response).await;
        assert_eq!(seen.opened.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_response_dropped_before_its_end_takes_its_connection_along() {
        let (addr, seen) = server().await;
        let pool = pool(PoolConfig::default());
        let connects = Connects::noop();
        let response = pool
            .send(addr, &connects, request("/big", "a.shop"))
            .await
            .unwrap();
        drop(response);
        seen.closed(1).await;
        assert_eq!(pool.idle(), 0);
        let response = pool
            .send(addr, &connects, request("/", "a.shop"))
            .await
            .unwrap();
        read_all(response).await;
        assert_eq!(seen.opened.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_the_server_closes_is_not_reused() {
        let (addr, seen) = server().await;
        let pool = pool(PoolConfig::default());
        let connects = Connects::noop();
        let response = pool
            .send(addr, &connects, request("/close", "a.shop"))
            .await
            .unwrap();
        read_all(response).await;
        seen.closed(1).await;
        let response = pool
            .send(addr, &connects, request("/", "a.shop"))
            .await
            .unwrap();
        assert_eq!(read_all(response).await, "a.shop".as_bytes());
        assert_eq!(seen.opened.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn concurrent_requests_get_connections_of_their_own_and_idle_ones_are_bounded() {
        let (addr, seen) = server().await;
        let config = PoolConfig {
            max_idle_per_endpoint: 2,
            ..PoolConfig::default()
        };
        let pool = pool(config);
        let connects = Connects::noop();
        // Four responses open at once: four connections.
        let mut open = Vec::new();
        for _ in 0..4 {
            open.push(
                pool.send(addr, &connects, request("/big", "a.shop"))
                    .await
                    .unwrap(),
            );
        }
        assert_eq!(seen.opened.load(Ordering::SeqCst), 4);
        for response in open {
            read_all(response).await;
        }
        assert_eq!(pool.idle(), 2, "two kept idle");
        seen.closed(2).await;
    }

    #[tokio::test]
    async fn idle_connections_close_even_when_the_pool_is_not_called() {
        let (addr, seen) = server().await;
        let config = PoolConfig {
            idle_timeout: Duration::from_millis(50),
            ..PoolConfig::default()
        };
        let pool = pool(config);
        let connects = Connects::noop();
        let response = pool
            .send(addr, &connects, request("/", "a.shop"))
            .await
            .unwrap();
        read_all(response).await;
        assert_eq!(pool.idle(), 1);
        seen.closed(1).await;
        idle(&pool, 0).await;
        let response = pool
            .send(addr, &connects, request("/", "a.shop"))
            .await
            .unwrap();
        read_all(response).await;
        assert_eq!(seen.opened.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn connects_are_counted_and_a_refused_one_is_a_connect_failure() {
        let recorder = metrics_util_counters();
        let (addr, _) = server().await;
        let pool = pool(PoolConfig::default());
        let connects = Connects {
            ok: recorder.0.clone(),
            error: recorder.1.clone(),
        };
        for _ in 0..3 {
            let response = pool
                .send(addr, &connects, request("/", "a.shop"))
                .await
                .unwrap();
            read_all(response).await;
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed = listener.local_addr().unwrap();
        drop(listener);
        let failure = pool.send(closed, &connects, request("/", "a.shop")).await;
        assert!(matches!(failure, Err(Failure::Connect(_))), "{failure:?}");
        assert_eq!(recorder.2.ok.load(Ordering::SeqCst), 1);
        assert_eq!(recorder.2.error.load(Ordering::SeqCst), 1);
    }

    /// Two counters that count into atomics.
    #[derive(Default)]
    struct Counts {
        ok: AtomicU64,
        error: AtomicU64,
    }

    struct Count(Arc<Counts>, bool);

    impl metrics::CounterFn for Count {
        fn increment(&self, value: u64) {
            let c = if self.1 { &self.0.ok } else { &self.0.error };
            c.fetch_add(value, Ordering::SeqCst);
        }
        fn absolute(&self, value: u64) {
            let c = if self.1 { &self.0.ok } else { &self.0.error };
            c.store(value, Ordering::SeqCst);
        }
    }

    fn metrics_util_counters() -> (metrics::Counter, metrics::Counter, Arc<Counts>) {
        let counts = Arc::new(Counts::default());
        (
            metrics::Counter::from_arc(Arc::new(Count(counts.clone(), true))),
            metrics::Counter::from_arc(Arc::new(Count(counts.clone(), false))),
            counts,
        )
    }
}
